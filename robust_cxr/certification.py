"""Certified L2 robustness by randomized smoothing: Cohen, Rosenfeld and Kolter's (2019) PREDICT and CERTIFY, per-image
results that sum over DDP ranks, and the certification report.

The smoothed classifier g(x) = argmax_c P(f(x + delta) = c), delta ~ N(0, sigma^2 I), is certified on x by CERTIFY:
`n0` selection draws guess the top class c_A, `n` estimation draws bound p_A = P(f(x + delta) = c_A) from below by the
one-sided Clopper-Pearson bound at level `alpha`; if the bound exceeds 1/2, g(x + e) = c_A for every ||e||_2 < sigma
PhiInverse(p_A lower) (the certified radius) with probability at least 1 - alpha over the draws, else CERTIFY abstains.
PREDICT answers the top class of the estimation counts unless a two-sided binomial test of the top two counts is not
significant at `alpha` (then it abstains). Here f is a smoothing module (`robust_cxr.smoothing`: the noise and any
denoiser) followed by a classifier deciding by argmax at its operating point; the noise comes from
`robust_cxr.keyed_noise`, keyed by (seed, image index, draw index).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from scipy.stats import beta, binomtest, norm
from torch import nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from robust_cxr.attacks.common import attacking, cross_entropy
from robust_cxr.attacks.engine import Expectation, gradient_ascent, l2_step
from robust_cxr.keyed_noise import keyed_normal
from robust_cxr.metrics import recall_names
from robust_cxr.smoothing import SmoothingNoise

ABSTAIN = -1  # the prediction of an image CERTIFY or PREDICT abstains on
CERTIFIED_RADII = (0.0, 0.25, 0.5, 1.0, 2.0)  # L2 radii of the report's rows, in [0, 1] pixel units
CURVE_POINTS = 101  # radii of the certified-accuracy curve
IMAGE_FIELDS = ("index", "label", "prediction", "radius", "p_lower", "counts", "selection_counts", "predict", "check_eps", "check_counts",
                "check_predict")  # per image in certificates.json, in this order
ANSWER_FIELDS = {"prediction", "predict", "check_predict"}  # null in certificates.json where they abstain (`ABSTAIN`)


@dataclass(frozen=True)
class CertificationSettings:
    """What CERTIFY and PREDICT run with.

    Args:
        sigma: the noise std, > 0, in [0, 1] pixel units.
        n0: selection draws per image (the guess of the top class), >= 1.
        n: estimation draws per image (the bound on its probability; PREDICT's counts), >= 1.
        alpha: the probability, in (0, 1), that a certificate or a PREDICT answer is wrong.
        seed: keys the noise together with each image's index and each draw's index.
        draws_per_batch: noisy images per forward pass (memory), >= 1; the noise does not depend on it.
    """

    sigma: float
    n0: int = 100
    n: int = 10000
    alpha: float = 0.001
    seed: int = 0
    draws_per_batch: int = 1000

    def __post_init__(self) -> None:
        problems = [
            f"sigma must be > 0 (a noise std in [0, 1] pixel units, e.g. 0.25), got {self.sigma}" if not self.sigma > 0 else "",
            f"n0 (selection draws) must be >= 1, e.g. 100, got {self.n0}" if self.n0 < 1 else "",
            f"n (estimation draws) must be >= 1, e.g. 10000, got {self.n}" if self.n < 1 else "",
            f"alpha must lie in (0, 1), e.g. 0.001, got {self.alpha}" if not 0 < self.alpha < 1 else "",
            f"draws_per_batch must be >= 1, got {self.draws_per_batch}" if self.draws_per_batch < 1 else "",
        ]
        if any(problems):
            raise ValueError("; ".join(problem for problem in problems if problem) + ".")

    @property
    def largest_radius(self) -> float:
        """The largest radius `n` estimation draws can certify: all of them for c_A, whose lower bound is alpha^(1/n)."""
        return self.sigma * float(norm.ppf(self.alpha ** (1 / self.n))) if self.alpha ** (1 / self.n) > 0.5 else 0.0


def vote_counts(classifier: nn.Module, smoothing: nn.Module, image: torch.Tensor, key: int, draws: range,
                settings: CertificationSettings, num_classes: int) -> torch.Tensor:
    """(K,) int64: how often ``classifier(smoothing(image, noise))`` decides each class over the noise draws `draws` of
    the image (C, H, W) in [0, 1] of index `key`, ``settings.draws_per_batch`` draws per forward pass."""
    counts = torch.zeros(num_classes, dtype=torch.int64, device=image.device)
    for start in range(draws.start, draws.stop, settings.draws_per_batch):
        indices = torch.arange(start, min(start + settings.draws_per_batch, draws.stop), device=image.device)
        noise = keyed_normal(tuple(image.shape), torch.full_like(indices, key), indices, settings.seed).to(image)
        decisions = classifier(smoothing(image.expand(len(indices), *image.shape), noise)).argmax(dim=1)
        counts += torch.bincount(decisions, minlength=num_classes)
    return counts


def clopper_pearson_lower(successes: np.ndarray, trials: np.ndarray, alpha: float) -> np.ndarray:
    """The exact one-sided (1 - alpha) lower confidence bound (Clopper-Pearson) on a binomial proportion: the alpha
    quantile of Beta(k, n - k + 1) for k successes of n trials, 0 for k = 0; arrays of any shape."""
    successes, trials = np.asarray(successes), np.asarray(trials)
    with np.errstate(invalid="ignore"):
        bound = beta.ppf(alpha, successes, trials - successes + 1)
    return np.where(successes > 0, bound, 0.0)


def certify(selection_counts: torch.Tensor, counts: torch.Tensor, sigma: float, alpha: float) -> dict[str, torch.Tensor]:
    """CERTIFY from the selection counts (B, K) and estimation counts (B, K) of B images: ``prediction`` (B,) c_A or
    `ABSTAIN`, ``p_lower`` (B,) the lower bound on p_A and ``radius`` (B,) sigma PhiInverse(p_lower), 0 when abstaining."""
    guess = selection_counts.argmax(dim=1)
    successes = counts.gather(1, guess[:, None])[:, 0]
    p_lower = clopper_pearson_lower(successes.cpu().numpy(), counts.sum(dim=1).cpu().numpy(), alpha)
    certified = p_lower > 0.5
    radius = np.where(certified, sigma * norm.ppf(np.where(certified, p_lower, 0.5)), 0.0)
    return dict(prediction=torch.where(torch.from_numpy(certified), guess.cpu(), ABSTAIN), p_lower=torch.from_numpy(p_lower),
                radius=torch.from_numpy(radius))


def predict(counts: torch.Tensor, alpha: float) -> torch.Tensor:
    """PREDICT from the counts (B, K) of B images: (B,) the top class, or `ABSTAIN` where the two-sided binomial test of
    the top two counts against 1/2 has a p-value above `alpha` (one scipy test per image)."""
    top = counts.topk(2, dim=1)
    p_values = torch.tensor([binomtest(first, first + second, 0.5).pvalue for first, second in top.values.tolist()], dtype=torch.float64)
    return torch.where(p_values <= alpha, top.indices[:, 0].cpu(), ABSTAIN)


def certify_images(classifier: nn.Module, smoothing: nn.Module, images: torch.Tensor, keys: torch.Tensor,
                   settings: CertificationSettings, num_classes: int) -> dict[str, torch.Tensor]:
    """CERTIFY and PREDICT on images (B, C, H, W) in [0, 1] of split indices `keys` (B,): draws 0..n0-1 of each image
    select, draws n0..n0+n-1 estimate. Returns CPU tensors: ``selection_counts``, ``counts`` (B, K), ``prediction``,
    ``p_lower``, ``radius`` (see `certify`) and ``predict`` (see `predict`), (B,) each."""
    selection = torch.zeros(len(images), num_classes, dtype=torch.int64)
    estimation = torch.zeros_like(selection)
    for row, (image, key) in enumerate(zip(images, keys.tolist())):
        selection[row] = vote_counts(classifier, smoothing, image, key, range(settings.n0), settings, num_classes).cpu()
        estimation[row] = vote_counts(classifier, smoothing, image, key, range(settings.n0, settings.n0 + settings.n), settings, num_classes).cpu()
    return dict(selection_counts=selection, counts=estimation, **certify(selection, estimation, settings.sigma, settings.alpha),
                predict=predict(estimation, settings.alpha))


@dataclass(frozen=True)
class RadiusCheck:
    """The attack that tries to contradict the certificates: per certified image, PGD-L2 with EOT of the loss on the
    smoothed classifier's base classifier behind its noise (and denoiser), away from the certified class, within `factor`
    times the certified radius; then PREDICT at the attacked image on the image's estimation draws.

    Args:
        images: attack the certified images of index < `images` (the class-stratified first ones; 0: none).
        steps: PGD-L2 steps, of 2.5 x budget / steps each, from the image itself.
        eot_samples: noise draws per step, >= 2 (the smoothed classifier is random).
        factor: the budget as a share of each image's radius, > 0: below 1 no answer may change (0.9 is the check);
            above 1 probes how tight the radius is.
    """

    images: int = 0
    steps: int = 20
    eot_samples: int = 8
    factor: float = 0.9

    def __post_init__(self) -> None:
        if self.images < 0 or self.steps < 1 or self.eot_samples < 2 or not self.factor > 0:
            raise ValueError(f"The radius check needs images >= 0, steps >= 1, eot_samples >= 2 (the smoothed classifier is random) "
                             f"and factor > 0 (0.9: attack at 0.9 x each radius), got {self}.")


def check_radii(classifier: nn.Module, smoothing: SmoothingNoise, images: torch.Tensor, keys: torch.Tensor, results: dict[str, torch.Tensor],
                settings: CertificationSettings, check: RadiusCheck, num_classes: int) -> dict[str, torch.Tensor]:
    """`check`'s attack on the certified images among images (B, C, H, W) in [0, 1] of indices `keys` (B,), whose
    `certify_images` `results` are given. Returns CPU tensors: ``check_eps`` (B,) each attack's L2 budget (0: not
    attacked), ``check_counts`` (B, K) the estimation counts at the attacked image (draws n0..n0+n-1 of the image's key;
    zeros where not attacked) and ``check_predict`` (B,) PREDICT there (`ABSTAIN` where not attacked).

    The attack's noise is keyed like the certificates' (draw indices from n0 + n on), so the check, too, does not depend on
    the batch or the number of processes; the counts after it use the certificates' estimation draws."""
    attacked = (results["prediction"] != ABSTAIN) & (keys.cpu() < check.images)
    eps = torch.where(attacked, check.factor * results["radius"].float(), 0.0)
    counts = torch.zeros(len(images), num_classes, dtype=torch.int64)
    predicted = torch.full((len(images),), ABSTAIN, dtype=torch.int64)
    if attacked.any():
        chosen = attacked.to(images.device)
        certified = results["prediction"][attacked].to(images.device)
        first_draw = settings.n0 + settings.n
        source = nn.Sequential(_KeyedDraws(smoothing.at_strength(smoothing.sigma, differentiable=True), keys[chosen], first_draw, settings.seed),
                               classifier)
        budget = eps[attacked].to(images)
        with attacking(source):
            clean = images[chosen].clone()  # a normal tensor also under inference mode, so that autograd can save it
            expectation = Expectation(source, cross_entropy, certified, check.eot_samples, score=lambda logits: (logits.argmax(dim=1) == certified).double())
            adversarial = gradient_ascent(expectation, clean, clean, check.steps, l2_step(2.5 * budget / check.steps), budget, "l2")
        estimation = range(settings.n0, settings.n0 + settings.n)
        with torch.no_grad():
            counts[attacked] = torch.stack([vote_counts(classifier, smoothing, image, key, estimation, settings, num_classes).cpu()
                                            for image, key in zip(adversarial, keys[chosen].tolist())])
        predicted[attacked] = predict(counts[attacked], settings.alpha)
    return dict(check_eps=eps.double(), check_counts=counts, check_predict=predicted)


