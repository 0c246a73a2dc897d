"""The ``lmk3d`` command: ``config``, and ``train --resume`` after a real SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from lmk3d.cli import main
from lmk3d.io import read_table, write_table
from tests.conftest import DATA, ROOT

HIPPO = DATA / "hippocampus"


def lmk3d(*args: str) -> list[str]:
    return [sys.executable, "-m", "lmk3d.cli", *args]


def test_config_prints_the_resolved_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "cascade", "--profile", "tiny", "--set", "max_epochs=7", "--set", "lr=0.01"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["detector"] == "cascade" and doc["profile"] == "tiny"
    assert doc["config"]["max_epochs"] == 7 and doc["config"]["lr"] == 0.01
    assert main(["config", "pin"]) == 0
    assert json.loads(capsys.readouterr().out)["profile"] == "cpu"


@pytest.mark.parametrize("args, message", [
    (["--set", "max_epochs=abc"], "'max_epochs' takes an integer, got 'abc'"),
    (["--set", "no_such_field=1"], "unknown config field(s) no_such_field"),
    (["--set", "lr"], "expected FIELD=VALUE"),
    (["--set", "roi_size=12"], "'roi_size' takes a tuple"),
    (["--profile", "huge"], "unknown profile 'huge'"),
])
def test_bad_config_requests_are_one_line_errors(args: list[str], message: str) -> None:
    r = subprocess.run(lmk3d("config", "cascade", *args), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["--max-minutes", "-1"], "max_minutes must be positive"),
    (["--max-minutes", "0"], "max_minutes must be positive"),
    (["--max-epochs", "0"], "max_epochs must be at least 1"),
])
def test_bad_budgets_are_refused(tmp_path: Path, args: list[str], message: str) -> None:
    r = subprocess.run(lmk3d("train", "--detector", "cascade", "--profile", "tiny", "--data", str(HIPPO), "--out",
                             str(tmp_path / "m"), *args), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def histories(report: Any) -> list[list[tuple[float, ...]]]:
    """Every phase's (epoch, loss, validation) rows, in the report's order."""
    out = []
    if isinstance(report, dict):
        if "history" in report and isinstance(report["history"], list):
            out.append([tuple(float(v) for k, v in sorted(row.items())) for row in report["history"]])
        for v in report.values():
            out += histories(v)
    elif isinstance(report, list):
        for v in report:
            out += histories(v)
    return out


def test_killed_training_resumes_with_the_same_losses(tmp_path: Path) -> None:
    table = read_table(HIPPO / "landmarks.csv")
    subset = {c: table[c] for c in sorted(table)[:12]}
    write_table(tmp_path / "landmarks.csv", subset, with_scores=False)
    common = ["--detector", "cascade", "--profile", "tiny", "--data", str(tmp_path / "landmarks.csv"), "--images",
              str(HIPPO / "images"), "--max-epochs", "4", "--seed", "1", "--device", "cpu", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole = tmp_path / "whole"
    subprocess.run(lmk3d("train", *common, "--out", str(whole)), check=True, env=env, capture_output=True, timeout=600)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(lmk3d("train", *common, "--out", str(killed)), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    state = killed / "train_state.pt"
    deadline = time.monotonic() + 600
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the training ended before it could be killed"
    assert not (killed / "checkpoint.pt").exists()

    r = subprocess.run(lmk3d("train", "--resume", str(killed), "--no-progress"), env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "resuming cascade" in r.stdout
    assert not state.exists(), "the resume state is removed once the model is saved"
    a = json.loads((whole / "train_report.json").read_text())
    b = json.loads((killed / "train_report.json").read_text())
    assert b["resumed"] is True
    assert histories(a["fit"]) and histories(b["fit"]) == histories(a["fit"])


def test_out_naming_a_file_is_refused(tmp_path: Path) -> None:
    afile = tmp_path / "a_file"
    afile.write_text("x")
    for args in (["predict", "--model", str(ROOT / "models" / "mean_shape-hippocampus"), "--out", str(afile),
                  str(HIPPO / "images" / "hippocampus_004.nii.gz")],
                 ["evaluate", "--pred", str(HIPPO / "landmarks.csv"), "--truth", str(HIPPO / "landmarks.csv"),
                  "--out", str(afile)],
                 ["phantoms", "--out", str(afile), "--n", "1", "--profile", "small"]):
        r = subprocess.run(lmk3d(*args), capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert r.returncode == 2, (args, r.stderr)
        assert "exists and is not a folder" in r.stderr and "Traceback" not in r.stderr
    assert afile.read_text() == "x"


def test_evaluate_with_nothing_matched_fails(tmp_path: Path) -> None:
    table = read_table(HIPPO / "landmarks.csv")
    first = sorted(table)[0]
    write_table(tmp_path / "pred.csv", {"not_a_case": table[first]}, with_scores=False)
    r = subprocess.run(lmk3d("evaluate", "--pred", str(tmp_path / "pred.csv"), "--truth", str(HIPPO / "landmarks.csv"),
                             "--out", str(tmp_path / "ev")), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "no predicted case matches a truth case" in r.stderr
    assert not (tmp_path / "ev" / "metrics.json").exists()


def test_one_bad_image_does_not_cost_the_batch(tmp_path: Path) -> None:
    good = sorted((HIPPO / "images").glob("*.nii.gz"))[:2]
    bad = tmp_path / "truncated.nii.gz"
    bad.write_bytes(good[0].read_bytes()[:500])
    out = tmp_path / "pred"
    r = subprocess.run(lmk3d("predict", "--model", str(ROOT / "models" / "mean_shape-hippocampus"), "--out", str(out),
                             str(good[0]), str(bad), str(good[1])), capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr
    assert "truncated: skipped" in r.stderr and "1 of 3 image(s)" in r.stderr and "Traceback" not in r.stderr
    rows = read_table(out / "predictions.csv")
    assert sorted(rows) == sorted(p.name.removesuffix(".nii.gz") for p in good)


def test_a_corrupt_image_in_the_training_set_is_skipped(tmp_path: Path) -> None:
    table = read_table(HIPPO / "landmarks.csv")
    cases = sorted(table)[:6]
    images = tmp_path / "images"
    images.mkdir()
    for c in cases:
        (images / f"{c}.nii.gz").write_bytes((HIPPO / "images" / f"{c}.nii.gz").read_bytes())
    corrupt = cases[2]
    (images / f"{corrupt}.nii.gz").write_bytes((HIPPO / "images" / f"{corrupt}.nii.gz").read_bytes()[:700])
    write_table(tmp_path / "landmarks.csv", {c: table[c] for c in cases}, with_scores=False)
    out = tmp_path / "model"
    r = subprocess.run(lmk3d("train", "--detector", "mean_shape", "--data", str(tmp_path / "landmarks.csv"),
                             "--images", str(images), "--out", str(out), "--val-fraction", "0.2", "--test-fraction",
                             "0", "--no-progress"), capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert f"warning: skipped {corrupt}" in r.stderr and "Traceback" not in r.stderr
    report = json.loads((out / "train_report.json").read_text())
    assert report["counts"]["train"] + report["counts"]["val"] == len(cases) - 1
    assert (out / "checkpoint.pt").is_file()


def test_an_sr_says_why_no_landmark_was_found(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A PACS user reads only the SR: a whole-head MPRAGE given to a hippocampus model is refused, and the SR's
    algorithm parameters carry the verdict and its reason (every landmark a not-found group)."""
    import pydicom

    from lmk3d.io.dicom_sr import read_sr

    series = DATA / "dicom" / "mr_brain_sagittal_mprage"
    out = tmp_path / "sr"
    assert main(["predict", "--model", str(ROOT / "models" / "prior_guided-hippocampus"), "--format", "sr",
                 "--out", str(out), str(series)]) == 0
    assert "not this model's kind of image" in capsys.readouterr().err
    (path,) = out.glob("*.sr.dcm")
    texts = [str(e.value) for e in pydicom.dcmread(path).iterall() if e.keyword == "TextValue"]
    verdict = [t for t in texts if t.startswith("image_check=")]
    assert verdict and "not of the model's kind, no landmark found" in verdict[0], texts
    assert "field of view" in verdict[0]
    assert not read_sr(path).found.any()


