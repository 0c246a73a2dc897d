"""Time ``prior_guided`` inference on a clinical-size CT-like phantom and print a table (not a test).

    .venv/bin/python benchmarks/bench_prior_guided_speed.py
    .venv/bin/python benchmarks/bench_prior_guided_speed.py --model models/prior_guided-phantom-hn --size 512,512,200

The phantom (``lmk3d.data.phantoms``, ``clinical`` profile with a fixed matrix, default 512x512x200)
is generated once into ``runs/bench`` (git-ignored). Each measurement then runs in a fresh process,
so the peak resident memory is that of inference alone (torch, the model, the image): reading the
NIfTI file, preprocessing (tensor, intensity fit), the coarse stage, the fine stage and writing the
``.mrk.json``. "End to end" is their sum; loading the model is listed apart (a server loads it once).
Torch runs on ``--threads`` threads (default 1); the machine may be shared, so
the median of ``--repeat`` runs is given.
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


def _measure(model: str, image_path: str, device: str, threads: int) -> dict[str, float]:
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
    det.prepare(image)  # type: ignore[attr-defined]
    t3 = time.perf_counter()
    pred = det.predict_all(image)
    t4 = time.perf_counter()
    out = Path(image_path).with_suffix("").with_suffix(".mrk.json")
    write_landmarks(out, pred.landmarks)
    t5 = time.perf_counter()
    row = {"model_load": t1 - t0, "read_image": t2 - t1, "preprocess": t3 - t2}
    row.update({f"stage_{k}": v for k, v in pred.latencies.items()})
    row.update({"write": t5 - t4, "end_to_end": t5 - t1,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0})
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/prior_guided-phantom-hn", help="model folder")
    parser.add_argument("--size", default="512,512,200", help="matrix I,J,K (default 512,512,200)")
    parser.add_argument("--seed", type=int, default=0, help="phantom seed (default 0)")
    parser.add_argument("--index", type=int, default=6, help="phantom case index (default 6: LPS, 0.67 x 0.67 x 1.33 "
                        "mm, the smallest field of view of the first ten)")
    parser.add_argument("--repeat", type=int, default=3, help="fresh-process runs (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: on a shared 2-core "
                        "machine a second thread mostly waits for the other jobs)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.chdir(ROOT)
    if args.measure:
        print(json.dumps(_measure(args.model, args.measure, args.device, args.threads)))
        return 0

    import dataclasses

    from lmk3d.data.phantoms import PROFILES, make_phantom, parse_size
    from lmk3d.io import write_image

    size = parse_size(args.size)
    path = Path("runs/bench") / f"phantom_{'x'.join(map(str, size))}_s{args.seed}_i{args.index}.nii.gz"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        ph = make_phantom(args.seed, args.index, dataclasses.replace(PROFILES["clinical"], size=size))
        write_image(path, ph.volume)
        del ph
    rows = []
    for _ in range(args.repeat):
        cmd = [sys.executable, __file__, "--measure", str(path), "--model", args.model, "--device", args.device,
               "--threads", str(args.threads)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            sys.exit(f"measurement failed:\n{done.stderr}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    keys = list(rows[0])
    print(f"prior_guided inference, {args.model}, phantom {path.name}, device {args.device}, "
          f"{args.threads} torch thread(s), median of {args.repeat} fresh processes\n")
    print("| step | seconds (median) | min | max |")
    print("|---|---|---|---|")
    for k in keys:
        vals = [r[k] for r in rows]
        unit = "" if k != "peak_rss_mb" else " (MB)"
        print(f"| {k}{unit} | {statistics.median(vals):.3f} | {min(vals):.3f} | {max(vals):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