class _KeyedDraws(nn.Module):
    """`smoothing` on draw-major batches (D * B, C, H, W) of the B images of `keys` (B,), with keyed noise: the d-th draw
    of the k-th call is draw ``first_draw + k * D + d`` of each image's key."""

    stochastic = True

    def __init__(self, smoothing: SmoothingNoise, keys: torch.Tensor, first_draw: int, seed: int):
        super().__init__()
        self.smoothing, self.keys, self.next_draw, self.seed = smoothing, keys, first_draw, seed

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        draws = len(images) // len(self.keys)
        indices = torch.arange(self.next_draw, self.next_draw + draws, device=self.keys.device).repeat_interleave(len(self.keys))
        self.next_draw += draws
        noise = keyed_normal(tuple(images.shape[1:]), self.keys.repeat(draws), indices, self.seed)
        return self.smoothing(images, noise.to(images))


class Certificates(Metric):
    """The per-image results of a certification (`certify_images`, `check_radii`, each image's ``index`` and ``label``),
    gathered over DDP ranks, and the ``seconds`` spent on them, summed."""

    full_state_update = False
    fields = ("index", "label", "prediction", "predict", "radius", "p_lower", "selection_counts", "counts", "check_eps", "check_counts",
              "check_predict")

    def __init__(self) -> None:
        super().__init__()
        for name in self.fields:
            self.add_state(name, default=[], dist_reduce_fx="cat")
        self.add_state("seconds", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, results: dict[str, torch.Tensor]) -> None:
        """Adds one batch's `results`: every field, (B, ...) each, and ``seconds`` (0-d)."""
        for name in self.fields:
            getattr(self, name).append(results[name].to(self.device))
        self.seconds += results["seconds"].to(self.device, torch.float64)

    def compute(self) -> dict[str, np.ndarray]:
        """Every field over all images in order of index, and the seconds, as numpy arrays (which torchmetrics does not
        squeeze when a certification holds a single image)."""
        fields = {name: dim_zero_cat(getattr(self, name)).cpu().numpy() for name in self.fields}
        order = fields["index"].argsort()
        return {**{name: values[order] for name, values in fields.items()}, "seconds": self.seconds.cpu().numpy()}


