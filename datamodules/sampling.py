"""Which images go where and in what order: the seeded stratified split, class-ratio subsampling, the class-interleaved
storage order, and the samplers that shard and draw a split.

Each split is stored in a seeded, class-interleaved order (`interleaved_order`): the first n images of any split hold
every class in its share of the split, within an image or two. Evaluation subsets are therefore "the images of
index < n" (see `AdversarialExampleCallback`), the same stratified images for any batch size and any number of DDP
ranks, whatever order the source lists its files in.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

from datamodules.dataset import SPLITS, Samples


class UnpaddedDistributedSampler(DistributedSampler):
    """Shards evaluation data over ranks without the padding of `DistributedSampler`.

    Every sample is scored exactly once, so metrics summed across ranks equal a 1-process run.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.num_samples = len(range(rank, len(dataset), num_replicas))
        self.total_size = len(dataset)

    def __iter__(self):
        return iter(range(self.rank, len(self.dataset), self.num_replicas))


class ClassBalancedSampler(DistributedSampler):
    """Training indices in which every class gets an equal share of each epoch's draws.

    Each epoch draws one global sequence of N indices (N = len(labels), rounded up to a multiple of num_replicas):
    N/K for each of the K classes present (the remainder to randomly chosen classes, one each), a class's share taken
    by cycling through fresh random permutations of its members, so each of its images is drawn equally often, within
    one; the sequence is then shuffled. The draw is seeded by (seed, epoch), so every rank computes the same sequence
    and a resumed run draws the epoch an uninterrupted one would; rank r yields ``sequence[r::num_replicas]``.
    Subclassing `DistributedSampler` keeps Lightning from replacing it under DDP; Lightning calls `set_epoch`.

    Args:
        labels: (N,) int class of each image, as np.ndarray or tensor.
        num_replicas, rank: the number of processes and this one's rank.
        seed: seeds the draws together with the epoch.
    """

    def __init__(self, labels: np.ndarray | torch.Tensor, num_replicas: int, rank: int, seed: int):
        self.labels = torch.as_tensor(labels, dtype=torch.int64)
        super().__init__(range(len(self.labels)), num_replicas=num_replicas, rank=rank, seed=seed)

    def __iter__(self):
        generator = epoch_generator(self.seed, self.epoch)
        classes = self.labels.unique()
        sequence = class_draws(self.labels, classes, equal_shares(self.total_size, len(classes), generator), generator)
        sequence = sequence[torch.randperm(len(sequence), generator=generator)]
        return iter(sequence[self.rank :: self.num_replicas].tolist())


class GeneratedMixSampler(DistributedSampler):
    """Training indices of a split whose images at positions >= `real` are generated: each epoch draws the real images
    (each once, or class-balanced as `ClassBalancedSampler` draws them) and enough generated ones that a share `ratio`
    of the epoch is generated, spread so that every run of consecutive indices (every batch) holds that share, within
    one image. The generated draws keep the real draws' class shares (each generated image of a class drawn equally
    often, within one), so mixing changes how much data each class sees, not the class balance. With `ratio` 1 the
    epoch is the generated images alone, drawn in the real split's class shares. Seeded by (seed, epoch); rank r yields
    ``sequence[r::num_replicas]``.

    Args:
        labels: (N,) int class of each image of the split, real first.
        real: how many of them are real.
        ratio: the generated share of each epoch, in [0, 1].
        balanced: draw the real images class-balanced.
        num_replicas, rank, seed: as `ClassBalancedSampler`'s.
    """

    def __init__(self, labels: np.ndarray | torch.Tensor, real: int, ratio: float, balanced: bool, num_replicas: int, rank: int, seed: int):
        self.labels = torch.as_tensor(labels, dtype=torch.int64)
        self.real, self.ratio, self.balanced = real, ratio, balanced
        self.generated = len(self.labels) - real
        size = self.generated if ratio == 1 else real + round(real * ratio / (1 - ratio))
        super().__init__(range(size), num_replicas=num_replicas, rank=rank, seed=seed)

    def __iter__(self):
        generator = epoch_generator(self.seed, self.epoch)
        real_labels, generated_labels = self.labels[: self.real], self.labels[self.real :]
        classes = real_labels.unique()
        slots = torch.arange(self.total_size)
        is_generated = (torch.floor((slots + 1) * self.ratio) > torch.floor(slots * self.ratio)) if self.ratio < 1 else torch.ones_like(slots, dtype=torch.bool)
        real_count = int((~is_generated).sum())
        if self.balanced:
            real_shares = equal_shares(real_count, len(classes), generator)
            real_draws = class_draws(real_labels, classes, real_shares, generator)
        else:
            real_shares = torch.stack([(real_labels == label).sum() for label in classes])
            real_draws = torch.randperm(self.real, generator=generator)[:real_count]
        generated_count = self.total_size - real_count
        shares = torch.floor(real_shares.double() / real_shares.sum() * generated_count).long()
        shares[torch.randperm(len(classes), generator=generator)[: generated_count - int(shares.sum())]] += 1
        generated_draws = self.real + class_draws(generated_labels, classes, shares, generator)
        sequence = torch.empty(self.total_size, dtype=torch.int64)
        sequence[~is_generated] = real_draws[torch.randperm(len(real_draws), generator=generator)]
        sequence[is_generated] = generated_draws[torch.randperm(len(generated_draws), generator=generator)]
        return iter(sequence[self.rank :: self.num_replicas].tolist())


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A generator seeded by (seed, epoch) hashed together, not seed + epoch, so runs of neighbouring seeds share no epoch."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]))


