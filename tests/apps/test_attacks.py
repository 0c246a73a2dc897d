"""Each attack of issue 17, replayed against the real server: the test fails if any of them succeeds.

Two servers, started once for the module (side by side, so the start costs one wait): ``guarded``
has an admin token (``LMK3D_ADMIN_TOKEN``) and one extra allowed origin (``--cors-origin``);
``open_server`` has no admin token, as ``lmk3d serve`` starts by default. Both serve a copy of the
shipped ``mean_shape`` model from a temporary models folder (the checkout's ``models/`` is never
touched) and a studies folder nested two levels deep, ``root/a/b/studies``, so that a ``../x`` or a
``../../x`` written by the server would land in a folder the tests watch.

The attacks:

- **code from files**: a checkpoint whose unpickling runs a shell command or Python code (alone,
  inside a real checkpoint, or as a bare pickle) uploaded with ``PUT /model/<name>`` without and with
  the admin token, followed by an inference, and loaded by ``lmk3d predict --model``; the command
  would create a marker file, which must never appear (a control test shows it does appear when the
  same file is unpickled the unsafe way);
- **path traversal**: absolute, ``..``, ``%2F`` and ``%252F`` ids, tags and file names on every route
  that turns a name into a path; nothing outside the studies folder may be read or written;
- **foreign origins**: CORS preflights and simple cross-site requests from a page on another site;
- **admin routes without the admin token**, and a **Host** header a DNS-rebinding page would send.
"""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import os
import pickle
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from lmk3d.io import read_table, write_landmarks
from tests.apps.server_fixture import (
    HIPPOCAMPUS,
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
    tree_digest,
)
from tests.conftest import ROOT

pytestmark = pytest.mark.server

MODEL = "mean_shape"
MODEL_FOLDER = f"{MODEL}-hippocampus"
LABELLED, OTHER = "hippocampus_004", "hippocampus_006"
EVIL = "http://evil.example"
EXTRA_ORIGIN = "http://viewer.example"
ADMIN_TOKEN = secrets.token_hex(16)


# --- the servers ----------------------------------------------------------------------------------
@dataclass
class Target:
    """A server under attack and the places an attack must not reach."""

    server: Server
    victim: Path  # a folder outside the studies folder holding a real image, secret.nii.gz

    @property
    def checkpoint(self) -> Path:
        assert self.server.models is not None
        return self.server.models / MODEL_FOLDER / "checkpoint.pt"

    @property
    def label(self) -> Path:
        return self.server.studies / "labels" / "final" / f"{LABELLED}.mrk.json"

    def outside(self) -> dict[str, Any]:
        """What the server must leave alone: every file around the studies folder, and the model folder."""
        root = self.server.root
        around = {p for p in files_under(root / "a") if not (p == "b/studies" or p.startswith("b/studies/"))}
        assert self.server.models is not None
        return {"around": around, "cwd": files_under(root / "cwd"), "victim": tree_digest(self.victim),
                "models": tree_digest(self.server.models)}

    def studies(self) -> dict[str, str]:
        return studies_digest(self.server.studies, skip=(".lock", "datastore_v2.json"))

    def infer(self, query: str, model: str = MODEL, headers: dict[str, str] | None = None) -> Reply:
        body, ctype = multipart({"params": (None, b"{}")})
        return self.server.request("POST", f"/infer/{model}?{query}", body=body, content_type=ctype, headers=headers)


def _prepare(root: Path) -> tuple[Path, Path, Path]:
    studies = root / "a" / "b" / "studies"
    copy_images(studies, (LABELLED, OTHER))
    final = studies / "labels" / "final"
    final.mkdir(parents=True)
    write_landmarks(final / f"{LABELLED}.mrk.json", read_table(HIPPOCAMPUS / "landmarks.csv")[LABELLED])
    models = root / "models"
    copy_model(models, MODEL_FOLDER)
    victim = root / "victim"
    copy_images(victim, ("hippocampus_007",))
    (victim / "hippocampus_007.nii.gz").rename(victim / "secret.nii.gz")
    return studies, models, victim