def certification_report(results: dict[str, np.ndarray], subject: str, settings: CertificationSettings, class_names: list[str],
                         radii: list[float], pixels: int, check: RadiusCheck) -> dict:
    """The report of `results` (`Certificates.compute`) on images of `pixels` values (C * H * W): certified accuracy and
    per-class certified recall (binary: ``certified_specificity``, ``certified_sensitivity``) at each of `radii`, with the
    side of the L-inf ball each L2 radius contains (r / sqrt(pixels)); abstention rates; PREDICT's accuracy; the cost;
    the radius check's outcome (`radius_check`)."""
    images = len(results["index"])
    rows = [dict(radius=radius, linf_radius=radius / math.sqrt(pixels), **_certified_at(results, radius, class_names)) for radius in radii]
    return dict(
        subject=subject, sigma=settings.sigma, n0=settings.n0, n=settings.n, alpha=settings.alpha, seed=settings.seed, images=images,
        class_names=list(class_names), abstention_rate=_share(results["prediction"] == ABSTAIN),
        predict_abstention_rate=_share(results["predict"] == ABSTAIN), predict_accuracy=_share(results["predict"] == results["label"]),
        largest_certifiable_radius=settings.largest_radius, forward_passes_per_image=settings.n0 + settings.n,
        seconds_per_image=float(results["seconds"]) / images if images else None, radius_check=_radius_check(results, settings, check),
        certified=rows,
    )


