"""Choose ``cascade``'s stage-2 lattice (``cube``, ``cross`` or ``centre``) on a saved model's validation split.

    .venv/bin/python benchmarks/cascade_lattice.py --model models/cascade-phantom-hn --data runs/phantom-hn
    .venv/bin/python benchmarks/cascade_lattice.py --model models/cascade-hippocampus \\
        --data ../shared/data/hippocampus --write     # also saves the chosen lattice into the checkpoint

The rule (docs/benchmarks.md, "Stage 2's lattice"; ``choose_lattice`` in
``lmk3d.detectors.cascade.training``, which training applies at its end): the candidate with the fewest
patches whose validation MRE is at most 2 % above ``cube``'s and which has no more validation points
over 3 mm than ``cube``; else ``cube``. Only the lattice changes: networks, ranges and step weights stay
as fitted. Here every candidate is scored on the detector's whole answer (no calibration models; a
point not found counts as over 3 mm). The test split is scored after the choice and printed for the
record; it does not enter the rule.

``--write`` saves the chosen lattice into ``checkpoint.pt`` (atomically) when it differs from the
model's, and the test split's ``metrics.json``; the model's calibration models then need ``lmk3d
calibrate`` again (its scores change).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a cascade model folder with split.json")
    parser.add_argument("--data", required=True, help="the dataset the model was trained on")
    parser.add_argument("--write", action="store_true", help="save the chosen lattice into the checkpoint")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from lmk3d.data import model_split
    from lmk3d.detectors import load_detector
    from lmk3d.detectors.cascade import CascadeDetector
    from lmk3d.detectors.cascade.config import CascadeConfig
    from lmk3d.detectors.cascade.stages import lattice_offsets
    from lmk3d.detectors.cascade.training import LATTICE_ERROR_MM, choose_lattice, lattice_candidates
    from lmk3d.io.atomic import atomic_write_text
    from lmk3d.metrics import Evaluation, evaluate, format_markdown

    _, split, _, val, test = model_split(args.model, args.data)
    det = load_detector(args.model, "cpu")
    if not isinstance(det, CascadeDetector):
        sys.exit(f"{args.model}: a {det.name} model, not cascade")
    shipped = det.config
    if shipped.refine_lattice_mm <= 0:
        sys.exit(f"{args.model}: refine_lattice_mm is 0 (one patch, the paper's): no lattice to choose")

    images = {s.case: s.load_image() for s in [*val, *test]}  # read once, scored by every candidate

    def score(samples: list, config: CascadeConfig) -> tuple[dict[str, float], Evaluation]:
        det.config = det.stage1.config = det.stage2.config = config
        truth = {s.case: s.landmarks for s in samples if s.landmarks is not None}
        preds, seconds = {}, []
        for s in samples:
            t0 = time.perf_counter()
            preds[s.case] = det.predict_all(images[s.case], trust=False).landmarks
            seconds.append(time.perf_counter() - t0)
        ev = evaluate(preds, truth)
        e = ev.errors_mm[~ev.missing]
        over = int(np.count_nonzero(e[np.isfinite(e)] > LATTICE_ERROR_MM) + ev.missing.sum())
        return {"val_mre_mm": ev.overall.mre, "val_over_mm": over, "n": ev.overall.n_truth,
                "patches": len(lattice_offsets(config.refine_lattice_mm, config.refine_lattice)),
                "median_s": float(np.median(seconds))}, ev

    configs = lattice_candidates(shipped)
    rows = {name: score(val, cfg)[0] for name, cfg in configs.items()}
    chosen = choose_lattice(rows)
    ref = rows["cube"]
    print(f"{args.model}: {len(val)} validation cases (split seed {split.seed}), detector's own answer, "
          f"{args.threads} torch thread(s)\n")
    print(f"| lattice | patches per landmark | val MRE mm | val points over {LATTICE_ERROR_MM:g} mm or not found "
          "| passes the rule | median s per image |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        passes = name == "cube" or choose_lattice({"cube": ref, name: r}) == name
        print(f"| {name} | {r['patches']} | {r['val_mre_mm']:.3f} | {r['val_over_mm']} of {r['n']} | "
              f"{'yes' if passes else 'no'} | {r['median_s']:.3f} |")
    print(f"\nchosen: {chosen}\n")

    tests = {name: score(test, cfg) for name, cfg in configs.items()}
    print(f"test split ({len(test)} cases), read after the choice:\n")
    print(f"| lattice | test MRE mm | test points over {LATTICE_ERROR_MM:g} mm or not found | median s per image |")
    print("|---|---|---|---|")
    for name, (r, _) in tests.items():
        print(f"| {name} | {r['val_mre_mm']:.3f} | {r['val_over_mm']} of {r['n']} | {r['median_s']:.3f} |")

    if args.write:
        new = configs[chosen]
        if new.refine_lattice == shipped.refine_lattice:
            print(f"\n{args.model}: keeps its lattice; nothing written")
            return 0
        det.config = det.stage1.config = det.stage2.config = new
        det.save(args.model)
        saved = load_detector(args.model, "cpu")
        assert isinstance(saved, CascadeDetector) and saved.config.refine_lattice == chosen
        after = tests[chosen][1]
        doc = {"subset": "test", "data": str(args.data), "split_seed": split.seed, "n_cases": len(test),
               **after.to_dict()}
        atomic_write_text(Path(args.model) / "metrics.json", json.dumps(doc, indent=2, allow_nan=True))
        print(f"\nwrote {args.model}/checkpoint.pt (lattice {chosen}) and its metrics.json (test split); "
              "run `lmk3d calibrate` on it again\n")
        print(format_markdown(after))
    return 0


if __name__ == "__main__":
    sys.exit(main())
