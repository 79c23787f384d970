"""A classifier behind a purifier measured over the purifier's strength (t* for diffusion, sigma for NIM), and the choice
of a strength on that frontier: the core that `benchmarks/purifier_tradeoff.py` and `select_strength.py` share.

Every subject is evaluated as the robustness report evaluates it (`robust_cxr.evaluation.SuiteEvaluation`), batch by
batch with the report's seeding: the clean and the attacked images are scored on independent draws of the purifier,
every strength on the same draws. Robust means right both clean and attacked (the report's definition).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from robust_cxr.attacks import AttackSpec
from robust_cxr.evaluation import BATCH_SEED_STRIDE, Observer, SuiteEvaluation, seeded_global_rng
from robust_cxr.purification import PurifiedClassifier, load_purifier, resolve_purifier_settings
from robust_cxr.tasks import ClassificationTask
from robust_cxr.threat import DefendedModel

SelectionMetric = Literal["acc", "balanced_acc"]
Criterion = Literal["clean_drop", "fid"]


def stratified_images(dataset: Dataset, max_images: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The images of index < `max_images` (all if None) of a split stored class-interleaved (`ChestXRayDataModule`), a
    class-stratified subset: images (N, C, H, W) in [0, 1], labels (N,), dataset indices (N,) (keys of random starts)."""
    count = min(max_images or len(dataset), len(dataset))
    batch = next(iter(DataLoader(Subset(dataset, range(count)), batch_size=count)))
    return batch["image"], batch["label"], batch["index"]


def evaluate_subject(subject: DefendedModel, attacks: list[AttackSpec], images: torch.Tensor, labels: torch.Tensor, keys: torch.Tensor,
                     batch_size: int, seed: int, num_classes: int, observe: Observer | None = None) -> dict[str, dict]:
    """`subject` (a classifier, [0, 1] images -> logits) on images (N, C, H, W) with labels (N,) and dataset indices (N,),
    clean and under `attacks`, in batches of `batch_size` seeded as the report seeds them: the counter results
    (`RobustnessCounts.compute`) by attack label, ``none`` for the clean images. `observe` sees every attack's images."""
    evaluation = SuiteEvaluation([subject], attacks, ClassificationTask([str(label) for label in range(num_classes)]), False, None, seed,
                                 images.device)
    for index, batch in enumerate(zip(images.split(batch_size), labels.split(batch_size), keys.split(batch_size))):
        evaluation.evaluate(*batch, seed + BATCH_SEED_STRIDE * index, observe=observe)
    return {attack: result for _, attack, result, _ in evaluation.results()}


def accuracies(result: dict) -> dict[str, float]:
    """``clean_acc``, ``robust_acc`` and their ``*_balanced_acc`` (the mean recall over the classes present) of a counter
    result (`RobustnessCounts.compute`)."""
    return {name: float(result[name]) for name in ("clean_acc", "robust_acc", "clean_balanced_acc", "robust_balanced_acc")}


def standard_error(share: float, count: int) -> float:
    """The binomial standard error of a share of `count` images."""
    return math.sqrt(share * (1 - share) / max(1, count))


def pooled_features(model: nn.Module, classifier: nn.Module, images: torch.Tensor, batch_size: int, seed: int) -> torch.Tensor:
    """(N, D) float64: what `classifier`'s head (its last `nn.Linear`: timm's and `SmallCNN`'s pooled-feature classifier)
    receives when `model` (the classifier, or a pipeline that ends in it) runs on images (N, C, H, W) in [0, 1], batch i
    on the global RNG seeded with seed + `BATCH_SEED_STRIDE` * i (the clean draws of `evaluate_subject`)."""
    heads = [module for module in classifier.modules() if isinstance(module, nn.Linear)]
    if not heads:
        raise ValueError(f"{type(classifier).__name__} has no linear head whose input would be its pooled features; the FID "
                         "criterion needs one (a timm classifier or SmallCNN): use --criterion clean_drop.")
    features = []
    hook = heads[-1].register_forward_pre_hook(lambda _, inputs: features.append(inputs[0].flatten(1)))
    try:
        with torch.no_grad():
            for index, batch in enumerate(images.split(batch_size)):
                with seeded_global_rng(seed + BATCH_SEED_STRIDE * index, images.device):
                    model(batch)
    finally:
        hook.remove()
    return torch.cat(features).double()


