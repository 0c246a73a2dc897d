"""The app's local datastore (``lib.datastore.LandmarkDatastore``) and train task, without a server.

Names stay inside the studies folder, labels are checked against their image before anything is
replaced, writes are atomic and the leftovers of killed writers are removed; the train task skips an
unreadable image, lowers its priority in the training child, and a RUNNING status left by a killed
server is reset. Real images (``../shared/data/hippocampus``) are copied under ``tmp_path``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np
import pytest
from fastapi import HTTPException

from lmk3d.io import read_image, read_table, write_image, write_landmarks
from lmk3d.io.atomic import TEMP_PREFIX, TEMP_SUFFIX
from lmk3d.io.labels import LABEL_MARGIN_MM
from lmk3d.landmarks import LandmarkSet
from tests.conftest import DATA, ROOT

APP = ROOT / "apps" / "landmarks"
HIPPOCAMPUS = DATA / "hippocampus"
CASES = ("hippocampus_004", "hippocampus_006", "hippocampus_007")
EXTENSIONS = ("*.nii.gz", "*.nii", "*.nrrd", "*.mrk.json", "*.fcsv")
TRUTH = read_table(HIPPOCAMPUS / "landmarks.csv")
NAMES = TRUTH[CASES[0]].names
BAD_NAMES = ["../outside", "..", "/etc/passwd", "a/b", "a\\b", "%2e%2e", "..%2foutside", ".hidden", "a\x00b",
             "a\nb", "a\x7fb", "", "x" * 256]


def _import_app(*modules: str) -> list[ModuleType]:
    """Import the app's ``lib.<module>``s, then forget ``lib`` ("lib" is too generic a name to leave behind)."""
    import importlib

    before = set(sys.modules)
    sys.path.insert(0, str(APP))
    try:
        return [importlib.import_module(f"lib.{m}") for m in modules]
    finally:
        sys.path.remove(str(APP))
        for name in set(sys.modules) - before:
            if name == "lib" or name.startswith("lib."):
                del sys.modules[name]


DATASTORE, TASK = _import_app("datastore", "trainers.task")


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temporary folder of its own as ``tempfile.gettempdir()``: every temp file anyone makes shows up there."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@pytest.fixture
def studies(tmp_path: Path) -> Path:
    folder = tmp_path / "studies"
    folder.mkdir()
    for case in CASES:
        (folder / f"{case}.nii.gz").write_bytes((HIPPOCAMPUS / "images" / f"{case}.nii.gz").read_bytes())
    (tmp_path / "outside").mkdir()
    return folder


def _datastore(studies: Path) -> Any:
    return DATASTORE.LandmarkDatastore(str(studies), extensions=list(EXTENSIONS), auto_reload=False,
                                       landmark_names=lambda: NAMES)


@pytest.fixture
def store(studies: Path) -> Any:
    return _datastore(studies)


