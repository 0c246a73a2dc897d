"""The ``lmk3d`` command: one entry point with sub-commands.

Each sub-command is a pair of functions (``add_<name>`` builds its parser, ``run_<name>`` runs it)
listed in ``COMMANDS``. Bad input (any :class:`lmk3d.errors.LandmarkError`) exits with status 2
and a one-line message naming the file and the problem.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from lmk3d import calibrate, serve  # stdlib only: it starts monailabel as a subprocess, never imports it
from lmk3d.errors import LandmarkError


def out_folder(path: str | os.PathLike[str]) -> Path:
    """An output folder argument: a folder or a path to create, never an existing file."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise LandmarkError(f"--out {p}: exists and is not a folder; give a folder (created if missing)")
    return p


# --- evaluate ------------------------------------------------------------------------------------
def add_evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pred", required=True, help="predicted landmarks: a table CSV, a JSON table, or a folder "
                   "of per-case .mrk.json/.fcsv/.json files")
    p.add_argument("--truth", required=True, help="true landmarks: a table CSV (or any --pred form)")
    p.add_argument("--out", required=True, help="folder for metrics.json, the plots and review_curve.csv")
    p.add_argument("--title", default="", help="title of the box plot")
    p.add_argument("--review-tolerance-mm", type=float, default=3.0, metavar="MM",
                   help="review burden (predictions with scores): a point over MM from the truth, or not found, "
                   "is an error to catch (default 3)")
    p.add_argument("--review-catch", type=float, default=0.95, metavar="SHARE",
                   help="review burden: the share of errors the reviewer must catch, in (0, 1] (default 0.95)")
    p.add_argument("--plot", metavar="PNG", help="also draw the review curve and the score calibration to PNG "
                   "(needs matplotlib)")


def run_evaluate(args: argparse.Namespace) -> int:
    import math

    from lmk3d import review
    from lmk3d.io import read_collection
    from lmk3d.io.atomic import atomic_write_text
    from lmk3d.metrics import evaluate, format_table

    tol, catch = args.review_tolerance_mm, args.review_catch
    if not (math.isfinite(tol) and tol > 0):
        raise LandmarkError(f"--review-tolerance-mm {tol}: give a distance in mm > 0")
    if not 0 < catch <= 1:
        raise LandmarkError(f"--review-catch {catch}: give the share of errors to catch, in (0, 1] (e.g. 0.95)")
    if args.plot:
        if Path(args.plot).is_dir():
            raise LandmarkError(f"--plot {args.plot}: is a folder; give a PNG file path")
        review.require_matplotlib()
    out = out_folder(args.out)
    truth = read_collection(args.truth)
    pred = read_collection(args.pred)
    if not set(pred) & set(truth):
        raise LandmarkError(f"no predicted case matches a truth case ({len(pred)} predicted, e.g. "
                            f"{', '.join(sorted(pred)[:3]) or 'none'}; {len(truth)} true, e.g. "
                            f"{', '.join(sorted(truth)[:3]) or 'none'}): nothing to evaluate")
    ev = evaluate(pred, truth)
    print(format_table(ev))
    if ev.unmatched_cases:
        print(f"{len(ev.unmatched_cases)} truth case(s) without any prediction (all their landmarks counted "
              f"missing): {', '.join(ev.unmatched_cases[:10])}{' ...' if len(ev.unmatched_cases) > 10 else ''}")
    out.mkdir(parents=True, exist_ok=True)
    doc = {"pred": str(args.pred), "truth": str(args.truth), **ev.to_dict()}
    written = [out / "metrics.json"]
    if review.carries_scores(pred):
        pts = review.review_points(ev, pred)
        rep = review.review_report(pts, tol, catch)
        rep["curve_csv"] = "review_curve.csv"
        doc["review"] = rep
        print(review.format_review(rep))
        atomic_write_text(out / "review_curve.csv", review.review_csv_text(pts, tol))
        written.append(out / "review_curve.csv")
        if args.plot:
            written.append(review.plot_review(args.plot, pts, rep))
    else:
        print("no review burden: the predictions carry no scores (every score is 1.0)"
              + ("; --plot skipped" if args.plot else ""))
    atomic_write_text(out / "metrics.json", json.dumps(doc, indent=2))
    try:
        from lmk3d.plots import error_boxplot, sdr_curve

        written += [error_boxplot(ev, out / "errors_boxplot.png", args.title), sdr_curve(ev, out / "sdr_curve.png")]
    except ImportError:  # matplotlib is missing: the numbers stand without the pictures
        print("matplotlib is missing: errors_boxplot.png and sdr_curve.png not drawn")
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 0


