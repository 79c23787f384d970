"""The attack library on a small trained classifier: budgets, strength, no gradient leaks, determinism."""

from __future__ import annotations

from dataclasses import replace
from typing import get_args

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from datamodules.synthetic import generate_phantoms
from robust_cxr.attacks import (
    METHODS,
    AttackMethod,
    AttackSpec,
    IdentityBackward,
    LogitAverage,
    attacking,
    craft_adversarial,
    keyed_uniform,
    perturbation_norm,
    random_start,
)
from robust_cxr.threat import DefendedModel

EPS = 0.03


def small_cnn(num_classes: int = 2) -> nn.Module:
    """A BatchNorm CNN: attacks must run it in eval mode to be correct."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(64, num_classes),
    )


@pytest.fixture(scope="module")
def trained():
    """A small CNN trained on phantoms to well above chance, with 64 held-out images."""
    torch.manual_seed(0)
    images, labels = generate_phantoms(864, 48, seed=11)
    model = small_cnn()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(8):
        for batch in torch.randperm(800).view(-1, 50):
            loss = F.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    return model, images[800:], labels[800:]


def _accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(images).argmax(1) == labels).float().mean().item()


SPECS = [
    AttackSpec(method="fgsm", eps=EPS),
    AttackSpec(method="pgd", eps=EPS, steps=10),
    AttackSpec(method="bim", eps=EPS, steps=10),
    AttackSpec(method="mifgsm", eps=EPS, steps=10),
    AttackSpec(method="pgd_l2", eps=1.0, steps=10),
    AttackSpec(method="apgd_ce", eps=EPS, steps=10),
    AttackSpec(method="cw_l2", steps=20),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda spec: spec.label)
def test_attack_stays_in_budget_and_lowers_accuracy(trained, spec):
    model, images, labels = trained
    clean = _accuracy(model, images, labels)
    assert clean > 0.75
    adversarial = craft_adversarial(spec, model, images, labels, num_classes=2, keys=torch.arange(len(images)))
    assert adversarial.shape == images.shape and adversarial.dtype == torch.float32
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    if spec.method != "cw_l2":
        assert perturbation_norm(adversarial, images, spec.norm).max() <= spec.eps + 1e-6
    assert _accuracy(model, adversarial, labels) < clean - 0.2


def test_iterative_attacks_are_stronger_than_fgsm(trained):
    model, images, labels = trained
    accuracy = {
        spec.label: _accuracy(model, craft_adversarial(spec, model, images, labels, num_classes=2, keys=torch.arange(64)), labels)
        for spec in SPECS[:2] + SPECS[5:6]
    }
    assert accuracy["fgsm"] >= accuracy["pgd10"] >= accuracy["apgd_ce"] - 1 / 64, accuracy


def test_attack_leaves_parameters_gradients_and_mode_alone(trained):
    model, images, labels = trained
    model.train()
    frozen = next(model.parameters())
    frozen.requires_grad_(False)
    try:
        for parameter in model.parameters():
            parameter.grad = None
        craft_adversarial(SPECS[1], model, images[:8], labels[:8], num_classes=2)
        assert all(p.grad is None for p in model.parameters())
        assert model.training and all(m.training for m in model.modules())
        assert not frozen.requires_grad and all(p.requires_grad for p in list(model.parameters())[1:])
    finally:
        frozen.requires_grad_(True)
        model.eval()


def test_attacks_run_inside_inference_mode(trained):
    model, images, labels = trained
    with torch.inference_mode():
        frozen_batch = images[:8].clone()
    with torch.inference_mode():
        with torch.inference_mode(False):
            usable = frozen_batch.clone()
        adversarial = craft_adversarial(SPECS[1], model, usable, labels[:8], num_classes=2)
    assert perturbation_norm(adversarial, usable, "linf").max() <= EPS + 1e-6


def test_keyed_noise_depends_on_the_key_not_the_batch():
    like = torch.zeros(6, 1, 4, 4)
    keys = torch.tensor([5, 9, 2, 7, 11, 3])
    full = keyed_uniform(like, keys, seed=1)
    part = keyed_uniform(like[:2], torch.tensor([2, 9]), seed=1)
    assert torch.equal(part[0], full[2]) and torch.equal(part[1], full[1])
    assert not torch.equal(full[0], full[1])
    assert not torch.equal(keyed_uniform(like, keys, seed=2), full)
    many = keyed_uniform(torch.zeros(64, 1, 32, 32), torch.arange(64), seed=0)
    assert 0 <= many.min() and many.max() < 1 and abs(many.mean().item() - 0.5) < 0.01


def test_random_start_pgd_is_independent_of_batch_composition(trained):
    model, images, labels = trained
    spec = AttackSpec(method="pgd", eps=EPS, steps=3)
    keys = torch.arange(8)
    together = craft_adversarial(spec, model, images[:8], labels[:8], num_classes=2, keys=keys)
    alone = craft_adversarial(spec, model, images[4:6], labels[4:6], num_classes=2, keys=keys[4:6])
    torch.testing.assert_close(alone, together[4:6], atol=1e-5, rtol=0)


def test_logit_average_averages_draws():
    class Noisy(nn.Module):
        stochastic = True

        def forward(self, images):
            return images.flatten(1)[:, :2] + torch.randn(len(images), 2)

    images = torch.rand(4, 1, 2, 2)
    averaged = LogitAverage(Noisy(), draws=4000)(images)
    torch.testing.assert_close(averaged, images.flatten(1)[:, :2], atol=0.08, rtol=0)


def test_every_method_of_the_spec_is_registered():
    assert set(get_args(AttackMethod)) == set(METHODS)


def test_dlr_attacks_need_three_classes(trained):
    model, images, labels = trained
    with pytest.raises(ValueError, match="at least 3 classes"):
        craft_adversarial(AttackSpec(method="apgd_dlr"), model, images[:4], labels[:4], num_classes=2)


@pytest.mark.parametrize("num_classes", [3, 4])
def test_dlr_and_autoattack_run_on_multiclass_models(num_classes, monkeypatch):
    ran = _record_autoattack(monkeypatch)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes)).eval()
    images = torch.rand(6, 1, 8, 8)
    labels = model(images).argmax(1).detach()
    for spec in (AttackSpec(method="apgd_dlr", eps=0.3, steps=10), AttackSpec(method="autoattack", eps=0.3, queries=100)):
        adversarial = craft_adversarial(spec, model, images, labels, num_classes=num_classes)
        assert perturbation_norm(adversarial, images, "linf").max() <= 0.3 + 1e-6
        assert _accuracy(model, adversarial, labels) < 1.0
    expected = ("standard", ["apgd-ce", "apgd-t", "fab-t", "square"]) if num_classes == 4 else ("custom", ["apgd-ce", "apgd-dlr", "fab", "square"])
    assert ran == [(*expected, 1)]


def _record_autoattack(monkeypatch) -> list[tuple[str, list[str], int]]:
    """(version, attacks, APGD's EOT draws) of every AutoAttack run from now on, in a list that fills as they run."""
    import pyautoattack.autoattack as autoattack_module

    ran = []
    original = autoattack_module.AutoAttack.run_standard_evaluation

    def recording(suite, *args, **kwargs):
        ran.append((suite.version, list(suite.attacks_to_run), suite.apgd.eot_iter))
        return original(suite, *args, **kwargs)

    monkeypatch.setattr(autoattack_module.AutoAttack, "run_standard_evaluation", recording)
    return ran


def test_binary_autoattack_stays_in_budget_and_is_at_least_as_strong_as_apgd_ce(trained, monkeypatch):
    ran = _record_autoattack(monkeypatch)
    model, images, labels = trained
    images, labels = images[:32], labels[:32]
    eps = EPS / 3  # small enough that APGD-CE leaves images for FAB and Square
    apgd = craft_adversarial(AttackSpec(method="apgd_ce", eps=eps, steps=100), model, images, labels, num_classes=2, keys=torch.arange(32))
    spec = AttackSpec(method="autoattack", eps=eps, queries=300)
    adversarial = craft_adversarial(spec, model, images, labels, num_classes=2)
    assert ran == [("custom", ["apgd-ce", "fab", "square"], 1)]
    assert spec.executed(2) == dict(steps=100, eot_samples=1, eot_average=None, version="custom: apgd-ce, fab, square-300")
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    assert perturbation_norm(adversarial, images, "linf").max() <= eps + 1e-6
    assert 0 < _accuracy(model, apgd, labels) < _accuracy(model, images, labels)
    assert _accuracy(model, adversarial, labels) <= _accuracy(model, apgd, labels)


def test_apgd_returns_its_highest_loss_point_for_images_it_cannot_fool(trained):
    model, images, labels = trained
    with torch.no_grad():
        right = model(images).argmax(1) == labels
    images, labels = images[right][:16], labels[right][:16]
    spec = AttackSpec(method="apgd_ce", eps=1e-4, steps=10)  # far too small a budget to flip any image
    keys = torch.arange(len(labels))
    start = random_start(images, spec.eps, spec.norm, keys, seed=0)
    adversarial = craft_adversarial(spec, model, images, labels, num_classes=2, keys=keys, seed=0)
    assert _accuracy(model, adversarial, labels) == 1.0
    with torch.no_grad():
        start_loss = F.cross_entropy(model(start), labels, reduction="none")
        final_loss = F.cross_entropy(model(adversarial), labels, reduction="none")
    assert not torch.equal(adversarial, start), "APGD handed back its random start"
    assert torch.all(final_loss >= start_loss - 1e-6) and torch.any(final_loss > start_loss)


def test_our_apgd_is_as_strong_as_the_reference_implementation(trained):
    from pyautoattack.autopgd_base import APGDAttack

    model, images, labels = trained
    eps = EPS / 3
    reference = APGDAttack(model, n_iter=20, norm="Linf", eps=eps, loss="ce", seed=0, device=images.device)
    reference_adversarial = reference.perturb(images, labels)
    ours = craft_adversarial(AttackSpec(method="apgd_ce", eps=eps, steps=20), model, images, labels, num_classes=2, keys=torch.arange(64))
    assert perturbation_norm(ours, images, "linf").max() <= eps + 1e-6
    assert _accuracy(model, ours, labels) <= _accuracy(model, reference_adversarial, labels) + 2 / 64


@pytest.mark.parametrize("num_classes", [2, 3])
def test_autoattack_on_a_random_model_runs_the_rand_version_over_draws(num_classes, monkeypatch):
    ran = _record_autoattack(monkeypatch)

    class NoisyLinear(nn.Module):
        """A random model: a linear classifier on inputs with fresh Gaussian noise."""

        stochastic = True

        def __init__(self):
            super().__init__()
            self.linear = nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))

        def forward(self, images):
            return self.linear(images + 0.05 * torch.randn_like(images))

    torch.manual_seed(0)
    model = NoisyLinear().eval()
    images = torch.rand(6, 1, 8, 8)
    labels = model.linear(images).argmax(1).detach()
    spec = AttackSpec(method="autoattack", eps=0.3, eot_samples=3)
    adversarial = craft_adversarial(spec, model, images, labels, num_classes=num_classes)
    attacks = ["apgd-ce", "apgd-dlr"][: num_classes - 1]  # no DLR loss without a third logit
    assert ran == []  # not pyautoattack's suite, which judges success on one forward pass
    assert spec.executed(num_classes, stochastic=True) == dict(steps=100, eot_samples=3, eot_average="loss", version="rand: " + ", ".join(attacks))
    assert perturbation_norm(adversarial, images, "linf").max() <= 0.3 + 1e-6
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    assert _accuracy(model.linear, adversarial, labels) < 1.0