def _radius_check(results: dict[str, np.ndarray], settings: CertificationSettings, check: RadiusCheck) -> dict:
    """What `check_radii` found: the images attacked, ``contradicted`` (PREDICT answered another class than the certified
    one: must be 0 below factor 1), ``majority_changed`` (another class got the most estimation draws), ``abstained``
    (PREDICT abstained), and the mean share of estimation draws on the certified class before and after the attack."""
    attacked = results["check_eps"] > 0
    certified = results["prediction"][attacked]
    after = results["check_predict"][attacked]
    share = lambda counts: float(np.take_along_axis(counts, certified[:, None], axis=1).mean() / settings.n) if attacked.any() else None  # noqa: E731
    return dict(asdict(check), method="pgd_l2, EOT of the loss", images_attacked=int(attacked.sum()),
                contradicted=int(((after != ABSTAIN) & (after != certified)).sum()),
                majority_changed=int((results["check_counts"][attacked].argmax(axis=1) != certified).sum()), abstained=int((after == ABSTAIN).sum()),
                certified_share_before=share(results["counts"][attacked]), certified_share_after=share(results["check_counts"][attacked]))


def certified_accuracy_curve(results: dict[str, np.ndarray], subject: str, settings: CertificationSettings, class_names: list[str],
                             largest_radius: float) -> dict:
    """Certified accuracy and per-class certified recall at `CURVE_POINTS` radii from 0 to `largest_radius`."""
    radii = np.linspace(0.0, largest_radius, CURVE_POINTS).tolist()
    points = [_certified_at(results, radius, class_names) for radius in radii]
    return dict(subject=subject, sigma=settings.sigma, images=len(results["index"]), radius=radii,
                **{name: [point[name] for point in points] for name in points[0]})


