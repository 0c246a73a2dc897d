"""Is each landmark inside the field of view? A small network that looks at the whole image (or around each point).

The detectors were trained on images that hold every landmark, so when a crop plane cuts one off they
still place it somewhere inside (often on another structure, not on the border). The presence network
answers the question they were never asked: it sees the image resampled on a world-aligned box larger
than any training image (two channels: intensities scaled by their 1st and 99th percentiles, and the
field-of-view mask, 0 outside the image), and gives each landmark the probability that it lies inside.

It is trained on the training cases with crop planes drawn near each landmark (inside or beyond it by up
to ``cut_mm``), so it learns where the anatomy it needs is truncated; it never sees a validation or test
case. Its weights are saved beside the trust model (``presence.pt``, read weights-only).

A box that holds a whole large image has coarse voxels (a 260 mm field of view on 40 voxels: 6.5 mm),
coarser than the few millimetres by which a crop plane cuts a landmark off. The ``local`` mode therefore
looks around each point instead: landmark *k* gets a small patch centred on the detector's point for
it, and the network's output *k* on that patch. It is trained on patches centred on the true positions
(moved into the field of view when cut off) with a random offset of the detectors' typical error, and,
with ``answer_variants``, also on patches centred where the detector itself puts each landmark on cut
training images (on a cut image a detector may place a cut-off landmark far inside, on other anatomy).

Several networks of the same settings, trained from different first weights (seeds), can serve together
(:meth:`PresenceModel.mean_of`): a landmark's probability is then the mean of theirs, which carries less of
any one network's noise. Their weights share one ``presence.pt``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmk3d.io.image import Volume
from lmk3d.trust.cuts import crop

__all__ = ["PRESENCE_FILE", "PresenceConfig", "PresenceModel", "presence_input", "presence_patches"]

PRESENCE_FILE = "presence.pt"


@dataclass(frozen=True)
class PresenceConfig:
    """The box the network sees (``size`` voxels of ``box_mm / size`` mm) and its training.

    ``mode``: ``"global"``, one box centred on the image; ``"local"``, one box per landmark centred on its
    point (training: on its true position, offset by ``jitter_mm`` per axis, Gaussian).
    ``answer_variants`` (local mode, K > 0): each training case also gets K cut variants that the detector
    answers once before the epochs; half of each case's variants in an epoch are drawn from them, the patches
    centred on the detector's points (on the true position where it found none). :meth:`PresenceModel.fit`
    then needs the detector (``answers``).
    """

    box_mm: float = 64.0
    size: int = 40
    channels: int = 8
    epochs: int = 40
    variants_per_case: int = 4
    batch_size: int = 32
    lr: float = 2e-3
    cut_mm: float = 8.0
    seed: int = 0
    mode: str = "global"
    jitter_mm: float = 2.0
    answer_variants: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("global", "local"):
            raise ValueError(f"presence network mode {self.mode!r}: give 'global' or 'local'")
        if self.answer_variants < 0 or (self.answer_variants and self.mode != "local"):
            raise ValueError(f"presence network: answer_variants {self.answer_variants} needs the local mode and a "
                             "count of 0 or more")


def presence_input(volume: Volume, box_mm: float, size: int) -> np.ndarray:
    """``(2, size, size, size)`` float32: scaled intensities and the field-of-view mask on a RAS box.

    The box is aligned with the world axes (R, A, S) and centred on the centre of the image's field of
    view, so the same anatomy lands in the same place whatever the image's voxel order.
    """
    centre_ijk = (np.asarray(volume.shape, dtype=np.float64) - 1.0) / 2.0
    return presence_patches(volume, box_mm, size, volume.ijk_to_ras(centre_ijk).reshape(1, 3))[0]


def presence_patches(volume: Volume, box_mm: float, size: int, centres: np.ndarray) -> np.ndarray:
    """``(K, 2, size, size, size)`` float32: :func:`presence_input`'s two channels on boxes centred on ``centres``.

    ``centres``: ``(K, 3)`` RAS mm. The intensities are scaled by the whole image's 1st and 99th
    percentiles, whatever the patch.
    """
    from scipy import ndimage

    from lmk3d.trust.intensity import percentiles_1_99, points_read, scaled_where_read

    a = np.asarray(volume.array, dtype=np.float32)
    step = box_mm / size
    ax = (np.arange(size) - (size - 1) / 2.0) * step
    box = np.stack(np.meshgrid(ax, ax, ax, indexing="ij"), axis=-1).reshape(-1, 3)
    k = len(centres)
    grid = (box[None] + np.asarray(centres, dtype=np.float64)[:, None]).reshape(-1, 3)
    ijk = volume.ras_to_ijk(grid).reshape(-1, 3).T
    a = scaled_where_read(a, *percentiles_1_99(volume.array), points_read(a.shape, ijk))  # only what is read
    img = ndimage.map_coordinates(a, ijk, order=1, mode="constant", cval=0.0)
    shape = np.asarray(volume.shape, dtype=np.float64)[:, None]
    mask = np.all((ijk >= -0.5) & (ijk <= shape - 0.5), axis=0).astype(np.float32)
    out = np.stack([img.reshape((k,) + (size,) * 3), mask.reshape((k,) + (size,) * 3)], axis=1)
    return out.astype(np.float32)


def _inside_point(volume: Volume, xyz: np.ndarray) -> np.ndarray:
    """``(N, 3)`` RAS: each point moved to the nearest voxel centre inside ``volume`` when it lies outside."""
    ijk = volume.ras_to_ijk(xyz).reshape(-1, 3)
    top = np.asarray(volume.shape, dtype=np.float64) - 1.0
    clipped = np.clip(ijk, 0.0, top)
    moved = np.any(clipped != ijk, axis=1)
    clipped[moved] = np.round(clipped[moved])
    return volume.ijk_to_ras(clipped).reshape(-1, 3)


def _network(n_landmarks: int, config: PresenceConfig) -> Any:
    import torch
    from torch import nn

    from lmk3d.networks.conv import Conv3d
    from lmk3d.networks.pooling import MaxPool3d

    c = config.channels
    final = config.size // 8
    return nn.Sequential(
        Conv3d(2, c, 3, padding=1), nn.ReLU(), MaxPool3d(2),
        Conv3d(c, 2 * c, 3, padding=1), nn.ReLU(), MaxPool3d(2),
        Conv3d(2 * c, 4 * c, 3, padding=1), nn.ReLU(), MaxPool3d(2),
        nn.Flatten(), nn.Linear(4 * c * final ** 3, n_landmarks),
    ).to(torch.device("cpu"))


def _mean(probs: Sequence[np.ndarray]) -> np.ndarray:
    """The members' mean probability (one member: its own, unchanged)."""
    return probs[0] if len(probs) == 1 else np.mean(np.stack(probs), axis=0)