def test_executed_settings_say_what_runs():
    assert AttackSpec(method="fgsm").executed()["steps"] == 1
    assert AttackSpec(method="cw_l2", steps=20).executed()["steps"] == 100  # 5 binary-search rounds of 20 steps
    assert AttackSpec(method="pgd", steps=7, eot_samples=4).executed(stochastic=True) == dict(steps=7, eot_samples=4, eot_average="loss", version=None)
    assert AttackSpec(method="pgd", eot_samples=4).executed()["eot_samples"] == 1  # a deterministic source runs one draw
    assert AttackSpec(method="pgd", eot_samples=4, eot_average="logits").executed(stochastic=True)["eot_average"] == "logits"
    assert AttackSpec(method="cw_l2", eot_samples=4).executed(stochastic=True)["eot_average"] == "logits"  # advertorch's CW sees the averaged logits
    assert AttackSpec(method="square", queries=300).executed() == dict(steps=300, eot_samples=1, eot_average=None, version=None)
    assert AttackSpec(method="autoattack", steps=7).executed(10) == dict(
        steps=100, eot_samples=1, eot_average=None, version="standard: apgd-ce, apgd-t, fab-t, square-5000")
    with pytest.raises(ValueError, match="AutoAttack attacks a classifier of 2 or more classes"):
        AttackSpec(method="autoattack").executed(None)


