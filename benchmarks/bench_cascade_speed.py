"""Time ``cascade`` inference on a clinical-size CT-like phantom, stage by stage (a table, not a test).

    .venv/bin/python benchmarks/bench_cascade_speed.py
    .venv/bin/python benchmarks/bench_cascade_speed.py --model models/cascade-phantom-hn --size 512,512,200 --threads 1

A phantom of the ``clinical`` profile with a fixed matrix (default 512x512x200, ``lmk3d.data.phantoms``)
is written once to ``runs/bench/``. Every measurement runs in a fresh Python process so that its peak
resident memory (``ru_maxrss``) is that of inference alone: torch, the model, the image. The steps are
reading the NIfTI file, preprocessing (axis reordering to RAS, the tensor, the intensity map), stage 1
(box filter, coarse grid, U-Net, peaks), stage 2 (patches, displacement CNNs) and writing the
``.mrk.json``; "end_to_end" is their sum (load to written markups). Loading the model is listed apart:
a server does it once. The machine may be shared, so the median of ``--repeat`` runs is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(model: str, image_path: str, device: str, threads: int) -> dict[str, float]:
    """One inference in this process: ``{step: seconds}`` plus ``peak_rss_mb``."""
    import resource

    import torch

    torch.set_num_threads(threads)
    from lmk3d.detectors import load_detector
    from lmk3d.io import read_image, write_landmarks

    t0 = time.perf_counter()
    det = load_detector(model, device)
    t1 = time.perf_counter()
    image = read_image(image_path)
    t2 = time.perf_counter()
    det.prepared(image)  # type: ignore[attr-defined]  # kept for both stages until predict_all returns
    t3 = time.perf_counter()
    pred = det.predict_all(image)
    t4 = time.perf_counter()
    write_landmarks(Path(image_path).parent / "cascade_speed.mrk.json", pred.landmarks)
    t5 = time.perf_counter()
    row = {"load_model": t1 - t0, "read_image": t2 - t1, "preprocess": t3 - t2}
    row.update(pred.latencies)
    row.update({"write_markups": t5 - t4, "end_to_end": t5 - t1,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
                "found": float(pred.landmarks.found.sum())})
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/cascade-phantom-hn", help="model folder")
    parser.add_argument("--size", default="512,512,200", help="phantom matrix I,J,K (default 512,512,200)")
    parser.add_argument("--seed", type=int, default=0, help="phantom seed (default 0)")
    parser.add_argument("--index", type=int, default=0, help="phantom case index (default 0)")
    parser.add_argument("--repeat", type=int, default=3, help="fresh-process runs (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2, the machine's cores)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.chdir(ROOT)
    if args.measure:
        print(json.dumps(measure(args.model, args.measure, args.device, args.threads)))
        return 0

    import dataclasses

    from lmk3d.data.phantoms import PROFILES, make_phantom, parse_size
    from lmk3d.io import write_image

    size = parse_size(args.size)
    path = Path("runs/bench") / f"phantom_{'x'.join(map(str, size))}_s{args.seed}_i{args.index}.nii.gz"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        config = dataclasses.replace(PROFILES["clinical"], size=size)
        write_image(path, make_phantom(args.seed, args.index, config).volume)
    rows = []
    for _ in range(args.repeat):
        cmd = [sys.executable, __file__, "--measure", str(path), "--model", args.model, "--device", args.device,
               "--threads", str(args.threads)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            sys.exit(f"measurement failed:\n{done.stderr}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"cascade inference: {args.model}, {path} ({path.stat().st_size / 1e6:.0f} MB), device {args.device}, "
          f"{args.threads} torch thread(s), median of {args.repeat} fresh processes\n")
    print("| step | median | min | max |")
    print("|---|---|---|---|")
    for key in rows[0]:
        vals = [r[key] for r in rows]
        unit = " (MB)" if key == "peak_rss_mb" else "" if key == "found" else " (s)"
        print(f"| {key}{unit} | {statistics.median(vals):.3f} | {min(vals):.3f} | {max(vals):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
