"""Time a detector's inference on a clinical-size CT-like phantom, stage by stage, with peak memory.

    .venv/bin/python benchmarks/bench_speed.py --model models/cascade-phantom-hn
    .venv/bin/python benchmarks/bench_speed.py --model models/pin-phantom-hn --threads 2
    .venv/bin/python benchmarks/bench_speed.py --model models/prior_guided-phantom-hn --size 512,512,300

One script for every detector (a table, not a test). The phantom (``lmk3d.data.phantoms``, ``clinical``
profile with a fixed matrix, default 512x512x200) is generated once into ``runs/bench`` (git-ignored).
Each measurement runs in a fresh Python process, so the peak resident memory (``ru_maxrss``) is that of
one inference: torch, the model, the image. Rows:

- ``model_load``: reading the checkpoint (listed apart: a server does it once);
- ``read_image``: reading the NIfTI file;
- ``preprocess``: the one prepared image every stage reads (:meth:`Detector.prepare`: orientation, modality,
  intensity map, the image on the device);
- ``stage_<name>``: each stage of ``predict_all``;
- ``write``: writing the ``.mrk.json``;
- ``end_to_end``: read + preprocess + stages + write (load to written markups).

The machine may be shared, so the median (and min, max) of ``--repeat`` runs is printed.
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
    """One inference in this process: ``{row: seconds}``, ``peak_rss_mb`` and ``found``."""
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
    prep = det.prepare(image)
    if det.device.type == "cuda":
        torch.cuda.synchronize(det.device)
    t3 = time.perf_counter()
    pred = det.predict_all(image, prep)  # every stage reads this prepared image; the runner times each
    t4 = time.perf_counter()
    out = Path(image_path).with_suffix("").with_suffix(f".{det.name}.mrk.json")
    write_landmarks(out, pred.landmarks)
    t5 = time.perf_counter()
    row = {"model_load": t1 - t0, "read_image": t2 - t1, "preprocess": t3 - t2}
    row.update({f"stage_{s.name}": s.seconds for s in pred.stages})
    row.update({"write": t5 - t4, "end_to_end": t5 - t1,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
                "found": float(pred.landmarks.found.sum())})
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model folder (any detector)")
    parser.add_argument("--size", default="512,512,200", help="phantom matrix I,J,K (default 512,512,200)")
    parser.add_argument("--seed", type=int, default=0, help="phantom seed (default 0)")
    parser.add_argument("--index", type=int, default=6, help="phantom case index (default 6: LPS, "
                        "0.67 x 0.67 x 1.33 mm, the smallest field of view of the first ten)")
    parser.add_argument("--repeat", type=int, default=3, help="fresh-process runs (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: on a shared 2-core "
                        "machine a second thread mostly waits for the other jobs)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.chdir(ROOT)
    if args.measure:
        print(json.dumps(measure(args.model, args.measure, args.device, args.threads)))
        return 0

    path = phantom_file(args.size, args.seed, args.index)
    rows = []
    for _ in range(args.repeat):
        cmd = [sys.executable, __file__, "--model", args.model, "--measure", str(path), "--device", args.device,
               "--threads", str(args.threads)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            sys.exit(f"measurement failed:\n{done.stderr}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"`python benchmarks/bench_speed.py {' '.join(sys.argv[1:])}`: {path.relative_to(ROOT)} "
          f"({path.stat().st_size / 1e6:.0f} MB), model {args.model}, {args.threads} torch thread(s), "
          f"device: {device_name(args.device)}, median of {len(rows)} fresh processes\n")
    print("| step | seconds (median) | min | max |")
    print("|---|---|---|---|")
    for key in rows[0]:
        if key in ("peak_rss_mb", "found"):
            continue
        vals = [r[key] for r in rows]
        print(f"| {key} | {statistics.median(vals):.3f} | {min(vals):.3f} | {max(vals):.3f} |")
    rss = [round(r["peak_rss_mb"]) for r in rows]
    print(f"\npeak RSS {statistics.median(rss):.0f} MB (median of {rss}); landmarks found: {int(rows[0]['found'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
