"""``benchmarks/trust_eval.py --held-out``: which data may stand in for a model's test split."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import ModuleType

import pytest

from lmk3d.data.phantoms import generate
from tests.conftest import DATA, ROOT, load_benchmark

MODEL = ROOT / "models" / "cascade-hippocampus"


@pytest.fixture(scope="module")
def trust_eval() -> ModuleType:
    return load_benchmark("trust_eval")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("held_out")
    generate(out, 2, seed=3, profile="small", progress=None)
    return out


@pytest.mark.skipif(not (MODEL / "trust.json").is_file(), reason="no shipped cascade-hippocampus")
def test_held_out_refuses_the_models_own_and_calibration_data(trust_eval: ModuleType, phantoms: Path,
                                                              tmp_path: Path) -> None:
    """A model's training dataset, or the dataset named as its calibration data, is not held out."""
    with pytest.raises(SystemExit, match="trained or calibrated on that dataset"):
        trust_eval.held_out_cases(MODEL, DATA / "hippocampus", DATA / "hippocampus")
    model = tmp_path / "model"
    model.mkdir()
    trust = json.loads((MODEL / "trust.json").read_text())
    trust["report"]["calibration_data"] = str(phantoms)
    (model / "trust.json").write_text(json.dumps(trust))
    with pytest.raises(SystemExit, match="calibrated on that dataset"):
        trust_eval.held_out_cases(model, phantoms, DATA / "hippocampus")
    # the same phantoms are held out for the shipped model, which never saw them: every case, in order
    cases = trust_eval.held_out_cases(MODEL, phantoms, DATA / "hippocampus")
    assert [c.case for c in cases] == ["hn_0000", "hn_0001"]
    assert all(c.landmarks is not None for c in cases)


def test_held_out_leaves_out_a_case_without_every_landmark(trust_eval: ModuleType, phantoms: Path,
                                                          tmp_path: Path) -> None:
    """The cut variants need every landmark's truth: a case whose image lacks one is left out, not half-counted."""
    partial = tmp_path / "partial"
    shutil.copytree(phantoms, partial)
    lines = (partial / "landmarks.csv").read_text().splitlines()
    names = [line.split(",")[1] for line in lines[1:] if line.startswith("hn_0000,")]
    dropped = [line for line in lines if not line.startswith(f"hn_0001,{names[-1]},")]
    assert len(dropped) == len(lines) - 1
    (partial / "landmarks.csv").write_text("\n".join(dropped) + "\n")
    cases = trust_eval.held_out_cases(MODEL, partial, DATA / "hippocampus", names)
    assert [c.case for c in cases] == ["hn_0000"]
    assert len(trust_eval.held_out_cases(MODEL, partial, DATA / "hippocampus")) == 2


def test_held_out_refuses_a_folder_without_landmarks(trust_eval: ModuleType, phantoms: Path, tmp_path: Path) -> None:
    empty = tmp_path / "no_landmarks"
    shutil.copytree(phantoms / "images", empty / "images")
    with pytest.raises(SystemExit):
        trust_eval.held_out_cases(MODEL, empty, DATA / "hippocampus")


def test_cards_are_not_written_from_held_out_data(trust_eval: ModuleType, phantoms: Path) -> None:
    with pytest.raises(SystemExit):
        trust_eval.main([str(MODEL), "--held-out", str(phantoms), "--cards"])


def test_the_case_bootstrap_resamples_whole_cases(trust_eval: ModuleType) -> None:
    """Points of one case move together: ten cases, five with every point a hit and five with none, give an
    interval of the hit share as wide as ten draws allow, however many points each case holds."""
    import numpy as np

    groups = np.repeat(np.arange(10), 40)
    hit = (groups < 5).astype(float)
    lo, hi = trust_eval.case_bootstrap(groups, lambda i: float(np.mean(hit[i])))
    assert lo < 0.25 and hi > 0.75  # as for 10 coin flips, not 400
    assert trust_eval.case_bootstrap(groups, lambda i: float(np.mean(hit[i]))) == [lo, hi]  # seeded
    # resamples where the figure is undefined (no error to rank) are left out, not counted as 0
    lo2, hi2 = trust_eval.case_bootstrap(groups, lambda i: float(np.mean(hit[i])) if hit[i].any() else float("nan"))
    assert lo2 > 0.0 and hi2 <= 1.0
    assert np.isnan(trust_eval.case_bootstrap(np.array([], dtype=int), lambda i: 1.0)).all()  # no case, no interval
