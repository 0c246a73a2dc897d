"""Time the anatomy check (lmk3d.trust.anatomy) beside the rest of a prediction, on the test split.

    .venv/bin/python benchmarks/bench_anatomy.py models/consensus-hippocampus models/prior_guided-hippocampus

For each model with the check: per test image (split seed 0), the wall-clock time of the whole
``predict_all`` (the thumbnail check, the detector, the trust model, the anatomy check included), of the
thumbnail check alone, and of the anatomy check alone (:meth:`AnatomyModel.distance` on the detector's own
points, with the image's percentiles already known, as in ``predict_all``). Medians (min, max) over the test
images, ``--repeat`` rounds each, 1 torch thread. A table, not a test.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _ms(values: list[float]) -> str:
    v = np.asarray(values) * 1000.0
    return f"{np.median(v):.1f} ({v.min():.1f}, {v.max():.1f})"


def main(argv: list[str] | None = None) -> int:
    import torch

    from lmk3d.data import load_dataset, read_split
    from lmk3d.detectors import load_detector
    from lmk3d.trust import check_image

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print("| model | images | predict_all ms | thumbnail check ms | anatomy check ms | anatomy / predict_all |")
    print("|---|---|---|---|---|---|")
    for m in args.models:
        det = load_detector(m, "cpu")
        if det.trust is None or det.trust.anatomy is None:
            print(f"{m}: no anatomy check (lmk3d calibrate --anatomy-check)", file=sys.stderr)
            continue
        data = json.loads((m / "split.json").read_text())["data"]
        ds = load_dataset(ROOT / data if not Path(data).is_absolute() else data)
        vols = [s.load_image() for s in ds.subset(read_split(m).test)]
        whole, thumb, anat = [], [], []
        for _ in range(args.repeat):
            for v in vols:
                t0 = time.perf_counter()
                p = det.predict_all(v)
                whole.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                check_image(det.trust, v)
                thumb.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                det.trust.anatomy.distance(v, p.raw)
                anat.append(time.perf_counter() - t0)
        ratio = np.median(anat) / np.median(whole)
        print(f"| {m.name} | {len(vols)} x {args.repeat} | {_ms(whole)} | {_ms(thumb)} | {_ms(anat)} | {ratio:.1%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