def test_bad_attack_settings_are_errors():
    with pytest.raises(ValueError, match="eps must be > 0"):
        AttackSpec(method="pgd", eps=0.0)
    with pytest.raises(ValueError, match="max_images >= 1"):
        AttackSpec(method="pgd", max_images=0)
    with pytest.raises(ValueError, match="custom loss"):
        craft_adversarial(
            AttackSpec(method="cw_l2"), nn.Flatten(), torch.rand(1, 1, 2, 2), torch.zeros(1, dtype=torch.long),
            num_classes=2, loss_fn=lambda logits, labels: logits.sum(),
        )


def test_attacking_context_restores_state_after_an_error(trained):
    model, _, _ = trained
    model.train()
    with pytest.raises(RuntimeError, match="boom"):
        with attacking(model):
            raise RuntimeError("boom")
    assert model.training and all(p.requires_grad for p in model.parameters())
    model.eval()


def test_bpda_through_an_identity_defense_is_plain_pgd(trained):
    model, images, labels = trained
    identity = nn.Identity()
    subject = DefendedModel.alone("cnn", model).behind("identity", identity)
    spec = AttackSpec(method="pgd", eps=EPS, steps=5)
    keys = torch.arange(len(images))
    plain = craft_adversarial(spec, model, images, labels, keys=keys, seed=3)
    bpda = craft_adversarial(replace(spec, bpda=True), subject.attack_source("whitebox", bpda=True), images, labels, keys=keys, seed=3)
    assert torch.equal(bpda, plain) and not torch.equal(plain, images)
    assert DefendedModel.alone("cnn", model).attack_source("whitebox", bpda=True) is None  # nothing to pass through