@pytest.fixture(scope="module")
def targets(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> dict[str, Target]:
    started = {}
    for name, env, flags in (("guarded", {"LMK3D_ADMIN_TOKEN": ADMIN_TOKEN}, ["--cors-origin", EXTRA_ORIGIN]),
                             ("open", {}, [])):
        root = tmp_path_factory.mktemp(f"attacks-{name}")
        studies, models, victim = _prepare(root)
        server = launch(root, studies, models=models, env=env, flags=flags)
        request.addfinalizer(partial(stop, server.process))
        started[name] = Target(server, victim)
    for target in started.values():
        ready(target.server)
    return started


@pytest.fixture(scope="module")
def guarded(targets: dict[str, Target]) -> Target:
    return targets["guarded"]


@pytest.fixture(scope="module")
def open_server(targets: dict[str, Target]) -> Target:
    return targets["open"]


def _admin(token: str = ADMIN_TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- files that run code --------------------------------------------------------------------------
@dataclass
class _RunsCode:
    """An object whose unpickling calls ``fn(*args)``: what a crafted checkpoint carries."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return self.fn, self.args


PAYLOADS = ("torch_save_os_system", "torch_save_builtins_exec", "inside_a_real_checkpoint", "bare_pickle")


def _crafted(kind: str, marker: Path) -> bytes:
    """A checkpoint file of ``kind`` whose unpickling creates ``marker``."""
    import torch

    shell = _RunsCode(os.system, (f"touch '{marker}'",))
    buf = io.BytesIO()
    if kind == "torch_save_os_system":
        torch.save(shell, buf)
    elif kind == "torch_save_builtins_exec":
        torch.save(_RunsCode(builtins.exec, (f"open({str(marker)!r}, 'w').close()",)), buf)
    elif kind == "inside_a_real_checkpoint":  # the served model itself, with one extra entry
        payload = torch.load(ROOT / "models" / MODEL_FOLDER / "checkpoint.pt", weights_only=True)
        payload["training"] = {"note": shell}
        torch.save(payload, buf)
    elif kind == "bare_pickle":
        return pickle.dumps(shell, protocol=2)
    else:
        raise ValueError(kind)
    return buf.getvalue()


@pytest.fixture(scope="module")
def markers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("markers")


def _upload(target: Target, data: bytes, headers: dict[str, str] | None = None, model: str = MODEL) -> Reply:
    body, ctype = multipart({"file": ("checkpoint.pt", data)})
    return target.server.request("PUT", f"/model/{model}", body=body, content_type=ctype, headers=headers)


@pytest.mark.parametrize("kind", PAYLOADS)
def test_control_each_crafted_checkpoint_runs_code_when_unpickled_unsafely(kind: str, tmp_path: Path) -> None:
    # Without this, a payload that never ran anything would make every test below pass.
    import torch

    marker = tmp_path / "ran"
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(_crafted(kind, marker))
    try:
        torch.load(path, weights_only=False)
    except Exception:  # the bare pickle runs its code, then torch finds no checkpoint in it
        pass
    assert marker.exists()


@pytest.mark.parametrize("kind", PAYLOADS)
def test_crafted_checkpoint_upload_without_the_admin_token_is_refused(kind: str, guarded: Target, open_server: Target,
                                                                      markers: Path) -> None:
    marker = markers / f"{kind}-no-token.ran"
    for target, token, status in ((open_server, None, 403), (guarded, None, 401), (guarded, "wrong", 401)):
        before = _sha256(target.checkpoint)
        reply = _upload(target, _crafted(kind, marker), _admin(token) if token else None)
        assert reply.status == status, reply
        assert "admin" in reply.detail
        assert _sha256(target.checkpoint) == before
        assert not marker.exists()


@pytest.mark.parametrize("kind", PAYLOADS)
def test_crafted_checkpoint_upload_with_the_admin_token_is_refused_unrun(kind: str, guarded: Target,
                                                                         markers: Path) -> None:
    marker = markers / f"{kind}-admin.ran"
    model_dir = guarded.checkpoint.parent
    before = tree_digest(model_dir)
    reply = _upload(guarded, _crafted(kind, marker), _admin())
    assert reply.status == 422, reply
    assert "refused" in reply.detail and MODEL in reply.detail, reply.detail
    if kind != "bare_pickle":  # torch names the global it would have had to import
        assert "GLOBAL" in reply.detail and ("system" in reply.detail or "exec" in reply.detail), reply.detail
    assert not marker.exists()
    # The served checkpoint is byte-identical, no previous version or staging folder was made.
    assert tree_digest(model_dir) == before
    assert sorted(p.name for p in model_dir.iterdir()) == sorted(before)

    # The next inference loads the served checkpoint, not the upload: still nothing ran.
    reply = guarded.infer(f"image={OTHER}&output=json")
    assert reply.status == 200, reply
    assert reply.json()["checkpoint"]["mtime_ns"] == guarded.checkpoint.stat().st_mtime_ns
    assert not marker.exists()


@pytest.mark.parametrize("kind", PAYLOADS)
def test_cli_predict_refuses_a_crafted_checkpoint(kind: str, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from lmk3d.cli import main

    marker = tmp_path / "ran"
    model = tmp_path / "model"
    model.mkdir()
    (model / "checkpoint.pt").write_bytes(_crafted(kind, marker))
    out = tmp_path / "out"
    image = HIPPOCAMPUS / "images" / f"{LABELLED}.nii.gz"
    assert main(["predict", "--model", str(model), "--out", str(out), str(image)]) != 0
    err = capsys.readouterr().err
    assert "refused" in err or "cannot read checkpoint" in err, err
    assert not marker.exists()
    assert not (out / "predictions.csv").exists()


# --- path traversal -------------------------------------------------------------------------------
def _image_upload(file_name: str) -> tuple[bytes, str]:
    data = (HIPPOCAMPUS / "images" / "hippocampus_007.nii.gz").read_bytes()
    return multipart({"params": (None, b"{}"), "file": (file_name, data)})


def _label_upload(target: Target, file_name: str = "x.mrk.json") -> tuple[bytes, str]:
    return multipart({"params": (None, b"{}"), "label": (file_name, target.label.read_bytes())})


@dataclass(frozen=True)
class Traversal:
    method: str
    path: Callable[[Target], str]
    body: Callable[[Target], tuple[bytes, str]] | None = None
    admin: bool = False  # sent with the admin token: a traversal stays refused for an admin too


TRAVERSALS: dict[str, Traversal] = {
    "infer_absolute_image_path": Traversal(
        "POST", lambda t: f"/infer/{MODEL}?image={t.victim / 'secret.nii.gz'}&output=json",
        lambda t: multipart({"params": (None, b"{}")})),
    "infer_absolute_image_id": Traversal(
        "POST", lambda t: f"/infer/{MODEL}?image={t.victim / 'secret'}&output=json",
        lambda t: multipart({"params": (None, b"{}")})),
    "infer_dotdot_image": Traversal(
        "POST", lambda t: f"/infer/{MODEL}?image=../x&output=json", lambda t: multipart({"params": (None, b"{}")})),
    "infer_dotdot_to_victim": Traversal(
        "POST", lambda t: f"/infer/{MODEL}?image=../../../victim/secret&output=json",
        lambda t: multipart({"params": (None, b"{}")})),
    "infer_encoded_slash": Traversal(
        "POST", lambda t: f"/infer/{MODEL}?image=..%2F..%2F..%2Fvictim%2Fsecret&output=json",
        lambda t: multipart({"params": (None, b"{}")})),
    "infer_double_encoded_slash": Traversal(
        "POST", lambda t: f"/infer/{MODEL}?image=..%252F..%252F..%252Fvictim%252Fsecret&output=json",
        lambda t: multipart({"params": (None, b"{}")})),
    "infer_encoded_dots": Traversal(
        "POST", lambda t: f"/infer/{MODEL}?image=%2e%2e&output=json", lambda t: multipart({"params": (None, b"{}")})),
    "infer_session_id_dotdot": Traversal(
        "POST", lambda t: f"/infer/{MODEL}?session_id=../../x&output=json",
        lambda t: multipart({"params": (None, b"{}")})),
    "infer_model_encoded_slash": Traversal(
        "POST", lambda t: f"/infer/..%2F..%2F{MODEL}?image={OTHER}&output=json",
        lambda t: multipart({"params": (None, b"{}")})),
    "download_absolute_image": Traversal("GET", lambda t: f"/datastore/image?image={t.victim / 'secret'}"),
    "download_dotdot_image": Traversal("GET", lambda t: "/datastore/image?image=../../../victim/secret"),
    "download_encoded_image": Traversal("GET", lambda t: "/datastore/image?image=..%2F..%2F..%2Fvictim%2Fsecret"),
    "download_dotdot_label": Traversal("GET", lambda t: "/datastore/label?label=../../../../victim/secret&tag=final"),
    "download_dotdot_tag": Traversal("GET", lambda t: f"/datastore/label?label={LABELLED}&tag=../../../../victim"),
    "image_info_dotdot": Traversal("GET", lambda t: "/datastore/image/info?image=../../../victim/secret"),
    "upload_image_id_dotdot": Traversal("PUT", lambda t: "/datastore/image?image=../x",
                                        lambda t: _image_upload("x.nii.gz")),
    "upload_image_id_dotdot_twice": Traversal("PUT", lambda t: "/datastore/image?image=../../x",
                                              lambda t: _image_upload("x.nii.gz")),
    "upload_image_id_absolute": Traversal("PUT", lambda t: f"/datastore/image?image={t.victim / 'x'}",
                                          lambda t: _image_upload("x.nii.gz")),
    "upload_image_id_encoded": Traversal("PUT", lambda t: "/datastore/image?image=..%2F..%2Fx",
                                         lambda t: _image_upload("x.nii.gz")),
    "upload_image_file_name_dotdot": Traversal("PUT", lambda t: "/datastore/image",
                                               lambda t: _image_upload("../../x.nii.gz")),
    "save_label_tag_dotdot": Traversal("PUT", lambda t: f"/datastore/label?image={LABELLED}&tag=../../x",
                                       lambda t: _label_upload(t)),
    "save_label_tag_encoded": Traversal("PUT", lambda t: f"/datastore/label?image={LABELLED}&tag=..%2F..%2Fx",
                                        lambda t: _label_upload(t)),
    "save_label_tag_dotdot_only": Traversal("PUT", lambda t: f"/datastore/label?image={LABELLED}&tag=..",
                                            lambda t: _label_upload(t)),
    "save_label_tag_absolute": Traversal("PUT", lambda t: f"/datastore/label?image={LABELLED}&tag={t.victim}",
                                         lambda t: _label_upload(t)),
    "save_label_image_dotdot": Traversal("PUT", lambda t: "/datastore/label?image=../../../victim/secret&tag=final",
                                         lambda t: _label_upload(t)),
    "delete_label_dotdot_as_admin": Traversal(
        "DELETE", lambda t: "/datastore/label?id=../../../../victim/secret&tag=final", admin=True),
    "delete_label_tag_dotdot_as_admin": Traversal(
        "DELETE", lambda t: f"/datastore/label?id={LABELLED}&tag=../../../../victim", admin=True),
    "delete_image_dotdot_as_admin": Traversal(
        "DELETE", lambda t: "/datastore/image?id=../../../victim/secret", admin=True),
    "delete_model_encoded_as_admin": Traversal("DELETE", lambda t: f"/model/..%2F{MODEL_FOLDER}", admin=True),
}


@pytest.mark.parametrize("attack", list(TRAVERSALS))
def test_traversal_is_4xx_and_nothing_outside_the_studies_folder_changes(attack: str, guarded: Target) -> None:
    spec = TRAVERSALS[attack]
    outside, studies = guarded.outside(), guarded.studies()
    secret = (guarded.victim / "secret.nii.gz").read_bytes()
    body, ctype = spec.body(guarded) if spec.body else (None, None)
    reply = guarded.server.request(spec.method, spec.path(guarded), body=body, content_type=ctype,
                                   headers=_admin() if spec.admin else None)
    assert 400 <= reply.status < 500, reply
    assert secret not in reply.body
    assert guarded.outside() == outside
    assert guarded.studies() == studies
    assert guarded.server.alive()


def test_an_absolute_upload_file_name_is_the_clients_path_and_stays_inside(guarded: Target) -> None:
    # MONAI Label's client (3D Slicer's) sends the file's full local path as its name: only its last part is used.
    outside = guarded.outside()
    body, ctype = _image_upload(f"{guarded.victim / 'absolute_name.nii.gz'}")
    reply = guarded.server.request("PUT", "/datastore/image", body=body, content_type=ctype)
    assert reply.status == 200 and reply.json() == {"image": "absolute_name"}, reply
    assert guarded.outside() == outside
    assert (guarded.server.studies / "absolute_name.nii.gz").is_file()
    assert not (guarded.victim / "absolute_name.nii.gz").exists()
    delete = guarded.server.request("DELETE", "/datastore/image?id=absolute_name", headers=_admin())
    assert delete.status == 200, delete


def test_an_upload_file_name_with_dotdot_leaves_no_file_outside(guarded: Target) -> None:
    # A label's stored name comes from its image id; the client's file name must not reach the disk.
    outside = guarded.outside()
    body, ctype = _label_upload(guarded, "../../../x.mrk.json")
    reply = guarded.server.request("PUT", f"/datastore/label?image={LABELLED}&tag=final", body=body,
                                   content_type=ctype)
    assert reply.status < 500, reply
    assert guarded.outside() == outside
    labels = files_under(guarded.server.studies / "labels")
    assert not [p for p in labels if Path(p).name.startswith("x.")], labels


# --- foreign origins ------------------------------------------------------------------------------
FOREIGN_ORIGINS = (EVIL, "null", "http://127.0.0.1:1", "http://127.0.0.1.evil.example", "https://127.0.0.1")


@pytest.mark.parametrize("origin", FOREIGN_ORIGINS)
def test_a_preflight_from_a_foreign_origin_gets_no_cors_headers(origin: str, guarded: Target) -> None:
    for path, method in ((f"/model/{MODEL}", "PUT"), ("/model/x", "PUT"), (f"/train/{MODEL}", "POST"),
                         ("/datastore/label", "DELETE")):
        reply = guarded.server.request("OPTIONS", path, headers={
            "Origin": origin, "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": "authorization,content-type"})
        assert not 200 <= reply.status < 300, reply
        assert not any(k.startswith("access-control-allow") for k in reply.headers), reply.headers


@pytest.mark.parametrize("origin", ["own_127", "own_localhost", EXTRA_ORIGIN])
def test_a_preflight_from_an_allowed_origin_works(origin: str, guarded: Target) -> None:
    port = guarded.server.port
    origin = {"own_127": f"http://127.0.0.1:{port}", "own_localhost": f"http://localhost:{port}"}.get(origin, origin)
    reply = guarded.server.request("OPTIONS", f"/model/{MODEL}", headers={
        "Origin": origin, "Access-Control-Request-Method": "PUT", "Access-Control-Request-Headers": "authorization"})
    assert reply.status == 200, reply
    assert reply.headers.get("access-control-allow-origin") == origin
    simple = guarded.server.request("GET", "/info/", headers={"Origin": origin})
    assert simple.status == 200 and simple.headers.get("access-control-allow-origin") == origin


def test_a_cross_site_train_request_is_403_and_starts_nothing(guarded: Target) -> None:
    # What a form or fetch(mode: "no-cors") on another site sends: no preflight, a text/plain body.
    stats = guarded.server.get_json("/info/")["train_stats"]
    for origin in FOREIGN_ORIGINS:
        reply = guarded.server.request("POST", f"/train/{MODEL}", body=json.dumps({"max_minutes": 0.05}).encode(),
                                       content_type="text/plain", headers={"Origin": origin})
        assert reply.status == 403, reply
        assert "origin" in reply.detail
        assert not reply.headers.get("access-control-allow-origin")
    tasks = guarded.server.request("GET", "/train/")
    assert tasks.status == 404 and "No Train Tasks" in tasks.detail, tasks  # no training was ever submitted
    assert guarded.server.get_json("/info/")["train_stats"] == stats


@pytest.mark.parametrize("action", ["infer", "save_label", "download_image", "upload_model_as_admin",
                                    "delete_label_as_admin"])
def test_cross_site_annotator_and_admin_actions_are_403(action: str, guarded: Target, markers: Path) -> None:
    server, origin = guarded.server, {"Origin": EVIL}
    label, checkpoint, studies = guarded.label.read_bytes(), _sha256(guarded.checkpoint), guarded.studies()
    if action == "infer":
        body, ctype = multipart({"params": (None, b"{}")})
        reply = server.request("POST", f"/infer/{MODEL}?image={OTHER}&output=json", body=body, content_type=ctype,
                               headers=origin)
    elif action == "save_label":
        body, ctype = _label_upload(guarded)
        reply = server.request("PUT", f"/datastore/label?image={OTHER}&tag=final", body=body, content_type=ctype,
                               headers=origin)
    elif action == "download_image":
        reply = server.request("GET", f"/datastore/image?image={OTHER}", headers=origin)
    elif action == "upload_model_as_admin":
        body, ctype = multipart({"file": ("checkpoint.pt", _crafted("torch_save_os_system", markers / "xsite.ran"))})
        reply = server.request("PUT", f"/model/{MODEL}", body=body, content_type=ctype, headers={**origin, **_admin()})
        assert not (markers / "xsite.ran").exists()
    else:
        reply = server.request("DELETE", f"/datastore/label?id={LABELLED}&tag=final", headers={**origin, **_admin()})
    assert reply.status == 403, reply
    assert "origin" in reply.detail
    assert not reply.headers.get("access-control-allow-origin")
    assert guarded.label.read_bytes() == label
    assert _sha256(guarded.checkpoint) == checkpoint
    assert guarded.studies() == studies


# --- admin routes ---------------------------------------------------------------------------------
ADMIN_ROUTES: dict[str, tuple[str, str]] = {
    "delete_model": ("DELETE", f"/model/{MODEL}"),
    "download_model": ("GET", f"/model/{MODEL}"),
    "model_info": ("GET", f"/model/info/{MODEL}"),
    "upload_model": ("PUT", f"/model/{MODEL}"),
    "logs": ("GET", "/logs/"),
    "dataset_download": ("GET", "/datastore/dataset"),
    "delete_label": ("DELETE", f"/datastore/label?id={LABELLED}&tag=final"),
    "delete_image": ("DELETE", f"/datastore/image?id={LABELLED}"),
    "reload": ("POST", "/reload"),
}


def _admin_request(target: Target, route: str, headers: dict[str, str] | None) -> Reply:
    method, path = ADMIN_ROUTES[route]
    body, ctype = (None, None)
    if route == "upload_model":  # a valid checkpoint: the refusal must come from the role, not the file
        body, ctype = multipart({"file": ("checkpoint.pt", target.checkpoint.read_bytes())})
    return target.server.request(method, path, body=body, content_type=ctype, headers=headers)


@pytest.mark.parametrize("route", list(ADMIN_ROUTES))
def test_admin_routes_without_the_admin_token_are_refused(route: str, guarded: Target, open_server: Target) -> None:
    method, path = ADMIN_ROUTES[route]
    for target, headers, status in (
        (open_server, None, 403),
        (open_server, _admin("anything"), 403),
        (guarded, None, 401),
        (guarded, _admin("wrong-" + ADMIN_TOKEN), 401),
        (guarded, _admin(ADMIN_TOKEN[:-1]), 401),
        (guarded, {"Authorization": f"Basic {ADMIN_TOKEN}"}, 401),
        (guarded, {"Authorization": ADMIN_TOKEN}, 401),
    ):
        model_dir, studies = tree_digest(target.checkpoint.parent), target.studies()
        reply = _admin_request(target, route, headers)
        assert reply.status == status, (headers, reply)
        assert "admin" in reply.detail, reply.detail
        if status == 403:
            assert "LMK3D_ADMIN_TOKEN" in reply.detail, reply.detail
        else:
            assert reply.headers.get("www-authenticate", "").startswith("Bearer"), reply.headers
        assert b"PK" not in reply.body[:4] and b"HIPPO" not in reply.body  # no model, archive or log content
        assert tree_digest(target.checkpoint.parent) == model_dir
        assert target.studies() == studies
        assert target.checkpoint.is_file() and target.label.is_file()
    assert open_server.server.alive() and guarded.server.alive()


def test_with_the_admin_token_the_logs_can_be_read(guarded: Target) -> None:
    reply = guarded.server.request("GET", "/logs/", headers=_admin())
    assert reply.status == 200, reply
    assert reply.body  # the server's log, which a 401 never shows


# --- DNS rebinding --------------------------------------------------------------------------------
@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "127.0.0.1.evil.example:{port}",
                                  "192.168.1.10:{port}"])
def test_a_foreign_host_header_is_400(host: str, guarded: Target) -> None:
    host = host.format(port=guarded.server.port)
    for method, path in (("GET", "/info/"), ("GET", f"/datastore/image?image={OTHER}")):
        reply = guarded.server.request(method, path, headers={"Host": host})
        assert reply.status == 400, reply
        assert "Host" in reply.detail
    reply = guarded.server.request("POST", f"/train/{MODEL}", body=b'{"max_minutes": 0.05}',
                                   content_type="application/json", headers={"Host": host})
    assert reply.status == 400, reply
    assert guarded.server.request("GET", "/train/").status == 404  # nothing submitted


@pytest.mark.parametrize("host", ["localhost:{port}", "127.0.0.1:{port}", "[::1]:{port}"])
def test_a_loopback_host_header_is_served(host: str, guarded: Target) -> None:
    reply = guarded.server.request("GET", "/info/", headers={"Host": host.format(port=guarded.server.port)})
    assert reply.status == 200, reply

