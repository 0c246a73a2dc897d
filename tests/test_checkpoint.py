"""Checkpoints: weights-only reading, refusal of anything that could run code, self-description."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmk3d.checkpoint import FORMAT, CheckpointError, read_checkpoint, write_checkpoint
from lmk3d.detectors import load_detector

ROOT = Path(__file__).resolve().parents[1]


class RunsCode:
    """A pickled object whose loading would run a command (what an attacker uploads)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def crafted(folder: Path, marker: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"detector": "mean_shape", "config": {}, "landmark_names": ["a"], "fitted": RunsCode(marker)}
    buf = io.BytesIO()
    torch.save(payload, buf)
    (folder / "checkpoint.pt").write_bytes(buf.getvalue())
    return folder


def test_pickled_object_is_refused_and_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    model = crafted(tmp_path / "model", marker)
    with pytest.raises(CheckpointError, match="refused"):
        load_detector(model, "cpu")
    assert not marker.exists()


def test_cli_predict_refuses_a_crafted_checkpoint(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    model = crafted(tmp_path / "model", marker)
    image = ROOT.parent / "shared" / "data" / "spine_t2" / "t2.nii.gz"
    r = subprocess.run([sys.executable, "-m", "lmk3d.cli", "predict", "--model", str(model), "--out",
                        str(tmp_path / "out"), str(image)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "refused" in r.stderr and "Traceback" not in r.stderr
    assert not marker.exists()


def test_not_a_checkpoint_and_missing_fields(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "checkpoint.pt").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="cannot read"):
        read_checkpoint(tmp_path / "a")
    buf = io.BytesIO()
    torch.save({"detector": "pin", "config": {}, "landmark_names": [1, 2]}, buf)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "checkpoint.pt").write_bytes(buf.getvalue())
    with pytest.raises(CheckpointError, match="landmark_names"):
        read_checkpoint(tmp_path / "b")
    with pytest.raises(CheckpointError, match="no checkpoint.pt"):
        read_checkpoint(tmp_path / "c")
    with pytest.raises(CheckpointError, match="lacks"):
        write_checkpoint(tmp_path / "d", {"detector": "x"})


def test_written_checkpoints_describe_themselves(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path / "m", {"detector": "mean_shape", "config": {}, "landmark_names": ["a"],
                                             "stages": {}, "data_fingerprint": "sha256:0"})
    doc = read_checkpoint(path)
    assert doc["format"] == FORMAT
    assert set(doc["versions"]) == {"lmk3d", "torch", "monai"}
    assert [p.name for p in (tmp_path / "m").iterdir()] == ["checkpoint.pt"]  # no temporary file left


@pytest.mark.parametrize("model", sorted(p.name for p in (ROOT / "models").iterdir() if p.is_dir()))
def test_shipped_checkpoints_are_converted(model: str) -> None:
    doc = read_checkpoint(ROOT / "models" / model)
    assert doc["format"] == FORMAT, f"{model}: run scripts/convert_checkpoints.py"
    assert doc["detector"] == model.split("-")[0]
