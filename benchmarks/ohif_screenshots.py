"""Screenshots of the bundled OHIF for docs/ohif.md: a studies folder and a PACS, the cascade detector's markers.

    .venv/bin/python benchmarks/ohif_screenshots.py [--out docs/figures] [--no-pacs]

Starts the real server (``lmk3d serve``) on a temporary studies folder of two hippocampus MR images
with a copy of ``models/cascade-hippocampus``, and drives Debian's chromium headless through playwright
(``tests/apps/ohif_driver.py``, the driver the browser tests use): the study list, then the cascade
detector's markers with the segmentation panel listing them, then a marker moved and exported
("Export DICOM SEG") and the final label it became. With root (``scripts/test_pacs.sh``), the same
image is also sent as a DICOM series to a throw-away Orthanc in a private network namespace and
shown through the PACS path; the server and the browser then run inside that namespace.

A spine T2 in the same folder shows what the panel says of an image the model refuses (no marker).

Writes ``ohif_study_list.png``, ``ohif_markers.png``, ``ohif_correction.png``, ``ohif_refused.png`` and
``ohif_pacs.png`` under ``--out``, and prints what each shows. Nothing is downloaded; the browser reaches only loopback.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.apps.ohif_driver import ohif, why_no_browser  # noqa: E402

from lmk3d.io import read_image, read_landmarks  # noqa: E402
from lmk3d.serve import start_server, stop_server, wait_until_ready  # noqa: E402

DATA = Path(os.environ.get("LMK3D_SHARED", ROOT.parent / "shared")) / "data" / "hippocampus" / "images"
CASES = ("hippocampus_004", "hippocampus_006")
OTHER_KIND = DATA.parents[1] / "spine_t2" / "t2.nii.gz"  # an image the hippocampus model must refuse
MODEL = "cascade"
PACS_PORT, SERVER_PORT = "8042", 8011


def _models(root: Path) -> Path:
    models = root / "models"
    shutil.copytree(ROOT / "models" / f"{MODEL}-hippocampus", models / f"{MODEL}-hippocampus")
    return models


def _serve(studies: str, root: Path, port: int, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    log = (root / "server.log").open("wb")
    process = start_server(studies, port=port, models_dir=_models(root), stdout=log, stderr=subprocess.STDOUT,
                           cwd=root, start_new_session=True,
                           env={**os.environ, "TMPDIR": str(root), "MONAI_LABEL_SESSION_PATH": str(root / "s"),
                                # a PACS's model registry goes under XDG_DATA_HOME: not the user's
                                "XDG_DATA_HOME": str(root / "data-home"), **(env or {})})
    wait_until_ready(f"http://127.0.0.1:{port}", process, timeout_s=600, log_file=root / "server.log")
    return process


def local(out: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="lmk3d-ohif-shots-") as tmp:
        root = Path(tmp)
        studies = root / "studies"
        studies.mkdir()
        for case in CASES:
            shutil.copy(DATA / f"{case}.nii.gz", studies / f"{case}.nii.gz")
        shutil.copy(OTHER_KIND, studies / "spine_t2.nii.gz")
        port = 8012
        process = _serve(str(studies), root, port)
        base = f"http://127.0.0.1:{port}"
        try:
            with ohif(base) as viewer:
                viewer.study_list(CASES[0])
                viewer.screenshot(out / "ohif_study_list.png")
                print(f"ohif_study_list.png: the studies folder's {len(CASES) + 1} images as OHIF's study list")
                viewer.open_from_list(CASES[0])
                notice = viewer.run_model(MODEL)
                segments = viewer.segments()
                viewer.open_segmentation_panel()
                first = sorted(segments.values())[0]
                viewer.show_segment(first)
                viewer.screenshot(out / "ohif_markers.png")
                print(f"ohif_markers.png: {MODEL} on {CASES[0]}: segments {', '.join(sorted(segments.values()))};"
                      f" views centred on {first}; the panel's notification: {notice}")
                index = {name: i for i, name in segments.items()}
                viewer.move_segment(index[first], 3)
                viewer.page.wait_for_timeout(1000)
                status, _ = viewer.export_seg("lmk3d correction")
                viewer.page.wait_for_timeout(1500)
                viewer.screenshot(out / "ohif_correction.png")
            with ohif(base) as viewer:
                viewer.study_list("spine_t2")
                viewer.open_from_list("spine_t2")
                notice = viewer.run_model(MODEL, markers=False)
                viewer.notification("does not recognise this image")
                viewer.screenshot(out / "ohif_refused.png")
                print(f"ohif_refused.png: {MODEL} on a spine T2 from the same folder: no marker; the panel's "
                      f"notification: {notice}")
            final = read_landmarks(studies / "labels" / "final" / f"{CASES[0]}.mrk.json")
            print(f"ohif_correction.png: {first} moved 3 voxels and exported (STOW-RS {status}); labels/final/"
                  f"{CASES[0]}.mrk.json: {dict(zip(final.names, final.xyz_mm_ras.round(2).tolist(), strict=True))}")
        finally:
            stop_server(process)


def in_pacs_namespace(url: str, out: Path) -> None:
    """The PACS part, run inside the test PACS's network namespace (see :func:`pacs`)."""
    import pydicom

    with tempfile.TemporaryDirectory(prefix="lmk3d-ohif-pacs-") as tmp:
        root = Path(tmp)
        env = {"MONAI_LABEL_DICOMWEB_CACHE_PATH": str(root / "cache")}
        process = _serve(url, root, SERVER_PORT, env)
        base = f"http://127.0.0.1:{SERVER_PORT}"
        try:
            study = str(pydicom.dcmread(next(Path(os.environ["LMK3D_SHOTS_SERIES"]).iterdir())).StudyInstanceUID)
            with ohif(base) as viewer:
                viewer.open_study(study)
                viewer.run_model(MODEL)
                segments = viewer.segments()
                viewer.open_segmentation_panel()
                first = sorted(segments.values())[0]
                viewer.show_segment(first)
                viewer.screenshot(out / "ohif_pacs.png")
                print(f"ohif_pacs.png: {MODEL} on {CASES[0]} sent as a DICOM series to Orthanc, read through the "
                      f"PACS: segments {', '.join(sorted(segments.values()))}")
        finally:
            stop_server(process)


