"""``make demo``: copy a few real images from ../shared/data into ``.demo/studies`` and serve them.

The studies folder (git-ignored) gets:

- 5 hippocampus MR crops; the first 3 carry their 4 reference landmarks as final labels
  (``labels/final/<id>.mrk.json``), the last 2 are left unlabelled for the next-sample strategies;
- the MNI152 template (``mni152_afids``) with the 32 AFIDs ground-truth fiducials;
- the cervical-spine T2 crop (``spine_t2``) with its 3 vertebral-level landmarks.

Then it starts the MONAI Label server (``lmk3d serve``) on 127.0.0.1 in the foreground, waits until
``/info/`` answers, and prints the URL. Ctrl-C stops it. Re-running keeps labels already in the
folder (corrections submitted from Slicer survive); ``--fresh`` starts from an empty folder.

Example::

    make demo PORT=8000
    .venv/bin/python scripts/demo.py --prepare-only     # build the folder, start nothing
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
from pathlib import Path

from lmk3d import serve
from lmk3d.errors import LandmarkError
from lmk3d.io import read_landmarks, read_table, write_landmarks
from lmk3d.landmarks import LandmarkSet

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LMK3D_SHARED", ROOT.parent / "shared")).resolve() / "data"
DEFAULT_STUDIES = ROOT / ".demo" / "studies"
N_HIPPOCAMPUS = 5
N_UNLABELLED = 2
LABEL_SUFFIXES = (".mrk.json", ".fcsv", ".nii.gz", ".nii", ".nrrd")


def _spine_landmarks(path: Path) -> LandmarkSet:
    """The spine CSV has extra voxel columns (``name,x_ras,y_ras,z_ras,i,j,k,inside``)."""
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return LandmarkSet.from_dict({r["name"]: (float(r["x_ras"]), float(r["y_ras"]), float(r["z_ras"]))
                                  for r in rows})


def _copy(src: Path, dest: Path) -> None:
    if not dest.is_file() or dest.stat().st_size != src.stat().st_size:
        shutil.copyfile(src, dest)


def _label(final: Path, image_id: str, landmarks: LandmarkSet) -> None:
    """Write ``<id>.mrk.json`` unless the image already has a final label (a user's correction)."""
    if not any((final / f"{image_id}{suf}").exists() for suf in LABEL_SUFFIXES):
        write_landmarks(final / f"{image_id}.mrk.json", landmarks)


def prepare(studies: Path, fresh: bool = False) -> list[str]:
    """Fill ``studies`` with the demo images and labels; return the image ids.

    Raises:
        SystemExit: ../shared/data is missing.
    """
    if not DATA.is_dir():
        raise SystemExit(f"demo: the shared data folder {DATA} is missing (set LMK3D_SHARED to the folder "
                         "that holds data/)")
    if fresh and studies.exists():
        shutil.rmtree(studies)
    final = studies / "labels" / "final"
    final.mkdir(parents=True, exist_ok=True)
    ids: list[str] = []

    hippo = DATA / "hippocampus"
    truth = read_table(hippo / "landmarks.csv")
    images = sorted((hippo / "images").glob("*.nii.gz"))[:N_HIPPOCAMPUS]
    for k, image in enumerate(images):
        image_id = image.name[: -len(".nii.gz")]
        _copy(image, studies / image.name)
        if k < len(images) - N_UNLABELLED and image_id in truth:
            _label(final, image_id, truth[image_id])
        ids.append(image_id)

    afids = DATA / "afids_mni152"
    _copy(afids / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz", studies / "mni152_afids.nii.gz")
    _label(final, "mni152_afids", read_landmarks(afids / "tpl-MNI152NLin2009cSym_res-1_desc-groundtruth_afids.fcsv"))
    ids.append("mni152_afids")

    spine = DATA / "spine_t2"
    _copy(spine / "t2.nii.gz", studies / "spine_t2.nii.gz")
    _label(final, "spine_t2", _spine_landmarks(spine / "landmarks_from_t2_labeled_center_manual.csv"))
    ids.append("spine_t2")
    return ids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, default=serve.DEFAULT_PORT)
    parser.add_argument("--host", default=serve.DEFAULT_HOST, help="default 127.0.0.1 (this machine only)")
    parser.add_argument("--studies", type=Path, default=DEFAULT_STUDIES, help=f"default {DEFAULT_STUDIES}")
    parser.add_argument("--fresh", action="store_true", help="empty the studies folder first")
    parser.add_argument("--prepare-only", action="store_true", help="build the studies folder; start nothing")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for /info/ (default 600)")
    args = parser.parse_args(argv)

    ids = prepare(args.studies, args.fresh)
    print(f"demo: {len(ids)} studies in {args.studies}: {', '.join(ids)}", flush=True)
    if args.prepare_only:
        return 0
    try:
        process = serve.start_server(args.studies, host=args.host, port=args.port)
    except LandmarkError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 2
    url = serve.server_url(args.host, args.port)
    try:
        info = serve.wait_until_ready(url, process, timeout_s=args.timeout)
    except RuntimeError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        serve.stop_server(process)
        return 1
    except KeyboardInterrupt:
        return serve.stop_server(process)
    models = ", ".join(info.get("models", {})) or "none yet"
    unavailable = ", ".join(info.get("unavailable_models", {})) or "none"
    print(f"\ndemo: MONAI Label is serving {info['datastore']['total']} studies at {url}/ "
          f"(API docs {url}/docs, app info {url}/info/)\n"
          f"demo: models: {models}; unavailable (no trained checkpoint in models/): {unavailable}\n"
          f"demo: in 3D Slicer's MONAI Label module, set the server to {url} ; Ctrl-C stops the server\n",
          flush=True)
    return serve.run_foreground(process)


if __name__ == "__main__":
    sys.exit(main())