# --- phantoms, train, predict (issue 3) ------------------------------------------------------------
def add_phantoms(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="folder for images/, landmarks.csv, groups.json, phantoms.json")
    p.add_argument("--n", type=int, required=True, help="number of cases")
    p.add_argument("--seed", type=int, default=0, help="seed; case i of a seed is always the same (default 0)")
    p.add_argument("--profile", default="clinical", choices=["clinical", "medium", "small"],
                   help="clinical: 512x512 at 0.5-1.2 mm, 1-3 mm slices; medium: about 140-290 in-plane for "
                   "benchmarks; small: 96x96x64 for tests (default clinical)")
    p.add_argument("--size", help="fixed matrix I,J,K (e.g. 96,96,64); the spacing follows from the field of view")
    p.add_argument("--preview", nargs="?", const="", default=None, metavar="PNG",
                   help="also draw orthogonal slices through each landmark of the first complete case "
                   "(default OUT/preview.png)")


def run_phantoms(args: argparse.Namespace) -> int:
    import dataclasses
    import time

    from lmk3d.data import phantoms

    if args.n < 1:
        raise LandmarkError(f"--n {args.n}: give at least one case")
    cfg = phantoms.PROFILES[args.profile]
    if args.size:
        cfg = dataclasses.replace(cfg, size=phantoms.parse_size(args.size))
    t0 = time.perf_counter()
    made = phantoms.generate(out_folder(args.out), args.n, args.seed, cfg, profile=args.profile)
    n_missing = sum(int((~ph.landmarks.found).sum()) for ph in made)
    print(f"wrote {args.n} phantoms to {args.out} in {time.perf_counter() - t0:.1f} s "
          f"({n_missing} landmark(s) outside their field of view)")
    if args.preview is not None:
        complete = next((ph for ph in made if ph.landmarks.found.all()), made[0])
        ph = phantoms.make_phantom(args.seed, complete.params.index, cfg)
        path = Path(args.preview) if args.preview else Path(args.out) / "preview.png"
        title = (f"{ph.params.case} (seed {args.seed}, {args.profile}): "
                 f"{'x'.join(map(str, ph.volume.shape))} voxels, "
                 f"{' x '.join(f'{s:.2f}' for s in ph.volume.spacing_mm)} mm, {''.join(ph.volume.axcodes)}")
        phantoms.preview(ph.volume, ph.landmarks, path, title)
        print(f"wrote {path}")
    return 0


def _command_line(name: str, args: argparse.Namespace, keys: Sequence[str]) -> str:
    """The command as it could be typed again (for reports and model cards)."""
    parts = ["lmk3d", name]
    for k in keys:
        v = getattr(args, k, None)
        if v is None or v is False:
            continue
        flag = "--" + k.replace("_", "-")
        parts += [flag] if v is True else [flag, str(v)]
    return " ".join(parts)


