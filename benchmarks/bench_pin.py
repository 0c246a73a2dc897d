"""PIN's accuracy tables in the paper's form (Li et al. 2018, Tables 1 and 2) on a model's test split.

    # Table 1: update rules A, B, C of the shipped (multiple-landmark) model, with the baseline
    .venv/bin/python benchmarks/bench_pin.py --model models/pin-hippocampus --data ../shared/data/hippocampus

    # Table 2 as well: train the single-landmark variant on the same split (one CNN per landmark)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_pin.py --model models/pin-hippocampus \\
        --data ../shared/data/hippocampus --train-single runs/pin-single-hippocampus --max-minutes 30

The split is the model's ``split.json`` (the one ``lmk3d train`` wrote), so every row scores the same
cases. Times are wall-clock seconds per image for the iterations alone (preprocessed images), on
one torch thread; the machine may be shared, so they are upper bounds. Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def _mre_sd(errors: np.ndarray) -> str:
    e = errors[np.isfinite(errors)]
    return f"{e.mean():.2f} ± {e.std():.2f}" if e.size else "n/a"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the multiple-landmark model folder (with split.json)")
    parser.add_argument("--data", required=True, help="the dataset the model was trained on")
    parser.add_argument("--subset", default="test", choices=["train", "val", "test"])
    parser.add_argument("--single-model", help="a trained single-landmark model folder (Table 2)")
    parser.add_argument("--train-single", metavar="DIR", help="train the single-landmark variant (cpu profile) "
                        "on the model's split and save it in DIR (Table 2)")
    parser.add_argument("--max-minutes", type=float, help="time budget of --train-single")
    parser.add_argument("--baseline", default=None, help="mean_shape model folder for the baseline row "
                        "(default: models/mean_shape-<dataset> when it exists)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from lmk3d.data import model_split
    from lmk3d.detectors import load_detector
    from lmk3d.detectors.pin import PinDetector, PinImage
    from lmk3d.landmarks import LandmarkSet
    from lmk3d.metrics import evaluate

    ds, split, train, val, test = model_split(args.model, args.data)
    cases = {"train": train, "val": val, "test": test}[args.subset]
    truth = {s.case: s.landmarks for s in cases}
    names = ds.names
    print(f"{args.data}: {args.subset} split of {args.model}/split.json (seed {split.seed}), {len(cases)} cases\n")

    multi = load_detector(args.model, "cpu")
    assert isinstance(multi, PinDetector)
    images = [s.load_image() for s in cases]
    prepared = [multi.prepare(im) for im in images]  # the shared preprocessing, once per image
    preps = [[PinImage.from_prepared(p, px) for p in prepared] for px in multi.level_pixdims]

    def run(det: PinDetector, preps: list[list[PinImage]], rule: str, levels: int) -> tuple[list[LandmarkSet], float]:
        """Chain the first ``levels`` levels (from the mean shape); seconds per image for the iterations."""
        t0 = time.perf_counter()
        preds: list[LandmarkSet] | None = None
        for level in range(levels):
            preds = det.levels[level].refine(preps[level], preds, rule=rule)
        assert preds is not None
        return preds, (time.perf_counter() - t0) / len(cases)

    rows = []
    baseline_dir = Path(args.baseline) if args.baseline else Path("models") / f"mean_shape-{Path(args.data).name}"
    if baseline_dir.is_dir():
        base = load_detector(baseline_dir, "cpu")
        ev = evaluate({s.case: base.predict(s.load_image()) for s in cases}, truth)
        rows.append(("mean_shape baseline", "-", "-", ev, float("nan"), float("nan")))
    per_rule = {}
    n_levels = len(multi.level_pixdims)
    for levels in sorted({1, n_levels}):
        for rule in ("A", "B", "C"):
            preds, seconds = run(multi, preps, rule, levels)
            ev = evaluate({s.case: p for s, p in zip(cases, preds, strict=True)}, truth)
            per_rule[(levels, rule)] = (ev, seconds)
            t = multi.config.iterations_rule_a if rule == "A" else multi.config.iterations
            fine = "" if multi.config.fine_variant == "multiple" else f", fine: {multi.config.fine_variant}"
            where = "first level only (the paper's PIN)" if levels == 1 and n_levels > 1 else (
                f"{levels} levels{fine}" if levels > 1 else "one level")
            rows.append((f"PIN-Multiple, {where}, rule {rule}", "C+R", str(t), ev, seconds, 0.0))

    print("Table 1 (cf. Li et al. 2018, Table 1): update rules, multiple-landmark model "
          f"(alpha = {multi.config.alpha}; levels at {', '.join(f'{p:g}' for p in multi.level_pixdims)} mm), "
          "MRE ± SD in mm over all landmarks")
    print()
    print("| method | training loss | T (max) | MRE ± SD (mm) | median | SDR@2 | SDR@4 | missing | s / image |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, loss, t, ev, sec, _ in rows:
        o = ev.overall
        print(f"| {name} | {loss} | {t} | {_mre_sd(ev.errors_mm.ravel())} | {o.median:.2f} | {o.sdr['2']:.1%} | "
              f"{o.sdr['4']:.1%} | {o.n_missing} | {'-' if not np.isfinite(sec) else f'{sec:.3f}'} |")
    print()

    single = None
    if args.train_single:
        # One level, as the paper's PIN-Single: compare it with the multiple model's first level.
        single = PinDetector.create(names, "cpu", variant="single", fine_pixdim=0.0)
        t0 = time.perf_counter()
        report = single.fit(train, val, seed=0, max_minutes=args.max_minutes, progress=False)
        out = Path(args.train_single)
        single.save(out)
        (out / "train_report.json").write_text(json.dumps({
            "command": " ".join(["python"] + sys.argv), "split_seed": split.seed, "seconds": time.perf_counter() - t0,
            "fit": report}, indent=2, default=str))
        print(f"trained the single-landmark variant in {time.perf_counter() - t0:.0f} s -> {out}\n")
    elif args.single_model:
        single = load_detector(args.single_model, "cpu")
    if single is not None:
        assert isinstance(single, PinDetector)
        single_prepared = [single.prepare(im) for im in images]
        sp = [[PinImage.from_prepared(p, px) for p in single_prepared] for px in single.level_pixdims]
        preds, sec_single = run(single, sp, "C", len(single.level_pixdims))
        ev_single = evaluate({s.case: p for s, p in zip(cases, preds, strict=True)}, truth)
        print("Table 2 (cf. Li et al. 2018, Table 2): single vs multiple landmarks, rule C, MRE ± SD in mm")
        print()
        print("| method | " + " | ".join(names) + " | overall | s / image |")
        print("|---|" + "---|" * (len(names) + 2))
        table2 = [(f"PIN-Single ({len(single.level_pixdims)} level(s))", ev_single, sec_single),
                  ("PIN-Multiple (first level)", *per_rule[(1, "C")])]
        if n_levels > 1:
            fine = "" if multi.config.fine_variant == "multiple" else f", fine: {multi.config.fine_variant}"
            table2.append((f"PIN-Multiple ({n_levels} levels{fine})", *per_rule[(n_levels, "C")]))
        for label, ev, sec in table2:
            cells = [_mre_sd(ev.errors_mm[:, j]) for j in range(len(names))]
            print(f"| {label} | " + " | ".join(cells) + f" | {_mre_sd(ev.errors_mm.ravel())} | {sec:.3f} |")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
