"""A classifier behind a purifier measured over the purifier's strength (t* for diffusion, sigma for NIM), and the choice
of a strength on that frontier: the core that `benchmarks/purifier_tradeoff.py` and `select_strength.py` share.

Every figure is on the same images, and noise follows the callback's convention: the clean and the attacked images of a
pass are scored on independent draws of the purifier (one draw per decision, as deployed). Batch i of the clean scoring
runs on the global RNG seeded with seed + i and of the attacked scoring with seed + `ATTACKED_SEED_OFFSET` + i
(`seeded_correct`), so every strength sees the same draws. Robust means right both clean and attacked (the report's
definition).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from robust_cxr.attacks import AttackSpec, craft_adversarial
from robust_cxr.purification import PurifiedClassifier, load_purifier, resolve_purifier_settings

SelectionMetric = Literal["acc", "balanced_acc"]
CRAFT_SEED_OFFSET = 10_000  # the global RNG of batch i of an attack is seeded with seed + CRAFT_SEED_OFFSET + i
ATTACKED_SEED_OFFSET = 20_000  # ... and of the scoring of its attacked images with seed + ATTACKED_SEED_OFFSET + i
Criterion = Literal["clean_drop", "fid"]


def stratified_images(dataset: Dataset, max_images: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The images of index < `max_images` (all if None) of a split stored class-interleaved (`ChestXRayDataModule`), a
    class-stratified subset: images (N, C, H, W) in [0, 1], labels (N,), dataset indices (N,) (keys of random starts)."""
    count = min(max_images or len(dataset), len(dataset))
    batch = next(iter(DataLoader(Subset(dataset, range(count)), batch_size=count)))
    return batch["image"], batch["label"], batch["index"]


def seeded_correct(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int) -> torch.Tensor:
    """(N,) bool: `model`'s argmax is right for images (N, C, H, W) in [0, 1] with labels (N,). Batch i runs on the global
    RNG seeded with seed + i, so two calls with one seed on images of the same positions draw the same purifier noise."""
    correct = []
    with torch.no_grad():
        for index, (batch, batch_labels) in enumerate(zip(images.split(batch_size), labels.split(batch_size))):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + index)
                correct.append(model(batch).argmax(dim=1) == batch_labels)
    return torch.cat(correct)


def craft(spec: AttackSpec, source: nn.Module, images: torch.Tensor, labels: torch.Tensor, keys: torch.Tensor, batch_size: int,
          seed: int, num_classes: int) -> torch.Tensor:
    """Adversarial images (N, C, H, W) in [0, 1] crafted on `source` batch by batch, each image the most adversarial
    iterate (wrong first, then the highest loss); random starts keyed by dataset index, EOT draws from the global RNG
    seeded per batch."""
    adversarial = []
    for index, (x, y, k) in enumerate(zip(images.split(batch_size), labels.split(batch_size), keys.split(batch_size))):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + CRAFT_SEED_OFFSET + index)
            adversarial.append(craft_adversarial(spec, source, x, y, num_classes=num_classes, keys=k, seed=seed,
                                                 score_fn=lambda logits, y=y: (logits.argmax(dim=1) == y).double()))
    return torch.cat(adversarial)