def equal_shares(total: int, classes: int, generator: torch.Generator) -> torch.Tensor:
    """(classes,) draws that add up to `total`, equal but for one more for `total % classes` random classes."""
    shares = torch.full((classes,), total // classes)
    shares[torch.randperm(classes, generator=generator)[: total % classes]] += 1
    return shares


def class_draws(labels: torch.Tensor, classes: torch.Tensor, shares: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``shares[i]`` indices of images (of `labels` (N,)) of class ``classes[i]`` each, class by class, cycling through
    fresh random permutations of the class's members, so that each is drawn equally often, within one."""
    draws = []
    for label, share in zip(classes.tolist(), shares.tolist()):
        members = torch.nonzero(labels == label).squeeze(1)
        if len(members) == 0:
            raise ValueError(f"No image of class {label} to draw {share} from: every class needs images (the generated data too).")
        cycles = -(-share // len(members))
        permutations = torch.rand(cycles, len(members), generator=generator).argsort(dim=1)
        draws.append(members[permutations].flatten()[:share])
    return torch.cat(draws)



def interleaved_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """A permutation (N,) of labels (N,) after which every prefix holds each class in proportion.

    Each class is shuffled (seeded), its k-th of n members is placed at (k + u) / n on [0, 1) with a per-class
    random offset u, and all members are sorted by place. A prefix up to any place x then holds floor or ceil
    of x * n members of each class, so class shares of a prefix are exact within one or two images.
    """
    rng = np.random.default_rng(seed)
    places = np.empty(len(labels))
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        places[members] = (np.arange(len(members)) + rng.random()) / len(members)
    return np.argsort(places, kind="stable")


def stratified_split(samples: Samples, fractions: tuple[float, float, float], seed: int) -> dict[str, Samples]:
    """Seeded split keeping each class's share in every split; returns {split: samples}."""
    labels = samples.labels
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_val = round(len(members) * fractions[1])
        n_test = round(len(members) * fractions[2])
        parts["val"].append(members[:n_val])
        parts["test"].append(members[n_val : n_val + n_test])
        parts["train"].append(members[n_val + n_test :])
    return {split: samples[np.sort(np.concatenate(chunks))] for split, chunks in parts.items()}


def check_class_ratio(class_ratio: dict[str, float], class_names: list[str]) -> None:
    """Raises ValueError if `class_ratio` names a class not in `class_names`, names all of them, or gives a ratio that is
    not positive."""
    unknown = sorted(set(class_ratio) - set(class_names))
    if unknown:
        raise ValueError(f"--data.class_ratio names unknown class(es) {unknown}; the classes are {class_names}.")
    if len(class_ratio) == len(class_names):
        raise ValueError(f"--data.class_ratio names every class {class_names}: leave out at least one, to count the ratios against.")
    for name, ratio in class_ratio.items():
        if not ratio > 0:
            raise ValueError(f"--data.class_ratio {name}: {ratio} must be positive ({name} images kept per image of the largest class not named).")


def subsample_to_class_ratio(samples: Samples, split: str, class_ratio: dict[str, float] | None, class_names: list[str],
                             seed: int) -> Samples:
    """Keeps round(ratio * n) seeded images of each class of `class_ratio`, n the largest unnamed class's size.

    `samples` are those of `split`, labelled by position in `class_names`; every image of an unnamed class stays. Which
    images of a named class stay is drawn from (`seed`, split, class) alone.
    """
    labels = samples.labels
    if not class_ratio or len(labels) == 0:
        return samples
    named = [class_names.index(name) for name in class_ratio]
    counts = np.bincount(labels, minlength=len(class_names))
    unnamed = np.setdiff1d(np.arange(len(class_names)), named)
    reference = unnamed[counts[unnamed].argmax()]
    reference_count = int(counts[reference])
    keep = ~np.isin(labels, named)
    for name, label in zip(class_ratio, named):
        ratio, count = class_ratio[name], int(counts[label])
        kept = round(ratio * reference_count)
        if kept > count:
            raise ValueError(
                f"--data.class_ratio {name}: {ratio} needs {kept} {name} images in the {split} split, which has "
                f"{count} for {reference_count} {class_names[reference]}: the largest possible ratio is "
                f"{count / reference_count:.4g}."
            )
        # a stream of its own per split and class: the choice does not depend on the other options
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(SPLITS.index(split), label)))
        keep[rng.choice(np.flatnonzero(labels == label), kept, replace=False)] = True
    return samples[keep]
