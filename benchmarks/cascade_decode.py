"""The cascade's stage-1 decoding compared: each channel's maximum (the paper) against the joint decode.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cascade_decode.py --model models/cascade-phantom-hn \\
        --data runs/phantom-hn

Runs the model on its validation and test splits (its ``split.json``) twice, decoding stage 1 with the
per-channel maximum and with the pairwise shape prior among local maxima, and prints one Markdown row
per split and decode: stage-1 MRE, final MRE (stage 2 from that stage-1 answer, with the model's step
weights), median, and the number of gross errors (over 8 mm). A model whose training kept the paper's
decode has no fitted prior; ``--fit-prior`` then fits one on its training split (as training would).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a cascade model folder (with split.json)")
    parser.add_argument("--data", required=True, help="the dataset it was trained on")
    parser.add_argument("--fit-prior", action="store_true", help="fit the pairwise prior on the training split")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    import torch

    from lmk3d.data import model_split
    from lmk3d.detectors import load_detector
    from lmk3d.detectors.cascade import CascadeDetector
    from lmk3d.detectors.cascade.training import pair_prior_from, stage1_estimates
    from lmk3d.training.cases import case_mre

    torch.set_num_threads(args.threads)
    det = load_detector(args.model, "cpu")
    if not isinstance(det, CascadeDetector):
        raise SystemExit(f"{args.model} is a {det.name} model, not a cascade one")
    split = model_split(args.model, args.data)
    if args.fit_prior or det.stage1.pair_prior is None:
        if not args.fit_prior:
            raise SystemExit(f"{args.model} has no fitted pairwise prior (it decodes with the maximum): "
                             "pass --fit-prior to fit one on its training split")
        det.stage1.pair_prior, _ = pair_prior_from(det.stage1, det.training_cases(split.train))
    print(f"{args.model} on {args.data} (split seed {split.split.seed}); model decode: {det.stage1.decode}\n")
    print("| split | cases | stage-1 decode | stage-1 MRE (mm) | final MRE (mm) | final median | errors > 8 mm |")
    print("|---|---|---|---|---|---|---|")
    for name in ("val", "test"):
        cases = det.training_cases(getattr(split, name))
        for decode in ("peak", "shape"):
            stage1_estimates(det.stage1, cases, decode=decode)
            s1 = case_mre(cases, [k.stage1 for k in cases])
            errs = []
            for k in cases:
                assert k.stage1 is not None
                d, _ = det.stage2.refine(k.image, k.stage1)
                pred = k.stage1 + det.stage2.step_weights[:, None] * d
                errs.append(np.linalg.norm(pred - k.xyz, axis=1)[k.present])
            e = np.concatenate(errs)
            label = "maximum per channel (paper)" if decode == "peak" else "joint, pairwise prior"
            print(f"| {name} | {len(cases)} | {label} | {s1:.2f} | {e.mean():.2f} | {np.median(e):.2f} | "
                  f"{int((e > 8).sum())} / {e.size} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