def clean_and_robust(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, keys: torch.Tensor, batch_size: int, seed: int,
                     num_classes: int, attack: AttackSpec | None = None, adversarial: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(clean, robust), each (N,) bool: `model` right on images (N, C, H, W) in [0, 1], and right both clean and on their
    attacked versions: `adversarial` (crafted elsewhere, e.g. gray-box on the undefended classifier), or else `attack`
    crafted on `model` itself (white-box; EOT as the spec says)."""
    if (attack is None) == (adversarial is None):
        raise ValueError("Give clean_and_robust either an attack to craft on the model or the adversarial images, not both.")
    clean = seeded_correct(model, images, labels, batch_size, seed)
    if adversarial is None:
        adversarial = craft(attack, model, images, labels, keys, batch_size, seed, num_classes)
    return clean, clean & seeded_correct(model, adversarial, labels, batch_size, seed + ATTACKED_SEED_OFFSET)


def pooled_features(model: nn.Module, classifier: nn.Module, images: torch.Tensor, batch_size: int, seed: int) -> torch.Tensor:
    """(N, D) float64: what `classifier`'s head (its last `nn.Linear`: timm's and `SmallCNN`'s pooled-feature classifier)
    receives when `model` (the classifier, or a pipeline that ends in it) runs on images (N, C, H, W) in [0, 1], batch i
    on the global RNG seeded with seed + i (the purifier noise of `seeded_correct`)."""
    heads = [module for module in classifier.modules() if isinstance(module, nn.Linear)]
    if not heads:
        raise ValueError(f"{type(classifier).__name__} has no linear head whose input would be its pooled features; the FID "
                         "criterion needs one (a timm classifier or SmallCNN): use --criterion clean_drop.")
    features = []
    hook = heads[-1].register_forward_pre_hook(lambda _, inputs: features.append(inputs[0].flatten(1)))
    try:
        seeded_correct(model, images, torch.zeros(len(images), dtype=torch.long, device=images.device), batch_size, seed)
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


def accuracy(correct: torch.Tensor) -> tuple[float, float]:
    """Mean of a (N,) bool vector and its binomial standard error."""
    mean = correct.float().mean().item()
    return mean, (mean * (1 - mean) / len(correct)) ** 0.5


def balanced_accuracy(correct: torch.Tensor, labels: torch.Tensor) -> float:
    """The mean over the classes present in labels (N,) of the share of their images with `correct` (N,) bool: 0.5 for
    a binary classifier that answers one class whatever the image, where plain accuracy reads that class's share."""
    return torch.stack([correct[labels == label].float().mean() for label in labels.unique()]).mean().item()


def accuracies(clean: torch.Tensor, robust: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """``clean_acc``, ``robust_acc`` and their ``*_balanced_acc`` from (N,) bool vectors and labels (N,)."""
    return dict(clean_acc=accuracy(clean)[0], robust_acc=accuracy(robust)[0], clean_balanced_acc=balanced_accuracy(clean, labels),
                robust_balanced_acc=balanced_accuracy(robust, labels))


def strength_frontier(classifier: nn.Module, purifier_dir: str | Path, strengths: list[float], settings: dict | None, attack: AttackSpec,
                      images: torch.Tensor, labels: torch.Tensor, keys: torch.Tensor, batch_size: int, seed: int,
                      num_classes: int, reference: torch.Tensor | None = None) -> dict:
    """Clean and robust accuracy of `classifier` (images (N, C, H, W) in [0, 1] -> logits (N, K)) alone and behind the
    purifier of `purifier_dir` at each of `strengths` (`at_strength`: t* rounded, DDIM steps capped at t*; its other settings:
    `settings` over the export's defaults).

    A ``graybox`` `attack` is crafted once on the classifier alone and scored through each purifier; any other is crafted
    through each purifier (differentiable, exact gradients). Returns ``undefended`` (the classifier alone under the attack
    crafted on it) and ``rows``, one per strength, each with ``strength``, ``label`` and `accuracies`; given `reference`
    images (M, C, H, W) in [0, 1] (UAD-RS: clean training images), each row also has ``fid``, the `frechet_distance`
    between the classifier's `pooled_features` of the purified adversarial images and of the reference images.
    """
    common = dict(images=images, labels=labels, keys=keys, batch_size=batch_size, seed=seed, num_classes=num_classes)
    plain_attack = AttackSpec(**{**vars(attack), "eot_samples": 1, "threat_model": "whitebox"})  # the classifier is deterministic
    adversarial = craft(plain_attack, classifier, images, labels, keys, batch_size, seed, num_classes)
    undefended = accuracies(*clean_and_robust(classifier, adversarial=adversarial, **common), labels)
    graybox = adversarial if attack.threat_model == "graybox" else None
    settings = resolve_purifier_settings(purifier_dir, settings)
    loaded = load_purifier(purifier_dir, **settings).to(images.device)
    reference_features = None if reference is None else pooled_features(classifier, classifier, reference, batch_size, seed)
    rows = []
    for strength in strengths:
        purifier = loaded.at_strength(strength, differentiable=True)
        defended = PurifiedClassifier(purifier, classifier)
        adversarial = graybox if graybox is not None else craft(attack, defended, images, labels, keys, batch_size, seed, num_classes)
        clean, robust = clean_and_robust(defended, adversarial=adversarial, **common)
        rows.append(dict(strength=purifier.strength, label=purifier.label, **accuracies(clean, robust, labels)))
        if reference_features is not None:
            purified_features = pooled_features(defended, classifier, adversarial, batch_size, seed)
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
