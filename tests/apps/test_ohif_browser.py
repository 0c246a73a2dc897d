"""The bundled OHIF in a real browser against the real server: Debian's chromium, headless, via playwright.

Two sessions, each as a radiologist works (``tests/apps/ohif_driver.py``):

- **a local studies folder** holding one image with a left-handed voxel grid (a hippocampus MR with
  its third voxel axis reversed, the same image in the world; the case where a viewer's slice order
  differs from the file's): the study list shows it, the MONAI Label panel's server is the
  page's own address, running the model from the panel gives one segment per landmark named as the
  model's landmarks (``/info/``), each a sphere of the expected size whose centre is the server's
  landmark (world mm, as OHIF places it); clicking a landmark in the segmentation panel moves every
  view to its marker, drawn in its own colour (counted in the viewports' pixels, none of that colour
  before the run); a marker moved by three voxels and stored with the segmentation
  panel's "Export DICOM SEG" becomes the image's final label, that landmark moved, the others kept; the
  panel's notification after the run is the answer's review notice (points to check), and a CT-like
  volume in the same folder gets no marker and a notification saying why the model refused it;
- **a PACS** (Orthanc in a private network namespace, the fixtures of ``tests/test_pacs.py``; the
  server and the browser are started from the test thread, inside that namespace): the same on a
  hippocampus MR sent to it as an oblique DICOM series (38 slices: the 192-slice MPRAGE takes OHIF a
  minute to show in software rendering), the final label stored in the PACS as a DICOM SR.

Skipped, saying why, only when chromium or playwright is missing (the PACS session also when the
test PACS cannot run here). No test measures time; waits are bounds on a hung viewer.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from lmk3d.io import Volume, read_image, read_landmarks, write_image
from lmk3d.io.dicom_export import SeriesIds, series_from_volume
from lmk3d.io.dicom_sr import read_sr
from lmk3d.serve import start_server, wait_until_ready, workspace_conf
from tests.apps.ohif_driver import Ohif, describe, ohif, why_no_browser
from tests.apps.server_fixture import HIPPOCAMPUS, Server, copy_model, launch, multipart, ready, stop
from tests.conftest import oblique_affine
from tests.test_pacs import Pacs, pacs  # noqa: F401  (module fixture)

pytestmark = [pytest.mark.server, pytest.mark.filterwarnings("ignore:'cgi' is deprecated:DeprecationWarning")]

MODEL = "mean_shape"
STUDY = "hippocampus_rai"
OTHER_KIND = "ct_like"  # a CT-like volume in the same folder: the MR model refuses it
#: How far (mm) a marker's centre in OHIF may be from the server's landmark: a voxelised sphere's centre
#: of mass is within a fraction of a voxel of the true centre (about 0.2 mm here); a wrong slice order,
#: axis or flip puts it millimetres away.
CENTRE_TOL_MM = 0.75
SHIFT_VOXELS = 3
PACS_SERVER_PORT = 8010  # inside the PACS's private namespace
TRUST_FILES = ("trust.json", "presence.pt")
#: The PACS's series: a hippocampus MR under an oblique affine, as a DICOM series (38 slices, quick to show).
PACS_IDS = SeriesIds.derive("pacs_case", "1")


def _colours(server: Server) -> dict[str, tuple[int, int, int]]:
    """The landmark colours the server's OHIF configuration gives."""
    text = server.request("GET", "/ohif/app-config.js").body.decode()
    config = json.loads(text.split("window.config = ", 1)[1].split(";\n", 1)[0])
    return {name: tuple(rgb) for name, rgb in config["lmk3dLabelColors"].items()}


def _detect(request: Any, image: str) -> dict[str, np.ndarray]:
    """The server's landmarks (LPS mm) for ``image``, found ones only."""
    body, ctype = multipart({"params": (None, b'{"result_write_to_file": false}')})
    reply = request("POST", f"/infer/{MODEL}?image={image}&output=json", body=body, content_type=ctype)
    assert reply.status == 200, reply
    return {it["name"]: np.array(it["lps"], dtype=float) for it in reply.json()["landmarks"] if it["found"]}