def add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", metavar="MODEL_DIR", help="continue the interrupted training whose model folder "
                   "is MODEL_DIR (its train_state.pt holds the command, the finished phases and the last epoch); "
                   "no other option is needed")
    p.add_argument("--detector", help="registered detector name (mean_shape, prior_guided, pin, cascade)")
    p.add_argument("--profile", default="cpu", help="config profile of the detector (default cpu)")
    p.add_argument("--data", help="dataset: a folder with landmarks.csv and images/ (e.g. "
                   "../shared/data/hippocampus), a phantom folder, a folder of images with <case>.mrk.json or "
                   ".fcsv files, or a landmark table CSV")
    p.add_argument("--images", help="image folder, when --data is a table CSV not beside an images/ folder")
    p.add_argument("--out", help="model folder: checkpoint.pt, split.json, train_report.json, "
                   "metrics.json (the test split); train_state.pt while training")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the case-level split (default 0)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="validation fraction (default 0.1)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="test fraction (default 0.2)")
    p.add_argument("--max-minutes", type=float, help="training time budget (minutes, > 0)")
    p.add_argument("--max-epochs", type=int, help="caps every training phase's epochs (>= 1; default: the "
                   "config's)")
    p.add_argument("--fold", metavar="K/N", help="train without fold K (counted from 0) of N of the training "
                   "cases (the split's validation and test cases unchanged): a model that answers its left-out "
                   "fold unseen, for lmk3d calibrate --cross-fit-models; split.json names the fold's cases")
    p.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    p.add_argument("--device", help="where to train and evaluate: cpu, cuda or cuda:N (default: cuda when present)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override one field of the profile's config, e.g. --set fine_epochs=120 (a Python "
                   "literal: numbers, True/False, tuples; anything else is a string); repeatable")


def parse_overrides(items: Sequence[str]) -> dict[str, object]:
    """``["a=1", "b=(2, 3)", "c=CT"]`` -> ``{"a": 1, "b": (2, 3), "c": "CT"}``."""
    import ast

    out: dict[str, object] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise LandmarkError(f"--set {item!r}: expected FIELD=VALUE")
        try:
            value: object = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            value = text.strip()
        out[key.strip()] = value
    return out


#: The ``train`` options a resumed run takes from the interrupted one.
TRAIN_KEYS = ("detector", "profile", "data", "images", "out", "split_seed", "val_fraction", "test_fraction",
              "fold", "max_minutes", "max_epochs", "seed", "device", "overrides")


def _train_args(args: argparse.Namespace) -> tuple[argparse.Namespace, dict[str, object] | None]:
    """The arguments to train with, and the resume state when ``--resume`` was given."""
    if not args.resume:
        missing = [f"--{k}" for k in ("detector", "data", "out") if getattr(args, k) is None]
        if missing:
            raise LandmarkError(f"{', '.join(missing)} required (or --resume MODEL_DIR)")
        return args, None
    from lmk3d.training.loop import read_train_state

    state = read_train_state(args.resume)
    saved = dict(state.get("meta", {}).get("args", {}))
    if not saved:
        raise LandmarkError(f"{args.resume}: its train_state.pt does not say how the training was started")
    merged = argparse.Namespace(**{**vars(args), **saved, "out": str(args.resume), "resume": args.resume,
                                   "no_progress": args.no_progress})
    return merged, state


