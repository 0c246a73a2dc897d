"""Fit ``cascade``'s stage-2 step weights on a saved model's validation split, and score the test split.

    .venv/bin/python benchmarks/cascade_step_weights.py --model models/cascade-hippocampus \\
        --data ../shared/data/hippocampus            # prints the tables only
    .venv/bin/python benchmarks/cascade_step_weights.py --model models/cascade-hippocampus \\
        --data ../shared/data/hippocampus --write    # also saves the model and its test metrics.json

``lmk3d train`` fits the weights at the end of training (``CascadeConfig.fit_step_weights``); this
does the same for a model trained before they existed, without touching its networks. The weights
come from the validation cases of the model's ``split.json`` only; the test cases are scored once,
before and after, through the saved checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a cascade model folder with split.json")
    parser.add_argument("--data", required=True, help="the dataset the model was trained on")
    parser.add_argument("--write", action="store_true", help="save the weights into the model folder and "
                        "rewrite its metrics.json (test split)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from lmk3d.data import model_split
    from lmk3d.detectors import load_detector
    from lmk3d.detectors.cascade import CascadeDetector
    from lmk3d.io.atomic import atomic_write_text
    from lmk3d.metrics import Evaluation, evaluate, format_markdown

    _, split, _, val, test = model_split(args.model, args.data)
    truth = {s.case: s.landmarks for s in test if s.landmarks is not None}
    images = {s.case: s.load_image() for s in test}

    def score(det: CascadeDetector) -> Evaluation:
        return evaluate({c: det.predict(im) for c, im in images.items()}, truth)

    loaded = load_detector(args.model, "cpu")
    if not isinstance(loaded, CascadeDetector):
        sys.exit(f"{args.model}: a {loaded.name} model, not cascade")
    det = loaded
    before = score(det)
    table = det.fit_step_weights(val)
    print(f"{args.model}: step weights fitted on {len(val)} validation cases (split seed {split.seed})\n")
    print("| landmark | weight | val MRE stage 1 | val MRE full step | val MRE chosen |")
    print("|---|---|---|---|---|")
    for name, row in table.items():
        print(f"| {name} | {row['weight']:.1f} | {row['val_mre_stage1_mm']:.2f} | {row['val_mre_full_step_mm']:.2f} "
              f"| {row['val_mre_mm']:.2f} |")
    if args.write:
        det.save(args.model)
        saved = load_detector(args.model, "cpu")  # score what was saved
        assert isinstance(saved, CascadeDetector)
        det = saved
    after = score(det)
    print(f"\ntest split ({len(test)} cases): MRE {before.overall.mre:.3f} mm with full steps, "
          f"{after.overall.mre:.3f} mm with the fitted weights\n")
    print(format_markdown(after))
    if args.write:
        doc = {"subset": "test", "data": str(args.data), "split_seed": split.seed, "n_cases": len(test),
               **after.to_dict()}
        atomic_write_text(Path(args.model) / "metrics.json", json.dumps(doc, indent=2, allow_nan=True))
        print(f"\nwrote {args.model}/checkpoint.pt and metrics.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