def test_a_batch_says_which_images_the_model_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """predictions.csv cannot tell a refused image from one with every landmark cut off: image_checks.csv does."""
    import csv
    import shutil

    hippo = sorted((HIPPO / "images").glob("*.nii.gz"))[0]
    spine = DATA / "spine_t2" / "t2.nii.gz"
    model = ROOT / "models" / "mean_shape-hippocampus"
    out = tmp_path / "pred"
    assert main(["predict", "--model", str(model), "--out", str(out), str(hippo), str(spine)]) == 0
    assert "image_checks.csv" in capsys.readouterr().out
    with (out / "image_checks.csv").open(newline="") as f:
        rows = {r["case"]: r for r in csv.DictReader(f)}
    assert set(rows) == {hippo.name.removesuffix(".nii.gz"), "t2"}
    kept, refused = rows[hippo.name.removesuffix(".nii.gz")], rows["t2"]
    assert (kept["in_distribution"], refused["in_distribution"], refused["atypical"]) == ("1", "0", "0")
    assert "unlike the training images" in refused["reason"] and float(refused["score"]) < 0.05
    assert not read_table(out / "predictions.csv")["t2"].found.any()
    # A model without a trust model judges nothing: no such file.
    raw = tmp_path / "raw-model"
    shutil.copytree(model, raw, ignore=shutil.ignore_patterns("trust.json", "presence.pt"))
    assert main(["predict", "--model", str(raw), "--out", str(tmp_path / "raw"), str(hippo)]) == 0
    assert not (tmp_path / "raw" / "image_checks.csv").exists()