def run_train(args: argparse.Namespace) -> int:
    import platform
    import time

    import numpy as np

    from lmk3d.data import apply_split, load_dataset, make_split, write_split
    from lmk3d.data.samples import readable
    from lmk3d.data.split import FOLD_METHOD, fold_out, parse_fold
    from lmk3d.detectors import detector_class, load_detector
    from lmk3d.io.atomic import atomic_write_text
    from lmk3d.metrics import evaluate, format_table
    from lmk3d.training import distributed
    from lmk3d.training.loop import Trainer, TrainOptions

    args, resume_state = _train_args(args)
    # Under torchrun every rank runs this; only rank 0 prints, writes and evaluates (docs/distributed.md).
    world = distributed.world_from_env()
    distributed.check_resume(resume_state, world)  # before the data is read: fail fast
    device = distributed.rank_device(args.device, world) if world.distributed else args.device
    is_main = world.rank == 0
    for key, low in (("val_fraction", 0.0), ("test_fraction", 0.0)):
        v = getattr(args, key)
        if not low <= v < 1.0:
            raise LandmarkError(f"--{key.replace('_', '-')} {v}: give a fraction in [0, 1)")
    if args.val_fraction + args.test_fraction >= 1.0:
        raise LandmarkError("--val-fraction and --test-fraction leave no training cases")
    out = out_folder(args.out)
    options = TrainOptions(seed=args.seed, max_minutes=args.max_minutes, max_epochs=args.max_epochs,
                           device=device, progress=not args.no_progress and is_main, state_dir=str(out))
    cls = detector_class(args.detector)
    ds = load_dataset(args.data, args.images)

    def warn(line: str) -> None:
        if is_main:
            print(f"warning: {line}", file=sys.stderr, flush=True)

    labelled = readable(ds.labelled(), warn)
    if not labelled:
        raise LandmarkError(f"{args.data}: no labelled cases with a readable image to train on ({len(ds)} images)")
    fractions = (1.0 - args.val_fraction - args.test_fraction, args.val_fraction, args.test_fraction)
    split = make_split([s.case for s in labelled], fractions, args.split_seed)
    fold: dict[str, object] = {}
    if getattr(args, "fold", None):
        k, n = parse_fold(args.fold)
        split, held = fold_out(split, k, n)
        fold = {"fold": {"k": k, "n": n, "held_out": list(held), "method": FOLD_METHOD}}
    train, val, test = apply_split(labelled, split)
    if is_main:
        print(f"{args.data}: {len(ds)} cases ({len(labelled)} labelled), {len(ds.names)} landmarks; split seed "
              f"{args.split_seed}: {len(train)} train / {len(val)} val / {len(test)} test"
              + (f" (fold {args.fold} of the training cases left out)" if fold else "")
              + (f"; {world.size} processes, each training on its shard" if world.distributed else ""))
    det = cls.create(ds.names, args.profile, device, **parse_overrides(args.overrides))
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(options, resume_state, {"args": {k: getattr(args, k) for k in TRAIN_KEYS}})
    try:
        if resume_state is not None and is_main:
            print(f"resuming {args.detector} in {out}: {len(trainer.completed)} phase(s) finished before")
        t0 = time.perf_counter()
        # Landmark groups are not passed: the prior-guided detector reads groups.json beside the images itself,
        # and detectors without groups reject options they do not know.
        fit_report = det.fit(train, val, trainer=trainer)
        train_seconds = time.perf_counter() - t0
        ranks: list[dict[str, object]] = []
        if world.distributed:  # what each rank trained on and the weights it ended with (equal on every rank)
            digest = distributed.weights_digest((f"{s.name}.{k}", m) for s in det.stages()
                                                for k, m in s.networks().items())
            ranks = distributed.all_gather({"rank": world.rank, "cases": sorted(set(trainer.shard_cases)),
                                            "weights_sha256": digest})
    finally:
        trainer.close()
    if not is_main:
        return 0
    det.save(out)
    trainer.finish()
    command = _command_line("train", args, ["detector", "profile", "data", "images", "out", "split_seed",
                                            "val_fraction", "test_fraction", "fold", "max_minutes", "max_epochs",
                                            "seed"])
    command += "".join(f" --set {item}" for item in args.overrides)
    write_split(out / "split.json", split, {"data": str(args.data), "command": command, **fold})
    metrics: dict[str, object] = {}
    test_mre: float | None = None
    if test:
        model = load_detector(out, device)  # evaluate what was saved, not what is in memory
        preds = {s.case: model.predict(s.load_image()) for s in test}
        ev = evaluate(preds, {s.case: s.landmarks for s in test if s.landmarks is not None})
        print(format_table(ev))
        metrics = {"subset": "test", "data": str(args.data), "split_seed": args.split_seed,
                   "n_cases": len(test), **ev.to_dict()}
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2, allow_nan=True))
        test_mre = ev.overall.mre
    report = {
        "detector": args.detector, "profile": args.profile, "data": str(args.data), "command": command,
        "seed": args.seed, "split_seed": args.split_seed, "max_minutes": args.max_minutes,
        "max_epochs": args.max_epochs, "resumed": resume_state is not None, "world_size": world.size,
        "counts": {"train": len(train), "val": len(val), "test": len(test)},
        "landmark_names": list(ds.names), "groups": [g.to_dict() for g in ds.groups],
        "train_seconds": round(train_seconds, 2), "machine": f"{platform.machine()}, {os.cpu_count()} CPU(s)",
        "fit": fit_report,
        "test_mre_mm": test_mre,
    }
    if world.distributed:
        report["distributed"] = {"backend": trainer.backend, "ranks": ranks}
    atomic_write_text(out / "train_report.json", json.dumps(report, indent=2, default=_jsonable))
    extra = f"; test MRE {test_mre:.2f} mm" if test_mre is not None and np.isfinite(test_mre) else ""
    print(f"trained {args.detector} ({args.profile}) in {train_seconds:.1f} s -> {out}{extra}")
    return 0


