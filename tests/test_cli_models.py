"""``lmk3d models list|show|rollback``: the model registry from the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmk3d.cli import main
from lmk3d.registry import SHIPPED, Registry
from tests.conftest import ROOT

SHIPPED_DIR = ROOT / "models" / "cascade-hippocampus"


def lmk3d(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if k != "LMK3D_WORKSPACE"}
    return subprocess.run([sys.executable, "-m", "lmk3d.cli", *args], capture_output=True, text=True, timeout=120,
                          env={**full, **(env or {})}, check=False)


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """A workspace with a shipped model (two published versions, one rejected) and a new, untrained model."""
    root = tmp_path / "ws"
    reg = Registry(root)
    rec = reg.ensure("cascade", "cascade", shipped=SHIPPED_DIR, landmark_names=["a", "b"])
    rec.validation_cases(["img1", "img2", "img3", "img4"])
    src = tmp_path / "src"
    src.mkdir()
    (src / "checkpoint.pt").write_bytes(b"w")
    parent = SHIPPED
    for mre, accepted in ((0.68, True), (0.90, False), (0.61, True)):
        calibration = None
        if mre == 0.61:  # the last one has a trust model
            (src / "trust.json").write_text("{}")
            calibration = {"calibrated": True, "reason": "fitted on 5 validation case(s)"}
        v = rec.add_version(src, parent=parent, detector="cascade", report={}, data_fingerprint="sha256:1",
                            metrics={"val_mre_mm": mre, "val_found": 1.0, "n_val": 1}, calibration=calibration)
        rec.decide(v.id, accepted, f"{'no worse' if accepted else 'has a larger MRE'}: MRE {mre} mm", {})
        parent = v.id if accepted else parent
    reg.ensure("my_skull", "mean_shape")
    return root


def test_list_shows_every_model(workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "list", "--workspace", str(workspace)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["model", "detector", "served", "versions", "latest"]
    assert lines[1].split() == ["cascade", "cascade", "v0003", "3", "v0003", "published"]
    assert lines[2].split() == ["my_skull", "mean_shape", "-", "0", "-"]


def test_list_of_an_empty_workspace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "list", "--workspace", str(tmp_path)]) == 0
    assert "no model yet" in capsys.readouterr().out


def test_show_tells_versions_decisions_and_validation_cases(workspace: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "show", "cascade", "--workspace", str(workspace)]) == 0
    out = capsys.readouterr().out
    assert f"served: v0003 ({workspace / 'cascade' / 'versions' / 'v0003'})" in out
    assert f"shipped: {SHIPPED_DIR}" in out and "landmarks: a, b" in out
    val = Registry(workspace).get("cascade").validation_cases(["img1", "img2", "img3", "img4"])
    assert f"validation cases ({len(val)}, never trained on): {', '.join(val)}" in out
    assert "v0002  rejected" in out and "rejected: has a larger MRE: MRE 0.9 mm" in out
    assert "MRE 0.610 mm  found 100%  n_val 1" in out and "parent v0001" in out
    assert out.count("not calibrated: no trust.json: scores are the detector's raw ones") == 2
    assert "  calibrated: fitted on 5 validation case(s)" in out
    assert main(["models", "show", "my_skull", "--workspace", str(workspace)]) == 0
    out = capsys.readouterr().out
    assert "served: nothing yet" in out and "landmarks: not known yet" in out and "no version yet" in out


def test_show_json_is_the_record(workspace: Path, capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMK3D_WORKSPACE", str(workspace))  # the default workspace
    assert main(["models", "show", "cascade", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc == Registry(workspace).get("cascade").to_json()
    assert [v["status"] for v in doc["versions"]] == ["published", "rejected", "published"]
    assert [v["calibrated"] for v in doc["versions"]] == [False, False, True]


def test_rollback_serves_the_parent_then_the_shipped_model(workspace: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "rollback", "cascade", "--workspace", str(workspace)]) == 0
    assert capsys.readouterr().out.strip() == "cascade: now serving v0001 (was v0003)"
    assert main(["models", "rollback", "cascade", "--workspace", str(workspace)]) == 0
    assert capsys.readouterr().out.strip() == f"cascade: now serving {SHIPPED} (was v0001)"
    record = Registry(workspace).get("cascade")
    assert record.current_dir() == SHIPPED_DIR
    assert [v.status for v in record.versions()] == ["rolled_back", "rejected", "rolled_back"]


@pytest.mark.parametrize(("args", "message"), [
    (["rollback", "cascade"], "serves its shipped checkpoint, the first one; there is nothing before it"),
    (["rollback", "my_skull"], "model 'my_skull' has no served version to roll back"),
    (["show", "nope"], "no model 'nope' in the registry"),
    (["show", "../cascade"], "no model '../cascade'"),
])
def test_refusals_are_one_line_errors_with_status_2(workspace: Path, args: list[str], message: str) -> None:
    if args == ["rollback", "cascade"]:
        for _ in range(2):
            Registry(workspace).get("cascade").rollback()
    before = (workspace / "cascade" / "model.json").read_bytes()
    r = lmk3d("models", *args, "--workspace", str(workspace))
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and r.stderr.startswith("lmk3d models: error: ") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stdout == ""
    assert (workspace / "cascade" / "model.json").read_bytes() == before


def test_unknown_model_names_the_known_ones(workspace: Path) -> None:
    r = lmk3d("models", "show", "nope", "--workspace", str(workspace))
    assert "it has cascade, my_skull" in r.stderr


def test_a_workspace_is_needed_and_never_created(tmp_path: Path) -> None:
    r = lmk3d("models", "list")
    assert r.returncode == 2 and "pass --workspace DIR" in r.stderr and "LMK3D_WORKSPACE" in r.stderr
    missing = tmp_path / "missing"
    r = lmk3d("models", "list", env={"LMK3D_WORKSPACE": str(missing)})
    assert r.returncode == 2 and f"workspace {missing}: no such folder" in r.stderr
    assert not missing.exists()
    r = lmk3d("models", "list", "--workspace", str(ROOT / "models"))
    assert r.returncode == 2 and "never written" in r.stderr
    r = lmk3d("models")
    assert r.returncode == 2 and "ACTION" in r.stderr  # argparse: an action is required


def test_models_commands_do_not_import_torch(workspace: Path) -> None:
    code = ("import sys; from lmk3d.cli import main; "
            f"main(['models', 'show', 'cascade', '--workspace', {str(workspace)!r}]); "
            "print('torch loaded' if 'torch' in sys.modules else 'no torch')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0 and r.stdout.strip().endswith("no torch"), r.stderr