def _check_markers(viewer: Ohif, names: list[str], detected: dict[str, np.ndarray],
                   min_voxels: int) -> tuple[dict[str, int], dict[int, tuple[int, np.ndarray]]]:
    """Segments named as the model's landmarks; each found landmark a marker of ``min_voxels`` at its place."""
    segments = viewer.segments()
    assert sorted(segments.values()) == sorted(names), segments
    index = {name: i for i, name in segments.items()}
    markers = viewer.markers()
    assert set(markers) == {index[n] for n in detected}, (describe(markers), detected)
    for name, lps in detected.items():
        voxels, centre = markers[index[name]]
        assert voxels >= min_voxels, f"{name}: a marker of {voxels} voxels"
        assert np.linalg.norm(centre - lps) < CENTRE_TOL_MM, f"{name}: OHIF shows it at {centre}, the server at {lps}"
    return index, markers


def _correct(viewer: Ohif, index: dict[str, int], markers: dict[int, tuple[int, np.ndarray]],
             name: str) -> dict[str, np.ndarray]:
    """Move ``name``'s marker by SHIFT_VOXELS along the first axis and export; the markers' centres after."""
    step = viewer.first_axis_step_lps()
    assert viewer.move_segment(index[name], SHIFT_VOXELS) > 0
    after = viewer.markers()
    moved = after[index[name]][1] - markers[index[name]][1]
    np.testing.assert_allclose(moved, SHIFT_VOXELS * step, atol=0.5)
    viewer.open_segmentation_panel()
    status, body = viewer.export_seg("lmk3d correction")
    assert status == 200, body
    return {n: after[i][1] for n, i in index.items() if i in after}


# --- a local studies folder -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def local_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    reason = why_no_browser()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("ohif-local")
    studies = root / "studies"
    studies.mkdir()
    image = read_image(HIPPOCAMPUS / "images" / "hippocampus_004.nii.gz", dtype=None)
    # The same image in the world, its third voxel axis reversed: a left-handed voxel grid (RAI here, as many
    # files are), whose slices a DICOM viewer stacks in the other order.
    flip = np.diag([1.0, 1.0, -1.0, 1.0])
    flip[2, 3] = image.shape[2] - 1
    affine = image.affine @ flip
    assert np.linalg.det(affine[:3, :3]) < 0
    write_image(studies / f"{STUDY}.nii.gz", image.array[:, :, ::-1], affine)
    ct = np.random.default_rng(4).integers(-1024, 1500, size=(40, 36, 24)).astype(np.int16)
    write_image(studies / f"{OTHER_KIND}.nii.gz", ct, np.diag([0.8, 0.8, 2.5, 1.0]))  # not the model's kind
    copy_model(root / "models")
    server = ready(launch(root, studies, models=root / "models"))
    yield server
    stop(server.process)


def test_local_study_shows_named_markers_and_a_correction_reaches_the_datastore(local_server: Server) -> None:
    server = local_server
    names = list(server.get_json("/info/")["models"][MODEL]["labels"])
    detected = _detect(server.request, STUDY)
    assert len(detected) >= 2, detected
    colours = _colours(server)
    first = sorted(detected)[0]
    with ohif(server.url) as viewer:
        assert STUDY in viewer.study_list(STUDY)
        viewer.open_from_list(STUDY)
        assert viewer.server_field() == f"{server.url}/"
        before = viewer.colour_pixels(colours[first])
        notice = viewer.run_model(MODEL)
        # The markers hold no score: the panel's notification names the points to check.
        assert notice is not None and notice["level"] in ("success", "warning"), notice
        assert notice["not_found"] == sorted(set(names) - set(detected), key=names.index), notice
        viewer.notification(notice["message"][:60])
        # A 3 mm sphere on 1 mm voxels holds about 113 voxels; one clipped at the border fewer.
        index, markers = _check_markers(viewer, names, detected, min_voxels=40)
        viewer.open_segmentation_panel()
        viewer.show_segment(first)
        for point, normal in viewer.view_planes():  # every view now cuts through that marker
            assert abs(float((markers[index[first]][1] - point) @ normal)) < 1.0, (point, normal)
        shown = viewer.colour_pixels(colours[first])
        assert before == 0 and shown > 30, f"{first}: {shown} pixels of its colour {colours[first]} ({before} before)"
        expected = _correct(viewer, index, markers, first)
        assert not viewer.errors, viewer.errors
    final = read_landmarks(server.studies / "labels" / "final" / f"{STUDY}.mrk.json")
    for name, lps in expected.items():
        got = final.xyz_mm_lps[final.names.index(name)]
        assert np.linalg.norm(got - lps) < 0.5, f"{name}: saved at {got}, OHIF showed {lps}"
    moved = final.xyz_mm_lps[final.names.index(first)] - detected[first]
    assert np.linalg.norm(moved) > 2.0, moved  # the correction, not the detection, was saved