def frechet_distance(first: torch.Tensor, second: torch.Tensor) -> float:
    """The Fréchet distance between Gaussians fitted to features (N, D) and (M, D):
    |mu_1 - mu_2|^2 + tr(S_1 + S_2 - 2 (S_1^1/2 S_2 S_1^1/2)^1/2), through symmetric eigendecompositions (stable for the
    rank-deficient covariances of a few hundred images)."""
    first_cov, second_cov = torch.cov(first.T), torch.cov(second.T)
    values, vectors = torch.linalg.eigh(first_cov)
    root = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
    cross = torch.linalg.eigvalsh(root @ second_cov @ root).clamp(min=0).sqrt().sum()
    return ((first.mean(0) - second.mean(0)).square().sum() + first_cov.trace() + second_cov.trace() - 2 * cross).item()


def strength_frontier(classifier: nn.Module, purifier_dir: str | Path, strengths: list[float], settings: dict | None, attack: AttackSpec,
                      images: torch.Tensor, labels: torch.Tensor, keys: torch.Tensor, batch_size: int, seed: int,
                      num_classes: int, reference: torch.Tensor | None = None) -> dict:
    """Clean and robust accuracy of `classifier` (images (N, C, H, W) in [0, 1] -> logits (N, K)) alone and behind the
    purifier of `purifier_dir` at each of `strengths` (`at_strength`: t* rounded, DDIM steps capped at t*; its other settings:
    `settings` over the export's defaults), each evaluated by `evaluate_subject`.

    A ``graybox`` `attack` is crafted on the classifier alone and scored through each purifier; any other is crafted
    through each purifier (differentiable, exact gradients). Returns ``undefended`` (the classifier alone under `attack`
    as white-box on it) and ``rows``, one per strength, each with ``strength``, ``label`` and `accuracies`; given `reference`
    images (M, C, H, W) in [0, 1] (UAD-RS: clean training images), each row also has ``fid``, the `frechet_distance`
    between the classifier's `pooled_features` of the purified adversarial images and of the reference images.
    """
    common = dict(images=images, labels=labels, keys=keys, batch_size=batch_size, seed=seed, num_classes=num_classes)
    alone = DefendedModel.alone("classifier", classifier)
    plain_attack = AttackSpec(**{**vars(attack), "threat_model": "whitebox"})  # the classifier is deterministic: one draw
    undefended = accuracies(evaluate_subject(alone, [plain_attack], **common)[plain_attack.label])
    settings = resolve_purifier_settings(purifier_dir, settings)
    loaded = load_purifier(purifier_dir, **settings).to(images.device)
    reference_features = None if reference is None else pooled_features(classifier, classifier, reference, batch_size, seed)
    rows = []
    for strength in strengths:
        purifier = loaded.at_strength(strength, differentiable=True)
        defended = PurifiedClassifier(purifier, classifier)
        adversarial: list[torch.Tensor] = []
        results = evaluate_subject(alone.behind(f"purifier/{purifier.label}", purifier, defended), [attack],
                                   observe=lambda subject, spec, attacked: adversarial.append(attacked), **common)
        rows.append(dict(strength=purifier.strength, label=purifier.label, **accuracies(results[attack.label])))
        if reference_features is not None:
            purified_features = pooled_features(defended, classifier, torch.cat(adversarial), batch_size, seed)
            rows[-1]["fid"] = frechet_distance(purified_features, reference_features)
    return dict(undefended=undefended, rows=rows, strength_name=loaded.strength_name, settings=settings)


def select_strength(rows: list[dict], undefended_clean: float, max_clean_drop: float, metric: SelectionMetric = "balanced_acc",
                    criterion: Criterion = "clean_drop") -> dict:
    """The row of `rows` (``strength``, ``clean_<metric>``, ``robust_<metric>``) with the highest robust `metric` among
    those whose clean `metric` is at least `undefended_clean` - `max_clean_drop` (ties: the smaller strength); with
    ``criterion="fid"`` the row of the lowest ``fid`` (UAD-RS), whatever its accuracies.

    Raises ValueError naming the best clean figure reached when no row qualifies."""
    if criterion == "fid":
        return min(rows, key=lambda row: (row["fid"], row["strength"]))
    if max_clean_drop < 0:
        raise ValueError(f"max_clean_drop must be >= 0 (an allowed drop of clean {metric}), got {max_clean_drop}.")
    floor = undefended_clean - max_clean_drop
    qualifying = [row for row in rows if row[f"clean_{metric}"] >= floor - 1e-12]
    if not qualifying:
        best = max(rows, key=lambda row: row[f"clean_{metric}"])
        raise ValueError(
            f"No strength keeps clean {metric} within {max_clean_drop} of the undefended {undefended_clean:.3f} (floor {floor:.3f}); "
            f"the best is {best[f'clean_{metric}']:.3f} at {best['strength']}. Add smaller strengths (--strengths), allow a larger "
            "drop (--max_clean_drop), or train the purifier longer."
        )
    return min(qualifying, key=lambda row: (-row[f"robust_{metric}"], row["strength"]))
