"""Time detectors' inference on a clinical-size CT-like phantom, step by step, against the bare file read.

    .venv/bin/python benchmarks/bench_speed.py                      # the four phantom models, one run
    .venv/bin/python benchmarks/bench_speed.py --model models/cascade-phantom-hn --repeat 5
    .venv/bin/python benchmarks/bench_speed.py --model models/pin-phantom-hn --threads 2 --size 512,512,300
    .venv/bin/python benchmarks/bench_speed.py --before /tmp/head/src  # git archive HEAD src | tar -x -C /tmp/head

One script for every detector (a table, not a test). The phantom (``lmk3d.data.phantoms``, ``clinical``
profile with a fixed matrix, default 512x512x200) is generated once into ``runs/bench`` (git-ignored).

Every measurement runs in a fresh Python process, so its peak resident memory (``ru_maxrss``, taken
once the landmarks are written, and again after the calibration models) is that of one inference:
torch, the model, the image. Each round runs one *bare read* process and then one
process per model, so the ratios compare runs made side by side under the same load. Rows:

- ``imports``: importing torch and the library (``lmk3d.detectors``, ``lmk3d.io``); like ``lmk3d predict``, the
  imports and the model load run inside :func:`lmk3d.startup.startup` (no garbage collection over them);
- ``model_load``: reading the checkpoint and building the networks;
- ``cold_start``: ``imports`` + ``model_load`` (what a fresh ``lmk3d predict`` pays before the image);
- ``read_image``: :func:`lmk3d.io.read_image` (float32 voxels, checked);
- ``preprocess``: the one prepared image every stage reads (:meth:`Detector.prepare`);
- ``stage_<name>``: each stage of ``predict_all`` (the detector's own answer: ``trust=False`` where the
  library has calibration models);
- ``write``: writing the ``.mrk.json``;
- ``end_to_end``: read + preprocess + stages + write (read to written landmarks);
- ``trust``: where the model folder has calibration models (``trust.json``), applying them to the
  detector's answer as ``predict_all`` does by default (scores, radii, cut-off landmarks, the image
  check); timed after the write, not part of ``end_to_end``.

The *bare read* is the least any reader does: ``numpy.asanyarray(nibabel.load(path).dataobj)``, the
stored voxels (int16 here) decompressed, with no conversion or check (nibabel and numpy imported first,
not timed). ``end_to_end / bare read`` is the ratio of the two medians of the same run. The same process
then times ``import torch`` alone: the floor of any cold start that needs torch.

With ``--before SRC`` every round also measures the library found in ``SRC`` (another commit's ``src``),
so before and after are compared under the same load.

Each row has the wall-clock median (min, max) and the median CPU time of the process
(``time.process_time``): on a shared machine the wall clock also counts the time other jobs held the
core, the CPU time does not. The load average before and after the run is printed with the tables.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODELS = ("models/prior_guided-phantom-hn", "models/pin-phantom-hn", "models/cascade-phantom-hn",
                  "models/mean_shape-phantom-hn")
SKIP_ROWS = ("peak_rss_mb", "peak_rss_trust_mb", "found")


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def measure_bare_read(image_path: str) -> dict[str, float]:
    """The bare read in this process, then ``import torch`` (the floor of any cold start with torch).

    Returns ``{"bare_read": s, "bare_read_cpu": s, "peak_rss_mb": MB, "torch_import": s, "torch_import_cpu": s}``
    (the peak RSS is the read's: it is taken before torch is imported).
    """
    import nibabel as nib
    import numpy as np

    w0, c0 = _clock()
    data = np.asanyarray(nib.load(image_path).dataobj)
    w1, c1 = _clock()
    if data.ndim != 3:
        sys.exit(f"{image_path}: expected a 3D image")
    rss = _peak_rss_mb()
    import torch  # noqa: F401

    w2, c2 = _clock()
    return {"bare_read": w1 - w0, "bare_read_cpu": c1 - c0, "peak_rss_mb": rss, "torch_import": w2 - w1,
            "torch_import_cpu": c2 - c1}


def measure(model: str, image_path: str, device: str, threads: int) -> dict[str, float]:
    """One inference in this process: ``{row: seconds}`` and ``{row_cpu: seconds}``, ``peak_rss_mb``, ``found``."""
    import inspect

    marks = [("start", *_clock())]

    def mark(name: str) -> None:
        marks.append((name, *_clock()))

    try:  # as `lmk3d predict` does: no collector passes over the start-up (a --before tree may lack it)
        from lmk3d.startup import startup
    except ImportError:
        startup = contextlib.nullcontext
    with startup():
        import torch

        torch.set_num_threads(threads)
        from lmk3d.detectors import load_detector
        from lmk3d.io import read_image, write_landmarks

        mark("imports")
    with startup():
        det = load_detector(model, device)
    mark("model_load")
    image = read_image(image_path)
    mark("read_image")
    prep = det.prepare(image)
    if det.device.type == "cuda":
        torch.cuda.synchronize(det.device)
    mark("preprocess")
    # The detector's own answer (calibration models, where the library has them, are timed elsewhere).
    raw = {"trust": False} if "trust" in inspect.signature(det.predict_all).parameters else {}
    pred = det.predict_all(image, prep, **raw)
    mark("stages")
    out = Path(image_path).with_suffix("").with_suffix(f".{det.name}.mrk.json")
    write_landmarks(out, pred.landmarks)
    mark("write")
    rss = _peak_rss_mb()
    trust = getattr(det, "trust", None)
    if trust is not None:  # the calibration models a plain `predict` applies after the detector (lmk3d.trust)
        from lmk3d.trust import apply_trust

        apply_trust(trust, pred.landmarks, pred.stages[0].landmarks if len(pred.stages) > 1 else None, image)
        mark("trust")
    times = {name: (w, c) for name, w, c in marks}
    row: dict[str, float] = {}

    def put(name: str, start: str, end: str) -> None:
        row[name] = times[end][0] - times[start][0]
        row[name + "_cpu"] = times[end][1] - times[start][1]

    put("imports", "start", "imports")
    put("model_load", "imports", "model_load")
    put("cold_start", "start", "model_load")
    put("read_image", "model_load", "read_image")
    put("preprocess", "read_image", "preprocess")
    for s in pred.stages:  # the runner times each stage (wall clock only)
        row[f"stage_{s.name}"] = s.seconds
    put("write", "stages", "write")
    put("end_to_end", "model_load", "write")
    if "trust" in times:
        put("trust", "write", "trust")
    row["peak_rss_mb"] = rss  # read to written landmarks
    row["peak_rss_trust_mb"] = _peak_rss_mb()  # the same, then the calibration models
    row["found"] = float(pred.landmarks.found.sum())
    return row


def device_name(device: str) -> str:
    """The device in words (the GPU's name on CUDA)."""
    import platform

    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            sys.exit("--device cuda: no CUDA device on this machine")
        return f"{torch.cuda.get_device_name(torch.device(device))} (CUDA {torch.version.cuda})"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def phantom_file(size_text: str, seed: int, index: int) -> Path:
    """The benchmark phantom's NIfTI file, generated on first use."""
    import dataclasses

    from lmk3d.data.phantoms import PROFILES, make_phantom, parse_size
    from lmk3d.io import write_image

    size = parse_size(size_text)
    path = ROOT / "runs" / "bench" / f"phantom_{'x'.join(map(str, size))}_s{seed}_i{index}.nii.gz"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        phantom = make_phantom(seed, index, dataclasses.replace(PROFILES["clinical"], size=size))
        write_image(path, phantom.volume)
    return path


def run_fresh(args: list[str], src: str | None = None) -> dict[str, float]:
    """Run this script with ``args`` in a fresh process (importing ``lmk3d`` from ``src`` if given); its last
    output line is the JSON row."""
    paths = [src, os.environ.get("PYTHONPATH", "")] if src else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)} if src else None
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        sys.exit(f"measurement failed ({' '.join(args)}):\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def median(rows: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def step_table(rows: list[dict[str, float]]) -> list[str]:
    """One model's rows: wall median (min, max) and CPU median."""
    lines = ["| step | wall s (median) | min | max | CPU s (median) |", "|---|---|---|---|---|"]
    for key in rows[0]:
        if key in SKIP_ROWS or key.endswith("_cpu"):
            continue
        vals = [r[key] for r in rows]
        cpu = f"{median(rows, key + '_cpu'):.3f}" if key + "_cpu" in rows[0] else "-"
        lines.append(f"| {key} | {statistics.median(vals):.3f} | {min(vals):.3f} | {max(vals):.3f} | {cpu} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=list(DEFAULT_MODELS),
                        help="model folders (any detectors; default: the four phantom-hn models)")
    parser.add_argument("--size", default="512,512,200", help="phantom matrix I,J,K (default 512,512,200)")
    parser.add_argument("--seed", type=int, default=0, help="phantom seed (default 0)")
    parser.add_argument("--index", type=int, default=6, help="phantom case index (default 6: LPS, "
                        "0.67 x 0.67 x 1.33 mm, the smallest field of view of the first ten)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of fresh processes (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: on a shared 2-core "
                        "machine a second thread mostly waits for the other jobs)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--before", metavar="SRC", help="also measure the library in this source folder (e.g. a "
                        "commit unpacked with `git archive`), in the same rounds: before and after side by side")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--measure-bare-read", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.chdir(ROOT)
    if args.measure_bare_read:
        print(json.dumps(measure_bare_read(args.measure_bare_read)))
        return 0
    if args.measure:
        print(json.dumps(measure(args.model[0], args.measure, args.device, args.threads)))
        return 0

    path = phantom_file(args.size, args.seed, args.index)
    trees = [("after", None)] + ([("before", str(Path(args.before).resolve()))] if args.before else [])
    load_before = os.getloadavg()
    t0 = time.time()
    bare: list[dict[str, float]] = []
    rows: dict[tuple[str, str], list[dict[str, float]]] = {(t, m): [] for m in args.model for t, _ in trees}
    for _ in range(args.repeat):
        bare.append(run_fresh(["--measure-bare-read", str(path)]))
        for m in args.model:
            for tree, src in trees:
                rows[(tree, m)].append(run_fresh(["--model", m, "--measure", str(path), "--device", args.device,
                                                  "--threads", str(args.threads)], src))
    load_after = os.getloadavg()
    print(f"`python benchmarks/bench_speed.py {' '.join(sys.argv[1:])}`: {path.relative_to(ROOT)} "
          f"({path.stat().st_size / 1e6:.0f} MB), {args.threads} torch thread(s), device: {device_name(args.device)}, "
          f"{args.repeat} rounds of fresh processes in {time.time() - t0:.0f} s, "
          f"{time.strftime('%Y-%m-%d %H:%M')}; load average (1, 5, 15 min) before "
          f"{', '.join(f'{v:.1f}' for v in load_before)}, after {', '.join(f'{v:.1f}' for v in load_after)}"
          + (f"; before = {args.before}" if args.before else "") + "\n")
    bare_wall, bare_cpu = median(bare, "bare_read"), median(bare, "bare_read_cpu")
    print(f"bare read: wall {bare_wall:.3f} s (min {min(r['bare_read'] for r in bare):.3f}, max "
          f"{max(r['bare_read'] for r in bare):.3f}), CPU {bare_cpu:.3f} s, peak RSS "
          f"{median(bare, 'peak_rss_mb'):.0f} MB; `import torch` alone: wall {median(bare, 'torch_import'):.3f} s, "
          f"CPU {median(bare, 'torch_import_cpu'):.3f} s\n")
    print("| model | tree | end to end s | / bare read | CPU s | / bare read CPU | peak RSS MB | cold start s "
          "| cold start CPU s | trust s (after) | peak RSS with trust MB | found |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (tree, m), rs in rows.items():
        e2e, e2e_cpu = median(rs, "end_to_end"), median(rs, "end_to_end_cpu")
        trust = f"{median(rs, 'trust'):.3f}" if "trust" in rs[0] else "-"
        print(f"| {Path(m).name} | {tree} | {e2e:.3f} | {e2e / bare_wall:.2f} | {e2e_cpu:.3f} | "
              f"{e2e_cpu / bare_cpu:.2f} | {median(rs, 'peak_rss_mb'):.0f} | {median(rs, 'cold_start'):.3f} | "
              f"{median(rs, 'cold_start_cpu'):.3f} | {trust} | {median(rs, 'peak_rss_trust_mb'):.0f} | "
              f"{int(rs[0]['found'])} |")
    for (tree, m), rs in rows.items():
        rss = [round(r["peak_rss_mb"]) for r in rs]
        print(f"\n`{m}`, {tree} (peak RSS per process {rss} MB)\n")
        print("\n".join(step_table(rs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
