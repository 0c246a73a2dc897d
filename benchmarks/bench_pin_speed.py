"""Time ``pin`` inference on a clinical-size CT-like phantom, per stage, with peak memory (not a test).

    .venv/bin/python benchmarks/bench_pin_speed.py                          # models/pin-phantom-hn, 512x512x200
    .venv/bin/python benchmarks/bench_pin_speed.py --model models/pin-hippocampus --threads 1

The phantom (``lmk3d.data.phantoms``, ``clinical`` profile with a fixed matrix, default 512x512x200) is
generated once into ``runs/bench`` (git-ignored). Each measurement runs in a fresh process, so the peak
resident memory is that of one inference (torch, the model, the image). Rows: reading the NIfTI file,
preprocessing (axis reordering, box filter, intensity map: :func:`lmk3d.detectors.pin.prepare`), the
iterations (all initialisations batched), writing the ``.mrk.json``, and ``predict_all``'s own stage
latencies (its ``pin`` stage holds preprocessing and iterations). "End to end" = read + ``predict_all`` +
write; loading the model is listed apart (a server loads it once). The machine may be shared: the median
of ``--repeat`` runs is given.
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
    from lmk3d.detectors.pin import PinDetector, prepare
    from lmk3d.io import read_image, write_landmarks

    t0 = time.perf_counter()
    det = load_detector(model, device)
    assert isinstance(det, PinDetector)
    t1 = time.perf_counter()
    image = read_image(image_path)
    t2 = time.perf_counter()
    pred = det.predict_all(image)
    t3 = time.perf_counter()
    out = Path(image_path).with_suffix("").with_suffix(".pin.mrk.json")
    write_landmarks(out, pred.landmarks)
    t4 = time.perf_counter()
    # The pin stage again, split into its two parts (same image, same answer).
    prep = prepare(image, det.pixdim, det.modality, det.device)
    t5 = time.perf_counter()
    det.refine([prep], [pred.stages[0].landmarks])
    t6 = time.perf_counter()
    row = {"model_load": t1 - t0, "read_image": t2 - t1}
    row.update({f"stage_{k}": v for k, v in pred.latencies.items()})
    row.update({"of_which_preprocess": t5 - t4, "of_which_iterations": t6 - t5, "write": t4 - t3,
                "end_to_end": t4 - t1, "found": float(pred.landmarks.found.sum()),
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0})
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/pin-phantom-hn", help="model folder")
    parser.add_argument("--size", default="512,512,200", help="matrix I,J,K (default 512,512,200)")
    parser.add_argument("--seed", type=int, default=0, help="phantom seed (default 0)")
    parser.add_argument("--index", type=int, default=0, help="phantom case index (default 0)")
    parser.add_argument("--repeat", type=int, default=3, help="fresh-process runs (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2, the machine's cores)")
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
    rows = []
    for _ in range(args.repeat):
        cmd = [sys.executable, __file__, "--model", args.model, "--measure", str(path), "--device", args.device,
               "--threads", str(args.threads)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    keys = list(rows[0])
    print(f"`{' '.join(['python', 'benchmarks/bench_pin_speed.py'] + sys.argv[1:])}`: {path} "
          f"({'x'.join(map(str, size))}), model {args.model}, {args.threads} torch thread(s), {args.device}, "
          f"median of {len(rows)} fresh processes\n")
    print("| step | seconds (median) | min | max |")
    print("|---|---|---|---|")
    for k in keys:
        if k in ("peak_rss_mb", "found"):
            continue
        vals = [r[k] for r in rows]
        print(f"| {k} | {statistics.median(vals):.3f} | {min(vals):.3f} | {max(vals):.3f} |")
    print(f"\npeak RSS {statistics.median(r['peak_rss_mb'] for r in rows):.0f} MB (median); "
          f"landmarks found: {int(rows[0]['found'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
