"""The one training skeleton every stage's networks go through.

A detector's ``fit`` gets a :class:`Trainer` and trains its networks in named **phases** (``coarse``,
``fine``, ``stage1``, ``pin_unit_0_1``...). :meth:`Trainer.phase` runs one phase: epochs until the
epoch budget, ``patience`` validations without improvement, or the time budget; a progress bar with
the loss and the validation MRE; the best-on-validation weights kept. After every epoch it writes a
resume state (weights, optimiser and scheduler states, every random generator's state, the reports
so far) atomically; ``lmk3d train --resume MODEL_DIR`` hands that state to a new :class:`Trainer`,
which skips the finished phases (their final weights restored) and continues the interrupted one at
its next epoch with the same generators, so the resumed run's later losses equal an uninterrupted
run's. Work between phases (estimates of the previous stage, fitted ranges) is deterministic and is
simply done again.

The shared pieces of every training loop also live here: the cosine schedule, the optimiser step and
the mean radial error.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the same trainer trains data-parallel (:mod:`lmk3d.training.distributed`):
it joins the process group, wraps the network of each phase in ``DistributedDataParallel`` (the training
functions call it through :meth:`Trainer.forward`), gives each rank its shard of the training cases
(:meth:`Trainer.shard`), and makes every decision (validation metric, early stop, time budget) rank 0's.
Only rank 0 writes the resume state. A single process runs exactly what it ran before.
"""

from __future__ import annotations

import copy
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmk3d.errors import LandmarkError
from lmk3d.training import distributed

STATE_FILE = "train_state.pt"


def seed_everything(seed: int) -> np.random.Generator:
    """Seed Python, NumPy and torch; return a NumPy generator for the caller's own draws."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def cosine_lr(optimizer: torch.optim.Optimizer, base: float, epoch: int, epochs: int, floor: float = 0.02) -> None:
    """Set the learning rate of ``epoch`` on a cosine from ``base`` to 0, never under ``floor * base``."""
    lr = 0.5 * base * (1.0 + math.cos(math.pi * min(epoch, epochs) / max(epochs, 1)))
    for group in optimizer.param_groups:
        group["lr"] = max(lr, floor * base)


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> float:
    """One step: clear the gradients, back-propagate ``loss``, step; returns the loss as a float."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def radial_errors(preds: Sequence[np.ndarray], truths: Sequence[np.ndarray], present: Sequence[np.ndarray]
                  ) -> np.ndarray:
    """The radial errors (mm) of every present landmark, all cases flattened: ``(M,)``.

    Args:
        preds, truths: per case ``(N, 3)`` world mm; present: per case ``(N,)`` bool.
    """
    errs = [np.linalg.norm(p[m] - t[m], axis=1) for p, t, m in zip(preds, truths, present, strict=True)]
    return np.concatenate(errs) if errs else np.zeros(0)


def mean_radial_error(preds: Sequence[np.ndarray], truths: Sequence[np.ndarray], present: Sequence[np.ndarray],
                      cap_mm: float = np.inf) -> float:
    """MRE (mm) over present landmarks, each error capped at ``cap_mm``; NaN when nothing is present."""
    e = radial_errors(preds, truths, present)
    return float(np.minimum(e, cap_mm).mean()) if e.size else float("nan")


