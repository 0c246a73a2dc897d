"""What the server gives the bundled OHIF, over plain HTTP (no browser): files, config, DICOMweb, results.

One real server (``lmk3d serve`` on loopback) on a studies folder of two images: a hippocampus MR with
a left-handed, oblique voxel grid (its voxels under a rotated affine whose third axis is mirrored) and
an integer CT-like volume. Checked with independent readers as oracles:

- the viewer's files: the patched bundles (:mod:`lib.ohif`), sub-folder files, the viewer's routes,
  ``app-config.js`` (the data source is this server's proxy, one distinct colour per landmark);
- DICOMweb over the studies folder (:mod:`lib.local_dicomweb`): QIDO-RS listings and filters; every
  instance's metadata and frame read back by SimpleITK/GDCM gives nibabel's geometry of the NIfTI (on
  the grid a viewer stacks it on) and its voxel values;
- an inference as OHIF's panel asks for it (the series UID as the image; ``restore_label_idx``): the
  label map's voxels, read as OHIF reads them (raw, header ignored) on the viewer's grid, decode to the
  server's landmarks; the answer's review header (:mod:`lib.review_notice`) names what the label map
  cannot show (landmarks not found, points to check, why an image of another kind was refused);
- corrections by STOW-RS: a SEG made by highdicom with one sphere moved becomes the final label, that
  landmark moved; other objects and bad bodies are refused with a message and nothing stored.
"""

from __future__ import annotations

import doctest
import importlib
import json
import re
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from lmk3d.io import Volume, read_image, read_landmarks, write_image
from lmk3d.io.dicom_export import viewer_grid
from lmk3d.io.label_map import landmarks_from_label_map, sphere_label_map
from lmk3d.landmarks import LandmarkSet
from tests.apps.server_fixture import HIPPOCAMPUS, Server, copy_model, launch, multipart, ready, stop
from tests.conftest import ROOT, oblique_affine

