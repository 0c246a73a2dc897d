"""Ablation of the correlated-landmark module (the paper's Table 2) on the phantom test split.

    .venv/bin/python benchmarks/ablation_prior_guided.py
    .venv/bin/python benchmarks/ablation_prior_guided.py --model models/prior_guided-phantom-hn --data runs/phantom-hn

Rows, as in Pang et al. 2023, Table 2, for the correlated pair (``chin``, ``occ_bone``, key-slice axis
LR): no fusion (two independent patch U-Nets), + deep fusion, + axis attention, + key-slice detection.
A fifth row decodes the last row's model with ``slice_constraint=0``: the key-slice branch then only
shapes the fused features through its training loss, and the landmarks keep their own axis coordinate.
Every row starts from the trained model (``--model``): same coarse network, same independent U-Nets
(``mand_l``, ``mand_r``, ``odont_p``, listed once), same split (``split.json`` of the model) and seed;
only the correlated module is rebuilt with the row's switches and trained
(``fit(..., init="current", parts=("groups",))``). Prints a Markdown table of MRE (SD) in mm on the
test split, the validation MRE and the training time of each row. Takes several minutes per row on a CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS = ((False, False, False), (True, False, False), (True, True, False), (True, True, True))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/prior_guided-phantom-hn", help="trained phantom model folder")
    parser.add_argument("--data", default="runs/phantom-hn", help="the phantom set it was trained on")
    parser.add_argument("--seed", type=int, default=0, help="training seed of every row (default 0)")
    args = parser.parse_args()

    import os

    import numpy as np
    import torch

    os.chdir(ROOT)
    torch.set_num_threads(1)
    from lmk3d.data import model_split
    from lmk3d.detectors import load_detector
    from lmk3d.detectors.prior_guided import PriorGuidedDetector
    from lmk3d.metrics import evaluate
    from lmk3d.training.loop import seed_everything

    base = load_detector(args.model, "cpu")
    assert isinstance(base, PriorGuidedDetector)
    if not base.fine.groups:
        sys.exit(f"{args.model}: the model has no correlated landmark group to ablate")
    _, split, train, val, test = model_split(args.model, args.data)
    truths = {s.case: s.landmarks for s in test if s.landmarks is not None}
    grouped = [n for names, _ in base.fine.groups for n in names]
    rows = []
    for fusion, attention, slices in ROWS:
        cfg = dataclasses.replace(base.config, groups=base.fine.groups, fusion=fusion, axis_attention=attention,
                                  slice_detection=slices)
        seed_everything(args.seed)  # the row's new correlated module starts from seeded weights
        det = PriorGuidedDetector(base.landmark_names, cfg, f"{base.profile}+ablation", device="cpu")
        det.modality_fitted = base.modality_fitted
        det.fine.pixdim_fitted = base.fine.pixdim_fitted
        det.coarse.net.load_state_dict(base.coarse.net.state_dict())
        det.fine.fine_nets.load_state_dict(base.fine.fine_nets.state_dict())
        t0 = time.perf_counter()
        report = det.fit(train, val, seed=args.seed, progress=False, init="current", parts=("groups",))
        seconds = time.perf_counter() - t0
        ev = evaluate({s.case: det.predict(s.load_image()) for s in test}, truths)
        rows.append((fusion, attention, slices, 1.0, ev, report, seconds))
        print(f"fusion={fusion} attention={attention} slice={slices}: " + ", ".join(
            f"{n} {ev.per_landmark[n].mre:.2f}" for n in grouped) + f" ({seconds:.0f} s)", flush=True)
    # The last row's model again, its key slice used only as a training signal (slice_constraint=0).
    det.config = det.fine.config = dataclasses.replace(det.config, slice_constraint=0.0)
    ev = evaluate({s.case: det.predict(s.load_image()) for s in test}, truths)
    rows.append((True, True, True, 0.0, ev, report, seconds))

    mark = {True: "✓", False: ""}
    indep = [n for n in base.landmark_names if n not in grouped]
    print(f"\nprior_guided ablation, {args.data}, split seed {split.seed} ({len(train)} train / {len(val)} val / "
          f"{len(test)} test), training seed {args.seed}, model {args.model}; MRE (SD) in mm on the test split\n")
    head = ["fusion", "axis attention", "slice detection", "slice constraint", *grouped,
            f"{' + '.join(grouped)}", "val MRE, capped (all)", "train s (CPU s)"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for fusion, attention, slices, lam, ev, report, seconds in rows:
        cells = [mark[fusion], mark[attention], mark[slices], f"{lam:g}" if slices else ""]
        cells += [f"{ev.per_landmark[n].mre:.2f} ({ev.per_landmark[n].sd:.2f})" for n in grouped]
        pair = np.concatenate([ev.errors_mm[:, ev.names.index(n)] for n in grouped])
        cells.append(f"{np.nanmean(pair):.2f} ({np.nanstd(pair):.2f})")
        cells.append(f"{report['fine']['best_val']:.2f}")
        cells.append(f"{seconds:.0f} ({report['cpu_seconds']:.0f})")
        print("| " + " | ".join(cells) + " |")
    ev = rows[0][4]
    print("\nindependent landmarks (the same U-Nets in every row): " + ", ".join(
        f"{n} {ev.per_landmark[n].mre:.2f} ({ev.per_landmark[n].sd:.2f})" for n in indep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