def pacs(out: Path) -> None:
    """Start the test PACS, store the image as a DICOM series, and run :func:`in_pacs_namespace` inside it."""
    from lmk3d.io.dicom_export import SeriesIds, series_from_volume, write_series

    with tempfile.TemporaryDirectory(prefix="lmk3d-ohif-pacs-state-") as tmp:
        state = Path(tmp)
        env = {**os.environ, "LMK3D_PACS_DIR": str(state / "pacs"), "LMK3D_PACS_PORT": PACS_PORT,
               "LMK3D_PACS_USER": "lmk3d-shots", "LMK3D_PACS_PASSWORD": secrets.token_urlsafe(16),
               "LMK3D_SHOTS_SERIES": str(state / "series")}
        script = ["bash", str(ROOT / "scripts" / "test_pacs.sh")]
        started = subprocess.run([*script, "start"], env=env, capture_output=True, text=True)
        if started.returncode != 0:
            print(f"ohif_pacs.png: not made: the test PACS cannot run here ({started.stderr.strip()})")
            return
        try:
            write_series(state / "series", series_from_volume(read_image(DATA / f"{CASES[0]}.nii.gz", dtype=None),
                                                              SeriesIds.derive(CASES[0], "shots")))
            upload = ("import os, pathlib, pydicom\n"
                      "from dicomweb_client.api import DICOMwebClient\n"
                      "from dicomweb_client.session_utils import create_session_from_user_pass\n"
                      f"c = DICOMwebClient('http://127.0.0.1:{PACS_PORT}/dicom-web', session="
                      "create_session_from_user_pass(os.environ['LMK3D_PACS_USER'],\n"
                      "                              os.environ['LMK3D_PACS_PASSWORD']))\n"
                      "c.store_instances([pydicom.dcmread(f) for f in sorted(pathlib.Path("
                      "os.environ['LMK3D_SHOTS_SERIES']).iterdir())])\n")
            subprocess.run([*script, "exec", sys.executable, "-c", upload], env=env, check=True)
            subprocess.run([*script, "exec", sys.executable, __file__, "--out", str(out), "--in-pacs",
                            f"http://127.0.0.1:{PACS_PORT}/dicom-web"], env=env, check=True)
        finally:
            subprocess.run([*script, "stop"], env=env, capture_output=True, text=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "figures")
    parser.add_argument("--no-pacs", action="store_true", help="only the studies folder")
    parser.add_argument("--in-pacs", metavar="URL", help=argparse.SUPPRESS)  # the PACS part, re-run in its namespace
    args = parser.parse_args()
    reason = why_no_browser()
    if reason:
        raise SystemExit(f"cannot take screenshots: {reason}")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.in_pacs:
        in_pacs_namespace(args.in_pacs, args.out)
        return
    local(args.out)
    if not args.no_pacs:
        pacs(args.out)
    print(json.dumps({"out": str(args.out)}))


if __name__ == "__main__":
    main()
