"""lmk3d.registry: the workspace, validation cases, the gate, versions, decisions and rollbacks."""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lmk3d.errors import LandmarkError
from lmk3d.registry import (
    DEFAULT_VAL_FRACTION,
    MODEL_FILE,
    SHIPPED,
    ModelRecord,
    Registry,
    RegistryError,
    default_workspace,
    gate,
)
from tests.conftest import ROOT

MODELS = ROOT / "models"
SHIPPED_DIR = MODELS / "mean_shape-hippocampus"


def metrics(mre: float, found: float = 1.0, n_val: int = 3) -> dict[str, Any]:
    return {"val_mre_mm": mre, "val_found": found, "n_val": n_val, "val_sdr_4mm": 1.0}


def make_source(folder: Path, payload: bytes = b"weights", extra: dict[str, str] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "checkpoint.pt").write_bytes(payload)
    for name, text in (extra or {}).items():
        (folder / name).write_text(text)
    return folder


def add(record: ModelRecord, tmp_path: Path, parent: str | None, mre: float = 1.0, tag: str = "") -> str:
    src = make_source(tmp_path / f"src-{tag or os.urandom(4).hex()}", payload=f"weights {tag}".encode())
    return record.add_version(src, parent=parent, detector=record.detector, metrics=metrics(mre),
                              report={"tag": tag}, data_fingerprint="sha256:abc").id


