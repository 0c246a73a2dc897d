"""Review burden, AUROC and ECE (lmk3d.review) and their report in ``lmk3d evaluate``."""

from __future__ import annotations

import csv
import doctest
import itertools
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from lmk3d import review
from lmk3d.cli import main
from lmk3d.landmarks import LandmarkSet
from lmk3d.metrics import evaluate
from lmk3d.review import auroc, ece, reliability, review_burden, review_curve, review_order


def test_docstring_examples() -> None:
    result = doctest.testmod(review)
    assert result.attempted >= 8 and result.failed == 0


# 6 points: one not found (an error), a tie at 0.3 of one error and one correct point, an error at 0.7.
SCORES = [0.9, 0.3, 0.3, 0.7, 0.1, 0.8]
FOUND = [True, True, True, True, False, True]
ERROR = [False, True, False, True, True, False]


def test_curve_by_hand_not_found_first_and_ties_averaged() -> None:
    c = review_curve(SCORES, ERROR, FOUND)
    # not found (1 error), the 0.3 tie (1 error in 2 points: 0.5 per check), 0.7 (error), 0.8, 0.9
    assert c.errors_caught.tolist() == [0.0, 1.0, 1.5, 2.0, 3.0, 3.0, 3.0]
    assert c.n_errors == 3 and c.n_points == 6
    assert c.share_checked.tolist() == pytest.approx([k / 6 for k in range(7)])
    assert c.share_caught.tolist() == pytest.approx([0, 1 / 3, 0.5, 2 / 3, 1, 1, 1])
    assert review_burden(c, 0.95) == 4 / 6  # 2.85 errors need the 4th check
    assert review_burden(c, 2 / 3) == 3 / 6  # 2 errors: after both points of the tie
    assert review_burden(c, 0.5) == 2 / 6  # 1.5 errors: half way through the tie
    assert review_burden(c, 1 / 3) == 1 / 6
    assert review_burden(c, 1.0) == 4 / 6
    assert review.reference_burdens(6, 3, 0.95) == (3 / 6, 6 / 6)


def test_curve_does_not_depend_on_input_order() -> None:
    base = review_curve(SCORES, ERROR, FOUND).errors_caught
    for perm in itertools.permutations(range(6)):
        p = list(perm)
        c = review_curve(np.array(SCORES)[p], np.array(ERROR)[p], np.array(FOUND)[p])
        assert np.array_equal(c.errors_caught, base), perm


def test_review_order_ties_follow_the_tiebreak() -> None:
    assert review_order(SCORES, FOUND).tolist() == [4, 1, 2, 3, 5, 0]
    assert review_order(SCORES, FOUND, tiebreak=[0, 9, 1, 0, 0, 0]).tolist() == [4, 2, 1, 3, 5, 0]


def test_no_error_means_nothing_to_check_and_constant_scores_mean_random_order() -> None:
    c = review_curve([0.2, 0.9], [False, False])
    assert review_burden(c, 0.95) == 0.0 and c.share_caught.tolist() == [1.0, 1.0, 1.0]
    # one tie of 10 points holding 3 errors: 0.3 caught per check, 2.85 needs all 10 (ceil(0.95 * 10))
    c = review_curve(np.full(10, 0.5), np.arange(10) < 3)
    assert c.errors_caught.tolist() == pytest.approx([0.3 * k for k in range(11)])
    assert review_burden(c, 0.95) == 1.0 == review.reference_burdens(10, 3, 0.95)[1]
    assert review_burden(c, 0.5) == 0.5


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="not found is always an error"):
        review_curve([0.5, 0.5], [False, False], [False, True])
    with pytest.raises(ValueError, match="one of each"):
        review_curve([0.5, 0.5], [False])
    with pytest.raises(ValueError, match="non-finite score"):
        review_curve([math.nan], [True])
    for bad in (0.0, 1.01, -0.5):
        with pytest.raises(ValueError, match="in \\(0, 1\\]"):
            review_burden(review_curve([0.5], [True]), bad)
    with pytest.raises(ValueError, match="\\[0, 1\\]"):
        ece([1.2], [True])


def test_perfect_scores_give_the_share_of_errors() -> None:
    rng = np.random.default_rng(1)
    n = 500
    err = rng.random(n) < 0.2
    scores = np.where(err, rng.uniform(0.0, 0.4, n), rng.uniform(0.5, 1.0, n))
    c = review_curve(scores, err)
    e = int(err.sum())
    assert review_burden(c, 1.0) == e / n
    assert review_burden(c, 0.95) == math.ceil(0.95 * e) / n == review.reference_burdens(n, e, 0.95)[0]
    assert auroc(1 - scores, err) == 1.0
    # the worst scores (errors most confident) need every point checked
    assert review_burden(review_curve(1 - scores, err), 0.95) > 0.95


