"""SEViT (Almalik et al.): a frozen ViT classifier and MLP heads on the patch tokens of its first blocks, as one
self-ensemble. Its prediction is the members' hard majority vote; their disagreement (the Frobenius norm of the
pairwise KL divergences of their softmax outputs) is a detector of adversarial inputs."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from robust_cxr.models import NormalizedModel, OperatingPoint

TIE_BREAK = 0.5  # added to the ViT's vote: a tie goes to the ViT's class, a strict majority (one vote ahead) still wins
VOTE_SHARE_FLOOR = 1e-3  # vote shares are floored here before the log, so that a class nobody voted for has a finite logit


class BlockHeads(nn.Module):
    """One MLP per transformer block: patch tokens of block k (B, N, D) -> logits (B, K) by Linear layers
    N * D -> hidden_sizes -> K with ReLU between them. A list of per-block tokens -> stacked logits (heads, B, K)."""

    def __init__(self, num_heads: int, tokens: int, dim: int, num_classes: int, hidden_sizes: Sequence[int]):
        super().__init__()
        widths = [tokens * dim, *hidden_sizes]
        self.heads = nn.ModuleList()
        for _ in range(num_heads):
            layers: list[nn.Module] = []
            for width_in, width_out in zip(widths[:-1], widths[1:]):
                layers += [nn.Linear(width_in, width_out), nn.ReLU(inplace=True)]
            self.heads.append(nn.Sequential(*layers, nn.Linear(widths[-1], num_classes)))

    def forward(self, block_tokens: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.stack([head(tokens.flatten(1)) for head, tokens in zip(self.heads, block_tokens)])


class SelfEnsemble(nn.Module):
    """The self-ensemble as deployed: [0, 1] images (B, C, H, W) -> vote logits (B, K) (`vote_logits`), whose
    gradient is that of the log of the members' mean softmax (a straight-through estimator).

    Members (`member_logits`): the ViT (`classifier`, a timm VisionTransformer behind its normalization) at its
    operating point, then one `BlockHeads` head per block 0 .. heads - 1, all from one forward of the ViT. The ViT is
    frozen and stays in eval mode whatever `train` is called with; ``threshold`` (a buffer, saved with the heads) is
    the `consistency_score` above which an image is flagged as adversarial.
    """

    def __init__(self, classifier: NormalizedModel, operating_point: OperatingPoint, heads: BlockHeads):
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)
        self.operating_point = operating_point.requires_grad_(False)
        self.heads = heads
        self.register_buffer("threshold", torch.tensor(0.0))

    def train(self, mode: bool = True) -> SelfEnsemble:
        super().train(mode)
        self.classifier.eval()
        return self

    def member_logits(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images (B, C, H, W) -> logits (1 + heads, B, K): the ViT's first, then each head's."""
        vit: VisionTransformer = self.classifier.backbone
        features, block_tokens = vit.forward_intermediates(
            self.classifier.normalize(images), indices=list(range(len(self.heads.heads))), output_fmt="NLC")
        return torch.cat([self.operating_point(vit.forward_head(features))[None], self.heads(block_tokens)])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return vote_logits(self.member_logits(images))


def block_tokens_shape(classifier: NormalizedModel, in_chans: int, image_size: int) -> tuple[int, int]:
    """(patch tokens N, width D) of the blocks of the ViT in `classifier` on `in_chans`-channel `image_size` px images."""
    with torch.no_grad():
        _, (tokens,) = classifier.backbone.forward_intermediates(torch.zeros(1, in_chans, image_size, image_size), indices=[0], output_fmt="NLC")
    return tokens.shape[1], tokens.shape[2]


def majority_vote(member_logits: torch.Tensor) -> torch.Tensor:
    """Votes (B, K) of member logits (M, B, K), the first member the ViT: how many members decide each class, plus
    `TIE_BREAK` on the ViT's class, so that argmax is the majority and a tie is decided as the ViT decides."""
    num_classes = member_logits.shape[-1]
    votes = F.one_hot(member_logits.argmax(dim=-1), num_classes).sum(dim=0).to(member_logits.dtype)
    return votes + TIE_BREAK * F.one_hot(member_logits[0].argmax(dim=-1), num_classes)


def vote_logits(member_logits: torch.Tensor) -> torch.Tensor:
    """Member logits (M, B, K) -> logits (B, K) whose value is the log of the vote shares (`majority_vote`, floored at
    `VOTE_SHARE_FLOOR`), so argmax is the majority vote, and whose gradient is that of the log of the members' mean
    softmax: the hard vote has no gradient, so white-box attacks follow the soft ensemble (straight-through)."""
    votes = majority_vote(member_logits)
    hard = torch.log((votes / votes.sum(dim=-1, keepdim=True)).clamp_min(VOTE_SHARE_FLOOR))
    soft = member_logits.softmax(dim=-1).mean(dim=0).log()
    return hard + (soft - soft.detach())


def consistency_score(member_logits: torch.Tensor) -> torch.Tensor:
    """Member logits (M, B, K) -> scores (B,): the Frobenius norm of the (M, M) matrix of KL(p_i || p_j) between the
    members' softmax outputs; 0 when all agree exactly, larger with disagreement (adversarial inputs)."""
    log_p = member_logits.float().log_softmax(dim=-1)
    p = log_p.exp()
    kl = (p * log_p).sum(dim=-1)[:, None] - torch.einsum("ibk,jbk->ijb", p, log_p)  # (M, M, B)
    return kl.flatten(0, 1).norm(dim=0)


class ConsistencyDetector(nn.Module):
    """The self-ensemble's detector, as `DefendedModel.detector`: [0, 1] images (B, C, H, W) -> `consistency_score`
    (B,), flagging scores above the ensemble's ``threshold``."""

    def __init__(self, ensemble: SelfEnsemble):
        super().__init__()
        self.ensemble = ensemble

    @property
    def threshold(self) -> torch.Tensor:
        return self.ensemble.threshold

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return consistency_score(self.ensemble.member_logits(images))
