"""The chain's decision: one entry per deployable model (teacher, teacher + purifier, fine-tuned teacher + purifier,
student) with its clean, gray-box and white-box figures, read from the stages' robustness reports, its cost, read from
the student stage's cost table, and the model a stated rule (`RecommendationRule`) recommends.

`read_chain` reads a runs directory; `chain_summary`, `render_summary` and the README helpers are pure functions of
what it read, so that a recorded summary (SUMMARY.json) renders again to the same Markdown.

Where each figure of a model comes from: the first report, in the model's order (`Deployable.reports`), that has it.
- clean: the ``none`` row, every test image;
- gray-box: the attacks of threat model ``graybox`` (crafted on the classifier alone, scored through the defense);
  it does not apply to a model without a defense;
- white-box: every attack that report ran on the model, once one of them is white-box (or adaptive): an attacker who
  knows the whole pipeline can run any of them.
A figure over several attacks is the report's per-image ``worst_case`` row when that row covers exactly those attacks
(run_chain.sh turns those rows on), else the lowest of the single attacks, which the figure says.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import yaml

from robust_cxr.evaluation import WORST_CASE

STAGE_CONFIGS = {"teacher": "teacher", "purifier": "purifier", "purify_finetune": "purify_finetune", "student": "distill"}  # run directory -> configs/<name>.yaml
REPORTED_STAGES = ("teacher", "purify_finetune", "student")  # the stages with a robustness report
REPORT_FILE = "robustness_report.json"
COST_STAGE, COST_FILE = "student", "model_costs.json"
WHITEBOX_THREATS = ("whitebox", "adaptive")  # threat models whose attacker knows the whole pipeline
README_BEGIN, README_END = "<!-- results:begin -->", "<!-- results:end -->"


@dataclass(frozen=True)
class Deployable:
    """A model the chain can deploy: its display `name`, its `model` in the reports, whether it sits behind the
    purify-then-fine-tune stage's purifier (`defended`), the stages whose reports hold its figures, searched in order,
    and its row of the cost table (``{defense}``: the purifier's label)."""

    name: str
    model: str
    defended: bool
    reports: tuple[str, ...]
    cost_model: str


DEPLOYABLE = (
    Deployable("teacher", "teacher", False, ("teacher", "purify_finetune", "student"), "teacher"),
    Deployable("teacher + purifier", "teacher", True, ("purify_finetune", "student"), "teacher+{defense}"),
    # The teacher's architecture behind the same purifier: the cost table's teacher + purifier row.
    Deployable("fine-tuned teacher + purifier", "teacher_finetuned", True, ("purify_finetune",), "teacher+{defense}"),
    Deployable("student", "student", False, ("student",), "student"),
)


@dataclass(frozen=True)
class RecommendationRule:
    """Admits the models whose clean balanced accuracy is within `clean_margin` of the best model's, whose clean
    sensitivity is at least `sensitivity_floor` and that have a white-box figure; recommends the admitted model of
    highest robust score (the lower of its gray-box and white-box worst-case robust balanced accuracies). Scores within
    `tie_margin` of the highest tie; of tied models the one of lowest latency at batch 1, then fewest parameters, wins."""

    clean_margin: float = 0.05
    sensitivity_floor: float = 0.85
    tie_margin: float = 0.01


def rule_text(rule: dict) -> str:
    """The rule (`RecommendationRule` as a dict) in words, with its numbers."""
    return (f"among the models whose clean balanced accuracy is within {_points(rule['clean_margin'])} of the best model's, "
            f"whose clean sensitivity is at least {rule['sensitivity_floor']:g} and that have a white-box figure, the one of highest "
            "robust score, the lower of its gray-box and white-box worst-case robust balanced accuracies; scores within "
            f"{_points(rule['tie_margin'])} of the highest tie, and of tied models the one of lowest latency at batch 1, "
            "then of fewest parameters, wins.")


def read_chain(runs_dir: str | Path) -> dict:
    """The robustness reports (``reports``: stage -> rows), the cost table (``costs``) and the resolved configs
    (``configs``: stage -> dict) of the chain's runs under `runs_dir`; FileNotFoundError naming the stage to run for a
    missing one."""
    runs = Path(runs_dir)
    if not runs.is_dir():
        raise NotADirectoryError(f"{runs} is not a directory: run the chain first (`bash run_chain.sh`), or pass the folder holding "
                                 f"{', '.join(STAGE_CONFIGS)}.")
    return dict(
        reports={stage: _read_stage_file(runs, stage, REPORT_FILE, json.loads) for stage in REPORTED_STAGES},
        costs=_read_stage_file(runs, COST_STAGE, COST_FILE, json.loads),
        configs={stage: _read_stage_file(runs, stage, "config.yaml", yaml.safe_load) for stage in STAGE_CONFIGS},
    )


def _read_stage_file(runs: Path, stage: str, name: str, parse: Callable[[str], object]):
    path = runs / stage / name
    if not path.is_file():
        config = STAGE_CONFIGS[stage]
        raise FileNotFoundError(f"{path} is missing: run the {config} stage first, `python train.py --config configs/{config}.yaml --run_dir "
                                f"{runs / stage}` (for runs/: `STAGES={config} bash run_chain.sh`).")
    return parse(path.read_text())


def chain_summary(reports: dict[str, list[dict]], costs: dict, configs: dict[str, dict], rule: RecommendationRule = RecommendationRule(),
                  runs_dir: str = "runs") -> dict:
    """The summary of the chain (what `read_chain` returns): ``runs_dir``, ``chain`` (its data and training settings),
    ``cost_device``, ``models`` (per `DEPLOYABLE` model: ``clean``, ``graybox``, ``whitebox`` figures or None, ``cost``
    or None, ``robust_score`` and the rule's ``verdict``), ``rule`` and ``recommendation`` (``model`` or None, ``reason``)."""
    defense = _purifier_label(reports["purify_finetune"])
    cost_rows = {row["model"]: row for row in costs["models"]}
    models = [_model_figures(spec, reports, defense, cost_rows) for spec in DEPLOYABLE]
    rule_settings = asdict(rule)
    return dict(runs_dir=str(runs_dir), chain=_chain_settings(configs), cost_device=costs["device"], models=models, rule=rule_settings,
                recommendation=_recommend(models, rule_settings))


def _purifier_label(rows: list[dict]) -> str:
    """The defense of the fine-tuned teacher in the purify-then-fine-tune report, e.g. ``purifier/ddim-1@t100``."""
    defenses = {row["defense"] for row in rows if row["model"] == "teacher_finetuned"}
    if len(defenses) != 1:
        raise ValueError(f"The purify_finetune report should hold the fine-tuned teacher behind one purifier, it holds defenses {sorted(defenses)}: "
                         "rerun its test (`python train.py --config configs/purify_finetune.yaml`) without --adversarial.subjects.")
    return defenses.pop()


def _model_figures(spec: Deployable, reports: dict[str, list[dict]], defense: str, cost_rows: dict[str, dict]) -> dict:
    subject_defense = defense if spec.defended else "none"
    subjects = {stage: [row for row in reports[stage] if row["model"] == spec.model and row["defense"] == subject_defense
                        and row["metric"] == "accuracy"] for stage in spec.reports}
    clean = _first_figure(subjects, _clean_figure)
    if clean is None:
        raise ValueError(f"No report of {list(spec.reports)} has a clean row of {spec.model} with defense {subject_defense}: rerun those "
                         "stages' tests without --adversarial.subjects.")
    cost_model = spec.cost_model.format(defense=defense)
    cost = cost_rows.get(cost_model)
    return dict(
        name=spec.name, model=spec.model, defense=subject_defense, clean=clean,
        graybox=_first_figure(subjects, _graybox_figure) if spec.defended else None,
        whitebox=_first_figure(subjects, _whitebox_figure),
        cost=None if cost is None else dict(cost_model=cost_model, parameters=cost["parameters"], latency_ms_batch1=cost["latency_ms_batch1"],
                                            latency_ms_batch64=cost["latency_ms_batch64"]),
    )


def _first_figure(subjects: dict[str, list[dict]], figure: Callable[[list[dict]], dict | None]) -> dict | None:
    """`figure` of the first stage's rows that have it, with ``report``: that stage."""
    for stage, rows in subjects.items():
        found = figure(rows)
        if found is not None:
            return dict(found, report=stage)
    return None


def _clean_figure(rows: list[dict]) -> dict | None:
    row = next((row for row in rows if row["attack"] == "none"), None)
    if row is None:
        return None
    return dict(accuracy=row["clean_value"], balanced_accuracy=row["clean_balanced_accuracy"], sensitivity=row.get("clean_sensitivity"), n=row["n"],
                how="clean images", attacks=[])


def _attack_rows(rows: list[dict]) -> list[dict]:
    return [row for row in rows if row["attack"] not in ("none", WORST_CASE)]


def _graybox_figure(rows: list[dict]) -> dict | None:
    return _worst_case_figure(rows, [row for row in _attack_rows(rows) if row["threat_model"] == "graybox"])


def _whitebox_figure(rows: list[dict]) -> dict | None:
    attacks = _attack_rows(rows)
    return _worst_case_figure(rows, attacks) if any(row["threat_model"] in WHITEBOX_THREATS for row in attacks) else None


def _worst_case_figure(rows: list[dict], attacks: list[dict]) -> dict | None:
    """The figure over `attacks` (report rows of one subject; None if there are none): the subject's worst-case row of
    exactly those attacks, one attack's row, or the lowest single attack by balanced accuracy, then accuracy."""
    if not attacks:
        return None
    labels = {row["attack"] for row in attacks}
    worst_case = next((row for row in rows if row["attack"] == WORST_CASE and set(row["worst_of"].split(", ")) == labels), None)
    if worst_case is not None:
        row, how = worst_case, "per-image worst case"
    elif len(attacks) == 1:
        row, how = attacks[0], "single attack"
    else:
        row = min(attacks, key=lambda attack: (attack["balanced_accuracy"], attack["value"]))
        how = f"lowest single attack, {row['attack']} (the report has no worst_case row: test with --adversarial.worst_case true)"
    settings = ("attack", "threat_model", "norm", "eps", "steps", "eot_samples", "n")
    return dict(accuracy=row["value"], balanced_accuracy=row["balanced_accuracy"], sensitivity=row.get("sensitivity"), n=row["n"], how=how,
                attacks=[{key: attack[key] for key in settings} for attack in attacks])


def _chain_settings(configs: dict[str, dict]) -> dict:
    """The teacher's data settings and each stage's epochs and precision, from the runs' resolved configs."""
    data = configs["teacher"]["data"]
    return dict(data_source=data["source"], data_root=data.get("root"), image_size=data["image_size"],
                synthetic_samples=data["synthetic_samples"] if data["source"] == "synthetic" else None,
                max_epochs={stage: config["trainer"]["max_epochs"] for stage, config in configs.items()},
                precision={stage: config["trainer"]["precision"] for stage, config in configs.items()})


def robust_score(model: dict) -> float | None:
    """The lower of a summary model's gray-box and white-box worst-case robust balanced accuracies (None without either)."""
    scores = [figure["balanced_accuracy"] for figure in (model["graybox"], model["whitebox"]) if figure is not None]
    return min(scores) if scores else None


def _recommend(models: list[dict], rule: dict) -> dict:
    """Applies `rule` to `models`: sets each one's ``robust_score`` and ``verdict`` (why the rule admits it or not);
    returns ``model`` (the recommended one's name, None if none is admitted) and ``reason``."""
    best_clean = max(model["clean"]["balanced_accuracy"] for model in models)
    admitted = []
    for model in models:
        model["robust_score"] = robust_score(model)
        problems = []
        gap = best_clean - model["clean"]["balanced_accuracy"]
        if round(gap, 9) > rule["clean_margin"]:
            problems.append(f"clean balanced accuracy {100 * gap:.1f} points below the best")
        sensitivity = model["clean"]["sensitivity"]
        if sensitivity is not None and sensitivity < rule["sensitivity_floor"]:
            problems.append(f"sensitivity {sensitivity:.3f} below {rule['sensitivity_floor']:g}")
        if model["whitebox"] is None:
            problems.append("no white-box figure")
        model["verdict"] = "not admitted: " + "; ".join(problems) if problems else "admitted"
        if not problems:
            admitted.append(model)
    if not admitted:
        return dict(model=None, reason="No model meets the rule: " + "; ".join(f"{model['name']}, {model['verdict']}" for model in models) + ".")
    highest = max(model["robust_score"] for model in admitted)
    tied = [model for model in admitted if round(highest - model["robust_score"], 9) <= rule["tie_margin"]]
    chosen = min(tied, key=_cost_key)
    chosen["verdict"] = "recommended"
    scores = ", ".join(f"{model['name']} {model['robust_score']:.3f}" for model in admitted)
    if len(tied) == 1:
        reason = f"{chosen['name']} has the highest robust score of the admitted models ({scores})."
    else:
        reason = (f"{', '.join(model['name'] for model in tied)} score within {_points(rule['tie_margin'])} of the highest robust score of the "
                  f"admitted models ({scores}); {chosen['name']} costs least of them ({_cost_text(chosen['cost'])}).")
    return dict(model=chosen["name"], reason=reason)


def _cost_key(model: dict) -> tuple[float, float]:
    cost = model["cost"]
    return (float("inf"), float("inf")) if cost is None else (cost["latency_ms_batch1"], cost["parameters"])


def _cost_text(cost: dict | None) -> str:
    return "cost not measured" if cost is None else f"{cost['latency_ms_batch1']:.2f} ms at batch 1, {cost['parameters']:,} parameters"


def render_summary(summary: dict) -> str:
    """The summary (`chain_summary`) as Markdown without a heading: the chain's settings, the table of models, the
    recommendation, the rule and what each figure covers."""
    chain, runs = summary["chain"], summary["runs_dir"]
    data = (f"synthetic data ({chain['synthetic_samples']} images)" if chain["data_source"] == "synthetic"
            else f"{chain['data_source']} data ({Path(chain['data_root']).name})")
    epochs = ", ".join(f"{stage} {epochs}" for stage, epochs in chain["max_epochs"].items())
    precisions = chain["precision"]
    precision = (f"precision {next(iter(precisions.values()))}" if len(set(precisions.values())) == 1
                 else "precision: " + ", ".join(f"{stage} {value}" for stage, value in precisions.items()))
    lines = [
        f"Chain: {data}, {chain['image_size']} px, {precision}; epochs: {epochs}. Figures from `{runs}/<stage>/{REPORT_FILE}`, "
        f"costs from `{runs}/{COST_STAGE}/{COST_FILE}` (measured on {summary['cost_device']}). Robust accuracy counts an image right "
        "both clean and attacked. Gray-box: attacks crafted on the classifier alone, scored through the defense; white-box: every "
        "attack the report ran on the model, once one of them is white-box (an attacker who knows the whole pipeline can run any "
        "of them); each the per-image worst case over its attacks where the report has it. `-`: the threat model does not apply "
        "(gray-box: no defense) or no report has the figure.",
        "",
        "| model | clean balanced acc. | clean sensitivity | gray-box robust acc. | gray-box robust balanced acc. | white-box robust acc. "
        "| white-box robust balanced acc. | robust score | parameters | ms at batch 1 | ms at batch 64 | rule |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model in summary["models"]:
        clean, graybox, whitebox, cost = model["clean"], model["graybox"], model["whitebox"], model["cost"]
        cells = [model["name"], _number(clean["balanced_accuracy"]), _number(clean["sensitivity"]),
                 *[_number(None if figure is None else figure[key]) for figure in (graybox, whitebox) for key in ("accuracy", "balanced_accuracy")],
                 _number(model["robust_score"]),
                 "-" if cost is None else f"{cost['parameters']:,}", "-" if cost is None else f"{cost['latency_ms_batch1']:.2f}",
                 "-" if cost is None else f"{cost['latency_ms_batch64']:.2f}", model["verdict"]]
        lines.append("| " + " | ".join(cells) + " |")
    recommended = summary["recommendation"]["model"]
    lines += [
        "",
        f"**Recommended: {recommended}.** {summary['recommendation']['reason']}" if recommended else f"**No recommendation.** {summary['recommendation']['reason']}",
        "",
        f"Rule: {rule_text(summary['rule'])}",
        "",
        "What each figure covers (`n`: test images; cost rows of the fine-tuned teacher + purifier are the teacher + purifier's, the same "
        "architecture behind the same purifier):",
        "",
        "| model | figure | report | how | attacks | n |",
        "|---|---|---|---|---|---|",
    ]
    for model in summary["models"]:
        for figure_name, figure in (("clean", model["clean"]), ("gray-box", model["graybox"]), ("white-box", model["whitebox"])):
            if figure is not None:
                attacks = "; ".join(_attack_text(attack) for attack in figure["attacks"]) or "-"
                lines.append(f"| {model['name']} | {figure_name} | `{runs}/{figure['report']}/{REPORT_FILE}` | {figure['how']} "
                             f"| {attacks} | {figure['n']} |")
        if model["cost"] is not None:
            lines.append(f"| {model['name']} | cost | `{runs}/{COST_STAGE}/{COST_FILE}` | row {model['cost']['cost_model']} | - | - |")
    return "\n".join(lines) + "\n"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _attack_text(attack: dict) -> str:
    """E.g. ``pgd10_whitebox_eot2 (whitebox, linf eps 0.03, steps 10, EOT 2, n 64)``."""
    executed = "".join(f", {name} {attack[key]}" for name, key in (("steps", "steps"), ("EOT", "eot_samples")) if attack[key] is not None)
    return f"{attack['attack']} ({attack['threat_model']}, {attack['norm']} eps {attack['eps']:g}{executed}, n {attack['n']})"


def _points(share: float) -> str:
    """A share in [0, 1] as percentage points, e.g. ``5 points``."""
    return f"{100 * share:g} point" + ("" if 100 * share == 1 else "s")


def readme_results_block(readme: str) -> str:
    """The text between the README's `README_BEGIN` and `README_END` markers, without the newlines next to them."""
    begin, end = readme.find(README_BEGIN), readme.find(README_END)
    if begin < 0 or end < begin:
        raise ValueError(f"The README has no results block: put `{README_BEGIN}` and, after it, `{README_END}` on lines of their own in its "
                         "Results section.")
    return readme[begin + len(README_BEGIN):end].strip("\n")


def with_readme_results(readme: str, block: str) -> str:
    """`readme` with the text between its results markers replaced by `block` (see `readme_results_block`)."""
    readme_results_block(readme)  # checks the markers
    before, rest = readme.split(README_BEGIN, 1)
    after = rest.split(README_END, 1)[1]
    block = block.strip("\n")
    return f"{before}{README_BEGIN}\n{block}\n{README_END}{after}"
