"""Knowledge-distillation losses as pure functions: logits (B, K) in, a scalar loss out.

`kd_loss` is Hinton et al.'s soft-target loss. The robust variants pair clean images x with
adversarial ones x' crafted against the student: ARD (Goldblum et al. 2020) matches the student on
x' to the teacher on x, RSLAD (Zi et al. 2021) also replaces the hard labels by the teacher's soft
labels. In every loss `alpha` weighs the term that follows the teacher (on x' for the robust ones), and
optional per-image `weights` (B,) (e.g. class weights of the labels) turn each mean over images into a weighted mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def check_distillation_settings(temperature: float, alpha: float) -> None:
    """Raises ValueError unless temperature > 0 and alpha lies in [0, 1]."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}.")


def weighted_mean(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """sum(weights * values) / sum(weights) of per-image values (B,); the plain mean for weights None."""
    return values.mean() if weights is None else (weights * values).sum() / weights.sum()


def soft_target_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), (weighted) mean over the batch: logits (B, K) -> scalar.

    The T^2 factor keeps the gradient scale independent of T (Hinton et al. 2015).
    """
    per_image = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=1),
        F.log_softmax(teacher_logits / temperature, dim=1),
        reduction="none",
        log_target=True,
    ).sum(dim=1)
    return temperature**2 * weighted_mean(per_image, weights)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float, alpha: float,
            weights: torch.Tensor | None = None) -> torch.Tensor:
    """alpha * T^2 * KL(teacher || student at temperature T) + (1 - alpha) * CE(student, labels): `ard_loss` with the
    clean images in place of the adversarial ones.

    Args:
        student_logits, teacher_logits: (B, K) for the same images; labels: (B,) class indices.
        temperature: T > 0 softens both distributions; alpha in [0, 1]: 0 is plain cross-entropy.
    """
    return ard_loss(student_logits, student_logits, teacher_logits, labels, temperature, alpha, weights)


def ard_loss(
    student_logits: torch.Tensor,
    adversarial_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """ARD: alpha * T^2 * KL(teacher(x) || student(x') at T) + (1 - alpha) * CE(student(x), labels).

    Args:
        student_logits, teacher_logits: (B, K) student and teacher on the clean images; labels: (B,).
        adversarial_logits: (B', K) student on adversarial versions of the first B' clean images.
    """
    check_distillation_settings(temperature, alpha)
    count = len(adversarial_logits)
    adversarial_weights = None if weights is None else weights[:count]
    adversarial_term = soft_target_kl(adversarial_logits, teacher_logits[:count], temperature, adversarial_weights)
    cross_entropy = weighted_mean(F.cross_entropy(student_logits, labels, reduction="none"), weights)
    return alpha * adversarial_term + (1 - alpha) * cross_entropy


def rslad_loss(
    student_logits: torch.Tensor,
    adversarial_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    alpha: float,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """RSLAD: (1 - alpha) * KL(teacher(x) || student(x)) + alpha * KL(teacher(x) || student(x')), at temperature 1.

    Args:
        student_logits, teacher_logits: (B, K) student and teacher on the clean images.
        adversarial_logits: (B', K) student on adversarial versions of the first B' clean images.
    """
    check_distillation_settings(1.0, alpha)
    count = len(adversarial_logits)
    clean_term = soft_target_kl(student_logits, teacher_logits, weights=weights)
    adversarial_term = soft_target_kl(adversarial_logits, teacher_logits[:count], weights=None if weights is None else weights[:count])
    return (1 - alpha) * clean_term + alpha * adversarial_term
