"""The training skeleton: phases, budgets, and a resumed run that equals an uninterrupted one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmk3d.errors import LandmarkError
from lmk3d.training.loop import (
    STATE_FILE,
    Trainer,
    TrainOptions,
    cosine_lr,
    mean_radial_error,
    optimizer_step,
    read_train_state,
)


class Interrupted(Exception):
    """Stands for the process being killed at the end of an epoch."""


def two_phase_fit(trainer: Trainer, stop_after: int | None = None) -> dict[str, list[float]]:
    """A small two-phase fit whose every draw comes from the trainer: returns each phase's losses.

    ``stop_after``: raise :class:`Interrupted` once this many epochs (over both phases) have run, after
    the trainer wrote its state for that epoch.
    """
    torch.manual_seed(0)  # the networks are built the same way in every run, as detectors do
    nets = {name: torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1))
            for name in ("first", "second")}
    truth = torch.tensor([[1.0], [-2.0], [0.5]])
    counter = {"epochs": 0}
    losses: dict[str, list[float]] = {}
    for name, net in nets.items():
        opt = torch.optim.Adam(net.parameters(), lr=0.05)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=1)

        def epoch_fn(epoch: int, net: torch.nn.Module = net, opt: torch.optim.Optimizer = opt) -> float:
            x = torch.as_tensor(trainer.rng.normal(size=(16, 3)), dtype=torch.float32)
            return optimizer_step(opt, ((net(x) - x @ truth) ** 2).mean())

        def validate(net: torch.nn.Module = net, sched: object = sched) -> float:
            x = torch.as_tensor(np.random.default_rng(1).normal(size=(32, 3)), dtype=torch.float32)
            v = float(((net(x) - x @ truth) ** 2).mean())
            sched.step(v)  # type: ignore[attr-defined]
            return v

        def counted(epoch: int, fn=epoch_fn) -> float:  # type: ignore[no-untyped-def]
            if stop_after is not None and counter["epochs"] == stop_after:
                raise Interrupted
            counter["epochs"] += 1
            return fn(epoch)

        rep = trainer.phase(name, net, counted, validate, max_epochs=6, optimizer=opt, scheduler=sched, patience=50)
        losses[name] = [row["loss"] for row in rep.history]
    return losses


def test_resumed_run_has_the_losses_of_an_uninterrupted_run(tmp_path):
    whole = two_phase_fit(Trainer(TrainOptions(seed=3, progress=False)))
    for stop in (2, 6, 9):  # inside the first phase, at the phase boundary, inside the second
        folder = tmp_path / f"stop{stop}"
        with pytest.raises(Interrupted):
            two_phase_fit(Trainer(TrainOptions(seed=3, progress=False, state_dir=str(folder))), stop_after=stop)
        state = read_train_state(folder)
        resumed = two_phase_fit(Trainer(TrainOptions(seed=3, progress=False, state_dir=str(folder)), state))
        assert resumed["first"] == whole["first"], stop
        assert resumed["second"] == whole["second"], stop


def test_a_different_seed_gives_different_losses():
    a = two_phase_fit(Trainer(TrainOptions(seed=3, progress=False)))
    b = two_phase_fit(Trainer(TrainOptions(seed=4, progress=False)))
    assert a["first"] != b["first"]


def test_finish_removes_the_state_and_epoch_cap_applies(tmp_path):
    trainer = Trainer(TrainOptions(seed=0, progress=False, state_dir=str(tmp_path), max_epochs=2))
    losses = two_phase_fit(trainer)
    assert [len(v) for v in losses.values()] == [2, 2]
    assert (tmp_path / STATE_FILE).is_file()
    trainer.finish()
    assert not (tmp_path / STATE_FILE).exists()
    with pytest.raises(LandmarkError, match="no train_state.pt"):
        read_train_state(tmp_path)


@pytest.mark.parametrize("kw", [{"max_minutes": 0}, {"max_minutes": -1.0}, {"max_epochs": 0}])
def test_bad_budgets_are_refused(kw):
    with pytest.raises(LandmarkError, match="must be"):
        TrainOptions(**kw)


def test_cosine_schedule_and_mre():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    cosine_lr(opt, 1.0, 0, 10)
    assert opt.param_groups[0]["lr"] == pytest.approx(1.0)
    cosine_lr(opt, 1.0, 5, 10)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)
    cosine_lr(opt, 1.0, 10, 10)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.02)  # the floor
    preds = [np.zeros((2, 3)), np.zeros((2, 3))]
    truths = [np.array([[3.0, 4.0, 0.0], [np.nan] * 3]), np.array([[0.0, 0.0, 1.0], [0.0, 0.0, 9.0]])]
    present = [np.array([True, False]), np.array([True, True])]
    assert mean_radial_error(preds, truths, present) == pytest.approx((5 + 1 + 9) / 3)
    assert mean_radial_error(preds, truths, present, cap_mm=4.0) == pytest.approx((4 + 1 + 4) / 3)
