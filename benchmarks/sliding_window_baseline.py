"""A full-resolution sliding-window heatmap U-Net (the nnLandmark approach) against the three detectors.

    nice -n 10 .venv/bin/python benchmarks/sliding_window_baseline.py  # train 30 min, evaluate, time
    nice -n 10 .venv/bin/python benchmarks/sliding_window_baseline.py --out runs/sw_dry --max-minutes 2 --repeat 1

The baseline is what nnLandmark does with nnU-Net, scaled to this CPU: a U-Net of nnU-Net's layout
(MONAI's ``DynUNet``: two 3x3x3 convolutions per level, instance norm, leaky ReLU, strided
convolutions down, transposed convolutions up) regresses one Gaussian heatmap per landmark at the
image's own resolution, trained on random patches, and predicts the whole image with
``monai.inferers.SlidingWindowInferer`` (overlapping windows blended with a Gaussian weight); each
landmark is the argmax of its channel (refined to sub-voxel by :func:`lmk3d.transforms.heatmap.decode_peaks`).
There is no coarse stage: every voxel of the image goes through the network, which is what the
coarse-to-fine detectors avoid.

What the script does, in this order:

1. **Train** on the 140 training cases of the shipped hippocampus models' ``split.json`` (split seed 0),
   select on the 20 validation cases (the weights of the best validation MRE, the rule fixed before
   the test split is looked at), under the same wall-clock budget as the shipped detectors
   (``--max-minutes 30``, theirs), one torch thread, seed 0. The run goes through
   :class:`lmk3d.training.loop.Trainer`, which writes a resume state after every epoch: an interrupted
   run started again with the same ``--out`` continues where it stopped (the budget counts the time
   already spent). The trained network is ``<out>/checkpoint.pt`` (tensors and plain data, read
   weights-only); a finished one is reused, not retrained.
2. **Test MRE** of the baseline and of the three shipped models (``models/<detector>-hippocampus``, their
   own answer without the trust layer, see :func:`detector_predict`) on the 40 test cases, all in this
   process, scored by :func:`lmk3d.metrics.evaluate`.
3. **Latency**, read -> landmarks (read the NIfTI, preprocess, run, landmarks in world mm; model loading
   and process start not counted), each measurement in a fresh Python process at one torch thread,
   the median of ``--repeat``; the repeats are interleaved over the methods, so a busy spell of the
   shared machine does not fall on one method only. Images: the test case ``hippocampus_004`` (the
   hippocampus models) and the 512x512x200 CT-like phantom of ``benchmarks/bench_speed.py`` (the
   ``models/<detector>-phantom-hn`` models, and for the baseline an **untrained** network of the same
   layout with the phantom's 5 landmark channels: its latency does not depend on its weights). The
   detectors are timed again with their trust check (``<detector>+trust``), reported apart.

It prints one Markdown table (method, test MRE, SD, the paired MRE difference to the sliding window
over the same 160 test landmarks with a 95 % interval from resampling the test cases, the two
latencies, how many times faster than the sliding window each method is, and the mean in-process
seconds per test image) and writes every number, per-landmark errors included, to ``<out>/results.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmk3d import geometry
from lmk3d.data.samples import Sample
from lmk3d.errors import LandmarkError
from lmk3d.io.image import Volume
from lmk3d.landmarks import LandmarkSet

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LMK3D_SHARED", ROOT.parent / "shared")).resolve()
HIPPOCAMPUS = SHARED / "data" / "hippocampus"
DETECTORS = ("prior_guided", "pin", "cascade")
NAME = "sliding_window"
LATENCY_CASE = "hippocampus_004"
TRUST_SUFFIX = "+trust"


@dataclass(frozen=True)
class SlidingWindowConfig:
    """The baseline's sizes (defaults: the run reported in docs/sliding_window.md).

    Attributes:
        roi_size: training patch and inference window ``(D, H, W)`` in voxels. (40, 56, 40) is the
            patch nnU-Net plans for these hippocampus crops (Medical Segmentation Decathlon Task04),
            which hold the whole ~36x50x35 image; each size a multiple of ``2 ** (len(filters) - 1)``.
        filters: channels per level (nnU-Net's 32, 64, 128, 256, 320 halved and cut to 4 levels for a
            2-core CPU).
        sigma: heatmap standard deviation in voxels.
        target_scale: the target Gaussians' peak value. With peak 1 the network first learns to answer
            0 everywhere (the peaks are 0.1 % of a patch) and the first epochs' argmax is anywhere.
        overlap: sliding-window overlap (MONAI's default 0.25; nnU-Net uses 0.5, twice the windows in
            each axis: 0.25 is the faster choice for the baseline).
        mode: window blending (``gaussian``, nnU-Net's).
        sw_batch_size: windows per forward pass (4 takes about 30 % less CPU time than 1 here).
        batch_size: patches per training step.
        learning_rate: Adam's initial rate, on a cosine to 2 % of it over the budget.
        weight_decay: Adam's weight decay.
        foreground_fraction: share of patches forced to hold a landmark (nnU-Net's one third).
        intensity_jitter: training-time random scale ``1 +- j`` and shift ``+- j`` of the normalised image.
        max_epochs: epoch budget (the schedule ends at whichever of this and the time budget comes first).
        modality: ``auto`` (fixed on the first training image), ``CT`` or ``MR``.
    """

    roi_size: tuple[int, int, int] = (40, 56, 40)
    filters: tuple[int, ...] = (16, 32, 64, 128)
    sigma: float = 2.0
    target_scale: float = 100.0
    overlap: float = 0.25
    mode: str = "gaussian"
    sw_batch_size: int = 4
    batch_size: int = 2
    learning_rate: float = 1e-3
    weight_decay: float = 1e-5
    foreground_fraction: float = 1.0 / 3.0
    intensity_jitter: float = 0.1
    max_epochs: int = 1000
    modality: str = "auto"

    def __post_init__(self) -> None:
        levels = len(self.filters)
        if levels < 3:
            raise LandmarkError(f"filters needs at least 3 levels (DynUNet's minimum), got {self.filters}")
        step = 2 ** (levels - 1)
        if len(self.roi_size) != 3 or any(int(r) < step or int(r) % step for r in self.roi_size):
            raise LandmarkError(f"roi_size {self.roi_size}: each of the 3 sizes must be a positive multiple of "
                                f"{step} (2 ** (levels - 1) for {levels} levels)")
        if not 0.0 <= self.overlap < 1.0:
            raise LandmarkError(f"overlap must be in [0, 1), got {self.overlap}")
        if self.modality not in ("auto", "CT", "MR"):
            raise LandmarkError(f"unknown modality {self.modality!r}; choose auto, CT or MR")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SlidingWindowConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise LandmarkError(f"unknown sliding-window config key(s) {', '.join(unknown)}; known: {sorted(known)}")
        kw = dict(d)
        for k in ("roi_size", "filters"):
            if k in kw:
                kw[k] = tuple(int(v) for v in kw[k])
        return cls(**kw)


# --- network and preprocessing (one of each, shared by training, validation and inference) ---------------
def build_network(config: SlidingWindowConfig, out_channels: int) -> torch.nn.Module:
    """The heatmap U-Net: ``(B, 1, D, H, W)`` -> ``(B, out_channels, D, H, W)`` (nnU-Net's layout).

    Example:
        >>> net = build_network(SlidingWindowConfig(roi_size=(8, 8, 8), filters=(4, 8, 16)), 3)
        >>> net(torch.zeros(1, 1, 8, 8, 8)).shape
        torch.Size([1, 3, 8, 8, 8])
    """
    from monai.networks.nets import DynUNet

    k = len(config.filters)
    return DynUNet(spatial_dims=3, in_channels=1, out_channels=out_channels, kernel_size=[3] * k,
                   strides=[1] + [2] * (k - 1), upsample_kernel_size=[2] * (k - 1), filters=list(config.filters),
                   norm_name=("instance", {"affine": True}), res_block=False)


def resolve_modality(config: SlidingWindowConfig, fitted: str | None, volume: Volume) -> str:
    """The config's modality, else the one fixed in training, else a guess from this image."""
    from lmk3d.preprocessing import resolve_modality as resolve

    return resolve(config.modality, fitted, volume.array)


def prepare(volume: Volume, modality: str) -> tuple[torch.Tensor, np.ndarray]:
    """The network's input at the image's own resolution, and its voxel -> world affine.

    The voxels are viewed with their axes towards R, A, S (:mod:`lmk3d.preprocessing`, nothing
    resampled), intensity-normalised by modality (CT: the HU window; MR: 0.5th-99.5th percentiles), the
    background shifted to 0 so that the inferer's zero padding is background.

    Returns:
        ``(1, 1, I, J, K)`` float32 and ``(4, 4)`` ijk (of that tensor) -> world RAS mm.
    """
    from lmk3d.preprocessing import PreparedImage

    prep = PreparedImage.from_volume(volume, modality)
    # At the finest spacing every box-filter factor is 1: the full-resolution grid.
    t, affine, _ = prep.normalised(float(prep.spacing_mm.min()))
    return t, affine


def decode(heatmaps: torch.Tensor, affine: np.ndarray, names: Sequence[str], scale: float = 1.0) -> LandmarkSet:
    """Landmarks from heatmaps: each channel's argmax (sub-voxel refined), to world RAS mm.

    Args:
        heatmaps: ``(N, I, J, K)`` on the grid of ``affine``.
        affine: ijk -> world RAS mm.
        names: the ``N`` landmark names.
        scale: the trained peak value; each landmark's score is its peak divided by it, clipped to [0, 1].
    """
    from lmk3d.transforms.heatmap import decode_peaks

    if heatmaps.shape[0] != len(names):
        raise LandmarkError(f"{heatmaps.shape[0]} heatmap channels for {len(names)} landmark names")
    pos, peak = decode_peaks(heatmaps.float())
    scores = np.clip(peak.cpu().numpy().astype(np.float64) / scale, 0.0, 1.0)
    return LandmarkSet.from_ijk(names, pos.cpu().numpy(), affine, scores=scores)


def inferer(config: SlidingWindowConfig) -> Any:
    from monai.inferers import SlidingWindowInferer

    return SlidingWindowInferer(roi_size=config.roi_size, sw_batch_size=config.sw_batch_size, overlap=config.overlap,
                                mode=config.mode, padding_mode="constant", cval=0.0, progress=False)


def predict_prepared(net: torch.nn.Module, config: SlidingWindowConfig, image: torch.Tensor, affine: np.ndarray,
                     names: Sequence[str]) -> LandmarkSet:
    """Sliding-window heatmaps of a prepared image ``(1, 1, I, J, K)``, decoded to world landmarks."""
    net.eval()
    with torch.no_grad():
        out = inferer(config)(image, net)
    out_t = out.as_tensor() if hasattr(out, "as_tensor") else out
    return decode(out_t[0], affine, names, config.target_scale)


def predict(net: torch.nn.Module, config: SlidingWindowConfig, volume: Volume, names: Sequence[str],
            modality: str | None = None) -> LandmarkSet:
    """Read -> landmarks minus the reading: preprocess ``volume``, slide the network over it, decode.

    Args:
        modality: the one fixed in training (None: ``config.modality``, guessed when ``auto``).
    """
    t, affine = prepare(volume, resolve_modality(config, modality, volume))
    return predict_prepared(net, config, t, affine, names)


# --- training ---------------------------------------------------------------------------------------
@dataclass(eq=False)
class _Case:
    """A prepared training case: image ``(1, I, J, K)``, affine, truth ``(N, 3)`` RAS mm (NaN: missing)."""

    case: str
    image: torch.Tensor
    affine: np.ndarray
    xyz: np.ndarray
    present: np.ndarray


def _load_cases(samples: Sequence[Sample], names: Sequence[str], modality: str) -> list[_Case]:
    from lmk3d.training.cases import sample_truth

    out = []
    for s in samples:
        t, affine = prepare(s.load_image(), modality)
        xyz, present = sample_truth(s, names)
        out.append(_Case(s.case, t[0], affine, xyz, present))
    return out


def patch_origin(shape: Sequence[int], roi: Sequence[int], rng: np.random.Generator,
                 inside: np.ndarray | None = None) -> np.ndarray:
    """A random patch origin ``(3,)`` (voxel index of the patch's first voxel, negative = padding).

    Axes shorter than the patch place the image at a random offset inside it. With ``inside`` (a voxel
    position ``(3,)``), the patch holds that voxel.
    """
    lo_min = np.minimum(0, np.asarray(shape) - np.asarray(roi))
    lo_max = np.maximum(0, np.asarray(shape) - np.asarray(roi))
    if inside is not None:
        p = np.round(np.asarray(inside, dtype=np.float64)).astype(int)
        lo_min = np.maximum(lo_min, p - np.asarray(roi) + 1)
        lo_max = np.maximum(lo_min, np.minimum(lo_max, p))
    return np.array([int(rng.integers(a, b + 1)) for a, b in zip(lo_min, lo_max, strict=True)])


def extract_patch(image: torch.Tensor, origin: Sequence[int] | np.ndarray, roi: Sequence[int]) -> torch.Tensor:
    """``image[:, o:o + roi]`` of ``(C, I, J, K)``, zero (background) where it leaves the image."""
    out = image.new_zeros((image.shape[0], *roi))
    src, dst = [], []
    for a in range(3):
        o, n, r = int(origin[a]), int(image.shape[1 + a]), int(roi[a])
        lo, hi = max(o, 0), min(o + r, n)
        src.append(slice(lo, max(hi, lo)))
        dst.append(slice(lo - o, lo - o + max(hi - lo, 0)))
    out[:, dst[0], dst[1], dst[2]] = image[:, src[0], src[1], src[2]]
    return out


def heatmap_targets(xyz_mm_ras: np.ndarray, affine: np.ndarray, origin: Sequence[int] | np.ndarray, roi: Sequence[int],
                    sigma: float) -> torch.Tensor:
    """Gaussian targets ``(N, *roi)`` (peak 1) of world landmarks on the patch at ``origin``; NaN rows give 0."""
    from lmk3d.transforms.heatmap import gaussian_heatmaps

    ijk = geometry.ras_to_ijk(np.asarray(xyz_mm_ras, dtype=np.float64).reshape(-1, 3), affine) - np.asarray(origin)
    shape = (int(roi[0]), int(roi[1]), int(roi[2]))
    return gaussian_heatmaps(torch.as_tensor(ijk, dtype=torch.float32), shape, sigma)


def train(config: SlidingWindowConfig, train_samples: Sequence[Sample], val_samples: Sequence[Sample],
          names: Sequence[str], out: str | os.PathLike[str] | None = None, *, seed: int = 0,
          max_minutes: float | None = None, max_epochs: int | None = None,
          progress: bool = True) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train the heatmap U-Net; returns it (best validation MRE weights) and a JSON-able report.

    Args:
        out: folder of the resume state (``train_state.pt`` after every epoch) and, at the end, of
            ``checkpoint.pt`` and ``train_report.json``; a resume state found there is continued.
        max_minutes: wall-clock budget of the whole fit (data loading included), counting the time an
            interrupted run already spent.
        max_epochs: caps ``config.max_epochs``.
    """
    from lmk3d.training.cases import case_mre
    from lmk3d.training.loop import STATE_FILE, Trainer, TrainOptions, cosine_lr, optimizer_step, read_train_state

    t_start, cpu_start = time.monotonic(), time.process_time()
    if not train_samples or not val_samples:
        raise LandmarkError(f"training needs training and validation cases, got {len(train_samples)} and "
                            f"{len(val_samples)}")
    state_dir = None if out is None else str(out)
    resume = read_train_state(out) if out is not None and (Path(out) / STATE_FILE).is_file() else None
    spent = 0.0 if resume is None or resume.get("current") is None else float(resume["current"]["report"]["seconds"])
    trainer = Trainer(TrainOptions(seed=seed, max_minutes=max_minutes, max_epochs=max_epochs, device="cpu",
                                   progress=progress, state_dir=state_dir),
                      resume=resume, meta={"config": dataclasses.asdict(config)})
    first = train_samples[0].load_image()
    modality = resolve_modality(config, None, first)
    train_cases = _load_cases(train_samples, names, modality)
    val_cases = _load_cases(val_samples, names, modality)
    net = build_network(config, len(names))
    opt = torch.optim.Adam(net.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    epochs = trainer.epochs(config.max_epochs)
    budget_s = None if max_minutes is None else 60.0 * max_minutes
    deadline = None if budget_s is None else t_start + budget_s - spent
    rng, roi = trainer.rng, config.roi_size

    def train_epoch(epoch: int) -> float:
        done = epoch / epochs
        if budget_s is not None and deadline is not None:
            done = max(done, 1.0 - (deadline - time.monotonic()) / budget_s)
        cosine_lr(opt, config.learning_rate, int(round(1000 * min(done, 1.0))), 1000)
        order = rng.permutation(len(train_cases))
        losses = []
        for b in range(0, len(order), config.batch_size):
            xs, ys, ms = [], [], []
            for i in order[b:b + config.batch_size]:
                c = train_cases[int(i)]
                inside = None
                if rng.random() < config.foreground_fraction and c.present.any():
                    j = int(rng.choice(np.flatnonzero(c.present)))
                    inside = geometry.ras_to_ijk(c.xyz[j], c.affine).reshape(3)
                o = patch_origin(c.image.shape[1:], roi, rng, inside)
                x = extract_patch(c.image, o, roi)
                j_ = config.intensity_jitter
                x = x * float(1.0 + rng.uniform(-j_, j_)) + float(rng.uniform(-j_, j_))
                xs.append(x)
                ys.append(config.target_scale * heatmap_targets(c.xyz, c.affine, o, roi, config.sigma))
                ms.append(torch.as_tensor(c.present))
            pred = trainer.forward(net, torch.stack(xs))
            mask = torch.stack(ms).to(pred.dtype)[:, :, None, None, None]
            # Missing landmarks are left out of the loss, not trained towards an empty map.
            se = (pred - torch.stack(ys)) ** 2 * mask
            loss = se.sum() / (mask.sum() * float(np.prod(roi))).clamp(min=1.0)
            losses.append(optimizer_step(opt, loss))
        return float(np.mean(losses))

    def validate() -> float:
        preds = [predict_prepared(net, config, c.image[None], c.affine, names).xyz_mm_ras for c in val_cases]
        return case_mre(val_cases, preds)  # type: ignore[arg-type]

    report = trainer.phase(NAME, net, train_epoch, validate, max_epochs=epochs, optimizer=opt,
                           deadline=deadline, patience=epochs + 1)
    seconds = time.monotonic() - t_start + spent
    full = {"detector": NAME, "config": dataclasses.asdict(config), "seed": seed, "modality": modality,
            "max_minutes": max_minutes, "n_train": len(train_cases), "n_val": len(val_cases),
            "landmark_names": list(names), "train_seconds": round(seconds, 2),
            # CPU time this process got (this run only, not an interrupted one's): on a shared machine it
            # says how much of the wall-clock budget was computing.
            "cpu_seconds_this_run": round(time.process_time() - cpu_start, 2),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU(s)", "torch_threads": torch.get_num_threads(),
            "phase": report.to_dict()}
    if out is not None:
        from lmk3d.io.atomic import atomic_write_text

        save(out, net, config, names, modality, {k: v for k, v in full.items() if k != "phase"})
        atomic_write_text(Path(out) / "train_report.json", json.dumps(full, indent=2) + "\n")
        trainer.finish()
    trainer.close()
    return net, full


def save(directory: str | os.PathLike[str], net: torch.nn.Module, config: SlidingWindowConfig,
         names: Sequence[str], modality: str | None, training: dict[str, Any]) -> Path:
    """Write ``checkpoint.pt`` (atomically; tensors and plain data only)."""
    from lmk3d.checkpoint import write_checkpoint

    Path(directory).mkdir(parents=True, exist_ok=True)
    return write_checkpoint(directory, {
        "detector": NAME, "profile": "benchmark", "config": dataclasses.asdict(config),
        "landmark_names": list(names),
        "stages": {NAME: {"networks": {"unet": net.state_dict()}, "fitted": {"modality": modality}}},
        "fitted": {"modality": modality}, "training": training})


def load(directory: str | os.PathLike[str]) -> tuple[torch.nn.Module, SlidingWindowConfig, list[str], str | None]:
    """Read a checkpoint written by :func:`save` (weights-only): network, config, names, modality."""
    from lmk3d.checkpoint import CheckpointError, read_checkpoint

    payload = read_checkpoint(directory)
    if payload["detector"] != NAME:
        raise CheckpointError(f"{directory}: a {payload['detector']!r} checkpoint, not the {NAME!r} baseline")
    config = SlidingWindowConfig.from_dict(payload["config"])
    names = [str(n) for n in payload["landmark_names"]]
    net = build_network(config, len(names))
    net.load_state_dict(payload["stages"][NAME]["networks"]["unet"])
    net.eval()
    modality = payload["fitted"].get("modality")
    return net, config, names, None if modality is None else str(modality)


# --- latency in a fresh process ------------------------------------------------------------------------
def measure(method: str, model: str, image_path: str, threads: int) -> dict[str, float]:
    """One read -> landmarks in this process: ``{"seconds", "cpu_seconds", "load_seconds", "peak_rss_mb", "n"}``.

    ``cpu_seconds`` is the CPU time of the same span (all threads): on a shared machine it grows less than
    the wall-clock time when other jobs take the cores.

    ``method`` is ``sliding_window`` (``model``: a checkpoint folder, or ``untrained:N`` for a fresh
    network with N channels) or a detector (``model``: its folder); ``<detector>+trust`` runs the
    detector with its trust check (:mod:`lmk3d.trust`, where the model has one) as a server would.
    """
    torch.set_num_threads(threads)
    from lmk3d.io import read_image

    t0 = time.perf_counter()
    if method == NAME:
        if model.startswith("untrained:"):
            torch.manual_seed(0)
            config, names, modality = SlidingWindowConfig(), [f"L{i}" for i in range(int(model.split(":")[1]))], None
            net = build_network(config, len(names)).eval()
        else:
            net, config, names, modality = load(model)
    else:
        from lmk3d.detectors import load_detector

        det = load_detector(model, "cpu")
        trust = method.endswith(TRUST_SUFFIX)
    t1, c1 = time.perf_counter(), time.process_time()
    volume = read_image(image_path)
    if method == NAME:
        lm = predict(net, config, volume, names, modality)
    else:
        lm = detector_predict(det, volume, trust)
    t2, c2 = time.perf_counter(), time.process_time()
    return {"seconds": t2 - t1, "cpu_seconds": c2 - c1, "load_seconds": t1 - t0, "n": float(len(lm)),
            "peak_rss_mb": _peak_rss_mb()}


def detector_predict(det: Any, volume: Volume, trust: bool = False) -> LandmarkSet:
    """A detector's landmarks; with ``trust`` False its own answer, without the trust layer's check.

    The trust layer (:mod:`lmk3d.trust`: an image-level check and calibrated scores that may mark
    landmarks not found) is not part of the coarse-to-fine method and the baseline has none, so the
    comparison runs without it, as ``models/*/metrics.json`` and ``benchmarks/bench_speed.py`` do.
    """
    import inspect

    if "trust" in inspect.signature(det.predict_all).parameters:
        return det.predict_all(volume, trust=trust).landmarks  # type: ignore[no-any-return]
    return det.predict(volume)  # type: ignore[no-any-return]


def _peak_rss_mb() -> float:
    """This process's peak resident memory in MB.

    ``VmHWM`` where Linux has it: ``ru_maxrss`` survives ``exec``, so a child started by a large
    parent (this script after training) would report the parent's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _bench_speed() -> Any:
    """``benchmarks/bench_speed.py`` as a module (its phantom file, so both scripts time the same image)."""
    spec = importlib.util.spec_from_file_location("bench_speed", Path(__file__).with_name("bench_speed.py"))
    if spec is None or spec.loader is None:
        raise RuntimeError("benchmarks/bench_speed.py not found beside this script")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fresh(method: str, model: str, image: Path, threads: int) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--measure", method, model, str(image), "--threads", str(threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env, cwd=ROOT)
    if done.returncode != 0:
        sys.exit(f"measurement failed: {' '.join(cmd)}\n{done.stderr}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


# --- the benchmark ---------------------------------------------------------------------------------
def _test_scores(method: str, model: str, samples: Sequence[Sample]) -> dict[str, Any]:
    """Test MRE and SD of one method, and its mean in-process (warm) seconds per image."""
    from lmk3d.metrics import evaluate

    if method == NAME:
        net, config, names, modality = load(model)
    else:
        from lmk3d.detectors import load_detector

        det = load_detector(model, "cpu")
    preds, seconds = {}, []
    for s in samples:
        volume = s.load_image()
        t0 = time.perf_counter()
        preds[s.case] = predict(net, config, volume, names, modality) if method == NAME else \
            detector_predict(det, volume)
        seconds.append(time.perf_counter() - t0)
    ev = evaluate(preds, {s.case: s.landmarks for s in samples if s.landmarks is not None})
    errors = [[None if not np.isfinite(e) else float(e) for e in row] for row in ev.errors_mm]
    return {"cases": list(ev.cases), "names": list(ev.names), "errors_mm": errors,
            "mre": ev.overall.mre, "sd": ev.overall.sd, "median": ev.overall.median, "max": ev.overall.max,
            "n_scored": ev.overall.n_scored, "n_missing": ev.overall.n_missing,
            "sdr": ev.overall.sdr, "per_landmark_mre": {n: s.mre for n, s in ev.per_landmark.items()},
            "warm_seconds_per_image": float(np.mean(seconds))}


def paired_difference(errors: np.ndarray, reference: np.ndarray, n_boot: int = 10_000, seed: int = 0
                      ) -> tuple[float, float, float]:
    """Mean of ``errors - reference`` over the landmarks both scored, and its 95 % bootstrap interval.

    Args:
        errors, reference: ``(cases, landmarks)`` radial errors in mm of two methods on the same cases
            (NaN: not scored).
        n_boot: bootstrap resamples; cases are resampled whole (a case's landmarks share its image).

    Returns:
        ``(mean difference, 2.5th percentile, 97.5th percentile)`` in mm; negative = ``errors`` lower.
    """
    d = np.asarray(errors, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    ok = np.isfinite(d)
    if not ok.any():
        return float("nan"), float("nan"), float("nan")
    sums, counts = np.where(ok, d, 0.0).sum(axis=1), ok.sum(axis=1)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, d.shape[0], size=(n_boot, d.shape[0]))
    boot = sums[idx].sum(axis=1) / np.maximum(counts[idx].sum(axis=1), 1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return float(sums.sum() / counts.sum()), float(lo), float(hi)


def _errors(score: dict[str, Any]) -> np.ndarray:
    return np.array([[np.nan if e is None else e for e in row] for row in score["errors_mm"]], dtype=np.float64)


def _splits(split_from: Sequence[str], data: Path) -> Any:
    """The shipped models' split (every one of ``split_from`` must hold the same case lists)."""
    from lmk3d.data import model_split, read_split

    splits = [read_split(d) for d in split_from]
    for d, s in zip(split_from[1:], splits[1:], strict=True):
        if (s.train, s.val, s.test) != (splits[0].train, splits[0].val, splits[0].test):
            sys.exit(f"{d}/split.json differs from {split_from[0]}/split.json: the methods would not share a test set")
    return model_split(split_from[0], data)


def _fmt(x: float) -> str:
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(HIPPOCAMPUS), help="the hippocampus dataset folder")
    parser.add_argument("--models", default="models", help="folder of the shipped <detector>-<dataset> models")
    parser.add_argument("--out", default="runs/sliding_window", help="the baseline's folder (resume state, "
                        "checkpoint, results.json)")
    parser.add_argument("--max-minutes", type=float, default=30.0, help="training wall-clock budget (default 30, "
                        "the shipped detectors' --max-minutes)")
    parser.add_argument("--max-epochs", type=int, help="cap the epochs (default: the config's)")
    parser.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    parser.add_argument("--repeat", type=int, default=3, help="fresh-process latency runs per cell (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads everywhere (default 1)")
    parser.add_argument("--phantom-size", default="512,512,200", help="latency phantom matrix (default 512,512,200)")
    parser.add_argument("--phantom-index", type=int, default=6, help="phantom case index (default 6, bench_speed's)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--measure", nargs=3, metavar=("METHOD", "MODEL", "IMAGE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.chdir(ROOT)
    torch.set_num_threads(args.threads)
    if args.measure:
        method, model, image = args.measure
        print(json.dumps(measure(method, model, image, args.threads)))
        return 0

    from lmk3d.checkpoint import read_checkpoint
    from lmk3d.io.atomic import atomic_write_text

    t_run = time.monotonic()
    models = Path(args.models)
    hippo_models = {d: models / f"{d}-hippocampus" for d in DETECTORS}
    phantom_models = {d: models / f"{d}-phantom-hn" for d in DETECTORS}
    split = _splits([str(p) for p in hippo_models.values()], Path(args.data))
    names = list(split.dataset.names)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    done_ckpt = (out / "checkpoint.pt").is_file() and not (out / "train_state.pt").is_file()
    if done_ckpt:
        print(f"{out}/checkpoint.pt: trained already, reused (delete the folder to train again)", flush=True)
    else:
        print(f"training on {len(split.train)} cases, validating on {len(split.val)}, budget {args.max_minutes} min",
              flush=True)
        train(SlidingWindowConfig(), split.train, split.val, names, out, seed=args.seed, max_minutes=args.max_minutes,
              max_epochs=args.max_epochs, progress=not args.no_progress)
    report = json.loads((out / "train_report.json").read_text())
    phase = report["phase"]
    print(f"trained: {phase['epochs']} epochs in {report['train_seconds'] / 60:.1f} min ({phase['stopped']}), "
          f"best validation MRE {phase['best_val']:.3f} mm at epoch {phase['best_epoch']}", flush=True)

    methods = {NAME: str(out), **{d: str(p) for d, p in hippo_models.items()}}
    scores = {}
    for m, model in methods.items():
        t0 = time.perf_counter()
        scores[m] = _test_scores(m, model, split.test)
        print(f"{m}: test MRE {scores[m]['mre']:.3f} mm ({time.perf_counter() - t0:.0f} s)", flush=True)

    hippo_image = split.dataset.get(LATENCY_CASE).image_path
    phantom_image = _bench_speed().phantom_file(args.phantom_size, 0, args.phantom_index)
    n_phantom = len(read_checkpoint(phantom_models["cascade"])["landmark_names"])
    cells = {(m, "hippocampus"): (model, hippo_image) for m, model in methods.items()}
    cells.update({(NAME, "phantom"): (f"untrained:{n_phantom}", phantom_image)})
    cells.update({(d, "phantom"): (str(p), phantom_image) for d, p in phantom_models.items()})
    cells.update({(d + TRUST_SUFFIX, "hippocampus"): (str(p), hippo_image) for d, p in hippo_models.items()})
    cells.update({(d + TRUST_SUFFIX, "phantom"): (str(p), phantom_image) for d, p in phantom_models.items()})
    runs: dict[tuple[str, str], list[dict[str, float]]] = {k: [] for k in cells}
    for r in range(args.repeat):
        for (m, where), (model, image) in cells.items():
            runs[(m, where)].append(_fresh(m, model, image, args.threads))
            print(f"latency {r + 1}/{args.repeat} {m} {where}: {runs[(m, where)][-1]['seconds']:.3f} s", flush=True)
    lat = {k: statistics.median(x["seconds"] for x in v) for k, v in runs.items()}
    cpu = {k: statistics.median(x["cpu_seconds"] for x in v) for k, v in runs.items()}

    when = datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    machine = f"{platform.machine()}, {os.cpu_count()} CPU(s), {args.threads} torch thread(s), load average " \
              f"{os.getloadavg()[0]:.1f} at the end"
    command = "python benchmarks/sliding_window_baseline.py " + " ".join(sys.argv[1:])
    diffs = {m: paired_difference(_errors(scores[m]), _errors(scores[NAME])) for m in methods if m != NAME}
    results: dict[str, Any] = {
        "date": when, "machine": machine, "command": command,
        "run_minutes": round((time.monotonic() - t_run) / 60, 1),
        "split": {"from": str(hippo_models["cascade"] / "split.json"), "train": len(split.train),
                  "val": len(split.val), "test": len(split.test), "seed": split.split.seed},
        "train_report": {k: v for k, v in report.items() if k != "phase"} | {
            "epochs": phase["epochs"], "best_epoch": phase["best_epoch"], "best_val_mre_mm": phase["best_val"],
            "stopped": phase["stopped"], "history": phase["history"]},
        "latency_images": {"hippocampus": str(hippo_image), "phantom": str(phantom_image)},
        "scores": scores,
        "mre_minus_sliding_window_mm": {m: {"mean": d[0], "ci95": [d[1], d[2]]} for m, d in diffs.items()},
        "latency": {f"{m}/{w}": {"median_s": lat[(m, w)], "median_cpu_s": cpu[(m, w)], "runs": runs[(m, w)]}
                    for (m, w) in runs}}
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")

    sw_h, sw_p = lat[(NAME, "hippocampus")], lat[(NAME, "phantom")]
    print(f"\n`{results['command']}` ({when}; {machine}); test split: {len(split.test)} cases of "
          f"{results['split']['from']} (split seed {split.split.seed}); latency: read -> landmarks, median of "
          f"{args.repeat} fresh processes, on {LATENCY_CASE} and {phantom_image.name}\n")
    print("| method | test MRE (mm) | SD (mm) | MRE minus sliding window (mm, 95 % CI) | latency hippocampus (s) "
          "| latency phantom 512x512x200 (s) | faster than sliding window (hippocampus / phantom) "
          "| warm s / image (40 test cases) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for m in methods:
        h, p = lat[(m, "hippocampus")], lat[(m, "phantom")]
        ratio = "1 (reference)" if m == NAME else f"{sw_h / h:.2g}x / {sw_p / p:.0f}x"
        diff = "-" if m == NAME else f"{diffs[m][0]:+.3f} ({diffs[m][1]:+.3f} to {diffs[m][2]:+.3f})"
        print(f"| {m} | {scores[m]['mre']:.3f} | {scores[m]['sd']:.2f} | {diff} | {_fmt(h)} | {_fmt(p)} | {ratio} "
              f"| {scores[m]['warm_seconds_per_image']:.3f} |")
    print("\nThe same in CPU seconds (median of the same runs; less sensitive to other jobs on the machine):\n")
    print("| method | CPU s hippocampus | CPU s phantom | CPU ratio to sliding window (hippocampus / phantom) |")
    print("|---|---:|---:|---:|")
    for m in methods:
        h, p = cpu[(m, "hippocampus")], cpu[(m, "phantom")]
        ratio = "1 (reference)" if m == NAME else \
            f"{cpu[(NAME, 'hippocampus')] / h:.2g}x / {cpu[(NAME, 'phantom')] / p:.0f}x"
        print(f"| {m} | {_fmt(h)} | {_fmt(p)} | {ratio} |")
    print("\nThe detectors with their trust check (lmk3d.trust, as the server answers; not part of the comparison "
          "above):\n")
    print("| method | latency hippocampus (s) | latency phantom (s) | faster than sliding window (hipp. / phantom) |")
    print("|---|---:|---:|---:|")
    for d in DETECTORS:
        h, p = lat[(d + TRUST_SUFFIX, "hippocampus")], lat[(d + TRUST_SUFFIX, "phantom")]
        print(f"| {d}{TRUST_SUFFIX} | {_fmt(h)} | {_fmt(p)} | {sw_h / h:.2g}x / {sw_p / p:.0f}x |")
    print(f"\nwhole run {results['run_minutes']} min; results in {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
