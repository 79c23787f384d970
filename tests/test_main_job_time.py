"""benchmarks/main_job_time.py on handmade chain output and summaries (the benchmark itself installs and runs the chain)."""

from __future__ import annotations

import copy

import pytest

from benchmarks.main_job_time import figures, markdown_table, stage_seconds

CHAIN_OUTPUT = (
    "=== [1/2] teacher: python train.py --config configs/teacher.yaml --adversarial.worst_case true  (elapsed 0 s)\n"
    "Epoch 0:  50%|#####     | 1/2 [00:01<00:01]\rEpoch 0: 100%|##########| 2/2 [00:02<00:00]\n"
    "=== [2/2] purifier: python train.py --config configs/purifier.yaml --adversarial.worst_case true  (elapsed 142 s)\r"
    "=== chain finished in 325 s\n=== summary: python summarize.py runs\n"
)


def test_each_stage_runs_from_its_line_to_the_next_and_a_failed_chain_is_named():
    assert stage_seconds(CHAIN_OUTPUT) == {"teacher": 142, "purifier": 183}
    with pytest.raises(ValueError, match="did the chain fail"):
        stage_seconds(CHAIN_OUTPUT.split("=== chain finished")[0])


def test_the_figures_compared_with_the_readme_leave_the_latencies_out():
    model = dict(name="student", clean=dict(balanced_accuracy=0.918), graybox=None, whitebox=dict(balanced_accuracy=0.436),
                 verdict="recommended", cost=dict(latency_ms_batch1=0.64))
    rerun = copy.deepcopy(model)
    rerun["cost"]["latency_ms_batch1"] = 1.45
    assert figures(dict(models=[model])) == figures(dict(models=[rerun]))
    rerun["whitebox"]["balanced_accuracy"] = 0.437
    assert figures(dict(models=[model])) != figures(dict(models=[rerun]))


def test_the_table_gives_each_step_and_the_ratio_to_the_target():
    result = dict(commit="abc1234", device="cpu", processor="x86_64", cpu_cores=2, install_seconds=132.4,
                  stage_seconds={"teacher": 142, "purifier": 183}, chain_seconds=331.0, total_seconds=463.4,
                  ratio_to_target=463.4 / 900, figures_equal_readme=False)
    table = markdown_table(result)
    assert table.startswith("Main job from a fresh clone of commit abc1234,")
    assert "| teacher | 142 |" in table and "| reports and summary printed | 6 |" in table and "| **install and chain** | **463** |" in table
    assert "Ratio to the 15-minute target: 0.51 (met)." in table and "equal the README's (docs/results/synthetic_chain.json): no." in table
