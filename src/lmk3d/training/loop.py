"""A small, shared training loop: seeding, progress bar, best-on-validation keeping, early stop, time budget.

Detectors train several networks (a coarse one, then patch networks); each goes through
:func:`train_network` with its own epoch and validation functions.
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> np.random.Generator:
    """Seed Python, NumPy and torch; return a NumPy generator for the caller's own draws."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


@dataclass
class LoopReport:
    """What happened during one network's training (JSON-able through ``to_dict``)."""

    name: str
    epochs: int = 0
    best_epoch: int = -1
    best_val: float = float("inf")
    stopped: str = "max_epochs"
    seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def train_network(
    name: str,
    model: torch.nn.Module,
    train_epoch: Callable[[int], float],
    validate: Callable[[], float] | None,
    *,
    max_epochs: int,
    deadline: float | None = None,
    patience: int = 10,
    progress: bool = True,
    val_every: int = 1,
    metric_name: str = "val_mre_mm",
) -> LoopReport:
    """Run epochs until ``max_epochs``, ``patience`` validations without improvement, or ``deadline``.

    Args:
        train_epoch: runs one epoch (model already in train mode), returns the mean loss.
        validate: returns the validation metric (lower is better, e.g. MRE in mm); None = keep last.
        deadline: ``time.monotonic()`` value after which training stops (a time budget).

    The model ends with the weights of its best validation epoch.
    """
    from tqdm.auto import tqdm

    report = LoopReport(name)
    best_state: dict[str, torch.Tensor] | None = None
    since_best = 0
    t0 = time.monotonic()
    bar = tqdm(range(max_epochs), desc=name, disable=not progress, leave=False, dynamic_ncols=True)
    for epoch in bar:
        model.train()
        loss = float(train_epoch(epoch))
        row: dict[str, float] = {"epoch": float(epoch), "loss": loss}
        if validate is not None and (epoch % val_every == val_every - 1 or epoch == max_epochs - 1):
            model.eval()
            with torch.no_grad():
                val = float(validate())
            row[metric_name] = val
            if val < report.best_val:
                report.best_val, report.best_epoch, since_best = val, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                since_best += 1
        report.history.append(row)
        report.epochs = epoch + 1
        bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k != "epoch"})
        if since_best >= patience:
            report.stopped = "patience"
            break
        if deadline is not None and time.monotonic() > deadline:
            report.stopped = "time_budget"
            break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    report.seconds = time.monotonic() - t0
    return report


def deadline_from(max_minutes: float | None, share: float = 1.0) -> float | None:
    """``time.monotonic()`` deadline for ``share`` of a budget of ``max_minutes`` (None = no budget)."""
    return None if max_minutes is None else time.monotonic() + 60.0 * max_minutes * share
