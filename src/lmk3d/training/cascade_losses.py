"""Losses and targets of the cascade detector (Tan et al. 2019).

Stage 1 regresses ``N + 1`` heatmap channels. The target of landmark channel ``i`` at voxel ``v`` is
``k * exp(-|v - p_i|^2 / 2 sigma^2)``; the background channel is fixed to
``1 - k * exp(-|v - p_closest|^2 / 2 sigma^2)`` (``p_closest`` = the landmark nearest to ``v``) and
the landmark channels are then scaled by a common factor per voxel so that all ``N + 1`` channels sum
to 1. Unlike a softmax this keeps each landmark's own peak at ``k`` wherever spots do not overlap.

The loss is a weighted MSE whose voxel weights are exponential powers of the predicted values,
``w = exp(gamma * prediction)`` (``gamma = 1`` is the paper's literal form; the prediction is clamped
to ``[0, 1]``, the targets' range, inside the weight, and the weights are treated as constants, not
differentiated), plus the three side-path losses weighted 0.3, 0.6 and 0.9.

Missing landmarks are masked: a sample whose landmark ``i`` is not annotated contributes nothing to
channel ``i``, and nothing to the background channel either (where the unknown landmark lies, the
background target would be wrong).

Stage 2 regresses displacements with the Euclidean loss (the squared distance), masked likewise.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmk3d.transforms.heatmap import gaussian_heatmaps

#: Deep-supervision weights of the side paths s = 1, 2, 3 (coarsest first), from the paper.
SIDE_WEIGHTS: tuple[float, float, float] = (0.3, 0.6, 0.9)


def normalise_with_background(spots: torch.Tensor) -> torch.Tensor:
    """Add the background channel and scale the landmark channels so every voxel sums to 1.

    Args:
        spots: ``(B, N, *spatial)`` landmark heat spots ``k * exp(-d_i^2 / 2 sigma^2)`` with ``0 <= k <= 1``
            (a missing landmark's channel all zero).

    Returns:
        ``(B, N + 1, *spatial)``: the background ``1 - max_i spots_i`` last, and landmark channels
        ``spots_i * max_j spots_j / sum_j spots_j`` (zero where every spot is zero).

    Example:
        >>> t = normalise_with_background(torch.tensor([[[0.8], [0.2]]]))  # one voxel, two landmarks
        >>> [round(v, 4) for v in t.flatten().tolist()]
        [0.64, 0.16, 0.2]
    """
    closest = spots.amax(dim=1, keepdim=True)
    total = spots.sum(dim=1, keepdim=True)
    scale = torch.where(total > 0, closest / total.clamp(min=torch.finfo(spots.dtype).tiny), torch.zeros_like(total))
    return torch.cat([spots * scale, 1.0 - closest], dim=1)


def heatmap_targets(points: torch.Tensor, present: torch.Tensor, shape: Sequence[int], sigma: float,
                    height: float = 1.0) -> torch.Tensor:
    """Stage-1 targets for landmarks given in grid voxel indices.

    Args:
        points: ``(B, N, 3)`` continuous grid indices (ignored where not ``present``).
        present: ``(B, N)`` bool, the annotated landmarks.
        shape: the grid ``(D, H, W)``.
        sigma: Gaussian standard deviation in grid voxels.
        height: ``k``, the Gaussian height (at most 1 so the background stays non-negative).

    Returns:
        ``(B, N + 1, D, H, W)`` normalised targets (background last).
    """
    if not 0.0 < height <= 1.0:
        raise ValueError(f"heatmap height k must be in (0, 1] so the background 1 - k*g stays in [0, 1], got {height}")
    pts = torch.where(present[..., None], points, torch.full_like(points, float("nan")))
    spots = height * gaussian_heatmaps(pts, (int(shape[0]), int(shape[1]), int(shape[2])), sigma)
    return normalise_with_background(spots)


def heatmap_channel_mask(present: torch.Tensor) -> torch.Tensor:
    """``(B, N)`` present landmarks -> ``(B, N + 1)`` channels that enter the loss (background: all present)."""
    return torch.cat([present, present.all(dim=1, keepdim=True)], dim=1)


def exp_weighted_mse(prediction: torch.Tensor, target: torch.Tensor, channel_mask: torch.Tensor,
                     gamma: float = 1.0, include_target: bool = False) -> torch.Tensor:
    """Weighted MSE with weights ``exp(gamma * clamp(prediction, 0, 1))`` (constants), over the masked channels.

    Args:
        prediction, target: ``(B, C, *spatial)``.
        channel_mask: ``(B, C)`` bool, channels that count.
        gamma: the power's scale (1 = the paper's ``exp(prediction)``).
        include_target: weigh the landmark channels (all but the last, the background) by
            ``exp(gamma * max(prediction, target))`` instead (not the paper's form): a heat spot the
            network does not predict yet still gets a large weight, so a small spot in a large grid is
            not drowned by the background from the first step on.

    Returns:
        The scalar ``sum(m * w * (p - t)^2) / (sum(m) * voxels)``; zero when nothing is masked in.
    """
    # Clamped to the targets' range: an untrained network's outliers would otherwise get weights like e^50.
    base = prediction.detach().clamp(0.0, 1.0)
    if include_target:
        base = torch.cat([torch.maximum(base[:, :-1], target[:, :-1]), base[:, -1:]], dim=1)
    w = torch.exp(gamma * base)
    per_channel = (w * (prediction - target) ** 2).flatten(2).mean(dim=2)
    m = channel_mask.to(per_channel.dtype)
    return (per_channel * m).sum() / m.sum().clamp(min=1.0)


def deep_supervision_loss(main: torch.Tensor, sides: Sequence[torch.Tensor], target: torch.Tensor,
                          channel_mask: torch.Tensor, gamma: float = 1.0,
                          side_weights: Sequence[float] = SIDE_WEIGHTS, include_target: bool = False) -> torch.Tensor:
    """The paper's equation (2): ``L(P) + sum_s beta_s L(p^s)`` with the weighted MSE ``L``.

    Args:
        main: ``(B, C, *spatial)`` final output.
        sides: side-path outputs of the same shape, coarsest first (``s = 1, 2, 3``).
        target: ``(B, C, *spatial)``.
        channel_mask: ``(B, C)`` bool.
        side_weights: ``beta_s``, one per side output.
    """
    if len(sides) != len(side_weights):
        raise ValueError(f"{len(sides)} side outputs but {len(side_weights)} side weights")
    loss = exp_weighted_mse(main, target, channel_mask, gamma, include_target)
    for beta, side in zip(side_weights, sides, strict=True):
        loss = loss + float(beta) * exp_weighted_mse(side, target, channel_mask, gamma, include_target)
    return loss


def displacement_loss(prediction: torch.Tensor, target: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Euclidean loss of stage 2: mean squared distance between displacements over present landmarks.

    Args:
        prediction, target: ``(B, N, 3)``.
        present: ``(B, N)`` bool.
    """
    sq = ((prediction - torch.nan_to_num(target)) ** 2).sum(dim=-1)
    m = present.to(sq.dtype)
    return (sq * m).sum() / m.sum().clamp(min=1.0)