def test_an_image_of_another_kind_shows_why_nothing_is_marked(local_server: Server) -> None:
    with ohif(local_server.url) as viewer:
        viewer.study_list(OTHER_KIND)
        viewer.open_from_list(OTHER_KIND)
        notice = viewer.run_model(MODEL, markers=False)
        assert notice is not None and notice["level"] == "error", notice
        shown = viewer.notification("does not recognise this image")
        assert "looks like CT" in shown, shown
        assert not viewer.any_marker(), "a refused image has no marker"
        assert not viewer.errors, viewer.errors


# --- a PACS ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pacs_server(pacs: Pacs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:  # noqa: F811
    reason = why_no_browser()
    if reason:
        pytest.skip(reason)
    image = read_image(HIPPOCAMPUS / "images" / "hippocampus_006.nii.gz", dtype=None)
    oblique = Volume(image.array, oblique_affine(np.random.default_rng(5), spacing=(1.0, 1.0, 1.0)))
    series = series_from_volume(oblique, PACS_IDS)
    response = pacs.client().store_instances([series.dataset(k) for k in range(len(series.headers))])
    assert not response.get("FailedSOPSequence"), response
    root = tmp_path_factory.mktemp("ohif-pacs")
    models = root / "models"
    # Without the model's trust files (lmk3d.trust), which may call a rotated crop unlike those the model
    # knows and then find nothing: this test is about the viewer.
    for f in copy_model(models).iterdir():
        if f.name in TRUST_FILES:
            f.unlink()
    env = {k: v for k, v in pacs.env.items() if not k.startswith("MONAI_LABEL_DICOMWEB_")}
    env.update(MONAI_LABEL_DICOMWEB_CACHE_PATH=str(root / "cache"), MONAI_LABEL_SESSION_PATH=str(root / "sessions"),
               TMPDIR=str(root))
    log = root / "server.log"
    with log.open("wb") as out:  # from the thread in the PACS's namespace: so is the server
        # Its own workspace: the default one is keyed by the PACS address, which other tests' servers share.
        process = start_server(pacs.url, port=PACS_SERVER_PORT, models_dir=models, env=env, stdout=out,
                               conf=[workspace_conf(root / "workspace")],
                               stderr=subprocess.STDOUT, cwd=root, start_new_session=True)
    server = Server(f"http://127.0.0.1:{PACS_SERVER_PORT}", PACS_SERVER_PORT, process, root, root, models, root, log)
    try:
        wait_until_ready(server.url, process, timeout_s=600, log_file=log)
        yield server
    finally:
        stop(process)


def test_pacs_study_shows_named_markers_and_a_correction_reaches_the_pacs(pacs: Pacs,  # noqa: F811
                                                                          pacs_server: Server) -> None:
    server = pacs_server
    study, series = PACS_IDS.study_uid, PACS_IDS.series_uid
    names = list(server.get_json("/info/")["models"][MODEL]["labels"])
    detected = _detect(server.request, series)
    assert len(detected) >= 2, detected
    with ohif(server.url) as viewer:
        viewer.open_study(study)
        assert viewer.server_field() == f"{server.url}/"
        viewer.run_model(MODEL)
        index, markers = _check_markers(viewer, names, detected, min_voxels=40)
        expected = _correct(viewer, index, markers, sorted(detected)[0])
        assert not viewer.errors, viewer.errors
    client = pacs.client()
    finals = [s for s in client.search_for_series(search_filters={"Modality": "SR"}, fields=["SeriesDescription"])
              if s.get("0008103E", {}).get("Value") == ["lmk3d final landmarks"]]
    assert len(finals) == 1, finals
    (sr,) = client.retrieve_series(study, finals[0]["0020000E"]["Value"][0])
    final = read_sr(sr, frame_of_reference_uid=PACS_IDS.frame_of_reference_uid)
    for name, lps in expected.items():
        got = final.xyz_mm_lps[final.names.index(name)]
        assert np.linalg.norm(got - lps) < 0.5, f"{name}: saved at {got}, OHIF showed {lps}"
    segs = client.search_for_series(search_filters={"Modality": "SEG"})
    assert len(segs) == 1, "the exported SEG itself is stored in the PACS too"
