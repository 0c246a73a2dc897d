"""``lmk3d calibrate``: fit a model's trust model (:mod:`lmk3d.trust`) on its own split (stdlib imports only).

The model folder's ``split.json`` names the cases: ``train`` gives the shape model, the image model's
training images and the presence network's training; ``val`` (cases that trained nothing) gives the
calibration. The test cases are never read. ``trust.json`` and ``presence.pt`` are written into the
model folder (or ``--out``), atomically.

:func:`calibrate_new_weights` does the same for weights the server has just trained (``POST /train``),
on the model's validation cases; it trains a presence network only when asked to, and serves it only if it
tells the validation cases' cut-off landmarks better than the inherited one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmk3d.errors import LandmarkError

if TYPE_CHECKING:
    from lmk3d.data import Split
    from lmk3d.data.samples import Sample
    from lmk3d.detectors import Detector
    from lmk3d.io.image import Volume
    from lmk3d.landmarks import LandmarkSet
    from lmk3d.trust import ImageModel, TrustModel
    from lmk3d.trust.presence import PresenceModel

__all__ = ["DEFAULT_TOLERANCE_MM", "MIN_CALIBRATION_CASES", "MIN_PRESENCE_CASES", "PRESENCE_EPOCHS", "add_calibrate",
           "add_consensus", "calibrate_new_weights", "fold_answers", "own_answer", "run_calibrate", "run_consensus"]

#: The fewest labelled calibration cases a trust model is fitted on.
MIN_CALIBRATION_CASES = 5
#: The tolerance of a score (the probability that the error is within it) when nothing sets another.
DEFAULT_TOLERANCE_MM = 3.0
#: Epochs of the presence network the server trains for new weights (the shipped networks had 30-40).
PRESENCE_EPOCHS = 30
#: The fewest training cases with every landmark placed that the server trains a presence network on.
MIN_PRESENCE_CASES = 5
#: The patch of a local presence network (``--train-presence local``): 48 mm on 32 voxels (1.5 mm), wide
#: enough for the 8 mm crop planes of its training either side of a point plus the detectors' error.
LOCAL_BOX_MM = 48.0
LOCAL_SIZE = 32


def add_calibrate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="trained model folder (checkpoint.pt and split.json)")
    p.add_argument("--data", help="the dataset it was trained on (default: the data named in split.json)")
    p.add_argument("--out", help="folder for trust.json and presence.pt (default: the model folder)")
    p.add_argument("--tolerance-mm", type=float, default=DEFAULT_TOLERANCE_MM, metavar="MM",
                   help="a score is the probability that the error is within MM (default 3)")
    p.add_argument("--presence-epochs", type=int, default=30, metavar="N",
                   help="epochs of the presence network (0: no network; cut-off landmarks then only by geometry)")
    p.add_argument("--presence", metavar="DIR", nargs="+",
                   help="reuse the presence network (presence.pt) in DIR, e.g. another detector's model folder on the "
                   "same data, instead of training one; with several (or with --train-presence), the one whose "
                   "not-found rule does best on the validation cases' cut variants serves (ties: the first)")
    p.add_argument("--presence-ensemble", action="store_true",
                   help="with several --presence networks of the same settings and other seeds: the candidates are "
                   "the first and the mean of them all (an ensemble saved as one presence.pt)")
    p.add_argument("--train-presence", choices=("global", "local"),
                   help="with --presence: also train a network of this kind (global: one box on the whole image; "
                   "local: a patch around each point) as a candidate; alone: the kind to train (default global)")
    p.add_argument("--presence-answer-variants", type=int, default=0, metavar="K",
                   help="with --train-presence local: K cut variants of each training case that the detector answers "
                   "first; half of the network's training patches are then centred on its points (default 0: none)")
    p.add_argument("--calibration-data", metavar="DIR",
                   help="calibrate on every case with landmarks in this dataset instead of the model's validation "
                   "cases (cases that trained nothing, e.g. a site's own; not the model's own dataset)")
    p.add_argument("--presence-data", metavar="DIR",
                   help="with a presence network to train: its cases with every landmark join the training cases in "
                   "that network's training only (not the model's own dataset, not its calibration data)")
    p.add_argument("--anatomy-check", action="store_true",
                   help="also fit the image check on the anatomy around the detector's points (lmk3d.trust.anatomy)")
    p.add_argument("--pull-inside-mm", type=float, default=0.0, metavar="MM",
                   help="judge a point the detector placed at most MM beyond the field of view as inside: moved onto "
                   "the outer voxels and left to the not-found rule (default 0: not found, as the detector says)")
    p.add_argument("--cross-fit", action="store_true",
                   help="also calibrate the scores on the training cases, each answered by the detector fitted without "
                   "it (only mean_shape, whose fit is a mean, can; for the others see --cross-fit-models; not with "
                   "--calibration-data)")
    p.add_argument("--cross-fit-models", metavar="DIR", nargs="+",
                   help="also calibrate the scores on the training cases, each answered by the one of these models "
                   "(lmk3d train --fold) that was trained without it: the same detector and landmarks, the model's "
                   "validation and test cases, each leaving out other training cases (not with --cross-fit or "
                   "--calibration-data)")
    p.add_argument("--seed", type=int, default=0, help="seed of the cut variants and the presence network")
    p.add_argument("--device", default="cpu", help="device of the detector (default cpu)")


def run_calibrate(args: argparse.Namespace) -> int:
    from lmk3d.data import load_dataset, read_split
    from lmk3d.detectors import load_detector
    from lmk3d.trust import save_trust
    from lmk3d.trust.fit import fit_trust
    from lmk3d.trust.presence import PresenceConfig, PresenceModel

    if not (math.isfinite(args.tolerance_mm) and args.tolerance_mm > 0):
        raise LandmarkError(f"--tolerance-mm {args.tolerance_mm}: give a distance in mm > 0")
    if args.presence_epochs < 0:
        raise LandmarkError(f"--presence-epochs {args.presence_epochs}: give 0 (no network) or more")
    if not (math.isfinite(args.pull_inside_mm) and args.pull_inside_mm >= 0):
        raise LandmarkError(f"--pull-inside-mm {args.pull_inside_mm}: give a distance in mm, 0 or more")
    if args.presence_answer_variants and (args.presence_answer_variants < 0 or args.train_presence != "local"):
        raise LandmarkError(f"--presence-answer-variants {args.presence_answer_variants}: give a count of 0 or more, "
                            "with --train-presence local")
    model_dir = Path(args.model)
    split = read_split(model_dir)
    data = args.data or json.loads((model_dir / "split.json").read_text()).get("data")
    if not data:
        raise LandmarkError(f"{model_dir}: split.json names no dataset; give --data")
    ds = load_dataset(data)
    train = list(ds.subset(split.train))
    if args.calibration_data:
        if Path(args.calibration_data).resolve() == Path(data).resolve():
            raise LandmarkError(f"--calibration-data {args.calibration_data}: that is the model's own dataset, whose "
                                "validation cases are the default calibration; give cases that trained nothing")
        val = [s for s in load_dataset(args.calibration_data) if s.landmarks is not None]
        where = f"--calibration-data {args.calibration_data}: {len(val)} case(s) with landmarks"
    else:
        val = list(ds.subset(split.val))
        where = f"{model_dir}: {len(val)} validation case(s)"
    if len(val) < MIN_CALIBRATION_CASES:
        raise LandmarkError(f"{where}; calibration needs at least {MIN_CALIBRATION_CASES}")
    extra = []
    if args.presence_data:
        here = Path(args.presence_data).resolve()
        if here == Path(data).resolve() or (args.calibration_data and here == Path(args.calibration_data).resolve()):
            raise LandmarkError(f"--presence-data {args.presence_data}: that is the model's own dataset or its "
                                "calibration data; give cases that neither test nor calibrate it")
        if not ((args.train_presence or not args.presence) and args.presence_epochs > 0):
            raise LandmarkError(f"--presence-data {args.presence_data}: no presence network is trained here "
                                "(give --train-presence, or no --presence, and --presence-epochs > 0)")
        extra = [s for s in load_dataset(args.presence_data) if s.landmarks is not None]
    det = load_detector(model_dir, args.device)
    det.trust = None  # calibrate the detector's own answer
    predict = own_answer(det)
    cross_fit = []
    if args.cross_fit:
        if args.calibration_data:
            raise LandmarkError("--cross-fit: the training cases' points would join calibration points from other "
                                "data (--calibration-data); give one or the other")
        cross_fit = cross_fitted_answers(det, [s for s in train if s.landmarks is not None])
    if args.cross_fit_models:
        if args.cross_fit or args.calibration_data:
            raise LandmarkError("--cross-fit-models: not with --cross-fit or --calibration-data")
        cross_fit = fold_answers(det, split, train, args.cross_fit_models, args.device)
    candidates: list[PresenceModel | None] = []
    for folder in args.presence or ():
        loaded = PresenceModel.load(folder)
        if loaded is None:
            raise LandmarkError(f"--presence {folder}: no presence.pt there")
        if loaded.landmark_names != det.landmark_names:
            raise LandmarkError(f"--presence {folder}: its landmarks ({', '.join(loaded.landmark_names)}) "
                                f"are not the model's ({', '.join(det.landmark_names)})")
        candidates.append(loaded)
    if args.presence_ensemble:
        if len(candidates) < 2 or args.train_presence:
            raise LandmarkError("--presence-ensemble: give two or more --presence networks (and no --train-presence)")
        try:
            candidates = [candidates[0], PresenceModel.mean_of([c for c in candidates if c is not None])]
        except ValueError as e:
            raise LandmarkError(f"--presence-ensemble: {e}") from e
    if (args.train_presence or not args.presence) and args.presence_epochs > 0:
        local = args.train_presence == "local"
        config = (PresenceConfig(epochs=args.presence_epochs, seed=args.seed, mode="local", box_mm=LOCAL_BOX_MM,
                                 size=LOCAL_SIZE, answer_variants=args.presence_answer_variants) if local else
                  PresenceConfig(epochs=args.presence_epochs, seed=args.seed, box_mm=_box_mm(train)))
        candidates.append(PresenceModel(det.landmark_names, config))
    t0 = time.monotonic()
    trust = fit_trust(predict, train, val, det.modality_fitted, args.tolerance_mm, args.seed,
                      candidates[0] if len(candidates) == 1 else None,
                      log=lambda line: print(line, flush=True), names=det.landmark_names,
                      presence_candidates=candidates if len(candidates) > 1 else (),
                      anatomy_check=args.anatomy_check, pull_inside_mm=args.pull_inside_mm,
                      presence_extra=extra, cross_fit=cross_fit)
    trust.report["command"] = (f"lmk3d calibrate --model {args.model} --data {data} --tolerance-mm "
                               f"{args.tolerance_mm:g} --presence-epochs {args.presence_epochs} --seed {args.seed}"
                               + (f" --presence {' '.join(args.presence)}" if args.presence else "")
                               + (" --presence-ensemble" if args.presence_ensemble else "")
                               + (" --anatomy-check" if args.anatomy_check else "")
                               + (f" --train-presence {args.train_presence}" if args.train_presence else "")
                               + (f" --presence-answer-variants {args.presence_answer_variants}"
                                  if args.presence_answer_variants else "")
                               + (f" --calibration-data {args.calibration_data}" if args.calibration_data else "")
                               + (f" --presence-data {args.presence_data}" if args.presence_data else "")
                               + (f" --pull-inside-mm {args.pull_inside_mm:g}" if args.pull_inside_mm else "")
                               + (" --cross-fit" if args.cross_fit else "")
                               + (f" --cross-fit-models {' '.join(args.cross_fit_models)}"
                                  if args.cross_fit_models else ""))
    if args.calibration_data:
        trust.report["calibration_data"] = str(args.calibration_data)
    trust.report["seconds"] = round(time.monotonic() - t0, 1)
    out = Path(args.out) if args.out else model_dir
    out.mkdir(parents=True, exist_ok=True)
    path = save_trust(out, trust)
    rule = trust.report["not_found_rule"]
    kind = "calibration" if args.calibration_data else "validation"
    print(f"calibrated {det.name} on {len(val)} {kind} cases ({trust.report['calibration_points']} points): "
          f"90 % radius = {trust.q90:.2f} x scale; not found below face {rule['face_mm']} mm, presence < "
          f"{rule['presence_threshold']}"
          + (f" (the mean of {trust.presence.members} networks)" if trust.presence and trust.presence.members > 1
             else "") + f"; image threshold {trust.image.threshold if trust.image else float('nan'):.2f}"
          + (f", anatomy threshold {trust.anatomy.threshold:.2f}" if trust.anatomy is not None else "")
          + f"; error scale: {trust.features} features"
          + (f", images with a landmark not found calibrated apart (90 % radius {trust.partial_q90:.2f} x scale)"
             if trust.partial_q90 is not None else "") + f" -> {path}")
    return 0


#: A detector's own answer to an image: its final landmarks and its first stage's (None for one stage).
Answer = Callable[["Volume"], tuple["LandmarkSet", "LandmarkSet | None"]]


def own_answer(det: Detector) -> Callable[[Volume], tuple[LandmarkSet, LandmarkSet | None]]:
    """What a trust model is fitted on: the detector's own answer, final and first-stage landmarks.

    Any trust model the detector carries is left out (``predict_all(trust=False)``).
    """
    def predict(volume: Volume) -> tuple[LandmarkSet, LandmarkSet | None]:
        p = det.predict_all(volume, trust=False)
        return (p.raw if p.raw is not None else p.landmarks), (p.stages[0].landmarks if len(p.stages) > 1 else None)

    return predict


def cross_fitted_answers(det: Detector, fitted_on: Sequence[Sample], unseen: Sequence[Sample] = ()
                         ) -> list[tuple[Sample, Callable[[Volume], tuple[LandmarkSet, LandmarkSet | None]]]]:
    """``(case, answer)`` for :func:`lmk3d.trust.fit.fit_trust`'s ``cross_fit``: each case of ``fitted_on`` (the
    cases ``det`` was fitted on) answered by ``det`` fitted without it (:meth:`Detector.leave_one_out`), each of
    ``unseen`` (training cases it was never fitted on) by ``det`` itself.

    Raises:
        LandmarkError: ``det`` cannot be fitted without a case this cheaply (a detector with networks), or
            ``fitted_on`` are not the cases it was fitted on.
    """
    left = det.leave_one_out(fitted_on)
    return [*zip(fitted_on, (own_answer(d) for d in left), strict=True), *((s, own_answer(det)) for s in unseen)]


def fold_answers(det: Detector, split: Split, train: Sequence[Sample], folders: Sequence[str | Path],
                 device: str = "cpu") -> list[tuple[Sample, Answer]]:
    """``(case, answer)`` for :func:`lmk3d.trust.fit.fit_trust`'s ``cross_fit`` from fold models (``lmk3d train
    --fold``): each labelled training case of the model (``split``, ``train``) answered by the fold model that left
    it out.

    Raises:
        LandmarkError: a folder is not a fold model of this model: another detector or landmarks, other validation
            or test cases, training cases the model did not train on, or a case left out by two folds.
    """
    from lmk3d.data import read_split
    from lmk3d.detectors import load_detector

    model_train = set(split.train)
    by_case = {s.case: s for s in train if s.landmarks is not None}
    owner: dict[str, str] = {}
    out = []
    for folder in folders:
        where = f"--cross-fit-models {folder}"
        doc_path = Path(folder) / "split.json"
        try:
            fold = json.loads(doc_path.read_text(encoding="utf-8")).get("fold")
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LandmarkError(f"{where}: no readable split.json ({e})") from None
        if not isinstance(fold, dict) or not isinstance(fold.get("held_out"), list):
            raise LandmarkError(f"{where}: its split.json names no left-out fold (train it with lmk3d train --fold)")
        fsplit = read_split(folder)
        held = {str(c) for c in fold["held_out"]}
        if set(fsplit.val) != set(split.val) or set(fsplit.test) != set(split.test):
            raise LandmarkError(f"{where}: its validation or test cases are not the model's")
        if not set(fsplit.train) | held == model_train or set(fsplit.train) & held:
            raise LandmarkError(f"{where}: its training cases and its left-out fold are not the model's training "
                                "cases, split in two")
        twice = sorted(held & set(owner))
        if twice:
            raise LandmarkError(f"{where}: case {twice[0]} is also left out by {owner[twice[0]]}")
        fdet = load_detector(folder, device)
        if fdet.name != det.name or tuple(fdet.landmark_names) != tuple(det.landmark_names):
            raise LandmarkError(f"{where}: a {fdet.name} model of {', '.join(fdet.landmark_names)}, not a {det.name} "
                                f"model of {', '.join(det.landmark_names)}")
        fdet.trust = None
        answer = own_answer(fdet)
        for c in sorted(held):
            owner[c] = str(folder)
            if c in by_case:
                out.append((by_case[c], answer))
    return out


def calibrate_new_weights(det: Detector, train: Sequence[Sample], calibration: Sequence[Sample],
                          previous: Sequence[Path], seed: int = 0, log: Callable[[str], None] | None = None,
                          images_from: Path | None = None,
                          presence_epochs: int = 0,
                          presence_deadline: float | None = None,
                          fitted_on: Sequence[Sample] | None = None) -> tuple[TrustModel | None, dict[str, Any]]:
    """Fit the trust model of weights just trained by the server (``POST /train``), or say why not.

    Like ``lmk3d calibrate``, on the detector's own answer (:func:`own_answer`):

    - the presence network: the inherited one is the first ``presence.pt`` of ``previous`` (the parent
      version's, then the shipped model's) that names the detector's landmarks, in its order; none
      (geometry only) without one. With ``presence_epochs`` > 0 and at least :data:`MIN_PRESENCE_CASES`
      training cases with every landmark placed, a network is also trained for ``presence_epochs`` on
      ``train`` (starting from the inherited weights when there are some, else new, seed ``seed``), unless
      the inherited one was trained on these very cases (same data fingerprint). The two are compared
      on the calibration cases' cut variants (:func:`lmk3d.trust.fit.choose_presence`): the trained one
      replaces the inherited one only if its fitted not-found rule does strictly better there. The
      network looks at the image only, so an inherited one stays valid for new weights as long as the
      images are of the kind it learnt; training it again is for images of a new kind (another contrast)
      and for declared models, which inherit none;
    - the tolerance is the one of the first ``trust.json`` in ``previous``, else
      :data:`DEFAULT_TOLERANCE_MM`; so is ``pull_inside_mm`` (points just beyond the field of view judged
      as inside, :func:`lmk3d.trust.pulled_inside`), else 0;
    - ``images_from``: the folder of the weights these were fine-tuned from. The new image model knows
      that folder's training images as well as ``train``'s (:meth:`lmk3d.trust.ImageModel.merged`): the
      fine-tuned weights still serve the kind of image they started from, and a check fitted on a few
      images of a new kind alone would refuse it (docs/trust.md). Without it (training from scratch, an
      upload) the image model knows ``train`` only;
    - the training cases answered without themselves (``lmk3d calibrate --cross-fit``) join the score calibration
      when the first ``trust.json`` of ``previous`` was fitted so and ``fitted_on`` (the cases of ``train`` the
      weights were fitted on; the others trained nothing) is given: ``mean_shape`` keeps doing it in its versions;
      when the detector cannot (:meth:`Detector.leave_one_out`), the record's reason says why and the fit goes on
      without them;
    - the anatomy check (:mod:`lmk3d.trust.anatomy`) is fitted when the first ``trust.json`` of ``previous``
      that has one exists (a model that carries the check keeps it in every version), knowing
      ``images_from``'s training images too when that folder's check is there, else ``train``'s only.

    A ``trust.json`` of ``previous`` is never reused as it is: its error scale, radius and not-found
    thresholds describe the errors of the weights it was fitted on, not these.

    Args:
        det: the new weights (any trust model it carries is ignored).
        train: the cases they were trained on (the shape model, the image model's training images).
        calibration: cases that trained nothing, with labels (the model's validation cases).
        previous: folders the new weights descend from, nearest first; missing ones are skipped.
        seed: the seed of the calibration cases' cut variants.
        log: called with one line per step.
        images_from: see above; a folder without an image model is skipped, with a line in the record.
        presence_epochs: see above; 0 (the default) trains nothing.
        presence_deadline: a :func:`time.monotonic` time by which the network's training ends (the
            server's ``max_minutes``, :meth:`~lmk3d.trust.presence.PresenceModel.fit`); None: all
            ``presence_epochs`` run.

    Returns:
        ``(trust, record)``. ``trust`` is None when fewer than :data:`MIN_CALIBRATION_CASES` calibration
        cases have labels. ``record`` is plain JSON data for the version's report: ``calibrated`` (bool),
        ``reason`` (one line: what it was fitted on, or why it was not), and when fitted
        ``tolerance_mm``, ``calibration_cases``, ``presence_from`` and ``images_from`` (folders or None),
        ``presence`` (which network serves: ``"inherited"``, ``"trained"`` or ``"none"``), ``anatomy_from``
        (the folder whose anatomy check was kept, or None) and ``seconds``.

    Raises:
        LandmarkError: the fit itself failed (too few points, unreadable images...).
    """
    from lmk3d.trust import load_trust
    from lmk3d.trust.fit import fit_trust
    from lmk3d.trust.presence import PresenceModel

    labelled = [s for s in calibration if s.landmarks is not None and bool(s.landmarks.found.any())]
    if len(labelled) < MIN_CALIBRATION_CASES:
        return None, {"calibrated": False,
                      "reason": f"{len(labelled)} validation case(s); calibration needs at least "
                                f"{MIN_CALIBRATION_CASES}"}
    folders = [Path(p) for p in previous if Path(p).is_dir()]
    tolerance_mm = DEFAULT_TOLERANCE_MM
    loaded: dict[Path, TrustModel | None] = {}  # each trust.json (about 1 MB) read once
    for folder in folders:
        old = loaded[folder] = load_trust(folder)
        if old is not None:
            tolerance_mm = old.tolerance_mm
            break
    presence, presence_from = None, None
    for folder in folders:
        candidate = PresenceModel.load(folder)
        if candidate is not None and candidate.landmark_names == tuple(det.landmark_names):
            presence, presence_from = candidate, folder
            break
    trained = _presence_to_train(det.landmark_names, train, presence, presence_from, presence_epochs, seed, log)
    fine_tuned_from = Path(images_from) if images_from is not None and Path(images_from).is_dir() else None
    if fine_tuned_from is not None and fine_tuned_from not in loaded:
        loaded[fine_tuned_from] = load_trust(fine_tuned_from)
    prior = _prior_images(loaded[fine_tuned_from]) if fine_tuned_from is not None else None
    # The anatomy check is kept where the weights descend from a model that has one; a fine-tune's knows the
    # images of the weights it started from too.
    anatomy_from = next((f for f in folders if (t := _load(loaded, f)) is not None and t.anatomy is not None), None)
    parent = loaded.get(fine_tuned_from) if fine_tuned_from is not None else None
    anatomy_prior = parent.anatomy if anatomy_from is not None and parent is not None else None
    # A model that judges points just beyond the field of view as inside keeps doing so in its new versions.
    pull = next((t.pull_inside_mm for f in folders if (t := _load(loaded, f)) is not None), 0.0)
    # So does a model whose scores were also calibrated on its training cases answered without themselves.
    cross_fit: list[Any] = []
    cross_note = ""
    if next(("cross_fit" in t.report for f in folders if (t := _load(loaded, f)) is not None), False):
        if fitted_on is None:
            cross_note = "; no training case answered without itself (the cases the weights were fitted on unknown)"
        else:
            fitted = [s for s in fitted_on if s.landmarks is not None]
            names_fitted = {s.case for s in fitted}
            unseen = [s for s in train if s.landmarks is not None and s.case not in names_fitted]
            try:
                cross_fit = cross_fitted_answers(det, fitted, unseen)
            except LandmarkError as e:
                cross_note = f"; no training case answered without itself ({e})"
            else:
                cross_note = f"; the scores also on the {len(cross_fit)} training case(s), each answered without itself"
    t0 = time.monotonic()
    trust = fit_trust(own_answer(det), train, labelled, det.modality_fitted, tolerance_mm, seed,
                      presence if trained is None else None, log=log, names=det.landmark_names, image_prior=prior,
                      presence_candidates=(presence, trained) if trained is not None else (),
                      presence_deadline=presence_deadline, anatomy_check=anatomy_from is not None,
                      anatomy_prior=anatomy_prior, pull_inside_mm=pull, cross_fit=cross_fit)
    seconds = round(time.monotonic() - t0, 1)
    images = str(images_from) if prior is not None else None
    inherited = f"the presence network of {presence_from}" if presence_from else "no presence network (geometry only)"
    served = "none" if trust.presence is None else "trained" if trust.presence is trained else "inherited"
    if served == "trained":
        assert trained is not None
        where = (f"a presence network trained on {trained.report['training_cases']} training case(s)"
                 + (f", starting from that of {presence_from} (it told cut-off landmarks better than that one)"
                    if presence_from else " (it told cut-off landmarks better than geometry alone)"))
    elif trained is not None:
        where = f"{inherited} (one trained on these cases did no better)"
    else:
        where = inherited
    if served == "trained":
        presence_from = None
    trust.report.update(seconds=seconds, presence_from=str(presence_from) if presence_from else None,
                        presence=served, images_from=images,
                        anatomy_from=str(anatomy_from) if trust.anatomy is not None else None,
                        command="fitted by the server's training (lmk3d.calibrate.calibrate_new_weights)")
    known = (f"the image check knows the {prior.n_images} training images of {images_from} too" if prior is not None
             else "the image check knows these training images only")
    if trust.anatomy is not None:
        known += (f"; so does its anatomy check (kept from {anatomy_from})" if anatomy_prior is not None else
                  f"; an anatomy check (kept from {anatomy_from}) on these training images")
    return trust, {"calibrated": True,
                   "reason": f"fitted on {len(labelled)} validation case(s) "
                             f"({trust.report['calibration_points']} points), tolerance {tolerance_mm:g} mm, "
                             f"{where}; {known}{cross_note}",
                   "tolerance_mm": tolerance_mm, "calibration_cases": [s.case for s in labelled],
                   "presence_from": str(presence_from) if presence_from else None, "presence": served,
                   "images_from": images, "anatomy_from": str(anatomy_from) if trust.anatomy is not None else None,
                   "seconds": seconds}


def _load(loaded: dict[Path, TrustModel | None], folder: Path) -> TrustModel | None:
    """``load_trust(folder)``, read once into ``loaded``."""
    from lmk3d.trust import load_trust

    if folder not in loaded:
        loaded[folder] = load_trust(folder)
    return loaded[folder]


def _presence_to_train(names: Sequence[str], train: Sequence[Sample], inherited: PresenceModel | None,
                       inherited_from: Path | None, epochs: int, seed: int,
                       log: Callable[[str], None] | None) -> PresenceModel | None:
    """An untrained presence network for :func:`calibrate_new_weights` to train on ``train``, or None (see there)."""
    from lmk3d.checkpoint import data_fingerprint
    from lmk3d.trust.presence import PresenceConfig, PresenceModel

    say = log or (lambda _: None)
    if epochs <= 0:
        return None
    full = [s for s in train if s.landmarks is not None and set(names) <= set(s.landmarks.names)
            and bool(s.landmarks.reorder(names).found.all())]
    if len(full) < MIN_PRESENCE_CASES:
        say(f"presence network: not trained ({len(full)} training case(s) with every landmark placed; it needs "
            f"at least {MIN_PRESENCE_CASES})")
        return None
    fingerprint = data_fingerprint([(s.case, s.landmarks.reorder(names)) for s in full if s.landmarks is not None])
    if inherited is not None and inherited.report.get("data_fingerprint") == fingerprint:
        say(f"presence network: the one of {inherited_from} was trained on these cases; kept as it is")
        return None
    if inherited is not None:
        config = dataclasses.replace(inherited.config, epochs=epochs, seed=seed)
        net = PresenceModel(names, config)
        net.net.load_state_dict(inherited.net.state_dict())
    else:
        net = PresenceModel(names, PresenceConfig(epochs=epochs, seed=seed, box_mm=_box_mm(list(train))))
    net.provenance = {"data_fingerprint": fingerprint,
                      "fine_tuned_from": str(inherited_from) if inherited is not None else None}
    return net


def _prior_images(old: TrustModel | None) -> ImageModel | None:
    """The image model of ``old`` (a parent's trust model), with its count of training images; None without one.

    A ``trust.json`` written before the count was recorded fitted its image model on each training case and
    one cut variant of it, so its count is taken as twice its ``training_cases``.
    """
    if old is None or old.image is None:
        return None
    image = old.image
    if not image.n_images:
        cases = int(old.report.get("training_cases") or 0)
        if cases < 1:
            return None
        image = dataclasses.replace(image, n_images=2 * cases)
    return image


def _box_mm(train: list) -> float:  # type: ignore[type-arg]
    """The presence box: 1.1 x the largest training field of view (to 8 mm), so every training image fits."""
    import numpy as np

    extent = 0.0
    for s in train[:50]:
        v = s.load_image()
        extent = max(extent, float(np.max(np.asarray(v.shape) * v.spacing_mm)))
    return float(np.ceil(1.1 * extent / 8.0) * 8.0)


CONSENSUS_WEIGHTINGS = ("score", "radius", "landmark")  # lmk3d.detectors.consensus.WEIGHTINGS, named here without torch


def add_consensus(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--members", nargs="+", metavar="DIR",
                     help="calibrated model folders, one per detector (prior_guided, pin, cascade), same data "
                          "and split")
    src.add_argument("--from", dest="source", metavar="DIR",
                     help="a consensus model folder: the same members (as its checkpoint holds them), "
                          "with the settings given here")
    p.add_argument("--weighting", choices=CONSENSUS_WEIGHTINGS,
                   help="the members' weights: score (their calibrated scores; the default of a new consensus), "
                        "radius (1 / their calibrated 90 %% radius squared) or landmark (the score times a fixed "
                        "weight per member and landmark, fitted on --fit-data); with --from, default: as it was")
    p.add_argument("--fit-data", metavar="DIR",
                   help="with --weighting landmark: fit the weights on every case of DIR with landmarks (cases the "
                        "members were not trained on; default: the validation split of the members' own data)")
    p.add_argument("--out", required=True, help="folder for the consensus model (checkpoint.pt, split.json)")


def run_consensus(args: argparse.Namespace) -> int:
    import dataclasses
    import shutil

    from lmk3d.data import read_split
    from lmk3d.detectors import load_detector
    from lmk3d.detectors.consensus import ConsensusDetector, build_consensus

    if args.source:
        loaded = load_detector(args.source, "cpu")
        if not isinstance(loaded, ConsensusDetector):
            raise LandmarkError(f"--from {args.source}: a {loaded.name} model, not a consensus")
        det, split_from = loaded, Path(args.source)
        if Path(args.out).resolve() == split_from.resolve():
            raise LandmarkError(f"--out {args.out}: give a new folder (its trust.json no longer fits the answers; "
                                "calibrate the new one, then replace)")
    else:
        splits = {(s.train, s.val, s.test) for s in (read_split(m) for m in args.members)}
        if len(splits) != 1:
            raise LandmarkError("consensus: the members' split.json files name different train/val/test cases; "
                                "the members must share one split")
        det, split_from = build_consensus(args.members), Path(args.members[0])
    if args.fit_data and args.weighting != "landmark":
        raise LandmarkError("--fit-data fits the landmark weights: give it with --weighting landmark")
    if args.weighting == "landmark":
        lam, where = _fit_landmark_weights(det, split_from, args.fit_data)
        det.config = dataclasses.replace(det.config, weighting="landmark",
                                         landmark_weights=tuple(tuple(float(v) for v in row) for row in lam))
        det.training = {**det.training, "landmark_weights_fitted_on": where}
        print(f"landmark weights fitted on {where}:")
        for slug, row in zip(det.config.members, lam, strict=True):
            print(f"  {slug}: " + ", ".join(f"{n} {v:.3f}" for n, v in zip(det.landmark_names, row, strict=True)))
    elif args.weighting:
        det.config = dataclasses.replace(det.config, weighting=args.weighting)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    det.save(out)
    shutil.copyfile(split_from / "split.json", out / "split.json")
    print(f"consensus of {', '.join(det.config.members)} (weights: {det.config.weighting}) -> {out}; "
          f"next: lmk3d calibrate --model {out}")
    return 0


def _fit_landmark_weights(det: Any, split_from: Path, fit_data: str | None) -> tuple[Any, str]:
    """``(M, N)`` landmark weights of a consensus from its members' errors on the fit cases, and where those were."""
    import numpy as np

    from lmk3d.data import load_dataset, read_split
    from lmk3d.detectors.consensus import answer_errors, fit_landmark_weights

    own = json.loads((split_from / "split.json").read_text()).get("data")
    if fit_data:
        if own and Path(fit_data).resolve() == Path(own).resolve():
            raise LandmarkError(f"--fit-data {fit_data}: that is the members' own dataset (they were trained on it); "
                                "leave --fit-data out to fit on its validation split, or give other cases")
        cases = [s for s in load_dataset(fit_data) if s.landmarks is not None]
        where = f"{fit_data} ({len(cases)} cases with landmarks)"
    else:
        if not own:
            raise LandmarkError(f"{split_from}: split.json names no dataset; give --fit-data")
        cases = [s for s in load_dataset(own).subset(read_split(split_from).val) if s.landmarks is not None]
        where = f"{own}, validation split ({len(cases)} cases)"
    if not cases:
        raise LandmarkError(f"landmark weights: no case with landmarks in {where}")
    errors = [answer_errors([r.landmarks for r in det.member_answers(s.load_image())],
                            s.landmarks.reorder(det.landmark_names))  # type: ignore[union-attr]
              for s in cases]
    return fit_landmark_weights(np.stack(errors), det.config.inlier_mm), where