def tree_hash(folder: Path) -> str:
    """A hash of every path, mode and content under ``folder``."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        h.update(oct(p.stat().st_mode).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def case_hash(record: ModelRecord, case: str) -> float:
    salt = json.loads((record.root / MODEL_FILE).read_text())["salt"]
    return int(hashlib.sha256((salt + case).encode()).hexdigest()[:16], 16) / 2.0 ** 64


# --- the workspace ---------------------------------------------------------------------------------
def test_default_workspace_for_a_folder_and_for_a_dicomweb_url(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    assert default_workspace(str(tmp_path / "studies")) == (tmp_path / "studies" / ".lmk3d-workspace").resolve()
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_workspace("http://127.0.0.1:8042/dicom-web") == (tmp_path / "xdg" / "lmk3d" / "127.0.0.1_8042")
    assert default_workspace("https://pacs.example.org/wado").name == "pacs.example.org_443"
    assert default_workspace("http://[::1]:8042/dicom-web").name == "__1_8042"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_workspace("http://pacs:80/") == tmp_path / "home" / ".local" / "share" / "lmk3d" / "pacs_80"
    assert not (tmp_path / "studies").exists()  # computed, not created


@pytest.mark.parametrize("studies", ["ftp://pacs/dicom-web", "http:///no-host", "http://pacs:99999/x"])
def test_default_workspace_refuses_other_urls(studies: str) -> None:
    with pytest.raises(RegistryError, match="studies"):
        default_workspace(studies)


def test_no_workspace_inside_the_repositorys_models_folder(tmp_path: Path) -> None:
    assert issubclass(RegistryError, LandmarkError)
    with pytest.raises(RegistryError, match="models/"):
        default_workspace(str(MODELS))
    with pytest.raises(RegistryError, match="never written"):
        Registry(MODELS / "workspace")
    with pytest.raises(RegistryError, match="never written"):
        Registry(MODELS)
    assert not (MODELS / "workspace").exists()
    with pytest.raises(RegistryError, match="not a folder"):
        Registry(make_source(tmp_path / "x") / "checkpoint.pt")


# --- records ---------------------------------------------------------------------------------------
def test_ensure_creates_a_record_once_and_get_finds_it(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "ws")
    assert reg.names() == []
    rec = reg.ensure("skull", "cascade", landmark_names=["nasion", "sella"])
    doc = json.loads((tmp_path / "ws" / "skull" / MODEL_FILE).read_text())
    assert doc["detector"] == "cascade" and doc["created"] and len(doc["salt"]) == 32
    assert doc["val_fraction"] == DEFAULT_VAL_FRACTION
    assert rec.name == "skull" and rec.root == tmp_path / "ws" / "skull"
    assert rec.current() is None and rec.current_dir() is None and rec.shipped is None
    assert rec.landmark_names == ("nasion", "sella") and rec.versions() == []
    again = reg.ensure("skull", "cascade")
    assert json.loads((again.root / MODEL_FILE).read_text())["salt"] == doc["salt"]
    assert reg.names() == ["skull"] and reg.get("skull").detector == "cascade"
    with pytest.raises(RegistryError, match="'cascade' model, not 'pin'"):
        reg.ensure("skull", "pin")
    with pytest.raises(RegistryError, match="no model 'jaw'.*skull"):
        reg.get("jaw")
    with pytest.raises(RegistryError, match="no model"):
        reg.get("../skull")


@pytest.mark.parametrize("name", ["../x", ".hidden", "a/b", "", "%2e"])
def test_model_names_must_be_plain(tmp_path: Path, name: str) -> None:
    reg = Registry(tmp_path)
    with pytest.raises(RegistryError, match="not a plain name"):
        reg.ensure(name, "cascade")
    assert list(tmp_path.iterdir()) == []


def test_ensure_checks_its_arguments(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    with pytest.raises(RegistryError, match=r"\[0, 1\)"):
        reg.ensure("m", "pin", val_fraction=1.0)
    with pytest.raises(RegistryError, match="repeat a"):
        reg.ensure("m", "pin", landmark_names=["a", "a"])


def test_a_shipped_model_is_served_until_a_version_is_published(tmp_path: Path) -> None:
    rec = Registry(tmp_path).ensure("mean_shape", "mean_shape", shipped=SHIPPED_DIR)
    assert rec.current() == SHIPPED and rec.current_dir() == SHIPPED_DIR and rec.shipped == SHIPPED_DIR
    # a record made without a shipped folder adopts one while it has nothing served
    bare = Registry(tmp_path).ensure("pin", "pin")
    assert Registry(tmp_path).ensure("pin", "pin", shipped=SHIPPED_DIR).current() == SHIPPED
    assert bare.current_dir() == SHIPPED_DIR  # the other handle re-reads model.json


def test_landmark_names_change_only_before_the_first_version(tmp_path: Path) -> None:
    rec = Registry(tmp_path).ensure("m", "pin")
    assert rec.landmark_names is None
    rec.set_landmark_names(["a", "b"])
    rec.set_landmark_names(("a", "b"))
    rec.set_landmark_names(["a", "b", "c"])
    assert rec.landmark_names == ("a", "b", "c")
    for bad in ([], ["a", ""], "abc"):
        with pytest.raises(RegistryError):
            rec.set_landmark_names(bad)
    add(rec, tmp_path, None)
    rec.set_landmark_names(["a", "b", "c"])
    with pytest.raises(RegistryError, match="declare a new model"):
        rec.set_landmark_names(["a", "b"])
    assert Registry(tmp_path).get("m").landmark_names == ("a", "b", "c")


# --- validation cases ------------------------------------------------------------------------------
def cases_of(record: ModelRecord) -> dict[str, list[str]]:
    return dict(json.loads((record.root / MODEL_FILE).read_text())["cases"])


def test_validation_cases_follow_the_hash_rule_and_are_stable_as_cases_are_added(tmp_path: Path) -> None:
    rec = Registry(tmp_path).ensure("m", "pin")
    all_cases = [f"case_{i:03d}" for i in range(300)]
    answers: dict[str, bool] = {}
    stored: dict[str, list[str]] = {"validation": [], "training": []}
    for n in range(1, len(all_cases) + 1, 7):
        labelled = all_cases[:n]
        val = rec.validation_cases(reversed(labelled))  # order given does not matter
        assert val == sorted(val) and set(val) <= set(labelled)
        for c in labelled:
            is_val = c in val
            assert answers.setdefault(c, is_val) == is_val, f"{c} changed side at {n} cases"
        now = cases_of(rec)
        for side in ("validation", "training"):  # append-only
            assert now[side][:len(stored[side])] == stored[side]
        assert not set(now["validation"]) & set(now["training"])
        stored = now
    # every case but the fallback (at most one) is validation iff its hash is below the fraction
    by_hash = [c for c in answers if answers[c] != (case_hash(rec, c) < DEFAULT_VAL_FRACTION)]
    assert len(by_hash) <= 1
    share = sum(answers.values()) / len(answers)
    assert 0.13 < share < 0.27, share
    every = set(rec.validation_cases(all_cases + ["new_case"]))
    subset = ["case_000", "case_001", "case_002", "new_case"]
    assert rec.validation_cases(subset) == sorted(c for c in subset if c in every)


def test_two_labelled_cases_always_give_a_validation_case(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    for i in range(40):  # 40 names, so 40 salts
        rec = reg.ensure(f"m{i}", "pin")
        assert rec.validation_cases(["a"]) in ([], ["a"])
        first_side = cases_of(rec)
        val = rec.validation_cases(["a", "b"])
        assert len(val) >= 1
        if first_side["training"] == ["a"]:  # a training case stays one: the new case is the one chosen
            assert val == ["b"]
        rec2 = reg.ensure(f"n{i}", "pin")
        assert len(rec2.validation_cases(["x", "y"])) >= 1


def test_a_model_never_has_validation_cases_only(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    for i in range(40):  # 40 names, so 40 salts
        rec = reg.ensure(f"m{i}", "pin", val_fraction=0.99)  # the hash would choose nearly every case
        assert rec.validation_cases(["a"]) == []  # a single labelled case always trains
        assert cases_of(rec)["training"] == ["a"]
        rec2 = reg.ensure(f"n{i}", "pin", val_fraction=0.99)
        val = rec2.validation_cases(["x", "y", "z"])
        assert len(val) == 2 and cases_of(rec2)["training"] == [max(["x", "y", "z"], key=lambda c: case_hash(rec2, c))]


def test_the_salt_comes_from_the_name_so_a_split_is_reproducible(tmp_path: Path) -> None:
    cases = [f"case_{k:03d}" for k in range(50)]
    first = Registry(tmp_path / "a").ensure("cascade", "cascade").validation_cases(cases)
    again = Registry(tmp_path / "b").ensure("cascade", "cascade").validation_cases(cases)
    other = Registry(tmp_path / "c").ensure("pin", "pin").validation_cases(cases)
    assert first == again and first != other


def test_the_fallback_takes_the_new_case_with_the_smallest_hash(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    for i in range(30):
        rec = reg.ensure(f"m{i}", "pin", val_fraction=0.0)  # only the fallback chooses
        cases = [f"c{j}" for j in range(5)]
        assert rec.validation_cases(cases[:1]) == []
        assert rec.validation_cases(cases) == [min(cases[1:], key=lambda c: case_hash(rec, c))]
        assert rec.validation_cases(cases + ["c9"]) == rec.validation_cases(cases)  # no second fallback


def test_a_case_seen_once_keeps_its_side_even_if_its_label_goes(tmp_path: Path) -> None:
    rec = Registry(tmp_path).ensure("m", "pin", val_fraction=0.0)
    assert rec.validation_cases(["a"]) == []  # training
    assert rec.validation_cases(["b"]) == ["b"]  # 2 seen, none validation: the new one
    assert rec.validation_cases(["a", "b", "c"]) == ["b"]
    assert cases_of(rec) == {"validation": ["b"], "training": ["a", "c"]}


def test_validation_cases_read_without_writing_when_nothing_is_new(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    rec = Registry(tmp_path).ensure("m", "pin")
    val = rec.validation_cases([f"c{i}" for i in range(20)])
    before = (rec.root / MODEL_FILE).stat().st_mtime_ns

    def no_replace(*_: Any) -> None:
        raise AssertionError("model.json written although no case was new")

    monkeypatch.setattr(os, "replace", no_replace)
    assert rec.validation_cases([f"c{i}" for i in range(20)]) == val
    assert (rec.root / MODEL_FILE).stat().st_mtime_ns == before


# --- the gate --------------------------------------------------------------------------------------
NAN = math.nan


@pytest.mark.parametrize(("current", "new", "accepted", "words"), [
    (None, metrics(0.9), True, "first version"),
    (None, metrics(NAN, 0.0, 0), True, "first version"),
    (metrics(0.68), metrics(0.9, n_val=0), False, "no validation cases yet"),
    (metrics(0.68), metrics(0.9), False, "larger MRE"),
    (metrics(0.68), metrics(0.68), True, "no worse"),
    (metrics(0.68), metrics(0.61), True, "no worse"),
    (metrics(0.68, 1.0), metrics(0.5, 0.9), False, "finds fewer landmarks"),
    (metrics(0.68, 0.9), metrics(0.9, 1.0), False, "larger MRE"),
    (metrics(0.68, 0.9), metrics(0.6, 0.8), False, "finds fewer"),
    (metrics(0.68, 0.9), metrics(0.7, 0.8), False, "finds fewer landmarks and has a larger MRE"),
    (metrics(0.68), metrics(NAN, 0.0), False, "none found"),
    (metrics(NAN, 0.0), metrics(5.0, 0.1), True, "no worse"),
    (metrics(NAN, 0.0), metrics(NAN, 0.0), True, "no worse"),
    ({"val_mre_mm": None, "val_found": None, "n_val": 3}, metrics(9.0, 0.1), True, "no worse"),
    (metrics(0.68, n_val=3), metrics(0.5, n_val=4), False, "not the same cases"),
])
def test_the_gate(current: dict[str, Any] | None, new: dict[str, Any], accepted: bool, words: str) -> None:
    ok, reason = gate(current, new)
    assert ok is accepted and words in reason, reason


def test_the_gates_reason_names_both_numbers() -> None:
    ok, reason = gate(metrics(0.68, 1.0), metrics(0.90, 0.95))
    assert not ok
    for number in ("0.680 mm", "0.900 mm", "100.0%", "95.0%", "3 validation case(s)"):
        assert number in reason, reason


# --- versions --------------------------------------------------------------------------------------
def test_add_version_copies_the_checkpoint_and_its_files(tmp_path: Path) -> None:
    rec = Registry(tmp_path / "ws").ensure("m", "pin", shipped=SHIPPED_DIR)
    src = make_source(tmp_path / "src", extra={"train_report.json": "{}", "MODEL_CARD.md": "# card",
                                               "train_state.pt": "big", "notes.txt": "x", "trust.json": "{}",
                                               "presence.pt": "presence"})
    v = rec.add_version(src, parent=SHIPPED, detector="pin", metrics=metrics(NAN, 0.0),
                        report={"options": {"max_minutes": 1}}, data_fingerprint="sha256:1",
                        calibration={"calibrated": True, "reason": "fitted on 5 validation case(s)"})
    assert v.id == "v0001" and v.status == "candidate" and v.decision is None and v.parent == SHIPPED
    assert v.checkpoint == tmp_path / "ws" / "m" / "versions" / "v0001" / "checkpoint.pt"
    assert v.checkpoint.read_bytes() == b"weights"
    assert sorted(p.name for p in v.path.iterdir()) == ["MODEL_CARD.md", "checkpoint.pt", "presence.pt",
                                                        "report.json", "train_report.json", "trust.json",
                                                        "version.json"]
    assert (v.path / "presence.pt").read_text() == "presence"  # the trust model travels with its weights
    assert v.calibrated and rec.version("v0001").calibration_reason() == "fitted on 5 validation case(s)"
    assert v.metrics["val_mre_mm"] is None and v.metrics["n_val"] == 3  # NaN stored as null
    assert v.report() == {"options": {"max_minutes": 1}} and v.data_fingerprint == "sha256:1"
    assert rec.current() == SHIPPED  # added, not served
    assert [x.id for x in rec.versions()] == ["v0001"] and rec.version("v0001").created == v.created
    with pytest.raises(RegistryError, match="no version 'v0009'; it has v0001"):
        rec.version("v0009")
    assert sorted(p.name for p in src.iterdir()) == sorted(["checkpoint.pt", "train_report.json", "MODEL_CARD.md",
                                                            "train_state.pt", "notes.txt", "trust.json",
                                                            "presence.pt"])  # source untouched


def test_add_version_refusals(tmp_path: Path) -> None:
    rec = Registry(tmp_path / "ws").ensure("m", "pin")
    empty = tmp_path / "empty"
    empty.mkdir()
    common: dict[str, Any] = {"parent": None, "metrics": metrics(1.0), "report": {}, "data_fingerprint": ""}
    with pytest.raises(RegistryError, match="no checkpoint.pt"):
        rec.add_version(empty, detector="pin", **common)
    with pytest.raises(RegistryError, match="a 'cascade' checkpoint"):
        rec.add_version(make_source(tmp_path / "a"), detector="cascade", **common)
    with pytest.raises(RegistryError, match="registry's own file"):
        rec.add_version(make_source(tmp_path / "b", extra={"version.json": "{}"}), detector="pin", **common)
    with pytest.raises(RegistryError, match="status 'served'"):
        rec.add_version(make_source(tmp_path / "c"), detector="pin", status="served", **common)
    assert rec.versions() == [] and not list((rec.root / "versions").glob("*"))


def _add_many(root: str, worker: int, n: int, barrier: Any) -> list[str]:
    rec = Registry(root).get("m")
    src = make_source(Path(root).parent / f"src-{worker}", payload=f"worker {worker}".encode())
    barrier.wait()
    ids = []
    for i in range(n):
        ids.append(rec.add_version(src, parent=None, detector="pin", metrics=metrics(float(i)),
                                   report={"worker": worker, "i": i}, data_fingerprint="").id)
        rec.validation_cases([f"w{worker}-{i}", f"shared-{i}"])
    return ids


def test_two_processes_never_get_the_same_version_number(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    Registry(root).ensure("m", "pin")
    ctx = multiprocessing.get_context("spawn")
    n_workers, n = 3, 6
    with ctx.Manager() as manager:
        barrier = manager.Barrier(n_workers)
        with ctx.Pool(n_workers) as pool:
            results = pool.starmap(_add_many, [(str(root), w, n, barrier) for w in range(n_workers)])
    ids = [i for r in results for i in r]
    assert sorted(ids) == [f"v{k:04d}" for k in range(1, n_workers * n + 1)]
    rec = Registry(root).get("m")
    versions = rec.versions()
    assert [v.id for v in versions] == sorted(ids)
    for w, r in enumerate(results):  # each id holds what its worker added, in its order
        assert [rec.version(v).report()["worker"] for v in r] == [w] * n
        assert [rec.version(v).checkpoint.read_bytes() for v in r] == [f"worker {w}".encode()] * n
    doc = json.loads((root / "m" / MODEL_FILE).read_text())
    assert sorted(doc["versions"]) == sorted(ids)
    seen = doc["cases"]["validation"] + doc["cases"]["training"]
    assert sorted(seen) == sorted(set(seen)) and len(seen) == n_workers * n + n  # each case assigned once
    assert not [p for p in (root / "m" / "versions").iterdir() if p.name.startswith(".")]


# --- decisions and rollbacks -----------------------------------------------------------------------
def test_decide_and_rollback_walk_the_history(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "ws")
    rec = reg.ensure("m", "pin", shipped=SHIPPED_DIR)
    other = ModelRecord(rec.root)  # another process's view of the same model
    v1 = add(rec, tmp_path, SHIPPED, 0.9, "1")
    d = rec.decide(v1, True, "first", {"before": None})
    assert d.status == "published" and d.decision is not None and d.decision["reason"] == "first"
    assert other.current() == v1 and other.current_dir() == rec.root / "versions" / v1
    v2 = add(rec, tmp_path, v1, 1.2, "2")
    assert rec.decide(v2, False, "worse", {}).status == "rejected"
    decision = other.version(v2).decision
    assert other.current() == v1 and decision is not None and decision["accepted"] is False
    v3 = add(rec, tmp_path, v1, 0.5, "3")
    rec.decide(v3, True, "better", {})
    assert other.current() == v3
    assert rec.rollback() == v1
    assert other.current() == v1 and other.version(v3).status == "rolled_back"
    assert other.version(v1).status == "published"
    assert rec.rollback() == SHIPPED and rec.current_dir() == SHIPPED_DIR
    with pytest.raises(RegistryError, match="shipped checkpoint"):
        rec.rollback()
    events = [e["event"] for e in rec.to_json()["history"]]
    assert events == ["created", "added", "published", "added", "rejected", "added", "published", "rolled_back",
                      "rolled_back"]
    with pytest.raises(RegistryError, match="no version"):
        rec.decide("v0042", True, "", {})


def test_rollback_refuses_when_there_is_nothing_published_before(tmp_path: Path) -> None:
    rec = Registry(tmp_path / "ws").ensure("new_model", "mean_shape")
    with pytest.raises(RegistryError, match="no served version"):
        rec.rollback()
    v1 = add(rec, tmp_path, None, tag="1")
    rec.decide(v1, True, "first version", {})
    with pytest.raises(RegistryError, match="is its first"):
        rec.rollback()
    v2 = add(rec, tmp_path, v1, tag="2")
    rec.decide(v2, True, "ok", {})
    v3 = add(rec, tmp_path, v2, tag="3")
    rec.rollback()  # v2 -> v1; v2 rolled back
    rec.decide(v3, True, "an admin's decision", {})  # made from v2, served after v2 was withdrawn
    with pytest.raises(RegistryError, match="parent v0002 is rolled_back, not published"):
        rec.rollback()
    assert rec.current() == v3


def test_shipped_folder_is_never_written(tmp_path: Path) -> None:
    before = tree_hash(SHIPPED_DIR)
    listing = sorted(os.listdir(SHIPPED_DIR))
    rec = Registry(tmp_path / "ws").ensure("mean_shape", "mean_shape", shipped=SHIPPED_DIR)
    v = rec.add_version(SHIPPED_DIR, parent=SHIPPED, detector="mean_shape", metrics=metrics(1.0), report={},
                        data_fingerprint="")  # the shipped folder as a source is only read
    rec.validation_cases(["a", "b", "c"])
    rec.decide(v.id, True, "ok", {})
    assert rec.rollback() == SHIPPED
    Registry(tmp_path / "ws").ensure("mean_shape", "mean_shape", shipped=SHIPPED_DIR)
    assert tree_hash(SHIPPED_DIR) == before and sorted(os.listdir(SHIPPED_DIR)) == listing
    assert v.checkpoint.read_bytes() == (SHIPPED_DIR / "checkpoint.pt").read_bytes()
    if (ROOT / ".git").exists():
        status = subprocess.run(["git", "status", "--porcelain", "--", str(SHIPPED_DIR)], cwd=ROOT,
                                capture_output=True, text=True, check=False)
        assert status.stdout == ""


# --- atomicity and leftovers -----------------------------------------------------------------------
def _failing_replace(*_: Any) -> None:
    raise OSError("disk full (simulated)")


@pytest.mark.parametrize("change", ["decide", "rollback", "validation_cases", "set_landmark_names"])
def test_a_failed_write_leaves_model_json_unchanged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     change: str) -> None:
    rec = Registry(tmp_path / "ws").ensure("m", "pin", shipped=SHIPPED_DIR)
    v1 = add(rec, tmp_path, SHIPPED, tag="1")
    rec.decide(v1, True, "ok", {})
    v2 = add(rec, tmp_path, v1, tag="2")
    before = (rec.root / MODEL_FILE).read_bytes()
    monkeypatch.setattr(os, "replace", _failing_replace)
    with pytest.raises(OSError, match="simulated"):
        {"decide": lambda: rec.decide(v2, True, "ok", {}), "rollback": rec.rollback,
         "validation_cases": lambda: rec.validation_cases(["a", "b"]),
         "set_landmark_names": lambda: rec.set_landmark_names(["a"])}[change]()
    monkeypatch.undo()
    assert (rec.root / MODEL_FILE).read_bytes() == before
    assert rec.current() == v1 and rec.version(v2).status == "candidate"
    assert sorted(p.name for p in rec.root.iterdir()) == [".lock", MODEL_FILE, "versions"]  # no temporary file


def test_a_failed_rename_adds_no_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rec = Registry(tmp_path / "ws").ensure("m", "pin")
    before = (rec.root / MODEL_FILE).read_bytes()

    def failing_rename(*_: Any) -> None:
        raise OSError("rename failed (simulated)")

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(OSError, match="simulated"):
        add(rec, tmp_path, None)
    monkeypatch.undo()
    assert (rec.root / MODEL_FILE).read_bytes() == before
    assert os.listdir(rec.root / "versions") == [] and rec.versions() == []
    assert add(rec, tmp_path, None) == "v0001"


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_leftovers_of_killed_writers_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "ws")
    rec = reg.ensure("m", "pin")
    versions = rec.root / "versions"
    versions.mkdir()
    dead = _dead_pid()
    stale = versions / f".staging-{dead}-abc"
    live = versions / f".staging-{os.getppid()}-abc"  # a live process's add_version in progress
    stale_tmp = rec.root / f".lmk3d-tmp-{dead}-x.tmp"
    for p in (stale, live):
        make_source(p)
    stale_tmp.write_text("{")
    reg.ensure("m", "pin")
    assert not stale.exists() and not stale_tmp.exists() and live.is_dir()
    make_source(stale)
    assert add(rec, tmp_path, None) == "v0001"
    assert not stale.exists() and live.is_dir()


def test_to_json_is_strict_json(tmp_path: Path) -> None:
    rec = Registry(tmp_path / "ws").ensure("m", "pin", landmark_names=["a", "b"])
    rec.validation_cases(["c1", "c2", "c3"])
    v1 = add(rec, tmp_path, None, NAN, "1")
    rec.decide(v1, True, "first version", {"before": None, "after": metrics(NAN, 0.0)})
    doc = rec.to_json()
    text = json.dumps(doc, allow_nan=False)
    assert json.loads(text) == doc
    assert doc["name"] == "m" and doc["current"] == v1 and doc["landmark_names"] == ["a", "b"]
    assert len(doc["validation_cases"]) + doc["n_training_cases_seen"] == 3 and doc["validation_cases"]
    (only,) = doc["versions"]
    assert only["id"] == v1 and only["status"] == "published" and only["metrics"]["val_mre_mm"] is None
    assert only["decision"]["compared"]["after"]["val_mre_mm"] is None and "salt" not in doc
