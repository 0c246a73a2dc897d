"""PIN's multi-task loss (Li et al. 2018, Eq. 2) and its direction labels (Eq. 1), missing-aware.

``L = (1 - alpha) * MSE(d, d_GT) + alpha * CE(P, c_GT)`` with ``c_GT`` the sign of the largest
component of ``d_GT``: class ``2i`` for ``+`` along mode ``i``, ``2i + 1`` for ``-``.

With missing landmarks the true ``d`` is only known through the observed landmarks, so the
regression error is measured where it is known: in landmark space, on the observed coordinates,
``|| M W (d - d_GT) ||^2 / n_b``. For a complete case (``M = I``, orthonormal ``W``) this is exactly
the paper's ``|| d - d_GT ||^2 / n_b``. The direction label of a partial case would rest on the
unobserved part of ``d_GT``, so its cross-entropy term is masked out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def direction_labels(d_gt: torch.Tensor) -> torch.Tensor:
    """Eq. 1: the class of the largest-magnitude component and its sign.

    Args:
        d_gt: ``(B, n_b)``.

    Returns:
        ``(B,)`` long in ``[0, 2 n_b)``.
    """
    i = d_gt.abs().argmax(dim=1)
    negative = d_gt.gather(1, i[:, None])[:, 0] <= 0
    return 2 * i + negative.long()


def pin_loss(
    d: torch.Tensor,
    logits: torch.Tensor,
    d_gt: torch.Tensor,
    alpha: float = 0.5,
    coord_mask: torch.Tensor | None = None,
    components: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The combined loss of one batch.

    Args:
        d: ``(B, n_b)`` predicted displacement.
        logits: ``(B, 2 n_b)`` direction logits.
        d_gt: ``(B, n_b)`` true displacement.
        alpha: weight of the classification term (paper: 0.5; 0 = regression only, 1 = classification only).
        coord_mask: ``(B, 3N)`` 1 where the coordinate's landmark is annotated; None = all annotated.
        components: ``W``, ``(3N, n_b)``; needed with ``coord_mask``.

    Returns:
        The scalar loss and its parts ``{"mse": ..., "ce": ...}`` (floats, for logging).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    n_b = d.shape[1]
    if coord_mask is None:
        mse = ((d - d_gt) ** 2).sum(dim=1) / n_b
        complete = torch.ones(d.shape[0], dtype=torch.bool, device=d.device)
    else:
        if components is None:
            raise ValueError("pin_loss: coord_mask needs the shape model's components W (3N, n_b)")
        err = (d - d_gt) @ components.T  # landmark-space error of the predicted move, (B, 3N)
        mse = (coord_mask * err**2).sum(dim=1) / n_b
        complete = coord_mask.bool().all(dim=1)
    mse_mean = mse.mean()
    if complete.any():
        ce = F.cross_entropy(logits[complete], direction_labels(d_gt[complete]))
    else:
        ce = logits.sum() * 0.0
    loss = (1.0 - alpha) * mse_mean + alpha * ce
    return loss, {"mse": float(mse_mean.detach()), "ce": float(ce.detach())}