def _tree(folder: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``folder`` (the lock file's content does not matter)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def _points_file(folder: Path, landmarks: LandmarkSet, suffix: str = ".mrk.json", name: str = "upload") -> str:
    path = folder / f"{name}{suffix}"
    write_landmarks(path, landmarks)
    return str(path)


def _status(excinfo: pytest.ExceptionInfo[HTTPException]) -> tuple[int, str]:
    return excinfo.value.status_code, str(excinfo.value.detail)


# --- names stay inside the studies folder ------------------------------------------------------------------
def _calls(store: Any, upload: str) -> dict[str, Any]:
    """Every datastore method a request reaches, with the bad name in each of its name arguments."""
    case = CASES[0]
    return {
        "get_image_uri[image]": lambda bad: store.get_image_uri(bad),
        "get_image[image]": lambda bad: store.get_image(bad),
        "get_image_info[image]": lambda bad: store.get_image_info(bad),
        "get_label_uri[label]": lambda bad: store.get_label_uri(bad, "final"),
        "get_label_uri[tag]": lambda bad: store.get_label_uri(case, bad),
        "get_label[tag]": lambda bad: store.get_label(case, bad),
        "get_label_info[label]": lambda bad: store.get_label_info(bad, "final"),
        "get_label_info[tag]": lambda bad: store.get_label_info(case, bad),
        "get_labels_by_image_id[image]": lambda bad: store.get_labels_by_image_id(bad),
        "get_label_by_image_id[tag]": lambda bad: store.get_label_by_image_id(case, bad),
        "save_label[image]": lambda bad: store.save_label(bad, upload, "final", {}),
        "save_label[tag]": lambda bad: store.save_label(case, upload, bad, {}),
        "add_image[image]": lambda bad: store.add_image(bad, str(HIPPOCAMPUS / "images" / f"{case}.nii.gz"), {}),
        "remove_image[image]": lambda bad: store.remove_image(bad),
        "remove_label[label]": lambda bad: store.remove_label(bad, "final"),
        "remove_label[tag]": lambda bad: store.remove_label(case, bad),
        "update_image_info[image]": lambda bad: store.update_image_info(bad, {"k": 1}),
        "update_label_info[label]": lambda bad: store.update_label_info(bad, "final", {"k": 1}),
        "update_label_info[tag]": lambda bad: store.update_label_info(case, bad, {"k": 1}),
    }


def test_every_method_refuses_names_that_are_not_plain_and_writes_nothing(store: Any, studies: Path,
                                                                         tmp_path: Path) -> None:
    upload = _points_file(tmp_path, TRUTH[CASES[0]])
    store.save_label(CASES[0], upload, "final", {})  # something to remove, update or overwrite
    before = _tree(tmp_path)
    calls = _calls(store, upload)
    for method, call in calls.items():
        what = method.split("[")[1].rstrip("]")
        for bad in BAD_NAMES:
            if method.startswith("add_image") and bad == "":
                continue  # no id: MONAI Label takes it from the file name
            with pytest.raises(HTTPException) as excinfo:
                call(bad)
            status, detail = _status(excinfo)
            assert status == 400 and f"{what} " in detail and "not a plain name" in detail, (method, bad, detail)
    assert _tree(tmp_path) == before  # nothing written, moved or removed anywhere under tmp_path
    assert store.get_label_uri(CASES[0], "final")  # and the label is still listed


def test_a_traversing_tag_does_not_write_outside(store: Any, studies: Path, tmp_path: Path) -> None:
    # Plain MONAI Label writes this label to studies/labels/../../outside/.
    upload = _points_file(tmp_path, TRUTH[CASES[0]])
    with pytest.raises(HTTPException) as excinfo:
        store.save_label(CASES[0], upload, "../../outside", {})
    assert _status(excinfo)[0] == 400
    assert list((tmp_path / "outside").iterdir()) == []


def test_files_that_resolve_outside_the_studies_folder_are_refused(store: Any, studies: Path, tmp_path: Path) -> None:
    secret = tmp_path / "outside" / "secret.nii.gz"
    secret.write_bytes((HIPPOCAMPUS / "images" / f"{CASES[0]}.nii.gz").read_bytes())
    (studies / "linked.nii.gz").symlink_to(secret)
    (studies / "labels" / "evil").symlink_to(tmp_path / "outside", target_is_directory=True)
    store.refresh()
    assert "linked" in store.list_images()
    for call in (lambda: store.get_image_uri("linked"), lambda: store.get_image_info("linked"),
                 lambda: store.remove_image("linked")):
        with pytest.raises(HTTPException) as excinfo:
            call()
        status, detail = _status(excinfo)
        assert status == 403 and "outside the studies folder" in detail and str(tmp_path) not in detail
    with pytest.raises(HTTPException) as excinfo:
        store.save_label(CASES[0], _points_file(tmp_path, TRUTH[CASES[0]]), "evil", {})
    assert _status(excinfo)[0] == 403
    assert sorted(p.name for p in (tmp_path / "outside").iterdir()) == ["secret.nii.gz"]
    assert secret.is_file()


def test_files_with_names_that_are_not_plain_are_not_listed(studies: Path) -> None:
    (studies / ".hidden.nii.gz").write_bytes((studies / f"{CASES[0]}.nii.gz").read_bytes())
    (studies / "a%2fb.nii.gz").write_bytes((studies / f"{CASES[0]}.nii.gz").read_bytes())
    assert sorted(_datastore(studies).list_images()) == sorted(CASES)


def test_unknown_images_and_labels_are_404(store: Any, tmp_path: Path) -> None:
    for call in (lambda: store.remove_image("nope"), lambda: store.remove_label("nope", "final"),
                 lambda: store.remove_label(CASES[0], "final"), lambda: store.update_image_info("nope", {}),
                 lambda: store.update_label_info(CASES[0], "final", {}),
                 lambda: store.save_label("nope", _points_file(tmp_path, TRUTH[CASES[0]]), "final", {})):
        with pytest.raises(HTTPException) as excinfo:
            call()
        assert _status(excinfo)[0] == 404


# --- labels are checked against their image before anything is replaced --------------------------------------
def _shifted(landmarks: LandmarkSet, name: str, offset: tuple[float, float, float]) -> LandmarkSet:
    xyz = landmarks.xyz_mm_ras.copy()
    xyz[landmarks.names.index(name)] += offset
    return LandmarkSet(landmarks.names, xyz)


def test_a_point_outside_the_image_is_refused_and_the_previous_label_stays(store: Any, studies: Path,
                                                                          tmp_path: Path,
                                                                          private_tmp: Path) -> None:
    case = CASES[0]
    truth = TRUTH[case]
    store.save_label(case, _points_file(tmp_path, truth), "final", {})
    stored = Path(store.get_label_uri(case, "final"))
    before, tree = stored.read_bytes(), _tree(studies)
    name = truth.names[1]
    xyz = truth.xyz_mm_ras.copy()
    xyz[1, 0] = 36.5 + 25.0  # the image spans x 0.5..36.5 mm: 25 mm beyond its right edge
    bad = LandmarkSet(NAMES, xyz)
    for suffix in (".mrk.json", ".fcsv", ".json"):
        with pytest.raises(HTTPException) as excinfo:
            store.save_label(case, _points_file(tmp_path, bad, suffix), "final", {})
        status, detail = _status(excinfo)
        assert status == 422, detail
        assert f"{name!r}" in detail and "25.0 mm outside" in detail and "x 0.5..36.5" in detail, detail
        assert f"{LABEL_MARGIN_MM:g} mm" in detail
    assert stored.read_bytes() == before and _tree(studies) == tree
    assert list(private_tmp.iterdir()) == []


def test_a_point_just_outside_the_image_is_accepted(store: Any, tmp_path: Path) -> None:
    case = CASES[0]
    xyz = TRUTH[case].xyz_mm_ras.copy()
    xyz[0] = (36.5 + LABEL_MARGIN_MM - 1.0, 20.0, 20.0)  # 1 mm within the margin beyond the right edge
    assert store.save_label(case, _points_file(tmp_path, LandmarkSet(NAMES, xyz)), "final", {}) == case


def _label_map(tmp_path: Path, case: str, shape: tuple[int, int, int] | None = None,
               shift_voxels: float = 0.0) -> str:
    ref = read_image(HIPPOCAMPUS / "images" / f"{case}.nii.gz")
    affine = ref.affine.copy()
    affine[:3, 3] += affine[:3, :3] @ np.array([shift_voxels, 0.0, 0.0])
    grid = ref.shape if shape is None else shape
    from lmk3d.io.label_map import sphere_label_map

    arr = sphere_label_map(TRUTH[case], grid, affine)
    assert arr.any()
    path = tmp_path / f"map_{'x'.join(map(str, grid))}_{shift_voxels:g}.nii.gz"
    write_image(path, arr, affine)
    return str(path)


def test_a_label_map_on_another_grid_is_refused(store: Any, studies: Path, tmp_path: Path,
                                                private_tmp: Path) -> None:
    case = CASES[0]
    shape = read_image(studies / f"{case}.nii.gz").shape
    assert store.save_label(case, _label_map(tmp_path, case), "final", {}) == case  # the image's own grid: fine
    stored = Path(store.get_label_uri(case, "final"))
    before, tree = stored.read_bytes(), _tree(studies)
    smaller = (shape[0] - 4, shape[1], shape[2])
    for path, other in ((_label_map(tmp_path, case, shape=smaller), "x".join(map(str, smaller))),
                        (_label_map(tmp_path, case, shift_voxels=1.0), "x".join(map(str, shape)))):
        with pytest.raises(HTTPException) as excinfo:
            store.save_label(case, path, "final", {})
        status, detail = _status(excinfo)
        assert status == 422, detail
        assert "grid" in detail and other in detail and "x".join(map(str, shape)) in detail, detail
    assert stored.read_bytes() == before and _tree(studies) == tree
    assert list(private_tmp.iterdir()) == []


def test_unknown_landmark_names_are_still_refused(store: Any, tmp_path: Path) -> None:
    with pytest.raises(HTTPException) as excinfo:
        store.save_label(CASES[0], _points_file(tmp_path, LandmarkSet.from_dict({"NOSE_TIP": (5.0, 5.0, 5.0)})),
                         "final", {})
    status, detail = _status(excinfo)
    assert status == 422 and "unknown landmark(s) NOSE_TIP" in detail


def test_rejections_leave_no_temporary_file(store: Any, studies: Path, tmp_path: Path, private_tmp: Path) -> None:
    case = CASES[0]
    tree = _tree(studies)
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"\x1f\x8b" + bytes(range(256)) * 4)
    uploads = [str(garbage), _points_file(tmp_path, _shifted(TRUTH[case], NAMES[0], (0.0, 300.0, 0.0)), ".json"),
               _label_map(tmp_path, case, shift_voxels=2.0)]
    for upload in uploads:
        with pytest.raises(HTTPException) as excinfo:
            store.save_label(case, upload, "final", {})
        assert _status(excinfo)[0] == 422
    with pytest.raises(HTTPException) as excinfo:
        store.add_image("new_image", str(garbage), {})
    assert _status(excinfo)[0] == 422
    assert list(private_tmp.iterdir()) == [] and _tree(studies) == tree
    # and an accepted .json upload (converted to .mrk.json) leaves none either
    store.save_label(case, _points_file(tmp_path, TRUTH[case], ".json"), "final", {})
    assert list(private_tmp.iterdir()) == []
    assert [p.name for p in studies.rglob(f"{TEMP_PREFIX}*")] == []
    assert Path(store.get_label_uri(case, "final")).name == f"{case}.mrk.json"


def test_an_uploaded_image_is_stored_and_listed(store: Any, studies: Path) -> None:
    src = HIPPOCAMPUS / "images" / f"{CASES[1]}.nii.gz"
    assert store.add_image("copy_of_006", str(src), {}) == "copy_of_006"
    assert Path(store.get_image_uri("copy_of_006")).read_bytes() == src.read_bytes()
    assert "copy_of_006" in json.loads((studies / "datastore_v2.json").read_text())["objects"]


# --- atomic writes, and what a killed writer leaves ------------------------------------------------------------
def test_a_failed_rename_leaves_the_old_label_and_datastore_file(store: Any, studies: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    case = CASES[0]
    store.save_label(case, _points_file(tmp_path, TRUTH[case]), "final", {})
    tree = _tree(studies)
    partial = TRUTH[case].reorder(NAMES[:1])

    def fail(src: Any, dst: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        store.save_label(case, _points_file(tmp_path, partial), "final", {})
    with pytest.raises(OSError):
        store.update_image_info(case, {"reviewed": True})  # the datastore file is written the same way
    monkeypatch.undo()
    assert _tree(studies) == tree  # old label, old datastore file, no temporary file
    json.loads((studies / "datastore_v2.json").read_text())


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temporary_files_are_removed_at_construction(studies: Path, caplog: pytest.LogCaptureFixture) -> None:
    _datastore(studies)  # creates the labels folders
    dead, live = _dead_pid(), 1  # pid 1 always runs
    final = studies / "labels" / "final"
    stale = [studies / f"{TEMP_PREFIX}{dead}-abc{TEMP_SUFFIX}", final / f"{TEMP_PREFIX}{dead}-def{TEMP_SUFFIX}",
             studies / "labels" / f"{TEMP_PREFIX}{os.getpid()}-own{TEMP_SUFFIX}",
             final / f"{TEMP_PREFIX}old{TEMP_SUFFIX}"]
    kept = [final / f"{TEMP_PREFIX}{live}-busy{TEMP_SUFFIX}", studies / ".other.tmp",
            final / f"{TEMP_PREFIX}{dead}-not-a-temp.nii.gz"]
    for path in stale + kept:
        path.write_bytes(b"partial")
    caplog.set_level("WARNING")
    _datastore(studies)
    assert [p.exists() for p in stale] == [False] * len(stale)
    assert [p.exists() for p in kept] == [True] * len(kept)
    for path in stale:
        assert str(path) in caplog.text


# --- training from the datastore ---------------------------------------------------------------------------
def _train_task(model_dir: Path) -> Any:
    model_dir.mkdir(parents=True, exist_ok=True)
    record = SimpleNamespace(root=model_dir, landmark_names=NAMES)  # the registry record's part a task reads
    model = SimpleNamespace(config=SimpleNamespace(name="pin", detector="pin"), record=record,
                            detector=SimpleNamespace(landmark_names=NAMES))
    return TASK.LandmarkTrainTask(model)  # type: ignore[arg-type]


def test_an_unreadable_image_is_skipped_in_training_samples(store: Any, studies: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    for case in CASES:
        store.save_label(case, _points_file(tmp_path, TRUTH[case]), "final", {})
    broken = studies / f"{CASES[1]}.nii.gz"
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])  # truncated: its header still reads
    samples = _train_task(tmp_path / "model")._samples(store)
    assert [s.case for s in samples] == [CASES[0], CASES[2]]
    out = capsys.readouterr().out
    assert f"skipped {CASES[1]}: its image cannot be read" in out and str(studies) not in out, out
    assert "read 2 final label(s)" in out and "skipped 1" in out


def test_a_running_status_left_by_a_killed_server_is_reset(tmp_path: Path) -> None:
    stats = tmp_path / TASK.STATS_FILE
    assert TASK.reset_stale_status(tmp_path) is False  # no file
    stats.write_text(json.dumps({"status": "RUNNING", "phase": "training", "epoch": 3}))
    assert TASK.reset_stale_status(tmp_path) is True
    got = json.loads(stats.read_text())
    assert got == {"status": "STOPPED", "phase": "stopped", "epoch": 3, "note": "interrupted (server restarted)"}
    assert TASK.reset_stale_status(tmp_path) is False
    stats.write_text(json.dumps({"status": "DONE"}))
    assert TASK.reset_stale_status(tmp_path) is False and json.loads(stats.read_text()) == {"status": "DONE"}


def test_the_training_child_lowers_its_priority_first(store: Any, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(TASK, "_lower_priority", calls.append)
    task = _train_task(tmp_path)
    with pytest.raises(HTTPException) as excinfo:  # no final label: 409 at the first check, after the priority
        task({}, store)
    assert _status(excinfo)[0] == 409 and calls == []  # pytest is not MONAI Label's training child
    monkeypatch.setattr(TASK, "is_training_child", lambda: True)
    with pytest.raises(HTTPException):
        task({}, store)
    assert calls == [TASK.TRAIN_NICE]


def test_lower_priority_lowers_every_thread(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import os, sys, threading
        sys.path.insert(0, {str(APP)!r})
        from lib.trainers.task import _lower_priority
        ready, stop = threading.Event(), threading.Event()
        def worker():
            ready.set()
            stop.wait()
        t = threading.Thread(target=worker)
        t.start()
        ready.wait()
        tids = sorted(int(x) for x in os.listdir("/proc/self/task"))
        before = [os.getpriority(os.PRIO_PROCESS, i) for i in tids]
        _lower_priority(10)
        after = [os.getpriority(os.PRIO_PROCESS, i) for i in tids]
        stop.set()
        t.join()
        print(before, after)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout
    before, after = (json.loads(part) for part in out.strip().replace("] [", "]|[").split("|"))
    assert len(after) >= 2
    assert after == [min(19, b + 10) for b in before]
