"""Bad input, one class per test, against the real server: a 4xx naming the problem, nothing changed, the server alive.

One server for the module, started with ``lmk3d serve --max-upload-mb 1`` and a private ``TMPDIR``
(:mod:`tests.apps.server_fixture`), serving a copy of the shipped ``mean_shape`` model. Its studies
folder holds two real hippocampus images (the first with a final label), a corrupt image and a 2D
image. Each class of bad input (labels, images, inference and training parameters, ids, sizes) is
one test case, and each must get

- the expected 4xx (never a 500) with a ``detail`` that names the problem (a key word is checked);
- the studies folder byte for byte as before, so the stored label of the first image is untouched;
- no file left in the server's temporary folder (its upload folder empty, no new temporary file);
- ``GET /info/`` still answering 200.
"""

from __future__ import annotations

import gzip
import http.client
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lmk3d.io import read_image, read_table, write_image, write_landmarks
from lmk3d.io.markups import markups_dict
from lmk3d.landmarks import LandmarkSet
from tests.apps.server_fixture import (
    HIPPOCAMPUS,
    REQUEST_TIMEOUT_S,
    Reply,
    Server,
    copy_images,
    copy_model,
    files_under,
    launch,
    multipart,
    ready,
    stop,
    studies_digest,
)

pytestmark = pytest.mark.server

MODEL = "mean_shape"
LABELLED, OTHER = "hippocampus_004", "hippocampus_006"
CORRUPT, FLAT = "corrupt_scan", "flat_2d"
MAX_UPLOAD_MB = 1


@dataclass
class Ctx:
    """The server and what the bad inputs are made from."""

    server: Server
    work: Path  # scratch folder for the files sent
    truth: LandmarkSet  # the labelled image's true landmarks

    @property
    def label(self) -> Path:
        return self.server.studies / "labels" / "final" / f"{LABELLED}.mrk.json"

    def image(self, case: str = LABELLED) -> Any:
        return read_image(self.server.studies / f"{case}.nii.gz")

    def nifti(self, name: str, array: np.ndarray, affine: np.ndarray | None = None) -> bytes:
        path = self.work / f"{name}.nii.gz"
        write_image(path, array, self.image().affine if affine is None else affine)
        return path.read_bytes()

    def sphere_map(self) -> bytes:
        """A valid sphere label map of the truth on the labelled image's grid."""
        path = self.work / "sphere.nii.gz"
        write_landmarks(path, self.truth, self.image())
        return path.read_bytes()

    def markups(self, edit: Callable[[dict[str, Any]], None] | None = None,
                landmarks: LandmarkSet | None = None) -> bytes:
        doc = markups_dict(landmarks if landmarks is not None else self.truth)
        if edit is not None:
            edit(doc)
        return json.dumps(doc).encode()

    def studies_state(self) -> dict[str, str]:
        return studies_digest(self.server.studies)

    def temp_files(self) -> set[str]:
        """The server's temporary files, but for its upload folder (made at the first upload, checked apart)."""
        return files_under(self.server.tmp) - {self.server.upload_dir().name}


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Ctx:
    root = tmp_path_factory.mktemp("bad-input")
    studies = root / "studies"
    copy_images(studies, (LABELLED, OTHER))
    truth = read_table(HIPPOCAMPUS / "landmarks.csv")[LABELLED]
    final = studies / "labels" / "final"
    final.mkdir(parents=True)
    write_landmarks(final / f"{LABELLED}.mrk.json", truth)
    (studies / f"{CORRUPT}.nii.gz").write_bytes(gzip.compress(b"not an image at all " * 50)[:300])
    write_image(studies / f"{FLAT}.nii.gz", np.zeros((40, 40, 1), np.int16), np.eye(4))
    models = root / "models"
    copy_model(models, f"{MODEL}-hippocampus")
    work = root / "work"
    work.mkdir()
    server = launch(root, studies, models=models, flags=["--max-upload-mb", str(MAX_UPLOAD_MB)])
    request.addfinalizer(lambda: stop(server.process))
    return Ctx(ready(server), work, truth)


# --- how each class is sent -----------------------------------------------------------------------
def put_label(c: Ctx, file_name: str | None, data: bytes, params: bytes = b"{}", image: str = LABELLED,
              tag: str = "final") -> Reply:
    fields: dict[str, tuple[str | None, bytes]] = {"params": (None, params)}
    if file_name is not None:
        fields["label"] = (file_name, data)
    body, ctype = multipart(fields)
    return c.server.request("PUT", f"/datastore/label?image={image}&tag={tag}", body=body, content_type=ctype)