@dataclass
class LoopReport:
    """What happened during one phase (JSON-able through ``to_dict``)."""

    name: str
    epochs: int = 0
    best_epoch: int = -1
    best_val: float = float("inf")
    stopped: str = "max_epochs"
    seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: The learning-rate factor of a fine-tune (the server's ``init: current``): trained weights fine-tuned on a
#: handful of corrected cases at the profile's full rate got worse (docs/registry.md, "Fine-tuning").
FINE_TUNE_LR_SCALE = 0.1


@dataclass(frozen=True)
class TrainOptions:
    """What every detector's training takes, whichever detector it is.

    Attributes:
        seed: seeds every generator (Python, NumPy, torch).
        max_minutes: time budget of the whole fit (None: none); detectors share it between phases.
        max_epochs: caps every phase's epochs (None: the config's epochs).
        device: where the networks train (``"cpu"``, ``"cuda"``; None: CUDA when present).
        progress: show progress bars.
        state_dir: write the resume state there after every epoch (None: no resume state).
        lr_scale: multiplies every phase's learning rate (the config's); a fine-tune of trained weights
            on a few new cases takes smaller steps (the server's :data:`FINE_TUNE_LR_SCALE`).
    """

    seed: int = 0
    max_minutes: float | None = None
    max_epochs: int | None = None
    device: str | None = None
    progress: bool = True
    state_dir: str | None = None
    lr_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise LandmarkError(f"max_minutes must be positive, got {self.max_minutes}")
        if self.max_epochs is not None and self.max_epochs < 1:
            raise LandmarkError(f"max_epochs must be at least 1, got {self.max_epochs}")
        if not (math.isfinite(self.lr_scale) and self.lr_scale > 0):
            raise LandmarkError(f"lr_scale must be a positive number, got {self.lr_scale}")


def _rng_state(rng: np.random.Generator, device: torch.device | None = None) -> dict[str, Any]:
    legacy: tuple[Any, ...] = np.random.get_state(legacy=True)  # type: ignore[assignment]
    state: dict[str, Any] = {
        "numpy_generator": rng.bit_generator.state,
        "python": random.getstate(),
        "numpy_legacy": [legacy[0], torch.from_numpy(np.asarray(legacy[1], dtype=np.int64)), *legacy[2:]],
        "torch": torch.get_rng_state(),
    }
    if device is not None and device.type == "cuda":  # a rank's own GPU only (all of them would wake every GPU)
        state["cuda_device"] = torch.cuda.get_rng_state(device)
    elif device is None and torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(rng: np.random.Generator, state: dict[str, Any], device: torch.device | None = None) -> None:
    rng.bit_generator.state = state["numpy_generator"]
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    leg = state["numpy_legacy"]
    np.random.set_state((leg[0], leg[1].numpy().astype(np.uint32), *leg[2:]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "cuda_device" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_device"], device)


class _Calls(torch.nn.Module):
    """Holds a phase's model for ``DistributedDataParallel``; its forward runs the function it is handed.

    The training functions call their networks through stage methods (``forward_deep``, a stage's
    ``forward`` over several networks...), not through one module's ``forward``: this wrapper lets DDP
    see each of those calls (``ddp(fn, x)``), so it synchronises buffers before and averages the
    gradients after, with the parameters registered once.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)


class Trainer:
    """Runs a detector's training phases (see the module docstring); one per ``fit``.

    Attributes:
        options: the :class:`TrainOptions`.
        rng: the NumPy generator of every random draw of the fit (augmentation, sampling, order); in a
            distributed run rank ``r`` > 0 draws from its own stream (``default_rng([seed, r])``), so
            the ranks augment differently; rank 0 draws what a single process draws.
        device: the resolved torch device (``cuda:LOCAL_RANK`` for a rank of a distributed run on CUDA).
        world: this process's rank and the number of processes (rank 0 of 1 outside torchrun).
        shard_cases: the case ids of this rank's shards (what :meth:`shard` handed out), in order.
        meta: JSON-able facts saved with the resume state (the CLI stores its command there).
        on_epoch: called after every epoch with ``(phase, epochs done, phase's epoch budget, row)``,
            ``row`` being the epoch's ``{"epoch", "loss", ...}`` (the server reports progress with it).
    """

    def __init__(self, options: TrainOptions | None = None, resume: dict[str, Any] | None = None,
                 meta: dict[str, Any] | None = None,
                 on_epoch: Callable[[str, int, int, dict[str, float]], None] | None = None) -> None:
        self.on_epoch = on_epoch
        self.options = options or TrainOptions()
        self.world = distributed.world_from_env()
        distributed.check_resume(resume, self.world)
        self.rng = seed_everything(self.options.seed)
        if self.world.rank > 0:
            self.rng = np.random.default_rng([self.options.seed, self.world.rank])
        torch.use_deterministic_algorithms(True, warn_only=True)
        self.device = torch.device(distributed.rank_device(self.options.device, self.world))
        self._owns_group = distributed.init_group(self.world, self.device)
        #: the process group's backend (``gloo``, ``nccl``) in a distributed run, else None
        self.backend: str | None = None
        if self.world.distributed:
            import torch.distributed as dist

            self.backend = str(dist.get_backend())
        self._ddp: torch.nn.Module | None = None
        self.shard_cases: list[str] = []
        self.start = time.monotonic()
        self.meta = dict(meta or (resume or {}).get("meta", {}))
        self.completed: dict[str, dict[str, Any]] = dict((resume or {}).get("completed", {}))
        self._current: dict[str, Any] | None = (resume or {}).get("current")

    # --- budgets --------------------------------------------------------------------------------
    def deadline(self, share: float = 1.0) -> float | None:
        """``time.monotonic()`` value ending ``share`` of the budget from now (None: no budget)."""
        m = self.options.max_minutes
        return None if m is None else time.monotonic() + 60.0 * m * share

    def remaining_deadline(self) -> float | None:
        """The end of the whole fit's budget (None: no budget)."""
        m = self.options.max_minutes
        return None if m is None else self.start + 60.0 * m

    def minutes_left(self) -> float | None:
        m = self.options.max_minutes
        return None if m is None else max(0.0, m - (time.monotonic() - self.start) / 60.0)

    def epochs(self, configured: int) -> int:
        """A phase's epoch budget: the config's, capped by ``max_epochs``."""
        cap = self.options.max_epochs
        return configured if cap is None else min(configured, cap)

    def lr(self, configured: float) -> float:
        """A phase's learning rate: the config's times ``lr_scale``."""
        return float(configured) * self.options.lr_scale

    # --- data-parallel training --------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        """True on the process that writes files (rank 0; the only process outside torchrun)."""
        return self.world.rank == 0

    def shard(self, items: Sequence[Any], names: Sequence[str] | None = None) -> list[Any]:
        """This rank's share of the training ``items`` for the gradient steps (all of them in one process).

        See :func:`lmk3d.training.distributed.shard`. ``names`` (default: each item's ``case``) are
        recorded in :attr:`shard_cases`. Fitted state must be computed on all the items, never on a shard.
        """
        picked = distributed.shard(range(len(items)), self.world)
        mine = [items[i] for i in picked]
        if names is not None:
            if len(names) != len(items):
                raise ValueError(f"shard: {len(names)} names for {len(items)} items")
            self.shard_cases += [str(names[i]) for i in picked]
        else:
            self.shard_cases += [str(x.case) for x in mine if hasattr(x, "case")]
        return mine

    def forward(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``: the training forward pass of the current phase's networks.

        In a distributed run it goes through the phase's ``DistributedDataParallel`` wrapper, which
        then averages the gradients of the backward pass over the ranks; otherwise it is a plain call.
        """
        if self._ddp is None:
            return fn(*args, **kwargs)
        return self._ddp(fn, *args, **kwargs)

    def agree(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (``value`` in one process): for decisions that must not differ."""
        return distributed.agree(value)

    def _wrap(self, model: torch.nn.Module) -> None:
        if not self.world.distributed or not any(p.requires_grad for p in model.parameters()):
            return
        from torch.nn.parallel import DistributedDataParallel

        # find_unused_parameters: a loss may leave a head out of a batch (no landmark of its group present).
        ids = [self.device.index] if self.device.type == "cuda" else None
        self._ddp = DistributedDataParallel(_Calls(model), device_ids=ids, find_unused_parameters=True)

    def _rng_snapshot(self) -> dict[str, Any]:
        if not self.world.distributed:
            return _rng_state(self.rng)
        mine = _rng_state(self.rng, self.device)
        return {**mine, "ranks": distributed.all_gather(mine)}

    def _restore_rng(self, state: dict[str, Any]) -> None:
        if "ranks" in state:
            _set_rng_state(self.rng, state["ranks"][self.world.rank], self.device)
        else:
            _set_rng_state(self.rng, state)

    def close(self) -> None:
        """Leave the process group this trainer joined (nothing outside a distributed run)."""
        if self._owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._owns_group = False

    # --- resume state ---------------------------------------------------------------------------
    def _write_state(self) -> None:
        if self.options.state_dir is None or not self.is_main:
            return
        import io

        from lmk3d.io.atomic import atomic_write_bytes

        buf = io.BytesIO()
        torch.save({"meta": self.meta, "options": asdict(self.options), "completed": self.completed,
                    "current": self._current, "world_size": self.world.size}, buf)
        atomic_write_bytes(Path(self.options.state_dir) / STATE_FILE, buf.getvalue())

    def finish(self) -> None:
        """The fit is over: remove the resume state (the checkpoint is what stays)."""
        if self.options.state_dir is not None and self.is_main:
            p = Path(self.options.state_dir) / STATE_FILE
            if p.exists():
                os.unlink(p)

    # --- one phase ------------------------------------------------------------------------------
    def phase(
        self,
        name: str,
        model: torch.nn.Module,
        train_epoch: Callable[[int], float],
        validate: Callable[[], float] | None,
        *,
        max_epochs: int,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        deadline: float | None = None,
        patience: int = 10,
        val_every: int = 1,
        metric_name: str = "val_mre_mm",
    ) -> LoopReport:
        """Train ``model`` for one phase; it ends with the weights of its best validation epoch.

        Args:
            train_epoch: runs one epoch (model already in train mode), returns the mean loss.
            validate: returns the validation metric (lower is better, e.g. MRE in mm); None = keep last.
            max_epochs: the phase's epoch budget (capped by the options' ``max_epochs``).
            optimizer, scheduler: saved in the resume state and restored with it.
            deadline: ``time.monotonic()`` value after which the phase stops.
        """
        from tqdm.auto import tqdm

        if name in self.completed:  # finished before the interruption: its final weights, its report
            done = self.completed[name]
            model.load_state_dict(done["model"])
            model.eval()
            # The generators as that phase left them: what follows draws as it did in the first run.
            self._restore_rng(done["rng"])
            return LoopReport(**done["report"])
        max_epochs = self.epochs(max_epochs)
        report = LoopReport(name)
        best_state: dict[str, torch.Tensor] | None = None
        since_best, first = 0, 0
        cur = self._current
        if cur is not None and cur["name"] == name:
            model.load_state_dict(cur["model"])
            if optimizer is not None and cur.get("optimizer") is not None:
                optimizer.load_state_dict(cur["optimizer"])
            if scheduler is not None and cur.get("scheduler") is not None:
                scheduler.load_state_dict(cur["scheduler"])
            best_state, since_best, first = cur["best_state"], int(cur["since_best"]), int(cur["epoch"])
            report = LoopReport(**cur["report"])
            self._restore_rng(cur["rng"])
            self._current = None
        t0 = time.monotonic() - report.seconds
        bar = tqdm(range(first, max_epochs), desc=name, disable=not self.options.progress or not self.is_main,
                   leave=False, dynamic_ncols=True)
        self._wrap(model)
        try:
            report = self._epochs(bar, name, model, train_epoch, validate, report, best_state, since_best, t0,
                                  max_epochs=max_epochs, optimizer=optimizer, scheduler=scheduler, deadline=deadline,
                                  patience=patience, val_every=val_every, metric_name=metric_name)
        finally:
            self._ddp = None
        bar.close()
        model.eval()
        report.seconds = time.monotonic() - t0
        self.completed[name] = {"model": copy.deepcopy(model.state_dict()), "report": report.to_dict(),
                                "rng": self._rng_snapshot()}
        self._write_state()
        return report

    def _epochs(self, bar: Any, name: str, model: torch.nn.Module, train_epoch: Callable[[int], float],
                validate: Callable[[], float] | None, report: LoopReport,
                best_state: dict[str, torch.Tensor] | None, since_best: int, t0: float, *, max_epochs: int,
                optimizer: torch.optim.Optimizer | None, scheduler: Any, deadline: float | None, patience: int,
                val_every: int, metric_name: str) -> LoopReport:
        """The epochs of :meth:`phase`; the model ends with its best validation weights."""
        for epoch in bar:
            model.train()
            loss = float(train_epoch(epoch))
            if self.world.distributed:  # the epoch's loss over all the shards (each rank's mean, averaged)
                loss = float(np.mean(distributed.all_gather(loss)))
            distributed.broadcast_buffers(model)
            row: dict[str, float] = {"epoch": float(epoch), "loss": loss}
            if validate is not None and (epoch % val_every == val_every - 1 or epoch == max_epochs - 1):
                model.eval()
                with torch.no_grad():
                    val = float(self.agree(float(validate())))
                row[metric_name] = val
                if val < report.best_val:
                    report.best_val, report.best_epoch, since_best = val, epoch, 0
                    best_state = copy.deepcopy(model.state_dict())
                else:
                    since_best += 1
            report.history.append(row)
            report.epochs = epoch + 1
            report.seconds = time.monotonic() - t0
            bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k != "epoch"})
            if self.on_epoch is not None:
                self.on_epoch(name, epoch + 1, max_epochs, row)
            stop = ""
            if since_best >= patience:
                stop = "patience"
            elif deadline is not None and time.monotonic() > deadline:
                stop = "time_budget"
            stop = self.agree(stop)
            if stop:
                report.stopped = stop
            self._current = None if stop or epoch + 1 >= max_epochs else {
                "name": name, "epoch": epoch + 1, "model": model.state_dict(), "best_state": best_state,
                "since_best": since_best, "report": report.to_dict(), "rng": self._rng_snapshot(),
                "optimizer": None if optimizer is None else optimizer.state_dict(),
                "scheduler": None if scheduler is None else scheduler.state_dict(),
            }
            if self._current is not None:
                self._write_state()
            if stop:
                break
        if best_state is not None:
            model.load_state_dict(best_state)
        return report


def read_train_state(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The resume state a :class:`Trainer` left in ``directory`` (weights-only read)."""
    from lmk3d.checkpoint import CheckpointError, _load_bytes

    p = Path(directory) / STATE_FILE
    if not p.is_file():
        raise LandmarkError(f"{directory}: no {STATE_FILE} to resume from (the training finished, or it never "
                            "reached the end of an epoch)")
    state = _load_bytes(p, "cpu", str(p))
    if not isinstance(state, dict) or "completed" not in state:
        raise CheckpointError(f"{p}: not an lmk3d training state")
    return state


__all__ = ["FINE_TUNE_LR_SCALE", "LoopReport", "STATE_FILE", "TrainOptions", "Trainer", "cosine_lr",
           "mean_radial_error", "optimizer_step", "radial_errors", "read_train_state", "seed_everything"]