def test_random_scores_need_about_the_catch_share() -> None:
    rng = np.random.default_rng(2)
    n = 20000
    err = rng.random(n) < 0.2  # about 4000 errors: the 95 % point has an SD near 0.004
    scores = rng.random(n)
    for catch in (0.5, 0.95):
        assert abs(review_burden(review_curve(scores, err), catch) - catch) < 0.03
    assert abs(auroc(1 - scores, err) - 0.5) < 0.03


def _brute_auroc(risk: np.ndarray, pos: np.ndarray) -> float:
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in risk[pos] for b in risk[~pos])
    return wins / (pos.sum() * (~pos).sum())


def test_auroc_matches_the_pair_count() -> None:
    assert auroc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == 0.75
    rng = np.random.default_rng(3)
    for _ in range(20):
        n = int(rng.integers(2, 40))
        risk = np.round(rng.random(n), 1)  # many ties
        pos = rng.random(n) < rng.random()
        if pos.all() or not pos.any():
            assert math.isnan(auroc(risk, pos))
            continue
        assert auroc(risk, pos) == pytest.approx(_brute_auroc(risk, pos), abs=1e-12)
    assert math.isnan(auroc([0.3, 0.4], [True, True]))


def test_ece_by_hand() -> None:
    prob = [0.05, 0.05, 0.55, 0.65, 0.95, 1.0]
    outcome = [False, True, True, False, True, True]
    # bins 0.0-0.1: |0.05 - 1/2| * 2; 0.5-0.6: |0.55 - 1|; 0.6-0.7: |0.65 - 0|; 0.9-1.0 (closed): |0.975 - 1| * 2
    assert ece(prob, outcome) == pytest.approx((0.45 * 2 + 0.45 + 0.65 + 0.025 * 2) / 6, abs=1e-12)
    bins = reliability(prob, outcome)
    assert [(b["lo"], b["n"]) for b in bins] == [(0.0, 2), (0.5, 1), (0.6, 1), (0.9, 2)]
    assert reliability([0.1], [True])[0]["lo"] == 0.1  # a bin holds its lower edge
    assert ece([0.25] * 4, [True, False, False, False]) == 0.0  # calibrated
    assert ece([0.9] * 10, [False] * 10) == pytest.approx(0.9)  # over-confident
    assert ece([0.7, 0.72], [True, False], n_bins=1) == pytest.approx(0.21)
    assert math.isnan(ece([], []))


def test_review_points_skip_unpredicted_cases_and_absent_truth() -> None:
    names = ("P1", "P2")
    a = np.array
    truth = {"a": LandmarkSet(names, a([[0, 0, 0], [10, 0, 0]])),
             "b": LandmarkSet(names, a([[0, 0, 0], [np.nan] * 3])),  # P2 not annotated
             "c": LandmarkSet(names, a([[0, 0, 0], [10, 0, 0]]))}  # never predicted
    pred = {"a": LandmarkSet(("P1",), a([[0, 0, 4]]), a([0.7])),  # P2 has no row
            "b": LandmarkSet(names, a([[1, 0, 0], [5, 5, 5]]), a([0.8, 0.9]))}
    pts = review.review_points(evaluate(pred, truth), pred)
    assert list(zip(pts.cases, pts.names, strict=True)) == [("a", "P1"), ("a", "P2"), ("b", "P1")]
    assert pts.found.tolist() == [True, False, True] and pts.scores.tolist() == [0.7, 0.0, 0.8]
    assert pts.is_error(3.0).tolist() == [True, True, False]
    assert pts.is_error(4.0).tolist() == [False, True, False]
    assert review.carries_scores(pred) and not review.carries_scores(truth)


# --- lmk3d evaluate --------------------------------------------------------------------------------
TRUTH_CSV = """case,name,x_ras,y_ras,z_ras
a,P1,0,0,0
a,P2,10,0,0
a,P3,0,10,0
b,P1,0,0,0
b,P2,10,0,0
c,P1,0,0,0
"""
# errors: a/P1 1 mm, a/P2 5 mm, a/P3 3.5 mm, b/P1 2 mm, b/P2 not found, b/P3 has no truth; c unpredicted
PRED_CSV = """case,name,x_ras,y_ras,z_ras,score,found
a,P1,1,0,0,0.9,1
a,P2,10,5,0,0.2,1
a,P3,0,10,3.5,0.6,1
b,P1,0,2,0,0.6,1
b,P2,,,,0.1,0
b,P3,0,0,0,0.3,1
"""


