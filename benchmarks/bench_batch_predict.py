"""Throughput of ``lmk3d predict`` over a batch of images, reading ahead (streamed) or one image at a time.

    .venv/bin/python benchmarks/bench_batch_predict.py
    .venv/bin/python benchmarks/bench_batch_predict.py --detectors cascade --phantoms 6 --repeat 5

Two batches: the 40 test-split images of the hippocampus models (small MR volumes, ``../shared/data``)
and ``--phantoms`` CT-like phantoms of 512 x 512 x 200 (``clinical`` profile, seed 0, cases 0, 1, ...,
generated once into ``runs/bench``, git-ignored; the same files as ``bench_speed.py``'s). For every
detector and batch, ``lmk3d predict --prefetch 0`` (each image read when its turn comes) and
``--prefetch 1`` (the next image read in a background thread while the current one runs) each run
``--repeat`` times, every run in a fresh process with one torch thread. A run's seconds go from
loading the model to the last file written (the imports are done before the clock starts); images/s
is the batch size over them. The table prints the medians, the ratio streamed / not and the peak RSS
(the streamed run holds one more image).

The machine may be shared: the runs of one row alternate between the two modes, so a slow spell
hits both.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HIPPO = ROOT.parent / "shared" / "data" / "hippocampus"


def measure(model: str, images: list[str], prefetch: int) -> dict[str, float]:
    """One ``lmk3d predict`` in this process: seconds, images, peak RSS."""
    import resource

    import torch

    torch.set_num_threads(1)
    import lmk3d.detectors  # noqa: F401  (imports torch and MONAI before the clock starts)
    from lmk3d.cli import main as lmk3d_main

    with tempfile.TemporaryDirectory(prefix="bench-batch-") as out:
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            rc = lmk3d_main(["predict", "--model", model, "--out", out, "--device", "cpu", "--prefetch",
                             str(prefetch), *images])
        seconds = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"lmk3d predict exited with {rc}")
    return {"seconds": seconds, "images": float(len(images)),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}


def hippocampus_images(model: Path) -> list[str]:
    """The test-split images of a hippocampus model (its ``split.json``)."""
    from lmk3d.data import read_split

    return [str(HIPPO / "images" / f"{c}.nii.gz") for c in read_split(model).subset("test")]


def phantom_images(n: int, size_text: str = "512,512,200", seed: int = 0) -> list[str]:
    """``n`` clinical-profile phantoms of the given matrix, written on first use."""
    import dataclasses

    from lmk3d.data.phantoms import PROFILES, make_phantom, parse_size
    from lmk3d.io import write_image

    size = parse_size(size_text)
    paths = []
    for index in range(n):
        path = ROOT / "runs" / "bench" / f"phantom_{'x'.join(map(str, size))}_s{seed}_i{index}.nii.gz"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            print(f"generating {path.relative_to(ROOT)}", file=sys.stderr)
            write_image(path, make_phantom(seed, index, dataclasses.replace(PROFILES["clinical"], size=size)).volume)
        paths.append(str(path))
    return paths


def run(model: str, images: list[str], prefetch: int) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--measure", model, "--prefetch", str(prefetch), *images]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"measurement failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--detectors", default="prior_guided,cascade",
                        help="comma-separated detectors; models/<detector>-hippocampus and "
                        "models/<detector>-phantom-hn are used (default prior_guided,cascade)")
    parser.add_argument("--phantoms", type=int, default=4, help="512 x 512 x 200 phantoms in the batch (default 4; "
                        "0 skips that batch)")
    parser.add_argument("--no-hippocampus", action="store_true", help="skip the hippocampus batch")
    parser.add_argument("--repeat", type=int, default=3, help="fresh-process runs per mode (default 3)")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--prefetch", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("images", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.images, args.prefetch)))
        return 0

    batches: list[tuple[str, str, list[str]]] = []
    for det in args.detectors.split(","):
        if not args.no_hippocampus:
            model = ROOT / "models" / f"{det}-hippocampus"
            batches.append((f"hippocampus test split ({det})", str(model), hippocampus_images(model)))
        if args.phantoms > 0:
            batches.append((f"512x512x200 phantoms ({det})", str(ROOT / "models" / f"{det}-phantom-hn"),
                            phantom_images(args.phantoms)))
    print(f"`python benchmarks/bench_batch_predict.py {' '.join(sys.argv[1:])}` on {date.today().isoformat()}: "
          f"{platform.machine()}, {os.cpu_count()} CPU(s), 1 torch thread, CPU only; median of {args.repeat} "
          f"fresh processes per mode; load average at the start {os.getloadavg()[0]:.2f}\n")
    print("| batch | images | one at a time (s) | images/s | streamed (s) | images/s | streamed / one at a time "
          "| peak RSS one at a time -> streamed (MB) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, model, images in batches:
        rows: dict[int, list[dict[str, float]]] = {0: [], 1: []}
        for _ in range(args.repeat):
            for prefetch in (0, 1):
                rows[prefetch].append(run(model, images, prefetch))
        sec = {k: statistics.median(r["seconds"] for r in v) for k, v in rows.items()}
        rss = {k: statistics.median(r["peak_rss_mb"] for r in v) for k, v in rows.items()}
        n = len(images)
        print(f"| {name} | {n} | {sec[0]:.2f} | {n / sec[0]:.2f} | {sec[1]:.2f} | {n / sec[1]:.2f} | "
              f"{sec[1] / sec[0]:.2f} | {rss[0]:.0f} -> {rss[1]:.0f} |", flush=True)
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