def put_image(c: Ctx, file_name: str, data: bytes, image: str | None) -> Reply:
    body, ctype = multipart({"params": (None, b"{}"), "file": (file_name, data)})
    query = f"?image={image}" if image is not None else ""
    return c.server.request("PUT", f"/datastore/image{query}", body=body, content_type=ctype)


def infer(c: Ctx, query: str, params: bytes = b"{}", model: str = MODEL,
          files: dict[str, tuple[str | None, bytes]] | None = None) -> Reply:
    body, ctype = multipart({"params": (None, params), **(files or {})})
    return c.server.request("POST", f"/infer/{model}?{query}", body=body, content_type=ctype)


def post_json(c: Ctx, path: str, body: bytes) -> Reply:
    return c.server.request("POST", path, body=body, content_type="application/json")


def announced_too_large(c: Ctx) -> Reply:
    """A label upload whose Content-Length is over the limit; the body is never sent (the answer comes first)."""
    return c.server.raw_request("PUT", f"/datastore/label?image={LABELLED}&tag=final", {
        "Content-Type": "multipart/form-data; boundary=x", "Content-Length": str(2 * MAX_UPLOAD_MB * 2**20)})


def chunked_too_large(c: Ctx) -> Reply:
    """A label upload sent chunked (no length announced) that passes the limit after ~1.1 MB.

    The server may answer and close before the last chunks: a failed send is then not an error, and
    the answer is read from what the server sent.
    """
    body, ctype = multipart({"params": (None, b"{}"), "label": ("x.mrk.json", b" " * int(1.1 * MAX_UPLOAD_MB * 2**20))})
    conn = http.client.HTTPConnection("127.0.0.1", c.server.port, timeout=REQUEST_TIMEOUT_S)
    try:
        conn.putrequest("PUT", f"/datastore/label?image={LABELLED}&tag=final")
        conn.putheader("Content-Type", ctype)
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        try:
            for i in range(0, len(body), 65536):
                chunk = body[i:i + 65536]
                conn.send(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
            conn.send(b"0\r\n\r\n")
        except OSError:
            pass
        r = conn.getresponse()
        return Reply(r.status, r.read(), {k.lower(): v for k, v in r.getheaders()})
    finally:
        conn.close()


def _far(c: Ctx) -> bytes:
    far = LandmarkSet(c.truth.names, c.truth.xyz_mm_ras + np.array([1e6, 0.0, 0.0]), c.truth.scores, c.truth.found)
    return c.markups(landmarks=far)


def _other_grid(c: Ctx) -> bytes:
    # The same field of view sampled at half the spacing: every point inside, the grid another one.
    c.sphere_map()
    sphere = read_image(c.work / "sphere.nii.gz", dtype=None)
    affine = sphere.affine.copy()
    affine[:3, :3] *= 0.5
    fine = sphere.array.repeat(2, 0).repeat(2, 1).repeat(2, 2).astype(np.uint8)
    return c.nifti("other_grid", fine, affine)


def _set_point(index: int, key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        doc["markups"][0]["controlPoints"][index][key] = value
    return edit


def _duplicate_name(doc: dict[str, Any]) -> None:
    points = doc["markups"][0]["controlPoints"]
    points[1]["label"] = points[0]["label"]


def _no_points(doc: dict[str, Any]) -> None:
    doc["markups"][0]["controlPoints"] = []


def _map(c: Ctx, value: float, dtype: type, shape: tuple[int, ...] | None = None) -> bytes:
    array: np.ndarray = np.zeros(shape or c.image().shape, dtype)
    if value:
        array[(slice(2, 5),) * min(3, array.ndim)] = value
    return c.nifti(f"map_{value}_{np.dtype(dtype).name}_{array.ndim}d", array)


def _truncated(c: Ctx) -> bytes:
    data = c.sphere_map()
    return data[: len(data) // 2]


def _image_bytes(case: str = "hippocampus_007") -> bytes:
    return (HIPPOCAMPUS / "images" / f"{case}.nii.gz").read_bytes()


def _flat(c: Ctx) -> bytes:
    return (c.server.studies / f"{FLAT}.nii.gz").read_bytes()


@dataclass(frozen=True)
class Bad:
    status: int
    words: tuple[str, ...]  # key words of the message that name the problem (compared ignoring case)
    send: Callable[[Ctx], Reply]


TRAIN = f"/train/{MODEL}"
JSON_OUT = f"image={OTHER}&output=json"
CASES: dict[str, Bad] = {
    # --- labels -------------------------------------------------------------------------------------
    "label_point_1e6_mm_outside_the_image": Bad(422, ("outside", "mm"), lambda c: put_label(c, "x.mrk.json", _far(c))),
    "label_map_on_another_grid": Bad(422, ("grid",), lambda c: put_label(c, "x.nii.gz", _other_grid(c))),
    "label_unknown_landmark_name": Bad(422, ("unknown landmark", "NOSE_TIP"), lambda c: put_label(
        c, "x.mrk.json", c.markups(landmarks=LandmarkSet.from_dict({"NOSE_TIP": (20.0, 30.0, 15.0)})))),
    "label_empty_file": Bad(422, ("empty",), lambda c: put_label(c, "x.nii.gz", b"")),
    "label_truncated_nii_gz": Bad(422, ("cannot read",), lambda c: put_label(c, "x.nii.gz", _truncated(c))),
    "label_nii_gz_not_gzip": Bad(422, ("gzip",), lambda c: put_label(c, "x.nii.gz", b"plain text, not gzip\n" * 20)),
    "label_json_not_markups": Bad(422, ("markups",), lambda c: put_label(c, "x.mrk.json", b'{"points": []}')),
    "label_json_array": Bad(422, ("expected an object",), lambda c: put_label(c, "x.json", b"[1, 2, 3]")),
    "label_invalid_json": Bad(422, ("not valid JSON",), lambda c: put_label(c, "x.mrk.json", b"{not json")),
    "label_markups_nan_position": Bad(422, ("nan", "finite"), lambda c: put_label(
        c, "x.mrk.json", c.markups(_set_point(0, "position", [float("nan"), 0.0, 0.0])))),
    "label_markups_text_position": Bad(422, ("numbers",), lambda c: put_label(
        c, "x.mrk.json", c.markups(_set_point(0, "position", ["a", "b", "c"])))),
    "label_markups_duplicate_name": Bad(422, ("duplicate",), lambda c: put_label(
        c, "x.mrk.json", c.markups(_duplicate_name))),
    "label_markups_no_points": Bad(422, ("no placed landmark",), lambda c: put_label(
        c, "x.mrk.json", c.markups(_no_points))),
    "label_txt_file": Bad(422, ("label type", ".txt"), lambda c: put_label(c, "x.txt", b"1 2 3\n")),
    "label_file_without_suffix": Bad(422, ("label type",), lambda c: put_label(c, "label", b"1 2 3\n")),
    "label_bad_fcsv": Bad(422, ("fields",), lambda c: put_label(
        c, "x.fcsv", b"# Markups fiducial file version = 4.11\nnot,a,fiducial\n")),
    "label_dcm_not_an_sr": Bad(422, ("SR",), lambda c: put_label(c, "x.dcm", b"DICM" * 64)),
    "label_map_value_without_a_name": Bad(422, ("99", "no landmark name"), lambda c: put_label(
        c, "x.nii.gz", _map(c, 99, np.uint8))),
    "label_map_all_zero": Bad(422, ("no placed landmark",), lambda c: put_label(c, "x.nii.gz", _map(c, 0, np.uint8))),
    "label_map_non_integer": Bad(422, ("non-integer",), lambda c: put_label(c, "x.nii.gz", _map(c, 1.5, np.float32))),
    "label_map_2d": Bad(422, ("3D",), lambda c: put_label(
        c, "x.nii.gz", _map(c, 1, np.uint8, c.image().shape[:2] + (1,)))),
    "label_map_4d": Bad(422, ("3D",), lambda c: put_label(c, "x.nii.gz", _map(c, 1, np.uint8, c.image().shape + (2,)))),
    "label_info_not_a_list": Bad(422, ("label_info",), lambda c: put_label(
        c, "x.nii.gz", c.sphere_map(), json.dumps({"label_info": "abc"}).encode())),
    "label_for_an_unknown_image": Bad(404, ("unknown image", "no_such_image"), lambda c: put_label(
        c, "x.mrk.json", c.markups(), image="no_such_image")),
    "label_params_not_json": Bad(422, ("params", "JSON"), lambda c: put_label(
        c, "x.mrk.json", c.markups(), b"{not json")),
    "label_params_not_an_object": Bad(422, ("params", "object"), lambda c: put_label(
        c, "x.mrk.json", c.markups(), b"[1]")),
    "label_missing_file_field": Bad(422, ("label", "required"), lambda c: put_label(c, None, b"")),
    "label_tag_traversal": Bad(400, ("tag", "'/'"), lambda c: put_label(c, "x.mrk.json", c.markups(), tag="../../x")),
    "label_image_id_traversal": Bad(400, ("image", "'/'"), lambda c: put_label(
        c, "x.mrk.json", c.markups(), image="../" + LABELLED)),
    "label_over_the_size_limit": Bad(413, ("too large", "limit"), announced_too_large),
    "label_over_the_size_limit_chunked": Bad(413, ("too large", "limit"), chunked_too_large),
    # --- images ------------------------------------------------------------------------------------
    "image_upload_not_an_image": Bad(422, ("cannot read",), lambda c: put_image(
        c, "up.nii.gz", b"not an image", "up_not_image")),
    "image_upload_png": Bad(422, ("file type", ".png"), lambda c: put_image(
        c, "up.png", b"\x89PNG\r\n\x1a\n" + bytes(64), "up_png")),
    "image_upload_empty": Bad(422, ("empty",), lambda c: put_image(c, "up.nii.gz", b"", "up_empty")),
    "image_upload_truncated_header": Bad(422, ("cannot read",), lambda c: put_image(
        c, "up.nii.gz", _image_bytes()[:100], "up_header")),
    "image_upload_truncated_data": Bad(422, ("cannot read",), lambda c: put_image(
        c, "up.nii.gz", _image_bytes()[: len(_image_bytes()) // 2], "up_truncated")),
    "image_upload_2d": Bad(422, ("3D",), lambda c: put_image(c, "up.nii.gz", _flat(c), "up_flat")),
    "image_upload_4d": Bad(422, ("3D",), lambda c: put_image(
        c, "up.nii.gz", _map(c, 1, np.int16, (20, 20, 20, 2)), "up_4d")),
    "image_upload_id_traversal": Bad(400, ("image", "'/'"), lambda c: put_image(
        c, "up.nii.gz", _image_bytes(), "../up")),
    "image_upload_id_too_long": Bad(400, ("characters", "255"), lambda c: put_image(
        c, "up.nii.gz", _image_bytes(), "u" * 300)),
    "image_upload_no_name_no_id": Bad(400, ("image id",), lambda c: put_image(c, "", _image_bytes(), None)),
    # --- inference ---------------------------------------------------------------------------------
    "infer_unknown_model": Bad(404, ("unknown model", "no_such_model"), lambda c: infer(
        c, JSON_OUT, model="no_such_model")),
    "infer_unknown_image": Bad(404, ("unknown image", "no_such_image"), lambda c: infer(
        c, "image=no_such_image&output=json")),
    "infer_bad_output": Bad(422, ("output", "xml"), lambda c: infer(c, f"image={OTHER}&output=xml")),
    "infer_dicom_seg_output": Bad(422, ("dicom_seg",), lambda c: infer(c, f"image={OTHER}&output=dicom_seg")),
    "infer_bad_landmark_output": Bad(422, ("landmark_output", "points"), lambda c: infer(
        c, JSON_OUT, b'{"landmark_output": "points"}')),
    "infer_bad_result_extension": Bad(422, ("result_extension", ".png"), lambda c: infer(
        c, f"image={OTHER}&output=image", b'{"result_extension": ".png"}')),
    "infer_bad_result_dtype": Bad(422, ("result_dtype", "complex128"), lambda c: infer(
        c, f"image={OTHER}&output=image", b'{"result_dtype": "complex128"}')),
    "infer_params_not_json": Bad(422, ("params", "JSON"), lambda c: infer(c, JSON_OUT, b"{oops")),
    "infer_params_set_the_image": Bad(422, ("may not set", "image"), lambda c: infer(
        c, JSON_OUT, b'{"image": "/etc/passwd"}')),
    "infer_no_image": Bad(422, ("no image",), lambda c: infer(c, "output=json")),
    "infer_corrupt_image": Bad(422, ("cannot", CORRUPT), lambda c: infer(c, f"image={CORRUPT}&output=json")),
    "infer_2d_image": Bad(422, ("3D",), lambda c: infer(c, f"image={FLAT}&output=json")),
    "infer_uploaded_file_not_an_image": Bad(422, ("cannot read",), lambda c: infer(
        c, "output=json", files={"file": ("scan.nii.gz", b"not an image")})),
    "infer_with_a_label_upload": Bad(422, ("label", "not used"), lambda c: infer(
        c, JSON_OUT, files={"label": ("x.nii.gz", b"xx")})),
    "infer_unknown_session": Bad(404, ("unknown session",), lambda c: infer(
        c, "session_id=no_such_session&output=json")),
    "infer_image_id_with_nul": Bad(400, ("control character",), lambda c: infer(c, "image=a%00b&output=json")),
    "infer_image_id_hidden_file": Bad(400, ("starts with '.'",), lambda c: infer(c, "image=.hidden&output=json")),
    # --- other parameters --------------------------------------------------------------------------
    "next_sample_unknown_strategy": Bad(404, ("unknown strategy", "no_such_strategy"), lambda c: post_json(
        c, "/activelearning/no_such_strategy", b"{}")),
    "next_sample_bad_reduce": Bad(422, ("reduce", "median"), lambda c: post_json(
        c, "/activelearning/least_confident", b'{"reduce": "median"}')),
    "download_unknown_image": Bad(404, ("not found",), lambda c: c.server.request(
        "GET", "/datastore/image?image=no_such_image")),
    "download_unknown_label": Bad(404, ("not found",), lambda c: c.server.request(
        "GET", f"/datastore/label?label={OTHER}&tag=final")),
    "image_info_unknown_image": Bad(404, ("unknown image", "no_such_image"), lambda c: c.server.request(
        "GET", "/datastore/image/info?image=no_such_image")),
    "datastore_bad_output": Bad(422, ("output", "bogus"), lambda c: c.server.request(
        "GET", "/datastore/?output=bogus")),
    # --- training (last: a wrongly accepted request may start a short run) --------------------------
    "train_max_minutes_negative": Bad(422, ("max_minutes", "-1"), lambda c: post_json(
        c, TRAIN, b'{"max_minutes": -1}')),
    "train_max_minutes_not_a_number": Bad(422, ("max_minutes", "abc"), lambda c: post_json(
        c, TRAIN, b'{"max_minutes": "abc"}')),
    "train_max_minutes_nan": Bad(422, ("max_minutes", "nan"), lambda c: post_json(c, TRAIN, b'{"max_minutes": NaN}')),
    "train_val_fraction_2": Bad(422, ("val_fraction", "2"), lambda c: post_json(
        c, TRAIN, b'{"val_fraction": 2, "max_minutes": 0.05}')),
    "train_unknown_init": Bad(422, ("init", "pretrained"), lambda c: post_json(
        c, TRAIN, b'{"init": "pretrained", "max_minutes": 0.05}')),
    "train_seed_not_a_number": Bad(422, ("seed",), lambda c: post_json(
        c, TRAIN, b'{"seed": "x", "max_minutes": 0.05}')),
    "train_unknown_model": Bad(404, ("unknown model", "no_such_model"), lambda c: post_json(
        c, "/train/no_such_model", b"{}")),
    "train_body_not_json": Bad(422, ("JSON",), lambda c: post_json(c, TRAIN, b"{oops")),
    "train_unknown_option": Bad(422, ("max_epochs_typo",), lambda c: post_json(
        c, TRAIN, b'{"max_epochs_typo": 3, "max_minutes": 0.05}')),
    "batch_infer_unknown_model": Bad(404, ("unknown model", "no_such_model"), lambda c: post_json(
        c, "/batch/infer/no_such_model", b"{}")),
    "scoring_unknown_method": Bad(404, ("no_such_method",), lambda c: post_json(c, "/scoring/no_such_method", b"{}")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_4xx_naming_the_problem(case: str, ctx: Ctx) -> None:
    bad = CASES[case]
    label, studies, temps = ctx.label.read_bytes(), ctx.studies_state(), ctx.temp_files()
    reply = bad.send(ctx)
    assert reply.status == bad.status, reply
    assert all(w.lower() in reply.detail.lower() for w in bad.words), reply.detail
    assert ctx.label.read_bytes() == label
    assert ctx.studies_state() == studies
    assert not files_under(ctx.server.upload_dir()), "an upload was left in the server's upload folder"
    assert ctx.temp_files() <= temps, f"new temporary files: {sorted(ctx.temp_files() - temps)}"
    assert ctx.server.alive()


def test_the_server_still_does_its_work_after_all_that(ctx: Ctx) -> None:
    # The good requests the bad ones imitate: the refusals above were the input's fault, not a broken server.
    assert put_label(ctx, "x.mrk.json", ctx.label.read_bytes()).status == 200
    assert put_label(ctx, "x.nii.gz", ctx.sphere_map()).status == 200
    reply = infer(ctx, JSON_OUT)
    assert reply.status == 200, reply
    assert [p["name"] for p in reply.json()["landmarks"]] == list(ctx.truth.names)
    # Uploads went through the folder the checks above watch, and were removed.
    assert ctx.server.upload_dir().is_dir() and not files_under(ctx.server.upload_dir())
