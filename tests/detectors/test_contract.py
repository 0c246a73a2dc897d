"""The detector contract, checked the same way for every registered detector.

Each detector is fitted briefly (``tiny`` profile, two epochs per phase) on real hippocampus cases, one
landmark missing in half of them, then: predictions name every landmark in the detector's order and
carry each stage's result; a checkpoint round trip gives identical predictions and is a weights-only
format-2 file; the device is the one asked for; and the resume state lets training continue.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lmk3d.checkpoint import FORMAT, read_checkpoint
from lmk3d.data.samples import Sample
from lmk3d.detectors import Detector, detector_class, detector_names, load_detector
from lmk3d.io import read_image, read_table
from lmk3d.training.loop import STATE_FILE, Trainer, TrainOptions, read_train_state
from tests.conftest import DATA

HIPPO = DATA / "hippocampus"
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="no CUDA device on this machine"))]


@pytest.fixture(scope="module")
def samples() -> list[Sample]:
    table = read_table(HIPPO / "landmarks.csv")
    cases = sorted(table)[:12]
    out = []
    for i, case in enumerate(cases):
        lm = table[case]
        if i % 2 and i < 8:  # the first landmark is missing in half of the training cases
            lm = lm.with_found(np.array([k != 0 for k in range(len(lm))]))
        out.append(Sample(case, HIPPO / "images" / f"{case}.nii.gz", lm))
    return out


@pytest.fixture(scope="module", params=detector_names())
def fitted(request: pytest.FixtureRequest, samples: list[Sample], tmp_path_factory: pytest.TempPathFactory
           ) -> tuple[Detector, dict[str, object], Path]:
    name = request.param
    names = samples[0].landmarks.names  # type: ignore[union-attr]
    det = detector_class(name).create(names, "tiny", "cpu")
    state_dir = tmp_path_factory.mktemp(f"{name}_state")
    trainer = Trainer(TrainOptions(seed=0, max_epochs=2, progress=False, device="cpu", state_dir=str(state_dir)))
    report = det.fit(samples[:8], samples[8:10], trainer=trainer)
    return det, report, state_dir


def test_fit_reports_and_records_the_data(fitted: tuple[Detector, dict[str, object], Path]) -> None:
    det, report, _ = fitted
    assert report["seed"] == 0 and report["device"] == "cpu"
    assert isinstance(det.data_fingerprint, str) and det.data_fingerprint.startswith("sha256:")


def test_predict_names_every_landmark_and_every_stage(fitted: tuple[Detector, dict[str, object], Path],
                                                      samples: list[Sample]) -> None:
    det, _, _ = fitted
    image = read_image(samples[10].image_path)
    pred = det.predict_all(image)
    assert pred.landmarks.names == det.landmark_names
    assert [s.name for s in pred.stages] == [s.name for s in det.stages()]
    for s in pred.stages:
        assert s.landmarks.names == det.landmark_names
    lm = pred.landmarks
    assert np.isfinite(lm.xyz_mm_ras[lm.found]).all()
    assert ((lm.scores >= 0) & (lm.scores <= 1)).all()
    # The missing-in-training landmark is still predicted, by name, and near its truth if found.
    truth = samples[10].landmarks
    assert truth is not None
    if lm.found[0]:
        assert np.linalg.norm(lm.xyz_mm_ras[0] - truth.xyz_mm_ras[0]) < 40.0
    stages = pred.stages_json()
    assert [s["name"] for s in stages] == [s.name for s in det.stages()]


def test_checkpoint_round_trip_is_identical(fitted: tuple[Detector, dict[str, object], Path], samples: list[Sample],
                                           tmp_path: Path) -> None:
    det, _, _ = fitted
    det.save(tmp_path)
    doc = read_checkpoint(tmp_path)  # weights-only, or it raises
    assert doc["format"] == FORMAT and doc["detector"] == det.name
    assert list(doc["stages"]) == [s.name for s in det.stages()]
    assert doc["data_fingerprint"] == det.data_fingerprint
    again = load_detector(tmp_path, "cpu")
    for s in samples[10:]:
        image = read_image(s.image_path)
        a, b = det.predict(image), again.predict(image)
        np.testing.assert_array_equal(a.found, b.found)
        np.testing.assert_array_equal(a.xyz_mm_ras, b.xyz_mm_ras)
        np.testing.assert_array_equal(a.scores, b.scores)


@pytest.mark.parametrize("device", DEVICES)
def test_loads_on_the_device_asked_for(fitted: tuple[Detector, dict[str, object], Path], samples: list[Sample],
                                       tmp_path: Path, device: str) -> None:
    det, _, _ = fitted
    det.save(tmp_path)
    again = load_detector(tmp_path, device)
    assert again.device.type == device
    for stage in again.stages():
        for net in stage.networks().values():
            assert all(p.device.type == device for p in net.parameters())
    pred = again.predict(read_image(samples[11].image_path))
    assert pred.names == det.landmark_names


def test_training_left_a_resume_state(fitted: tuple[Detector, dict[str, object], Path]) -> None:
    det, _, state_dir = fitted
    if not any(s.networks() for s in det.stages()):
        pytest.skip(f"{det.name} has no networks to train")
    state = read_train_state(state_dir)
    assert state["completed"], "every finished phase is in the resume state"
    assert (state_dir / STATE_FILE).is_file()


@pytest.mark.parametrize("name", [n for n in detector_names() if n != "mean_shape"])
def test_every_optimiser_takes_the_trainers_learning_rate_scale(name: str, samples: list[Sample],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """``lr_scale`` (the server's fine-tune uses 0.1) scales every phase's learning rate, schedules included."""
    seen: list[float] = []
    original = torch.optim.Adam.step

    def step(self: torch.optim.Adam, *args: object, **kwargs: object) -> object:
        seen.extend(float(g["lr"]) for g in self.param_groups)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    names = samples[0].landmarks.names  # type: ignore[union-attr]
    rates = {}
    for scale in (1.0, 0.1):
        seen.clear()
        det = detector_class(name).create(names, "tiny", "cpu")
        det.fit(samples[:4], samples[8:10], trainer=Trainer(TrainOptions(seed=0, max_epochs=1, progress=False,
                                                                         device="cpu", lr_scale=scale)))
        rates[scale] = list(seen)
    assert rates[1.0] and len(rates[0.1]) == len(rates[1.0])
    np.testing.assert_allclose(rates[0.1], [0.1 * r for r in rates[1.0]], rtol=1e-9)
    with pytest.raises(Exception, match="lr_scale must be a positive number"):
        TrainOptions(lr_scale=0.0)