pytestmark = [pytest.mark.server,
              pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent the intended person name")]

APP = ROOT / "apps" / "landmarks"
MODEL = "mean_shape"
MR, CT = "hippo_oblique", "ct_like"
PROXY = "/proxy/dicom"


def _import_app(*modules: str) -> list[ModuleType]:
    """Import the app's ``lib.<module>``s, then forget ``lib`` ("lib" is too generic a name to leave behind)."""
    before = set(sys.modules)
    sys.path.insert(0, str(APP))
    try:
        return [importlib.import_module(f"lib.{m}") for m in modules]
    finally:
        sys.path.remove(str(APP))
        for name in set(sys.modules) - before:
            if name == "lib" or name.startswith("lib."):
                del sys.modules[name]


OHIF, TASK, NOTICE = _import_app("ohif", "infers.task", "review_notice")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("ohif-server")
    studies = root / "studies"
    studies.mkdir()
    image = read_image(HIPPOCAMPUS / "images" / "hippocampus_004.nii.gz", dtype=None)
    affine = oblique_affine(np.random.default_rng(3), spacing=(1.0, 1.1, 1.2), flip=(1, 1, -1))
    write_image(studies / f"{MR}.nii.gz", image.array, affine)
    ct = np.random.default_rng(4).integers(-1024, 1500, size=(20, 18, 12)).astype(np.int16)
    write_image(studies / f"{CT}.nii.gz", ct, np.diag([0.8, 0.8, 2.5, 1.0]))
    copy_model(root / "models")
    started = ready(launch(root, studies, models=root / "models"))
    yield started
    stop(started.process)


def _json(server: Server, path: str) -> Any:
    reply = server.request("GET", path, headers={"Accept": "application/dicom+json"})
    assert reply.status == 200, reply
    return reply.json()


def _value(doc: dict[str, Any], tag: str) -> Any:
    value = doc[tag]["Value"][0]
    return value["Alphabetic"] if isinstance(value, dict) else value


def _study(server: Server, image_id: str) -> tuple[str, str]:
    """``(StudyInstanceUID, SeriesInstanceUID)`` of a studies-folder image, found by QIDO-RS."""
    (study,) = _json(server, f"{PROXY}/qido/studies?PatientID={image_id}")
    study_uid = _value(study, "0020000D")
    (series,) = _json(server, f"{PROXY}/qido/studies/{study_uid}/series")
    return study_uid, _value(series, "0020000E")


def _multipart_parts(body: bytes, content_type: str) -> list[bytes]:
    boundary = re.search(r"boundary=([^;]+)", content_type).group(1).strip('"')  # type: ignore[union-attr]
    parts = body.split(f"--{boundary}".encode())[1:-1]
    return [p.split(b"\r\n\r\n", 1)[1][:-2] for p in parts]


def _series(server: Server, image_id: str) -> list[pydicom.Dataset]:
    """Every instance of the image's series, from WADO-RS metadata and frames (what OHIF reads)."""
    study_uid, series_uid = _study(server, image_id)
    out = []
    for meta in _json(server, f"{PROXY}/wado/studies/{study_uid}/series/{series_uid}/metadata"):
        ds = pydicom.Dataset.from_json(meta)
        reply = server.request("GET", f"{PROXY}/wado/studies/{study_uid}/series/{series_uid}/instances/"
                                      f"{ds.SOPInstanceUID}/frames/1")
        assert reply.status == 200 and reply.headers["content-type"].startswith("multipart/related"), reply
        (frame,) = _multipart_parts(reply.body, reply.headers["content-type"])
        assert len(frame) == ds.Rows * ds.Columns * 2
        ds.PixelData = frame
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.is_little_endian, ds.is_implicit_VR = True, False
        out.append(ds)
    return out


# --- the viewer's files ------------------------------------------------------------------------------------
def test_every_patch_applies_to_the_installed_viewer() -> None:
    patched, missing = OHIF.patch_bundles()
    assert missing == []
    for _, changes in OHIF.PATCHES:
        for old, new in changes:
            new = new.split(OHIF.SEGMENTATION_BUTTONS)[0]
            assert any(new in text for text in patched.values()), new[:80]
            assert not any(old in text and old not in new for text in patched.values()), old[:80]


def test_label_colours_are_distinct_and_bright() -> None:
    names = [f"landmark_{n}" for n in range(20)]
    colours = OHIF.label_colors(names)
    assert list(colours) == sorted(names) and len({tuple(c) for c in colours.values()}) == 20
    assert all(max(c) >= 200 for c in colours.values())


def test_viewer_files_config_and_routes(server: Server) -> None:
    text = server.request("GET", "/ohif/app-config.js").body.decode()
    config = json.loads(text.split("window.config = ", 1)[1].split(";\n", 1)[0])
    source = config["dataSources"][0]["configuration"]
    assert (source["qidoRoot"], source["wadoRoot"]) == (f"{PROXY}/qido", f"{PROXY}/wado")
    names = server.get_json("/info/")["models"][MODEL]["labels"]
    assert set(names) <= set(config["lmk3dLabelColors"])
    bundles = [name for name, text in OHIF.patch_bundles()[0].items() if "window.location.origin + '/'" in text]
    served = server.request("GET", f"/ohif/{bundles[0]}").body.decode()
    assert "window.location.origin + '/'" in served and ":8000/" not in served
    icon = next((OHIF.OHIF_DIR / "assets").glob("*.png"))
    reply = server.request("GET", f"/ohif/assets/{icon.name}")
    assert reply.status == 200 and reply.body == icon.read_bytes(), "a file in a sub-folder is that file"
    index = (OHIF.OHIF_DIR / "index.html").read_bytes()
    assert server.request("GET", "/ohif/viewer").body == index  # one of the viewer's own routes
    missing = server.request("GET", "/ohif/no-such-bundle.js")
    assert missing.status == 404 and "no such file" in missing.detail


# --- DICOMweb over the studies folder ------------------------------------------------------------------------
def test_qido_lists_and_filters_the_studies_folder(server: Server) -> None:
    studies = _json(server, f"{PROXY}/qido/studies?limit=101&offset=0&fuzzymatching=true")
    assert sorted(_value(s, "00100020") for s in studies) == sorted([MR, CT])
    modalities = {_value(s, "00100020"): _value(s, "00080061") for s in studies}
    assert modalities == {MR: "MR", CT: "CT"}
    assert [_value(s, "00100010") for s in _json(server, f"{PROXY}/qido/studies?PatientName=oblique"
                                                         "&fuzzymatching=true")] == [MR]
    assert len(_json(server, f"{PROXY}/qido/studies?limit=1&offset=1")) == 1
    assert _json(server, f"{PROXY}/qido/studies?PatientID=nobody") == []
    unknown = server.request("GET", f"{PROXY}/qido/studies/2.25.1/series")
    assert unknown.status == 404 and "no study 2.25.1" in unknown.detail
    study_uid, series_uid = _study(server, CT)
    assert _study(server, CT) == (study_uid, series_uid), "UIDs are stable while the file is unchanged"
    instances = _json(server, f"{PROXY}/qido/studies/{study_uid}/series/{series_uid}/instances")
    assert len(instances) == 12
    sop = _value(instances[0], "00080018")
    bad = server.request("GET", f"{PROXY}/wado/studies/{study_uid}/series/{series_uid}/instances/{sop}/frames/2")
    assert bad.status == 404 and "one frame" in bad.detail


@pytest.mark.parametrize("image_id", [MR, CT])
def test_the_series_is_the_image_the_detectors_read(server: Server, tmp_path: Path, image_id: str) -> None:
    for n, ds in enumerate(_series(server, image_id)):
        ds.save_as(tmp_path / f"{n:04d}.dcm", write_like_original=False)
    back = read_image(tmp_path, dtype=None)  # SimpleITK / GDCM: the oracle
    source = nib.load(str(server.studies / f"{image_id}.nii.gz"))
    data = np.asarray(source.dataobj)
    np.testing.assert_allclose(back.affine, viewer_grid(np.asarray(source.affine), data.shape), atol=1e-4)
    flipped = data[:, :, ::-1] if np.linalg.det(source.affine[:3, :3]) < 0 else data
    if np.issubdtype(data.dtype, np.integer):
        np.testing.assert_array_equal(back.array, flipped)
    else:
        step = (float(data.max()) - float(data.min())) / 65535
        assert np.abs(back.array - flipped).max() <= 0.51 * step


# --- an inference as OHIF asks for it ------------------------------------------------------------------------
OHIF_PARAMS = {"result_extension": ".nrrd", "result_dtype": "uint8", "result_compress": False,
               "restore_label_idx": False}


def _infer(server: Server, image: str, params: dict[str, Any], output: str) -> Any:
    body, ctype = multipart({"params": (None, json.dumps(params).encode())})
    reply = server.request("POST", f"/infer/{MODEL}?image={image}&output={output}", body=body, content_type=ctype)
    assert reply.status == 200, reply
    return reply


def test_ohif_gets_the_label_map_on_its_own_grid(server: Server) -> None:
    _, series_uid = _study(server, MR)
    detected = _infer(server, MR, {"result_write_to_file": False}, "json").json()
    names = [it["name"] for it in detected["landmarks"]]
    truth = LandmarkSet(tuple(names), np.array([it["ras"] if it["found"] else [np.nan] * 3
                                                for it in detected["landmarks"]], dtype=float),
                        found=np.array([it["found"] for it in detected["landmarks"]]))
    assert truth.found.sum() >= 2
    nrrd = _infer(server, series_uid, OHIF_PARAMS, "image").body
    image = read_image(server.studies / f"{MR}.nii.gz")
    n_voxels = int(np.prod(image.shape))
    # OHIF copies the last I*J*K bytes into its volume, x fastest, and never reads the header.
    raw = np.frombuffer(nrrd[-n_voxels:], dtype=np.uint8).reshape(image.shape, order="F")
    grid = viewer_grid(image.affine, image.shape)
    back = landmarks_from_label_map(raw, grid, names)
    assert (back.found == truth.found).all()
    np.testing.assert_allclose(back.xyz_mm_ras[truth.found], truth.xyz_mm_ras[truth.found], atol=0.5)
    # The same request without OHIF's marker option is the file's own grid (Slicer reads the header).
    plain = _infer(server, MR, {k: v for k, v in OHIF_PARAMS.items() if k != "restore_label_idx"}, "image").body
    assert not np.array_equal(np.frombuffer(plain[-n_voxels:], dtype=np.uint8).reshape(image.shape, order="F"), raw)


def test_the_label_map_answer_says_what_it_cannot_show(server: Server) -> None:
    """The panel's label map holds no score and no verdict: its header says them, as the JSON answer has them."""
    detected = _infer(server, MR, {"result_write_to_file": False}, "json")
    assert NOTICE.HEADER.lower() not in detected.headers  # a JSON answer says it all in its body
    items = detected.json()["landmarks"]
    _, series_uid = _study(server, MR)
    notice = json.loads(_infer(server, series_uid, OHIF_PARAMS, "image").headers[NOTICE.HEADER.lower()])
    assert notice["not_found"] == [it["name"] for it in items if not it["found"]]
    low = sorted((it["score"], it["name"]) for it in items if it["found"] and it["score"] < 0.5)
    assert notice["check"] == [name for _, name in low]
    assert notice["level"] == ("warning" if notice["not_found"] or notice["check"] else "success")
    assert notice == NOTICE.review_notice(detected.json())
    # An image of another kind: the viewer shows nothing, and the notice says why.
    _, ct_series = _study(server, CT)
    refused = json.loads(_infer(server, ct_series, OHIF_PARAMS, "image").headers[NOTICE.HEADER.lower()])
    assert refused["level"] == "error" and "looks like CT" in refused["message"], refused
    assert "does not recognise this image" in refused["message"] and refused["check"] == []
    config = server.request("GET", "/ohif/app-config.js").body.decode()
    assert f"headers['{NOTICE.HEADER.lower()}']" in config and "window.lmk3dNotice = function" in config


def _answer(verdict: dict[str, Any] | None, *scores: float | None) -> dict[str, Any]:
    """An infer answer's JSON with landmarks ``l0, l1, ...`` (None: not found)."""
    return {"tolerance_mm": 3.0, "image_check": verdict,
            "landmarks": [{"name": f"l{k}", "found": s is not None, "score": 0.0 if s is None else s}
                          for k, s in enumerate(scores)]}


def test_the_review_notice_names_what_to_check() -> None:
    examples = doctest.testmod(NOTICE)
    assert examples.attempted >= 1 and examples.failed == 0
    ok = {"in_distribution": True, "atypical": False, "reason": "like the training images"}
    calm = NOTICE.review_notice(_answer(ok, 0.9, 0.5, 0.97))
    assert calm["level"] == "success" and calm["check"] == calm["not_found"] == []
    assert "All 3 landmarks found" in calm["message"] and "within 3 mm" in calm["message"]
    mixed = NOTICE.review_notice(_answer(ok, 0.9, 0.3, None, 0.12, 0.49))
    assert mixed["level"] == "warning" and mixed["not_found"] == ["l2"]
    assert mixed["check"] == ["l3", "l1", "l4"]  # lowest score first; 0.5 is not below the line
    assert "Not found: l2." in mixed["message"] and "Check l3 (score 0.12), l1 (score 0.30)" in mixed["message"]
    odd = NOTICE.review_notice(_answer({**ok, "atypical": True}, 0.2, 0.2))
    assert odd["level"] == "warning" and "unusual" in odd["message"] and odd["check"] == ["l0", "l1"]
    out = NOTICE.review_notice(_answer({"in_distribution": False, "reason": "voxel spacing 3x3x3 mm is outside"},
                                       None, None))
    assert out["level"] == "error" and out["not_found"] == ["l0", "l1"] and "voxel spacing" in out["message"]
    raw = NOTICE.review_notice(_answer({"in_distribution": None, "reason": "not checked"}, 0.99, None))
    assert raw["level"] == "warning" and "1 of 2 landmarks found" in raw["message"]
    assert NOTICE.review_notice({"model": "m"}) is None and NOTICE.header_value({"model": "m"}) is None
    many = NOTICE.header_value(_answer(ok, *[0.1] * 400))
    assert many is not None and many.isascii() and len(json.loads(many)["message"]) == NOTICE.MAX_MESSAGE
    assert json.loads(NOTICE.header_value(_answer({**ok, "atypical": True}, 0.1)) or "")["level"] == "warning"


def test_markers_for_the_viewer_scale_with_the_image_and_stay_apart() -> None:
    big = Volume(np.zeros((256, 256, 180)), np.diag([0.9, 0.9, 1.0, 1.0]))
    small = Volume(np.zeros((36, 52, 38)), np.eye(4))
    apart = LandmarkSet(("a", "b"), np.array([[20.0, 20.0, 20.0], [150.0, 150.0, 90.0]]))
    close = LandmarkSet(("a", "b"), np.array([[20.0, 20.0, 20.0], [30.0, 20.0, 20.0]]))
    assert TASK.viewer_radius_mm(apart, big) == pytest.approx(0.025 * 256 * 0.9)
    assert TASK.viewer_radius_mm(close, big) == pytest.approx(0.45 * 10.0)
    assert TASK.viewer_radius_mm(apart, small) == TASK.DEFAULT_RADIUS_MM  # never under the default


# --- corrections by STOW-RS -----------------------------------------------------------------------------------
def _seg(sources: list[pydicom.Dataset], labels: np.ndarray, names: list[str]) -> pydicom.Dataset:
    """A highdicom SEG of the label map ``labels`` (series grid, value k+1 = names[k]) over ``sources``."""
    frames = np.stack([labels[:, :, k].T for k in range(labels.shape[2])])
    masks = np.stack([frames == n + 1 for n in range(len(names))], axis=-1)
    descriptions = [hd.seg.SegmentDescription(
        segment_number=n + 1, segment_label=name, segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.Tissue, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
        for n, name in enumerate(names)]
    return hd.seg.Segmentation(
        source_images=sources, pixel_array=masks, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=99,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="test", manufacturer_model_name="test",
        software_versions="1", device_serial_number="1")


def _stow(server: Server, *parts: bytes, content_type: str | None = None) -> Any:
    boundary = uuid.uuid4().hex
    body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p + b"\r\n" for p in parts)
    body += f"--{boundary}--\r\n".encode()
    ctype = content_type or f'multipart/related; type="application/dicom"; boundary={boundary}'
    return server.request("POST", f"{PROXY}/wado/studies", body=body, content_type=ctype)


def _bytes(ds: pydicom.Dataset) -> bytes:
    from io import BytesIO

    buffer = BytesIO()
    ds.save_as(buffer, write_like_original=False)
    return buffer.getvalue()


def test_a_stored_seg_becomes_the_final_label(server: Server) -> None:
    final = server.studies / "labels" / "final" / f"{CT}.mrk.json"
    sources = sorted(_series(server, CT), key=lambda d: int(d.InstanceNumber))
    grid = read_image(server.studies / f"{CT}.nii.gz")
    names = list(server.get_json("/info/")["models"][MODEL]["labels"])
    ijk = np.array([[5.0, 6.0, 4.0], [12.0, 9.0, 7.0], [9.0, 12.0, 5.0], [14.0, 5.0, 8.0]])
    placed = LandmarkSet(tuple(names), grid.ijk_to_ras(ijk[: len(names)]))
    moved = placed.xyz_mm_ras.copy()
    moved[0] += grid.affine[:3, 0] * 3  # the first landmark three voxels along i
    labels = sphere_label_map(LandmarkSet(placed.names, moved), grid.shape, grid.affine, radius_mm=2.5)

    not_seg = _stow(server, _bytes(sources[0]))
    assert not_seg.status == 422 and "only landmark corrections" in not_seg.detail
    garbage = _stow(server, b"not dicom")
    assert garbage.status == 422 and "not a DICOM file" in garbage.detail
    no_boundary = _stow(server, b"x", content_type="multipart/related")
    assert no_boundary.status == 400 and "boundary" in no_boundary.detail
    unknown = _stow(server, _bytes(_seg(sources, labels, ["nobody", *names[1:]])))
    assert unknown.status == 422 and "nobody" in unknown.detail
    assert not final.exists(), "nothing is stored from a refused upload"

    reply = _stow(server, _bytes(_seg(sources, labels, names)))
    assert reply.status == 200, reply
    saved = read_landmarks(final)
    for k, name in enumerate(names):
        got = saved.xyz_mm_ras[saved.names.index(name)]
        assert np.linalg.norm(got - moved[k]) < 0.5, f"{name}: saved at {got}, drawn at {moved[k]}"