def _random_cut(volume: Volume, xyz: np.ndarray, rng: np.random.Generator, cut_mm: float) -> Volume:
    """A crop of one face plane drawn within ``cut_mm`` of a random landmark (either side of it).

    Half the time the plane is the face nearest the landmark (the cut that can leave it outside), else
    any face.
    """
    from lmk3d.trust.cuts import distance_to_faces_mm

    k = int(rng.integers(len(xyz)))
    if rng.random() < 0.5:
        axis, side = divmod(int(np.argmin(distance_to_faces_mm(volume, xyz[k:k + 1])[0])), 2)
        high = bool(side)
    else:
        axis = int(rng.integers(3))
        high = bool(rng.integers(2))
    ijk = volume.ras_to_ijk(xyz[k]).reshape(3)
    spacing = float(volume.spacing_mm[axis])
    offset = rng.uniform(-cut_mm, cut_mm) / spacing
    lo, hi = [0, 0, 0], list(volume.shape)
    if high:
        hi[axis] = int(np.clip(round(ijk[axis] + offset), 4, volume.shape[axis]))
    else:
        lo[axis] = int(np.clip(round(ijk[axis] + offset), 0, volume.shape[axis] - 4))
    return crop(volume, lo, hi)


class PresenceModel:
    """The presence network with its config (see the module docstring)."""

    def __init__(self, landmark_names: Sequence[str], config: PresenceConfig | None = None) -> None:
        self.landmark_names = tuple(landmark_names)
        self.config = config or PresenceConfig()
        import torch

        with torch.random.fork_rng(devices=[]):  # the same first weights for the same seed, whatever ran before
            torch.manual_seed(self.config.seed)
            self.net = _network(len(self.landmark_names), self.config)
        #: the ensemble's further networks (:meth:`mean_of`), empty for one network; :meth:`fit` trains ``net`` only
        self.others: list[Any] = []
        #: True once trained or loaded
        self.fitted = False
        #: how it was trained (epochs, cases, final loss), saved with the weights
        self.report: dict[str, Any] = {}
        #: what :meth:`fit` adds to its report (e.g. the training data's fingerprint, the weights it started from)
        self.provenance: dict[str, Any] = {}

    def probabilities(self, volume: Volume, points: np.ndarray | None = None) -> np.ndarray:
        """``(N,)`` probability that each landmark lies inside ``volume``'s field of view.

        ``points``: ``(N, 3)`` RAS, the detector's answer; the ``local`` mode needs it (a point not found,
        NaN, gets probability 1: there is nothing to call cut off).
        """
        import torch

        nets = [self.net, *self.others]
        for net in nets:
            net.eval()
        c = self.config
        if c.mode != "local":
            x = torch.from_numpy(presence_input(volume, c.box_mm, c.size))[None]
            with torch.no_grad():
                return _mean([torch.sigmoid(net(x))[0].double().numpy() for net in nets])
        if points is None:
            raise ValueError("a local presence network needs the detector's points")
        points = np.asarray(points, dtype=np.float64).reshape(len(self.landmark_names), 3)
        ok = np.all(np.isfinite(points), axis=1)
        out = np.ones(len(points))
        if ok.any():
            x = torch.from_numpy(presence_patches(volume, c.box_mm, c.size, points[ok]))
            idx = torch.from_numpy(np.flatnonzero(ok))
            rows = torch.arange(len(idx))
            with torch.no_grad():
                out[ok] = _mean([torch.sigmoid(net(x)[rows, idx]).double().numpy() for net in nets])
        return out

    @classmethod
    def mean_of(cls, models: Sequence[PresenceModel]) -> PresenceModel:
        """One presence model whose probabilities are the mean of ``models``' (each fitted, one network each).

        They must answer for the same landmarks with the same settings but their seeds (the same box, mode
        and training), so that their probabilities mean the same thing.
        """
        if len(models) < 2:
            raise ValueError("an ensemble of presence networks needs at least two")
        first = models[0]
        for m in models:
            if m.others:
                raise ValueError("an ensemble's members are single networks, not ensembles")
            if not m.fitted:
                raise ValueError("an ensemble's members must be trained")
            if m.landmark_names != first.landmark_names:
                raise ValueError(f"presence networks for other landmarks ({', '.join(m.landmark_names)} against "
                                 f"{', '.join(first.landmark_names)}) cannot be averaged")
            if dataclasses.replace(m.config, seed=0) != dataclasses.replace(first.config, seed=0):
                raise ValueError(f"presence networks of other settings cannot be averaged: {m.config} against "
                                 f"{first.config}")
        seeds = [m.config.seed for m in models]
        if len(set(seeds)) < len(seeds):  # the same settings and seed train the same network
            raise ValueError(f"presence networks of the same seed in an ensemble (seeds {seeds}): give networks "
                             "trained from different first weights")
        out = cls(first.landmark_names, first.config)
        out.net = first.net
        out.others = [m.net for m in models[1:]]
        out.fitted = True
        out.report = {"ensemble": [m.report for m in models], "members": len(models),
                      "rule": "the mean of the members' probabilities"}
        return out

    @property
    def members(self) -> int:
        """How many networks answer (1 unless an ensemble)."""
        return 1 + len(self.others)

    def for_answer(self, volume: Volume, answer: Any) -> np.ndarray:
        """:meth:`probabilities` for a detector's answer (a ``LandmarkSet``; its points not found are NaN)."""
        return self.probabilities(volume, np.where(answer.found[:, None], answer.xyz_mm_ras, np.nan))

    def _examples(self, volume: Volume, truth: np.ndarray, rng: np.random.Generator,
                  answer: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
        """One training variant's inputs, labels (and for ``local``, each patch's landmark index).

        ``answer``: ``(N, 3)`` the detector's points on ``volume`` (NaN: not found); a local patch is then
        centred on its point, on the jittered true position where it has none.
        """
        c = self.config
        inside = volume.contains_ras(truth, margin=0.5).astype(np.float32)
        if c.mode != "local":
            return presence_input(volume, c.box_mm, c.size)[None], inside[None], np.zeros(1, dtype=np.int64)
        centres = _inside_point(volume, truth) + rng.normal(0.0, c.jitter_mm, size=truth.shape)
        if answer is not None:
            has = np.all(np.isfinite(answer), axis=1)
            centres[has] = answer[has]
        x = presence_patches(volume, c.box_mm, c.size, centres)
        return x, inside[:, None], np.arange(len(truth), dtype=np.int64)

    def fit(self, volumes: Sequence[Volume], truths: Sequence[np.ndarray], log: Any = None,
            deadline: float | None = None, answers: Any = None) -> dict[str, Any]:
        """Train on training images and their ``(N, 3)`` true positions (all found), with random crop planes.

        ``deadline``: a :func:`time.monotonic` time by which the training ends (the server's ``max_minutes``):
        no epoch starts that would end after it, going by the last epoch's duration (the first always runs).
        The report gives the epochs that ran (``epochs_run``) next to the budget.
        ``answers``: ``volume -> (N, 3)`` the detector's points (NaN: not found), needed when the config
        has ``answer_variants``.
        """
        import torch

        if self.others:
            raise ValueError("an ensemble of presence networks is not trained as one; train its members apart")
        c = self.config
        if c.answer_variants and answers is None:
            raise ValueError("presence network: answer_variants needs the detector's answers (fit(..., answers=))")
        rng = np.random.default_rng(c.seed)
        torch.manual_seed(c.seed)
        pool: list[list[tuple[Volume, np.ndarray]]] = [[] for _ in volumes]
        if c.answer_variants:
            pool_rng = np.random.default_rng([c.seed, 1])  # apart from the epochs' generator
            for i, (v, t) in enumerate(zip(volumes, truths, strict=True)):
                for _ in range(c.answer_variants):
                    cut = _random_cut(v, t, pool_rng, c.cut_mm)
                    pool[i].append((cut, np.asarray(answers(cut), dtype=np.float64).reshape(len(t), 3)))
            if log is not None:
                log(f"presence network: the detector answered {c.answer_variants} cut variants of each of "
                    f"{len(volumes)} training cases")
        from_pool = c.variants_per_case - c.variants_per_case // 2 if c.answer_variants else c.variants_per_case
        opt = torch.optim.Adam(self.net.parameters(), lr=c.lr)
        history = []
        last_epoch_s = 0.0
        for epoch in range(c.epochs):
            began = time.monotonic()
            if epoch and deadline is not None and began + last_epoch_s > deadline:
                if log is not None:
                    log(f"presence network: stopped after {epoch} of {c.epochs} epochs (the training's time is up)")
                break
            xs: list[np.ndarray] = []
            ys: list[np.ndarray] = []
            ks: list[np.ndarray] = []
            for i, (v, t) in enumerate(zip(volumes, truths, strict=True)):
                for j in range(c.variants_per_case):
                    answer = None
                    if j >= from_pool:  # one of the detector's answers on a cut variant
                        cut, answer = pool[i][int(rng.integers(len(pool[i])))]
                    else:
                        cut = v if j == 0 and rng.random() < 0.5 else _random_cut(v, t, rng, c.cut_mm)
                    x, y, k = self._examples(cut, t, rng, answer)
                    x[:, 0] *= rng.uniform(0.85, 1.15)  # contrast jitter: the scaling by percentiles is not exact
                    xs.extend(x)
                    ys.extend(y)
                    ks.extend(k)
            order = rng.permutation(len(xs))
            self.net.train()
            losses = []
            for i in range(0, len(order), c.batch_size):
                idx = order[i:i + c.batch_size]
                xb = torch.from_numpy(np.stack([xs[j] for j in idx]))
                yb = torch.from_numpy(np.stack([ys[j] for j in idx]))
                logits = self.net(xb)
                if c.mode == "local":  # each patch answers for its own landmark
                    kb = torch.from_numpy(np.asarray([ks[j] for j in idx]))
                    logits = logits[torch.arange(len(idx)), kb][:, None]
                loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
            for g in opt.param_groups:  # cosine decay over the epoch budget
                g["lr"] = c.lr * 0.5 * (1 + np.cos(np.pi * (epoch + 1) / c.epochs))
            history.append(float(np.mean(losses)))
            last_epoch_s = time.monotonic() - began
            if log is not None:
                log(f"presence epoch {epoch + 1}/{c.epochs}: loss {history[-1]:.4f}")
        self.net.eval()
        self.fitted = True
        self.report = {"epochs": c.epochs, "epochs_run": len(history), "training_cases": len(volumes), "seed": c.seed,
                       "final_loss": history[-1] if history else None, "config": dataclasses.asdict(c),
                       **self.provenance}
        return {"epochs": c.epochs, "epochs_run": len(history), "loss": history, "training_cases": len(volumes)}

    def save(self, directory: str | os.PathLike[str]) -> Path:
        import io

        import torch

        from lmk3d.io.atomic import atomic_write_bytes

        buf = io.BytesIO()
        doc = {"landmark_names": list(self.landmark_names), "config": dataclasses.asdict(self.config),
               "state_dict": self.net.state_dict(), "report": json.dumps(self.report)}
        if self.others:  # one network's file stays as it was before ensembles
            doc["ensemble"] = [net.state_dict() for net in self.others]
        torch.save(doc, buf)
        return atomic_write_bytes(Path(directory) / PRESENCE_FILE, buf.getvalue())

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> PresenceModel | None:
        """The ``presence.pt`` in ``directory`` (read weights-only), or None when there is none."""
        import torch

        path = Path(directory) / PRESENCE_FILE
        if not path.is_file():
            return None
        doc = torch.load(path, map_location="cpu", weights_only=True)
        model = cls(doc["landmark_names"], PresenceConfig(**doc["config"]))
        model.net.load_state_dict(doc["state_dict"])
        model.net.eval()
        for state in doc.get("ensemble") or ():
            with torch.random.fork_rng(devices=[]):  # its first weights are overwritten: leave the generator be
                net = _network(len(model.landmark_names), model.config)
            net.load_state_dict(state)
            net.eval()
            model.others.append(net)
        model.fitted = True
        model.report = json.loads(doc.get("report") or "{}")
        return model
