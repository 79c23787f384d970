"""The floor of benchmarks/teacher_seeds.py on handmade per-seed results (the benchmark itself trains three teachers)."""

from __future__ import annotations

import pytest

from benchmarks.teacher_seeds import CONFIG, FLOOR, floor_misses, markdown_table, seed_statistics


def seed_run(seed: int, accuracy: float, sensitivity: float) -> dict:
    return dict(seed=seed, accuracy=accuracy, balanced_accuracy=accuracy - 0.01, sensitivity=sensitivity, wall_seconds=100.0 + seed)


def test_the_floor_holds_for_stable_seeds_and_names_each_bound_missed():
    stable = seed_statistics([seed_run(0, 0.93, 0.90), seed_run(1, 0.90, 0.88), seed_run(2, 0.92, 0.86)])
    assert stable["mean_accuracy"] == pytest.approx(0.9166667) and stable["spread_accuracy"] == pytest.approx(0.03)
    assert stable["mean_wall_seconds"] == pytest.approx(101.0)
    assert floor_misses(stable) == []
    unstable = seed_statistics([seed_run(0, 0.93, 0.90), seed_run(1, 0.87, 0.84), seed_run(2, 0.89, 0.90)])
    assert floor_misses(unstable) == ["mean accuracy 0.897 < 0.9", "lowest accuracy 0.870 < 0.88", "lowest sensitivity 0.840 < 0.85"]
    table = markdown_table(dict(device="cpu", commit="abc1234", overrides=[], runs=[seed_run(1, 0.87, 0.84)], summary=unstable,
                                floor=FLOOR, floor_misses=floor_misses(unstable)))
    assert table.startswith(f"Default teacher ({CONFIG}) per seed, data seed fixed; commit abc1234; cpu;")
    assert "| 1 | 0.870 | 0.860 | 0.840 | 101 |" in table and "| lowest | 0.870 | 0.860 | 0.840 | |" in table
    assert table.rstrip().endswith("missed: mean accuracy 0.897 < 0.9; lowest accuracy 0.870 < 0.88; lowest sensitivity 0.840 < 0.85.")