def _evaluate(tmp_path: Path, pred_csv: str, *extra: str) -> tuple[int, Path]:
    (tmp_path / "truth.csv").write_text(TRUTH_CSV)
    (tmp_path / "pred.csv").write_text(pred_csv)
    out = tmp_path / "ev"
    rc = main(["evaluate", "--pred", str(tmp_path / "pred.csv"), "--truth", str(tmp_path / "truth.csv"),
               "--out", str(out), *extra])
    return rc, out


def test_evaluate_reports_the_review_burden(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = _evaluate(tmp_path, PRED_CSV, "--plot", str(tmp_path / "fig" / "review.png"))
    assert rc == 0
    text = capsys.readouterr().out
    assert "check 80.0% of the points (4 of 5) to catch 95% of the errors" in text
    rep = json.loads((out / "metrics.json").read_text())["review"]
    # review order: b/P2 (not found), a/P2 (0.2), the 0.6 tie a/P3 (error) + b/P1, a/P1 (0.9); 3 errors
    assert (rep["n_points"], rep["n_not_found"], rep["n_errors"], rep["n_checked"]) == (5, 1, 3, 4)
    assert rep["burden"] == 0.8 and rep["burden_perfect"] == 0.6 and rep["burden_random"] == 1.0
    assert rep["auroc"]["3"] == pytest.approx(5.5 / 6) and rep["auroc"]["4"] == 1.0
    assert rep["ece"] == pytest.approx((0.1 + 0.2 + 2 * 0.1 + 0.1) / 5)
    with open(out / "review_curve.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["case"], r["name"]) for r in rows] == [("b", "P2"), ("a", "P2"), ("a", "P3"), ("b", "P1"),
                                                      ("a", "P1")]
    assert [float(r["share_caught"]) for r in rows] == pytest.approx([1 / 3, 2 / 3, 2.5 / 3, 1, 1], abs=1e-6)
    assert [r["is_error"] for r in rows] == ["1", "1", "1", "0", "0"] and rows[0]["error_mm"] == ""
    assert (tmp_path / "fig" / "review.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    rc, out = _evaluate(tmp_path, PRED_CSV, "--review-tolerance-mm", "4", "--review-catch", "0.5")
    rep = json.loads((out / "metrics.json").read_text())["review"]
    assert rc == 0 and rep["n_errors"] == 2 and rep["burden"] == 0.2 and list(rep["auroc"]) == ["4"]


def test_evaluate_without_scores_has_no_review(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    no_scores = "\n".join(",".join(line.split(",")[:5]) for line in PRED_CSV.splitlines()
                          if not line.startswith("b,P2")) + "\n"
    rc, out = _evaluate(tmp_path, no_scores, "--plot", str(tmp_path / "review.png"))
    assert rc == 0 and "predictions carry no scores" in capsys.readouterr().out
    assert "review" not in json.loads((out / "metrics.json").read_text())
    assert not (out / "review_curve.csv").exists() and not (tmp_path / "review.png").exists()


@pytest.mark.parametrize("extra, message", [
    (["--review-catch", "0"], "--review-catch 0.0: give the share of errors to catch, in (0, 1]"),
    (["--review-catch", "1.5"], "in (0, 1]"),
    (["--review-tolerance-mm", "-1"], "--review-tolerance-mm -1.0: give a distance in mm > 0"),
    (["--review-tolerance-mm", "nan"], "give a distance in mm > 0"),
])
def test_evaluate_refuses_bad_review_options(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             extra: list[str], message: str) -> None:
    rc, out = _evaluate(tmp_path, PRED_CSV, *extra)
    assert rc == 2 and message in capsys.readouterr().err
    assert not out.exists()


def test_plot_without_matplotlib_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    rc, out = _evaluate(tmp_path, PRED_CSV, "--plot", str(tmp_path / "review.png"))
    assert rc == 2 and "--plot needs matplotlib" in capsys.readouterr().err and not out.exists()
    rc, out = _evaluate(tmp_path, PRED_CSV)  # without --plot the numbers still come
    assert rc == 0 and "matplotlib is missing" in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text())["review"]["burden"] == 0.8
    assert not (out / "errors_boxplot.png").exists()
