"""Every W&B sweep drives train.py with plain overrides: each parameter value parses and lands in its config."""

from __future__ import annotations

import contextlib
import io
import re

import pytest
import yaml

from conftest import CONFIGS, REPO
from robust_cxr.attacks import AttackSpec

SWEEP_FILES = sorted((CONFIGS / "sweeps").glob("*.yaml"))


def sweep_samples(parameter: dict) -> list:
    """The values of a sweep parameter to check: every listed value, or the bounds and midpoint of a distribution."""
    if "values" in parameter:
        return list(parameter["values"])
    if "value" in parameter:
        return [parameter["value"]]
    low, high = parameter["min"], parameter["max"]
    middle = (low + high) // 2 if parameter.get("distribution", "").startswith("int") else (low + high) / 2
    return [low, middle, high]


def fixed_arguments(sweep: dict) -> list[str]:
    """The train.py arguments of the sweep's command between the program and `${args}`."""
    command = sweep["command"]
    return [str(part) for part in command[command.index("${program}") + 1:command.index("${args}")]]


def printed_config(arguments: list[str]) -> dict:
    """The config train.py resolves from `arguments` (its --print_config output), parsed in this process."""
    from train import build_cli

    output, errors = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(errors), pytest.raises(SystemExit) as exit_info:
        build_cli([*arguments, "--print_config"])
    assert exit_info.value.code in (0, None), errors.getvalue()
    return yaml.safe_load(output.getvalue())


def lookup(config: dict, dotted_key: str):
    for key in dotted_key.split("."):
        config = config[key]
    return config


def test_there_is_a_sweep_for_the_student_and_the_purifier():
    assert {path.stem for path in SWEEP_FILES} >= {"student", "purifier"}


@pytest.mark.parametrize("sweep_file", SWEEP_FILES, ids=lambda path: path.stem)
def test_every_sweep_value_is_a_valid_override_of_its_config(sweep_file, single_thread):
    sweep = yaml.safe_load(sweep_file.read_text())
    assert sweep["program"] == "train.py" and sweep["command"][:3] == ["${env}", "python", "${program}"]
    fixed = fixed_arguments(sweep)
    config_file = REPO / fixed[fixed.index("--config") + 1]
    assert config_file.is_file(), f"{sweep_file.name} drives {config_file}, which does not exist"
    assert "--resume" in fixed and fixed[fixed.index("--resume") + 1] == "never", "sweep runs must not resume each other"

    base = printed_config(fixed)
    attack_labels = {AttackSpec(**spec).label for spec in base["adversarial"]["attacks"]}
    metric = re.fullmatch(r"(val|test)/robust_acc/([^/]+)(/.+)?", sweep["metric"]["name"])
    assert metric and metric.group(2) in attack_labels, f"{sweep['metric']['name']} is no robust accuracy of {sorted(attack_labels)}"
    assert sweep["metric"]["goal"] == "maximize"

    for name, parameter in sweep["parameters"].items():
        for value in sweep_samples(parameter):
            override = f"--{name}={value}"  # how the W&B agent writes ${args}
            assert lookup(printed_config([*fixed, override]), name) == value, override