def write_certification(results: dict[str, np.ndarray], directory: str | Path, subject: str, settings: CertificationSettings,
                        class_names: list[str], radii: list[float], pixels: int, check: RadiusCheck) -> Path:
    """Writes `certificates.json` (per image: index, label, prediction (null: abstained), radius (0 when abstaining),
    p_lower, counts, selection_counts, predict, and the radius check's eps (0: not attacked), counts and PREDICT answer
    after the attack), `certification_report.{json,md}` (`certification_report`) and
    `certified_accuracy.{json,png}` (`certified_accuracy_curve`, to the largest radius `settings.n` draws can certify, or
    the largest of `radii` when they certify none) to `directory`; returns the report's JSON path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    columns = [results[name].tolist() for name in IMAGE_FIELDS]
    images = [{name: None if name in ANSWER_FIELDS and value == ABSTAIN else value for name, value in zip(IMAGE_FIELDS, row)}
              for row in zip(*columns)]
    header = json.dumps(dict(subject=subject, class_names=list(class_names)))[:-1]
    (directory / "certificates.json").write_text(header + ', "images": [\n' + ",\n".join(json.dumps(image) for image in images) + "\n]}\n")  # an image a line
    report = certification_report(results, subject, settings, class_names, radii, pixels, check)
    report_path = directory / "certification_report.json"
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    (directory / "certification_report.md").write_text(_markdown(report))
    curve = certified_accuracy_curve(results, subject, settings, class_names, settings.largest_radius or max(radii))
    (directory / "certified_accuracy.json").write_text(json.dumps(curve, indent=2) + "\n")
    _plot_curve(curve, directory / "certified_accuracy.png")
    return report_path


def _certified_at(results: dict[str, np.ndarray], radius: float, class_names: list[str]) -> dict[str, float | None]:
    """``certified_accuracy`` (right and certified at radius >= `radius`) and the same per class (`recall_names`,
    prefixed ``certified_``; None for a class without images)."""
    labels = results["label"]
    certified = (results["prediction"] == labels) & (results["radius"] >= radius)
    per_class = {f"certified_{name}": _share(certified[labels == label]) for label, name in enumerate(recall_names(class_names))}
    return dict(certified_accuracy=_share(certified), **per_class)


def _share(flags: np.ndarray) -> float | None:
    return float(flags.mean()) if len(flags) else None


def _markdown(report: dict) -> str:
    """The report as a Markdown heading, its scalar figures and a table of its certified rows."""
    scalars = {key: value for key, value in report.items() if key not in ("certified", "class_names")}
    rows = report["certified"]
    columns = list(rows[0])
    lines = [
        f"# Certification of {report['subject']}",
        "",
        "`certified_accuracy`: share of the images classified right by the smoothed classifier with a certified L2 radius of "
        "at least `radius` ([0, 1] pixel units; each holds with probability 1 - alpha); `certified_*`: the same per class; "
        "`linf_radius`: the L-inf ball of that side lies inside the L2 ball of `radius`.",
        "",
        *(f"- {key}: {_cell(value)}" for key, value in scalars.items()),
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
        *("| " + " | ".join(_cell(row[column]) for column in columns) + " |" for row in rows),
    ]
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict):
        return ", ".join(f"{key} {_cell(item)}" for key, item in value.items())
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _plot_curve(curve: dict, path: Path) -> None:
    """Certified accuracy and each class's certified recall against the L2 radius."""
    figure = Figure(figsize=(5, 3.6), layout="constrained")
    axis = figure.subplots()
    for name in [key for key in curve if key.startswith("certified_")]:
        values = [np.nan if value is None else value for value in curve[name]]
        axis.plot(curve["radius"], values, label=name.removeprefix("certified_"), linewidth=2 if name == "certified_accuracy" else 1)
    axis.set(title=f"{curve['subject']} ({curve['images']} images)", xlabel="L2 radius ([0, 1] pixel units)", ylabel="certified",
             ylim=(0, 1.02))
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small")
    figure.savefig(path, dpi=100)