def test_bpda_passes_gradients_through_a_defense_without_any(trained):
    model, images, labels = trained
    quantize = _Quantize()  # piecewise constant: zero gradient almost everywhere
    pipeline = nn.Sequential(quantize, model)
    spec = AttackSpec(method="pgd", eps=EPS, steps=5, random_start=False)
    masked = craft_adversarial(spec, pipeline, images, labels)
    bpda = craft_adversarial(replace(spec, bpda=True), IdentityBackward(pipeline, quantize), images, labels)
    assert torch.equal(masked, images)  # plain PGD sees no gradient and never moves
    assert perturbation_norm(bpda, images, "linf").max() <= EPS + 1e-6
    assert _accuracy(pipeline, bpda, labels) < _accuracy(pipeline, images, labels) - 0.2
    assert quantize.forward.__func__ is _Quantize.forward  # the defense's own forward is back after the attack


class _Quantize(nn.Module):
    """Rounds [0, 1] images to 32 levels (steps of about eps)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images * 31).round() / 31


def test_square_stays_in_budget_and_lowers_the_margin(trained):
    model, images, labels = trained
    images, labels = images[:16], labels[:16]
    torch.manual_seed(0)
    adversarial = craft_adversarial(AttackSpec(method="square", eps=EPS, queries=300), model, images, labels)
    assert perturbation_norm(adversarial, images, "linf").max() <= EPS + 1e-6
    assert adversarial.min() >= 0 and adversarial.max() <= 1

    def margins(batch: torch.Tensor) -> torch.Tensor:  # true-class logit minus the other's
        with torch.no_grad():
            logits = model(batch)
        return logits.gather(1, labels[:, None])[:, 0] - logits.gather(1, 1 - labels[:, None])[:, 0]

    clean, attacked = margins(images), margins(adversarial)
    assert attacked.mean() < clean.mean() - 0.5
    assert (attacked < clean).float().mean() >= 0.75
    assert _accuracy(model, adversarial, labels) < _accuracy(model, images, labels)


def test_square_and_bpda_settings():
    assert AttackSpec(method="square", queries=1000).label == "square1000"
    assert AttackSpec(method="square", queries=1000, eot_samples=8).executed(stochastic=True) == dict(steps=1000, eot_samples=8, eot_average="loss",
                                                                                                     version=None)
    assert AttackSpec(method="pgd", steps=100, bpda=True).label == "pgd100_bpda"
    assert AttackSpec(method="pgd", bpda=True).executed()["version"] == "bpda"
    with pytest.raises(ValueError, match="threat_model whitebox"):
        AttackSpec(method="pgd", bpda=True, threat_model="graybox")
    with pytest.raises(ValueError, match="unknown method 'sqare'"):
        AttackSpec(method="sqare")


class _FlipDefense(nn.Module):
    """A deliberately random defense: the classifier's answer, swapped to the other class with probability `p` per
    forward pass and image (a binary classifier's logits exchanged)."""

    stochastic = True

    def __init__(self, classifier: nn.Module, p: float = 0.3):
        super().__init__()
        self.classifier = classifier
        self.p = p

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(images)
        flipped = torch.rand(len(images), device=images.device) < self.p
        return torch.where(flipped[:, None], logits.flip(1), logits)


class _MeanBrightness(nn.Module):
    """Class 1 where an image's mean pixel exceeds 0.5: logits (B, 2) = (-m, m), m = 20 * (mean - 0.5)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        margin = 20 * (images.flatten(1).mean(dim=1) - 0.5)
        return torch.stack([-margin, margin], dim=1)


def _expected_robust_accuracy(base: nn.Module, images: torch.Tensor, adversarial: torch.Tensor, labels: torch.Tensor, p: float) -> float:
    """The robust accuracy of `_FlipDefense(base, p)` in expectation over its draws, clean and attacked scored on
    independent draws (the report's convention): P(right clean) * P(right attacked), from the deterministic base."""
    with torch.no_grad():
        right_clean = (base(images).argmax(1) == labels).double()
        right_attacked = (base(adversarial).argmax(1) == labels).double()
    def chance(right):
        return right * (1 - p) + (1 - right) * p
    return (chance(right_clean) * chance(right_attacked)).mean().item()


def test_single_draw_attacks_overstate_a_random_defense_and_ours_do_not():
    """The libraries' decisions on one forward pass read a 30 %-flip defense as robust; judged over draws, Square, APGD
    and AutoAttack agree with EOT-PGD (every image's base decision flipped: robust accuracy 0.7 * 0.3 = 0.21)."""
    from pyautoattack import AutoAttack
    from pyautoattack.autopgd_base import APGDAttack
    from pyautoattack.square import SquareAttack

    torch.manual_seed(0)
    count, eps = 200, 0.15
    labels = torch.arange(count) % 2
    images = (0.4 + 0.2 * labels.float().view(-1, 1, 1, 1) + 0.02 * torch.randn(count, 1, 8, 8)).clamp(0, 1)
    base = _MeanBrightness()
    defense = _FlipDefense(base).eval()
    robust = {}
    single_draw = {
        "square": SquareAttack(defense, norm="Linf", eps=eps, n_queries=300, seed=0, device=images.device),
        "apgd_ce": APGDAttack(defense, n_iter=20, norm="Linf", eps=eps, loss="ce", seed=0, device=images.device),
    }
    for name, attack in single_draw.items():
        robust[f"{name} (one draw)"] = _expected_robust_accuracy(base, images, attack.perturb(images, labels), labels, 0.3)
    suite = AutoAttack(defense, norm="Linf", eps=eps, version="custom", seed=0, device=images.device)
    suite.verbose, suite.attacks_to_run = False, ["apgd-ce", "square"]
    suite.apgd.n_restarts, suite.square.n_queries = 1, 300
    robust["autoattack (one draw)"] = _expected_robust_accuracy(base, images, suite.run_standard_evaluation(images, labels, batch_size=count)[0], labels, 0.3)
    # The gradient attacks average the draws' logits: on a defense that swaps decisions, the mean cross-entropy of the
    # draws grows as the base grows surer of the truth (the swapped draws' loss), so EOT of the loss would climb away.
    for spec in (AttackSpec(method="pgd", eps=eps, steps=20, eot_samples=8, eot_average="logits"),
                 AttackSpec(method="square", eps=eps, queries=300, eot_samples=8),
                 AttackSpec(method="apgd_ce", eps=eps, steps=20, eot_samples=8, eot_average="logits"),
                 AttackSpec(method="autoattack", eps=eps, eot_samples=8, eot_average="logits")):
        adversarial = craft_adversarial(spec, defense, images, labels, num_classes=2, keys=torch.arange(count),
                                        score_fn=lambda logits: (logits.argmax(1) == labels).double())  # as the callback judges
        robust[spec.label] = _expected_robust_accuracy(base, images, adversarial, labels, 0.3)
    eot_pgd = robust["pgd20"]
    assert abs(eot_pgd - 0.21) < 0.02, robust
    for name in ("square (one draw)", "apgd_ce (one draw)", "autoattack (one draw)"):
        assert robust[name] > eot_pgd + 0.05, robust
    for name in ("square300", "apgd_ce", "autoattack"):
        assert abs(robust[name] - eot_pgd) < 0.02, robust


def test_an_attack_on_a_random_source_needs_eot():
    defense = _FlipDefense(_MeanBrightness())
    images, labels = torch.full((2, 1, 4, 4), 0.4), torch.zeros(2, dtype=torch.long)
    for method in ("pgd", "square", "apgd_ce", "autoattack", "cw_l2"):
        with pytest.raises(ValueError, match="eot_samples >= 2"):
            craft_adversarial(AttackSpec(method=method), defense, images, labels, num_classes=2)


class _FoolingBand(nn.Module):
    """One-pixel images x: logits (m(x), 0) with m(x) = 40 (x - 0.72)^2 - 0.1, so class 0 (the label) is lost only
    for x in (0.67, 0.77)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        margin = 40 * (images.flatten(1)[:, 0] - 0.72) ** 2 - 0.1
        return torch.stack([margin, torch.zeros_like(margin)], dim=1)


@pytest.mark.parametrize("score", [True, False], ids=["judged by the score", "by the loss alone"])
def test_an_image_fooled_at_an_intermediate_step_counts_as_fooled(score):
    """PGD from 0.5 with steps of 0.2 lands on 0.7 (fooled), then overshoots to 0.8 (eps 0.3; right again): the attack
    returns the fooling iterate, not the last."""
    from robust_cxr.metrics import RobustnessCounts

    model, images, labels = _FoolingBand(), torch.full((1, 1, 1, 1), 0.5), torch.zeros(1, dtype=torch.long)
    spec = AttackSpec(method="pgd", eps=0.3, steps=2, step_size=0.2, random_start=False)
    score_fn = (lambda logits: (logits.argmax(1) == labels).double()) if score else None
    adversarial = craft_adversarial(spec, model, images, labels, num_classes=2, score_fn=score_fn)
    torch.testing.assert_close(adversarial, torch.full((1, 1, 1, 1), 0.7))
    last = torch.full((1, 1, 1, 1), 0.8)
    assert model(last).argmax(1).item() == 0  # the last iterate is right again
    counts = RobustnessCounts(2)
    counts.update(labels, model(images), model(adversarial), torch.zeros(1))
    assert counts.compute()["robust_acc"] == 0.0
