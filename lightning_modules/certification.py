"""Randomized-smoothing certification of a trained classifier through `Trainer.test`, so that devices, strategy and DDP
come from the Trainer like any evaluation; the work itself is `robust_cxr.certification`."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from callbacks.evaluation_journal import BatchJournal, EvaluationProgress
from robust_cxr.certification import CERTIFIED_RADII, Certificates, CertificationSettings, RadiusCheck, certify_images, check_radii, write_certification
from robust_cxr.smoothing import SmoothingNoise


class SmoothingCertifier(L.LightningModule):
    """CERTIFY and PREDICT on each test batch of the rank, for ``classifier`` behind ``smoothing``; at test end, rank 0
    writes the certificates and the report of all ranks' images (`robust_cxr.certification.write_certification`).

    Each image's noise is keyed by (seed, image index, draw index), so the certificates do not depend on the batch size
    or the number of processes. Each finished batch's results are saved per rank in `journal_dir` (`BatchJournal`) and a
    re-run loads them instead of certifying the batch again; rank 0 logs progress with an ETA.

    Args:
        classifier: [0, 1] images (B, C, H, W) -> logits (B, K) at its operating point (argmax decides).
        smoothing: the noise and any denoiser in front of it (`robust_cxr.smoothing`), called as ``smoothing(images, noise)``.
        settings: sigma, n0, n, alpha, seed and draws per forward pass.
        check: the attack on the certified images that tries to contradict their radii (`RadiusCheck`; none by default).
        class_names: the K classes in label order.
        subject: the report's name of what is certified, e.g. ``teacher+diffusion_smoothing@s0.25``.
        output_dir: where rank 0 writes the results.
        journal_dir: where finished batches are kept for resuming.
        max_images: certify the test images of index < N only (class-stratified); None: all.
        radii: the L2 radii of the report's rows.
    """

    def __init__(self, classifier: nn.Module, smoothing: SmoothingNoise, settings: CertificationSettings, class_names: list[str], subject: str,
                 output_dir: str | Path, journal_dir: str | Path, max_images: int | None = None,
                 radii: tuple[float, ...] = CERTIFIED_RADII, check: RadiusCheck = RadiusCheck()):
        super().__init__()
        if max_images is not None and max_images < 1:
            raise ValueError(f"max_images must be >= 1 or null (every test image), got {max_images}.")
        self.classifier = classifier.eval().requires_grad_(False)
        self.smoothing = smoothing.eval().requires_grad_(False)
        self.settings = settings
        self.check = check
        self.class_names = list(class_names)
        self.subject = subject
        self.output_dir = Path(output_dir)
        self.journal_dir = journal_dir
        self.max_images = max_images
        self.radii = list(radii)
        self.certificates = Certificates()
        self._journal: BatchJournal | None = None
        self._progress: EvaluationProgress | None = None
        self._pixels = 0  # values per image (C * H * W), from the test batches

    def on_test_epoch_start(self) -> None:
        self.certificates.reset()
        self._journal = BatchJournal(self.journal_dir, self.global_rank)
        loader = self.trainer.test_dataloaders
        loader = loader[0] if isinstance(loader, (list, tuple)) else loader
        self._progress = EvaluationProgress(sum(1 for index in loader.sampler if self.max_images is None or index < self.max_images))

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._pixels = batch["image"][0].numel()
        record = self._journal.load(batch_idx)
        resumed = record is not None
        if not resumed:
            record = self._certify(batch)
            self._journal.save(batch_idx, record)
        self.certificates.update(record)
        if len(record["index"]):
            rank_zero_info(self._progress.update(len(record["index"]), attacked=not resumed))

    def _certify(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`certify_images` and `check_radii` on the batch's images of index < `max_images`, with their ``index``,
        ``label`` and the ``seconds`` the certification took (the check's attack not counted), on the CPU."""
        started = time.monotonic()
        keys = batch["index"]
        chosen = keys < self.max_images if self.max_images is not None else torch.ones_like(keys, dtype=torch.bool)
        images, keys = batch["image"][chosen], keys[chosen]
        results = certify_images(self.classifier, self.smoothing, images, keys, self.settings, len(self.class_names))
        seconds = torch.tensor(time.monotonic() - started, dtype=torch.float64)
        results.update(check_radii(self.classifier, self.smoothing, images, keys, results, self.settings, self.check, len(self.class_names)))
        return dict(results, index=keys.cpu(), label=batch["label"][chosen].cpu(), seconds=seconds)

    def on_test_epoch_end(self) -> None:
        results = self.certificates.compute()  # a collective: every rank takes part
        if self.trainer.is_global_zero:
            report = write_certification(results, self.output_dir, self.subject, self.settings, self.class_names, self.radii, self._pixels,
                                         self.check)
            rank_zero_info(f"Certification report: {report}")