def add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("detector", help="registered detector name (mean_shape, prior_guided, pin, cascade)")
    p.add_argument("--profile", default="cpu", help="config profile (default cpu)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override one field, as for train; repeatable")


def run_config(args: argparse.Namespace) -> int:
    """Print the resolved config ``train`` would use, as JSON."""
    import dataclasses

    from lmk3d.detectors import detector_class

    cls = detector_class(args.detector)
    config = cls.resolve_config(args.profile, **parse_overrides(args.overrides))
    doc = {"detector": cls.name, "profile": args.profile, "overrides": list(args.overrides),
           "config": dataclasses.asdict(config)}
    print(json.dumps(doc, indent=2, default=_jsonable))
    return 0


def _jsonable(o: object) -> object:
    import numpy as np

    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    return str(o)


PREDICT_FORMATS = ("mrk.json", "fcsv", "json", "csv", "sr")


def add_predict(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model folder (with checkpoint.pt)")
    p.add_argument("--out", required=True, help="folder for <case>.<format> files, predictions.csv and, for a "
                   "model with a trust model, image_checks.csv (each image's verdict: of the model's kind or not, "
                   "atypical, why); an image that cannot be read is skipped with a message (the exit status is "
                   "then 1)")
    p.add_argument("images", nargs="*", metavar="IMAGE", help="images (NIfTI, NRRD, MetaImage, DICOM folder)")
    p.add_argument("--format", default="mrk.json", choices=PREDICT_FORMATS,
                   help="per-image landmark file format (default mrk.json); sr = a DICOM Comprehensive 3D SR "
                   "(TID 1500) referencing the source series, for DICOM-folder inputs only")
    p.add_argument("--data", help="a dataset (as for train): predict its --subset cases instead of IMAGE...")
    p.add_argument("--images-dir", dest="images_dir", help="image folder for a --data table CSV")
    p.add_argument("--subset", default="test", choices=["train", "val", "test", "all"],
                   help="with --data: which cases of the model's split.json (default test); the subset's "
                   "true landmarks are written to OUT/truth.csv")
    p.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    p.add_argument("--shard", metavar="I/N", help="predict part I of N (1 <= I <= N) of the images, for N "
                   "machines or jobs sharing one batch: the images are sorted by case id and part I takes every "
                   "N-th from the I-th, so the N parts are disjoint and together cover the batch; the tables are "
                   "then predictions.shard-I-of-N.csv (and truth.shard-I-of-N.csv), so the parts may share one "
                   "--out folder (docs/distributed.md shows how to merge them)")
    p.add_argument("--prefetch", type=int, default=1, metavar="K", help="images read ahead in a background "
                   "thread while the current one runs (default 1; 0: read each image when its turn comes); "
                   "memory holds K+1 images")


def parse_shard(text: str) -> tuple[int, int]:
    """``--shard I/N`` -> ``(I, N)``: part ``I`` of ``N``, counted from 1 (``1 <= I <= N``).

    Raises:
        LandmarkError: not of the form ``I/N`` with whole numbers, ``N < 1``, or ``I`` outside ``1..N``.
    """
    import re

    m = re.fullmatch(r"\s*([+-]?\d+)\s*/\s*([+-]?\d+)\s*", text)
    if m is None:
        raise LandmarkError(f"--shard {text!r}: expected I/N with whole numbers, e.g. 2/4 (part 2 of 4; "
                            "parts count from 1)")
    index, count = int(m.group(1)), int(m.group(2))
    if count < 1:
        raise LandmarkError(f"--shard {text}: N must be at least 1 (the number of parts)")
    if not 1 <= index <= count:
        raise LandmarkError(f"--shard {text}: I must be between 1 and N={count} (parts count from 1: "
                            f"1/{count} ... {count}/{count})")
    return index, count


def shard_of(jobs: Sequence[tuple[str, Path]], index: int, count: int) -> list[tuple[str, Path]]:
    """Part ``index`` (from 1) of ``count`` of ``jobs``: sorted by case id, every ``count``-th from the ``index``-th.

    The same list gives the same parts on every machine whatever its order on the command line; the
    ``count`` parts are disjoint and together hold every job. Example: cases a..e in 2 parts ->
    ``1/2`` = a, c, e and ``2/2`` = b, d.
    """
    return sorted(jobs)[index - 1::count]


def run_predict(args: argparse.Namespace) -> int:
    import time

    from lmk3d.startup import startup

    with startup():  # torch, the library and (below) the model: no collector passes over them
        from lmk3d.detectors import load_detector
        from lmk3d.io import case_id, read_image, write_landmarks, write_table
        from lmk3d.io.read_ahead import ReadAhead
        from lmk3d.io.table import write_image_checks
        from lmk3d.landmarks import LandmarkSet
        from lmk3d.trust import ImageVerdict

    shard = parse_shard(args.shard) if args.shard is not None else None
    if args.prefetch < 0:
        raise LandmarkError(f"--prefetch {args.prefetch}: give the number of images to read ahead, 0 or more")
    jobs: list[tuple[str, Path]] = [(case_id(p), Path(p)) for p in args.images]
    out = out_folder(args.out)
    truth: dict[str, LandmarkSet] = {}
    if args.data:
        from lmk3d.data import load_dataset, read_split

        ds = load_dataset(args.data, args.images_dir)
        cases = read_split(args.model).subset(args.subset) if args.subset != "all" else ds.cases
        samples = ds.subset(cases)
        jobs += [(s.case, s.image_path) for s in samples]
        truth = {s.case: s.landmarks for s in samples if s.landmarks is not None}
    if not jobs:
        raise LandmarkError("no images to predict; give IMAGE... or --data")
    seen: dict[str, Path] = {}
    for c, p in jobs:
        if c in seen:
            raise LandmarkError(f"two images give the same case id {c!r}: {seen[c]} and {p}")
        seen[c] = p
    if args.format == "sr":
        for _, p in jobs:
            if not p.is_dir():
                raise LandmarkError(f"{p}: --format sr needs a DICOM series folder (the SR references its "
                                    "instances and frame of reference)")
    table_name, truth_name, checks_name = "predictions.csv", "truth.csv", "image_checks.csv"
    if shard is not None:
        everything = len(jobs)
        jobs = shard_of(jobs, *shard)
        truth = {c: truth[c] for c, _ in jobs if c in truth}
        table_name, truth_name, checks_name = (f"{stem}.shard-{shard[0]}-of-{shard[1]}.csv"
                                               for stem in ("predictions", "truth", "image_checks"))
        print(f"shard {shard[0]}/{shard[1]}: {len(jobs)} of {everything} image(s)")
    table: dict[str, LandmarkSet] = {}
    verdicts: dict[str, ImageVerdict] = {}  # for a model with a trust model
    failed: list[str] = []
    t_start = time.perf_counter()
    # The next image is read in a background thread while the current one runs (--prefetch); the
    # results come back in input order, so the output equals a run that reads one image at a time.
    with ReadAhead([p for _, p in jobs], read_image, args.prefetch) as reads:
        with startup():
            model = load_detector(args.model, args.device)
        for (c, p), got in zip(jobs, reads, strict=True):
            if got.error is not None:
                # One unreadable image must not cost the batch: skip it, say so, and exit 1 at the end.
                print(f"{c}: skipped: {got.error}", file=sys.stderr)
                failed.append(c)
                continue
            volume = got.value
            assert volume is not None
            pred = model.predict_all(volume)
            if args.format == "sr":
                from lmk3d.io.dicom_sr import write_sr

                write_sr(out / f"{c}.sr.dcm", pred.landmarks, p,
                         algorithm_parameters=[f"detector={model.name}", f"profile={model.profile}"]
                         + ([f"image_check={pred.verdict.summary()}"] if pred.verdict is not None else []))
            elif args.format == "json":
                from lmk3d.io.atomic import atomic_write_text
                from lmk3d.io.table import landmarks_to_json

                doc = {**landmarks_to_json(pred.landmarks, volume.affine), "detector": model.name,
                       "stages": pred.stages_json()}
                if pred.verdict is not None:  # the model's trust model judged the image (lmk3d.trust)
                    doc["image_check"] = pred.verdict.to_json()
                atomic_write_text(out / f"{c}.json", json.dumps(doc, indent=2))
            else:
                write_landmarks(out / f"{c}.{args.format}", pred.landmarks, reference=volume)
            table[c] = pred.landmarks
            if pred.verdict is not None:
                verdicts[c] = pred.verdict
            stages = ", ".join(f"{k} {v:.2f} s" for k, v in pred.latencies.items())
            print(f"{c}: {int(pred.landmarks.found.sum())}/{len(pred.landmarks)} found (load {got.seconds:.2f} s, "
                  f"{stages})")
            if pred.verdict is not None and not pred.verdict.in_distribution:
                print(f"{c}: not this model's kind of image, no landmark reported: {pred.verdict.reason}",
                      file=sys.stderr)
            elif pred.verdict is not None and pred.verdict.atypical:
                print(f"{c}: an unusual image for this model: {pred.verdict.reason}", file=sys.stderr)
    seconds = time.perf_counter() - t_start
    write_table(out / table_name, table, with_scores=True)
    if verdicts:
        write_image_checks(out / checks_name, verdicts)
    if truth:
        write_table(out / truth_name, truth, with_scores=False)
    rate = f" ({len(jobs) / seconds:.2f} image(s)/s)" if seconds > 0 and jobs else ""
    print(f"wrote {len(table)} {args.format} file(s) and {out / table_name}"
          + (f" and {out / checks_name}" if verdicts else "") + (f" and {out / truth_name}" if truth else "")
          + f"; {len(jobs)} image(s) in {seconds:.1f} s{rate}")
    if failed:
        print(f"lmk3d predict: {len(failed)} of {len(jobs)} image(s) could not be read and were skipped: "
              f"{', '.join(failed[:10])}{' ...' if len(failed) > 10 else ''}", file=sys.stderr)
        return 1
    return 0


# --- models: the model registry (issue 19) ---------------------------------------------------------
def add_models(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    workspace_help = ("the server's workspace: the model registry's folder (default: the LMK3D_WORKSPACE "
                      "variable)")
    for action, help_text in (("list", "every model of the workspace: detector, served version, versions"),
                              ("show", "one model: its versions, metrics, decisions and validation cases"),
                              ("rollback", "serve the version before the current one again (a running server "
                               "picks it up on its next request)")):
        q = sub.add_parser(action, help=help_text, description=help_text)
        if action != "list":
            q.add_argument("name", metavar="NAME", help="the model's name")
        q.add_argument("--workspace", metavar="DIR", help=workspace_help)
        if action == "show":
            q.add_argument("--json", action="store_true", help="print the record as JSON")


def _workspace(workspace: str | None) -> str:
    """The ``--workspace`` folder, else ``$LMK3D_WORKSPACE``; it must exist (listing never creates one)."""
    folder = workspace or os.environ.get("LMK3D_WORKSPACE")
    if not folder:
        raise LandmarkError("no workspace: pass --workspace DIR (the server's --workspace, by default "
                            "<studies>/.lmk3d-workspace) or set LMK3D_WORKSPACE")
    if not Path(folder).is_dir():
        raise LandmarkError(f"workspace {folder}: no such folder (a server creates it when it starts)")
    return folder


def _metric(metrics: dict[str, object], key: str, fmt: str) -> str:
    value = metrics.get(key)
    if not isinstance(value, int | float) or isinstance(value, bool):
        return "-"
    return format(int(value) if fmt == "d" else value, fmt)


def run_models(args: argparse.Namespace) -> int:
    from lmk3d.registry import Registry

    registry = Registry(_workspace(args.workspace))
    if args.models_command == "list":
        names = registry.names()
        if not names:
            print(f"{registry.root}: no model yet")
            return 0
        print(f"{'model':<24} {'detector':<14} {'served':<9} {'versions':>8}  latest")
        for name in names:
            rec = registry.get(name)
            versions = rec.versions()
            latest = f"{versions[-1].id} {versions[-1].status}" if versions else "-"
            print(f"{name:<24} {rec.detector:<14} {rec.current() or '-':<9} {len(versions):>8}  {latest}")
        return 0
    record = registry.get(args.name)
    if args.models_command == "rollback":
        before = record.current()
        served = record.rollback()
        print(f"{args.name}: now serving {served} (was {before})")
        return 0
    doc = record.to_json()
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    names = doc["landmark_names"]
    print(f"model {doc['name']} ({doc['detector']}) in {doc['root']}")
    print(f"  served: {doc['current'] or 'nothing yet'}" + (f" ({doc['current_dir']})" if doc["current_dir"] else ""))
    print(f"  shipped: {doc['shipped'] or '-'}")
    print(f"  landmarks: {', '.join(names) if names else 'not known yet'}")
    val = doc["validation_cases"]
    print(f"  validation cases ({len(val)}, never trained on): {', '.join(val) if val else 'none yet'}; training "
          f"cases seen: {doc['n_training_cases_seen']}")
    if not doc["versions"]:
        print("  no version yet")
    for v in doc["versions"]:
        m = v["metrics"]
        print(f"  {v['id']}  {v['status']:<11} {v['created']}  parent {v['parent'] or '-'}  MRE "
              f"{_metric(m, 'val_mre_mm', '.3f')} mm  found {_metric(m, 'val_found', '.0%')}  n_val "
              f"{_metric(m, 'n_val', 'd')}")
        if v["decision"]:
            print(f"         {'accepted' if v['decision']['accepted'] else 'rejected'}: {v['decision']['reason']}")
        print(f"         {'calibrated' if v['calibrated'] else 'not calibrated'}: {v['calibration']['reason']}")
    return 0


Command = tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
COMMANDS: list[Command] = [
    ("evaluate", "score predictions against a truth table (MRE, SD, SDR, missing) and plot", add_evaluate,
     run_evaluate),
    ("phantoms", "write CT-like head-and-neck phantoms with known landmarks", add_phantoms, run_phantoms),
    ("train", "train a detector on a dataset (case-level split) and score it on the test split", add_train,
     run_train),
    ("predict", "predict landmarks on images with a trained model", add_predict, run_predict),
    ("config", "print the resolved config of a detector profile (what train would use)", add_config, run_config),
    ("serve", "start the MONAI Label server with the landmarks app (127.0.0.1 unless --host)", serve.add_serve,
     serve.run_serve),
    ("models", "list, show or roll back the versions in a server's model registry (its workspace)", add_models,
     run_models),
    ("calibrate", "fit a model's calibrated scores, not-found rule and image check on its validation cases",
     calibrate.add_calibrate, calibrate.run_calibrate),
    ("consensus", "build the consensus model of calibrated prior_guided, pin and cascade models",
     calibrate.add_consensus, calibrate.run_consensus),
]


def build_parser() -> argparse.ArgumentParser:
    from lmk3d import __version__

    parser = argparse.ArgumentParser(prog="lmk3d", description="3D anatomical landmark detection.")
    parser.add_argument("--version", action="version", version=f"lmk3d {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text, add, run in COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        add(p)
        p.set_defaults(func=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except LandmarkError as e:
        print(f"lmk3d {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
