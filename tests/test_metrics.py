"""Metrics against hand-computed values, and the `lmk3d evaluate` command end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lmk3d.cli import main
from lmk3d.io import write_landmarks
from lmk3d.io.table import write_table
from lmk3d.landmarks import LandmarkSet
from lmk3d.metrics import evaluate, evaluate_detector, format_markdown, format_table, radial_errors


def truth_and_pred() -> tuple[dict[str, LandmarkSet], dict[str, LandmarkSet]]:
    """Two cases, landmarks A, B, C.

    case1: A error 3-4-0 -> 5 mm; B error 1 mm; C absent from the truth (not scored, though predicted).
    case2: A error 2 mm; B present in the truth but predicted not found (missing); C error 0 mm.
    """
    t1 = LandmarkSet.from_dict({"A": (0, 0, 0), "B": (10, 0, 0)})
    p1 = LandmarkSet.from_dict({"A": (3, 4, 0), "B": (10, 0, 1), "C": (99, 99, 99)})
    t2 = LandmarkSet.from_dict({"A": (0, 0, 0), "B": (5, 5, 5), "C": (1, 1, 1)})
    p2 = LandmarkSet(("A", "B", "C"), np.array([[0, 2, 0], [5, 5, 5], [1, 1, 1]], float),
                     np.array([0.9, 0.1, 0.8]), np.array([True, False, True]))
    return {"case1": t1, "case2": t2}, {"case1": p1, "case2": p2}


def test_radial_errors_by_hand():
    truth, pred = truth_and_pred()
    np.testing.assert_allclose(radial_errors(pred["case1"], truth["case1"]), [5.0, 1.0])
    e = radial_errors(pred["case2"], truth["case2"])
    assert e[0] == 2.0 and np.isnan(e[1]) and e[2] == 0.0


def test_evaluate_by_hand():
    truth, pred = truth_and_pred()
    ev = evaluate(pred, truth)
    assert ev.names == ("A", "B", "C")
    o = ev.overall
    # scored errors: 5, 1, 2, 0 ; missing: case2/B ; case1/C is not in the truth
    assert (o.n_truth, o.n_scored, o.n_missing) == (5, 4, 1)
    assert o.mre == pytest.approx(2.0)
    assert o.sd == pytest.approx(np.sqrt(((5 - 2) ** 2 + (1 - 2) ** 2 + 0 + (0 - 2) ** 2) / 4))
    assert o.median == pytest.approx(1.5)
    assert o.max == 5.0
    # SDR counts the missing landmark as a failure: within 2 mm are 1, 2, 0 -> 3 of 5
    assert o.sdr["2"] == pytest.approx(3 / 5)
    assert o.sdr["4"] == pytest.approx(3 / 5)
    assert o.sdr["8"] == pytest.approx(4 / 5)
    a, b, c = (ev.per_landmark[n] for n in "ABC")
    assert a.mre == pytest.approx(3.5) and a.sd == pytest.approx(1.5) and a.sdr["2.5"] == pytest.approx(0.5)
    assert (b.n_truth, b.n_scored, b.n_missing) == (2, 1, 1) and b.mre == pytest.approx(1.0)
    assert b.sdr["2"] == pytest.approx(0.5)
    assert (c.n_truth, c.n_scored) == (1, 1) and c.mre == 0.0


def test_case_without_prediction_counts_all_missing():
    truth, pred = truth_and_pred()
    del pred["case2"]
    ev = evaluate(pred, truth)
    assert ev.unmatched_cases == ("case2",)
    assert ev.overall.n_missing == 3 and ev.overall.n_scored == 2
    assert ev.overall.mre == pytest.approx(3.0)


def test_tables_render():
    truth, pred = truth_and_pred()
    ev = evaluate(pred, truth)
    text = format_table(ev)
    assert "overall" in text and "SDR@2.5" in text and "2.00" in text
    md = format_markdown(ev)
    assert md.count("\n") == 2 + 3 + 1 - 1 and "| **overall** | 5 | 1 | 2.00 |" in md


def test_cli_evaluate_on_table_and_markups_folder(tmp_path, capsys):
    truth, pred = truth_and_pred()
    write_table(tmp_path / "truth.csv", truth, with_scores=False)
    write_table(tmp_path / "pred.csv", pred)
    folder = tmp_path / "pred_markups"
    for case, s in pred.items():
        write_landmarks(folder / f"{case}.mrk.json", s)
    for source in (tmp_path / "pred.csv", folder):
        out = tmp_path / f"out_{source.name}"
        assert main(["evaluate", "--pred", str(source), "--truth", str(tmp_path / "truth.csv"), "--out", str(out)]) == 0
        doc = json.loads((out / "metrics.json").read_text())
        assert doc["overall"]["mre"] == pytest.approx(2.0, abs=1e-3)
        assert doc["overall"]["n_missing"] == 1
        assert doc["per_case_errors_mm"]["case2"]["B"] is None
        for png in ("errors_boxplot.png", "sdr_curve.png"):
            assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "overall" in capsys.readouterr().out


def test_cli_bad_input_exit_code(tmp_path, capsys):
    (tmp_path / "bad.csv").write_text("case,name,x_ras,y_ras,z_ras,colour\n")
    assert main(["evaluate", "--pred", str(tmp_path / "bad.csv"), "--truth", str(tmp_path / "bad.csv"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "unknown column(s) colour" in capsys.readouterr().err


def test_cli_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "evaluate" in capsys.readouterr().out


def test_evaluate_detector_predicts_each_sample_and_scores_the_labelled_ones() -> None:
    truths, preds = truth_and_pred()

    class Case:  # a Sample's interface: case, landmarks, load_image()
        def __init__(self, case: str, landmarks: LandmarkSet | None) -> None:
            self.case, self.landmarks = case, landmarks

        def load_image(self) -> str:
            return self.case

    class Detector:  # predicts the table above for each "image"
        def __init__(self) -> None:
            self.seen: list[str] = []

        def predict(self, image: str) -> LandmarkSet:
            self.seen.append(image)
            return preds.get(image, LandmarkSet.empty(("A",)))

    det = Detector()
    cases = [Case("case1", truths["case1"]), Case("case2", truths["case2"]), Case("unlabelled", None)]
    ev = evaluate_detector(det, cases, radii=(2.0,))  # type: ignore[arg-type]
    assert det.seen == ["case1", "case2", "unlabelled"]
    expected = evaluate(preds, truths, radii=(2.0,))
    assert ev.cases == ("case1", "case2")
    assert ev.to_dict() == expected.to_dict()
