"""The chain summary (robust_cxr.summary, summarize.py) on handmade reports, and the README's results block against the
recorded summary it is rendered from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from robust_cxr.summary import (
    README_BEGIN, README_END, RecommendationRule, chain_summary, read_chain, readme_results_block, render_summary, with_readme_results,
)
from summarize import main as summarize

RECORDED_SUMMARY = REPO / "docs" / "results" / "synthetic_chain.json"
PURIFIER = "purifier/ddim-1@t100"


def clean_row(model: str, defense: str, balanced_accuracy: float, sensitivity: float, n: int = 100) -> dict:
    return dict(model=model, defense=defense, attack="none", threat_model="none", norm="none", eps=0.0, steps=None, eot_samples=None, n=n,
                metric="accuracy", value=balanced_accuracy, clean_value=balanced_accuracy, balanced_accuracy=balanced_accuracy,
                sensitivity=sensitivity, clean_balanced_accuracy=balanced_accuracy, clean_sensitivity=sensitivity)


def attack_row(model: str, defense: str, attack: str, threat_model: str, balanced_accuracy: float, n: int = 100, eot_samples: int = 1) -> dict:
    return dict(model=model, defense=defense, attack=attack, threat_model=threat_model, norm="linf", eps=0.03, steps=10, eot_samples=eot_samples,
                n=n, metric="accuracy", value=balanced_accuracy + 0.01, clean_value=0.9, balanced_accuracy=balanced_accuracy, sensitivity=0.5,
                clean_balanced_accuracy=0.9, clean_sensitivity=0.9)


def worst_case_row(model: str, defense: str, attacks: list[str], balanced_accuracy: float, n: int = 64) -> dict:
    return dict(attack_row(model, defense, "worst_case", "whitebox", balanced_accuracy, n), steps=None, eot_samples=None,
                worst_of=", ".join(attacks))


def handmade_chain() -> dict:
    """Reports, costs and configs as `read_chain` returns them. Best clean: the teacher (0.92); the teacher + purifier is
    9 points below it, the fine-tuned one exactly 5; robust scores: teacher 0.18, fine-tuned 0.48, student 0.52."""
    teacher = [clean_row("teacher", "none", 0.92, 0.90), attack_row("teacher", "none", "fgsm", "whitebox", 0.40),
               attack_row("teacher", "none", "pgd10", "whitebox", 0.20), worst_case_row("teacher", "none", ["fgsm", "pgd10"], 0.18, n=100)]
    purify_finetune = [clean_row("teacher", "none", 0.92, 0.90), attack_row("teacher", "none", "pgd10_whitebox_eot2", "whitebox", 0.19, n=64)]
    for model, clean, sensitivity, graybox, whitebox, worst in (("teacher", 0.83, 0.88, 0.70, 0.42, 0.40), ("teacher_finetuned", 0.87, 0.87, 0.75, 0.50, 0.48)):
        purify_finetune += [clean_row(model, PURIFIER, clean, sensitivity), attack_row(model, PURIFIER, "pgd10_graybox", "graybox", graybox),
                            attack_row(model, PURIFIER, "pgd10_whitebox_eot2", "whitebox", whitebox, n=64, eot_samples=2),
                            worst_case_row(model, PURIFIER, ["pgd10_graybox", "pgd10_whitebox_eot2"], worst)]
    student = [clean_row("student", "none", 0.91, 0.86), attack_row("student", "none", "fgsm", "whitebox", 0.60),
               attack_row("student", "none", "pgd10", "whitebox", 0.55), attack_row("student", "none", "pgd10_transfer", "transfer", 0.85),
               worst_case_row("student", "none", ["fgsm", "pgd10", "pgd10_transfer"], 0.52, n=100),
               clean_row("teacher", "none", 0.92, 0.90), clean_row("teacher", PURIFIER, 0.83, 0.88),
               attack_row("teacher", PURIFIER, "pgd10_graybox", "graybox", 0.71)]
    costs = dict(device="cpu", models=[
        dict(model="student", parameters=70_000, latency_ms_batch1=0.5, latency_ms_batch64=5.0),
        dict(model="teacher", parameters=5_000_000, latency_ms_batch1=2.0, latency_ms_batch64=20.0),
        dict(model=f"teacher+{PURIFIER}", parameters=5_400_000, latency_ms_batch1=20.0, latency_ms_batch64=200.0),
    ])
    data = dict(source="synthetic", root=None, image_size=64, synthetic_samples=3000)
    configs = {stage: dict(data=data, trainer=dict(max_epochs=epochs, precision="32-true"))
               for stage, epochs in (("teacher", 15), ("purifier", 6), ("purify_finetune", 3), ("student", 10))}
    return dict(reports=dict(teacher=teacher, purify_finetune=purify_finetune, student=student), costs=costs, configs=configs)


def write_runs(chain: dict, runs: Path) -> Path:
    """`chain` (as `handmade_chain` returns it) written as the run directories of the chain under `runs`."""
    for stage, rows in chain["reports"].items():
        (runs / stage).mkdir(parents=True, exist_ok=True)
        (runs / stage / "robustness_report.json").write_text(json.dumps(rows))
    for stage, config in chain["configs"].items():
        (runs / stage).mkdir(parents=True, exist_ok=True)
        (runs / stage / "config.yaml").write_text(yaml.safe_dump(config))
    (runs / "student" / "model_costs.json").write_text(json.dumps(chain["costs"]))
    return runs


def models_by_name(summary: dict) -> dict[str, dict]:
    return {model["name"]: model for model in summary["models"]}


def test_each_figure_comes_from_the_report_that_has_it():
    models = models_by_name(chain_summary(**handmade_chain()))
    teacher, defended, finetuned, student = (models[name] for name in ("teacher", "teacher + purifier", "fine-tuned teacher + purifier", "student"))
    assert teacher["whitebox"]["report"] == "teacher" and teacher["whitebox"]["balanced_accuracy"] == 0.18  # not purify_finetune's 0.19
    assert teacher["graybox"] is None and student["graybox"] is None  # gray-box does not apply without a defense
    assert defended["defense"] == PURIFIER
    assert (defended["graybox"]["report"], defended["graybox"]["balanced_accuracy"]) == ("purify_finetune", 0.70)  # not the student's 0.71
    assert (defended["whitebox"]["report"], defended["whitebox"]["balanced_accuracy"], defended["whitebox"]["n"]) == ("purify_finetune", 0.40, 64)
    assert [attack["attack"] for attack in defended["whitebox"]["attacks"]] == ["pgd10_graybox", "pgd10_whitebox_eot2"]
    assert finetuned["cost"] == dict(defended["cost"], cost_model=f"teacher+{PURIFIER}")  # the teacher's architecture behind the purifier
    assert student["cost"]["parameters"] == 70_000 and student["clean"]["report"] == "student"


def test_a_worst_case_row_counts_only_for_exactly_its_attacks():
    chain = handmade_chain()
    models = models_by_name(chain_summary(**chain))
    graybox = models["teacher + purifier"]["graybox"]  # its worst-case row also covers the white-box attack
    assert (graybox["how"], graybox["balanced_accuracy"]) == ("single attack", 0.70)
    assert models["student"]["whitebox"]["how"] == "per-image worst case"  # white-box and transfer: all the student's attacks
    chain["reports"]["teacher"] = [row for row in chain["reports"]["teacher"] if row["attack"] != "worst_case"]
    whitebox = models_by_name(chain_summary(**chain))["teacher"]["whitebox"]
    assert whitebox["balanced_accuracy"] == 0.20 and whitebox["how"].startswith("lowest single attack, pgd10")
    assert "--adversarial.worst_case true" in whitebox["how"]


def test_the_rule_admits_by_clean_accuracy_and_sensitivity_and_ranks_by_the_lower_robust_figure():
    summary = chain_summary(**handmade_chain())
    models = models_by_name(summary)
    assert models["teacher + purifier"]["verdict"] == "not admitted: clean balanced accuracy 9.0 points below the best"
    assert models["fine-tuned teacher + purifier"]["verdict"] == "admitted"  # exactly 5 points below
    assert models["fine-tuned teacher + purifier"]["robust_score"] == 0.48  # below its gray-box 0.75
    assert summary["recommendation"]["model"] == "student" and models["student"]["verdict"] == "recommended"
    assert "student 0.520" in summary["recommendation"]["reason"]
    floor = chain_summary(**handmade_chain(), rule=RecommendationRule(sensitivity_floor=0.865))
    assert floor["recommendation"]["model"] == "fine-tuned teacher + purifier"
    assert models_by_name(floor)["student"]["verdict"] == "not admitted: sensitivity 0.860 below 0.865"


def test_tied_robust_scores_go_to_the_cheaper_model():
    chain = handmade_chain()
    chain["costs"]["models"][0]["latency_ms_batch1"] = 50.0  # the student now slower than the teacher + purifier (20 ms)
    summary = chain_summary(**chain, rule=RecommendationRule(tie_margin=0.05))
    assert summary["recommendation"]["model"] == "fine-tuned teacher + purifier"  # 0.48 ties the student's 0.52 within 5 points
    assert "costs least of them (20.00 ms at batch 1" in summary["recommendation"]["reason"]


def test_no_admitted_model_is_no_recommendation_with_the_reasons():
    summary = chain_summary(**handmade_chain(), rule=RecommendationRule(sensitivity_floor=0.95))
    assert summary["recommendation"]["model"] is None
    reason = summary["recommendation"]["reason"]
    assert reason.startswith("No model meets the rule") and "student, not admitted: sensitivity 0.860 below 0.95" in reason
    assert "**No recommendation.**" in render_summary(summary)


def test_the_chain_line_names_one_precision_or_each_stages():
    chain = handmade_chain()
    assert "64 px, precision 32-true; epochs: teacher 15, purifier 6" in render_summary(chain_summary(**chain))
    chain["configs"]["purifier"]["trainer"]["precision"] = "bf16-mixed"
    line = render_summary(chain_summary(**chain)).splitlines()[0]
    assert "precision: teacher 32-true, purifier bf16-mixed, purify_finetune 32-true, student 32-true; epochs:" in line


@pytest.mark.parametrize(("missing", "stage_to_run"), [
    ("purify_finetune/robustness_report.json", "configs/purify_finetune.yaml"),
    ("student/model_costs.json", "configs/distill.yaml"),
    ("purifier/config.yaml", "configs/purifier.yaml"),
])
def test_a_missing_run_file_names_the_stage_to_run(tmp_path, missing, stage_to_run):
    runs = write_runs(handmade_chain(), tmp_path / "runs")
    (runs / missing).unlink()
    with pytest.raises(FileNotFoundError, match=f"{missing}.* is missing: run the .*{stage_to_run}"):
        read_chain(runs)


def test_summarize_writes_the_summary_and_the_readme_block_and_rerenders_it_from_json(tmp_path, capsys):
    runs = write_runs(handmade_chain(), tmp_path / "runs")
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\n## Results\n\n{README_BEGIN}\nstale figures\n{README_END}\n\n## Next\n")
    summary = summarize([str(runs), "--readme", str(readme)])
    markdown = render_summary(summary)
    assert markdown in capsys.readouterr().out
    assert (runs / "SUMMARY.md").read_text() == f"# Chain summary\n\n{markdown}"
    assert json.loads((runs / "SUMMARY.json").read_text()) == summary
    text = readme.read_text()
    assert readme_results_block(text) == markdown.strip("\n") and "stale" not in text
    assert text.startswith("# Title\n\n## Results\n\n") and text.endswith(f"{README_END}\n\n## Next\n")
    assert render_summary(json.loads((runs / "SUMMARY.json").read_text())) == markdown
    assert "| student | 0.910 | 0.860 | - | - | 0.530 | 0.520 | 0.520 | 70,000 | 0.50 | 5.00 | recommended |" in markdown
    with pytest.raises(ValueError, match="made with its own rule"):
        summarize([str(runs / "SUMMARY.json"), "--tie_margin", "0.02"])


def test_a_readme_without_results_markers_is_a_clear_error():
    with pytest.raises(ValueError, match="no results block.*<!-- results:begin -->"):
        with_readme_results("## Results\n\nfigures\n", "table")


def test_the_readme_results_block_is_the_rendering_of_the_recorded_summary():
    """Regenerate both after a chain: record runs/SUMMARY.json as docs/results/synthetic_chain.json, then
    `python summarize.py docs/results/synthetic_chain.json --readme README.md`."""
    recorded = render_summary(json.loads(RECORDED_SUMMARY.read_text()))
    assert readme_results_block((REPO / "README.md").read_text()) == recorded.strip("\n"), (
        f"README.md's results block differs from {RECORDED_SUMMARY.relative_to(REPO)}: "
        f"run `python summarize.py {RECORDED_SUMMARY.relative_to(REPO)} --readme README.md`."
    )
