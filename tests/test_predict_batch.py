"""``lmk3d predict`` over many images: reading the next image in a thread, and ``--shard I/N``."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from lmk3d.cli import main, parse_shard, shard_of
from lmk3d.errors import LandmarkError
from lmk3d.io import read_table
from lmk3d.io.read_ahead import ReadAhead
from tests.conftest import DATA, ROOT

HIPPO = DATA / "hippocampus"
IMAGES = sorted((HIPPO / "images").glob("*.nii.gz"))
MEAN_SHAPE = ROOT / "models" / "mean_shape-hippocampus"
NETWORKS = ROOT / "models" / "prior_guided-hippocampus"  # the fastest of the shipped network models


# --- ReadAhead ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("ahead", [0, 1, 2])
def test_read_ahead_keeps_the_input_order(ahead: int) -> None:
    delays = np.random.default_rng(0).uniform(0, 0.004, size=12)  # uneven reads, to tempt any reordering

    def read(i: int) -> str:
        time.sleep(delays[i])
        return f"item{i}"

    with ReadAhead(range(12), read, ahead) as reads:
        got = list(reads)
    assert [g.index for g in got] == list(range(12))
    assert [g.value for g in got] == [f"item{i}" for i in range(12)]
    assert all(g.error is None and g.seconds >= 0 for g in got)


def test_the_next_item_is_read_while_the_caller_holds_the_current_one() -> None:
    second_read = threading.Event()

    def read(i: int) -> int:
        if i == 1:
            second_read.set()
        return i

    with ReadAhead([0, 1, 2], read, ahead=1) as reads:
        for got in reads:
            if got.index == 0:
                # The caller still holds item 0: only the thread can read item 1 now.
                assert second_read.wait(timeout=30), "item 1 was not read while item 0 was held"


def test_the_reader_stays_at_most_ahead_items_beyond_the_caller() -> None:
    taken = 0
    lead: list[int] = []

    def read(i: int) -> int:
        lead.append(i - taken)  # how far beyond the items the caller has finished this read is
        return i

    with ReadAhead(range(30), read, ahead=2) as reads:
        for _ in reads:
            time.sleep(0.002)  # a caller slower than the reader: the reader must wait for it
            taken += 1
    assert len(lead) == 30 and max(lead) <= 2


def test_bad_items_come_back_in_place_and_other_errors_are_raised_in_place() -> None:
    def read(i: int) -> int:
        if i == 1:
            raise LandmarkError("item 1 is truncated")
        if i == 3:
            raise RuntimeError("a bug")
        return i

    seen = []
    with ReadAhead(range(6), read, ahead=2) as reads, pytest.raises(RuntimeError, match="a bug"):
        for got in reads:
            seen.append((got.index, got.value, str(got.error) if got.error else None))
    assert seen == [(0, 0, None), (1, None, "item 1 is truncated"), (2, 2, None)]


def test_leaving_early_stops_the_reader() -> None:
    calls: list[int] = []
    reads = ReadAhead(range(1000), lambda i: calls.append(i) or i, ahead=1)
    with reads:
        for got in reads:
            if got.index == 2:
                break
    assert reads._thread is not None
    reads._thread.join(timeout=30)
    assert not reads._thread.is_alive() and len(calls) <= 5


def test_negative_ahead_is_refused() -> None:
    with pytest.raises(LandmarkError, match="0 \\(no reading ahead\\) or more"):
        ReadAhead([1], int, ahead=-1)


# --- --shard --------------------------------------------------------------------------------------------
def test_shards_partition_the_sorted_list() -> None:
    jobs = [(f"case{i}", Path(f"/d/case{i}.nii.gz")) for i in (4, 0, 3, 1, 2)]
    parts = [shard_of(jobs, i, 2) for i in (1, 2)]
    assert [c for c, _ in parts[0]] == ["case0", "case2", "case4"]
    assert [c for c, _ in parts[1]] == ["case1", "case3"]
    assert shard_of(list(reversed(jobs)), 1, 2) == parts[0], "the command line's order must not matter"
    assert shard_of(jobs, 1, 1) == sorted(jobs)
    assert shard_of(jobs, 7, 7) == []
    assert parse_shard("2/4") == (2, 4) and parse_shard(" 1 / 1 ") == (1, 1)


@pytest.mark.parametrize(("value", "message"), [
    ("0/4", "I must be between 1 and N=4"),
    ("5/4", "I must be between 1 and N=4"),
    ("-1/2", "I must be between 1 and N=2"),
    ("1/0", "N must be at least 1"),
    ("2", "expected I/N"),
    ("a/b", "expected I/N"),
    ("1.5/3", "expected I/N"),
])
def test_bad_shards_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str,
                                        message: str) -> None:
    rc = main(["predict", "--model", str(MEAN_SHAPE), "--out", str(tmp_path / "p"), f"--shard={value}",
               str(IMAGES[0])])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "p").exists()


def test_bad_prefetch_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["predict", "--model", str(MEAN_SHAPE), "--out", str(tmp_path / "p"), "--prefetch", "-1",
               str(IMAGES[0])])
    assert rc == 2 and "--prefetch -1" in capsys.readouterr().err


def test_the_shards_of_a_batch_together_predict_the_batch(tmp_path: Path) -> None:
    images = [str(p) for p in IMAGES[:7]]
    shuffled = [images[i] for i in np.random.default_rng(3).permutation(len(images))]
    assert main(["predict", "--model", str(MEAN_SHAPE), "--out", str(tmp_path / "whole"), *images]) == 0
    whole = read_table(tmp_path / "whole" / "predictions.csv")
    shared = tmp_path / "shared"  # all three parts write into one folder: their files must not collide
    for i in (1, 2, 3):
        assert main(["predict", "--model", str(MEAN_SHAPE), "--out", str(shared), "--shard", f"{i}/3",
                     *shuffled]) == 0
    parts = [read_table(shared / f"predictions.shard-{i}-of-3.csv") for i in (1, 2, 3)]
    assert [len(p) for p in parts] == [3, 2, 2]
    cases = [c for p in parts for c in p]
    assert len(cases) == len(set(cases)) and set(cases) == set(whole)
    for p in parts:
        for c, lm in p.items():
            np.testing.assert_array_equal(lm.xyz_mm_ras, whole[c].xyz_mm_ras)
    assert not (shared / "predictions.csv").exists()
    assert sorted(f.name.removesuffix(".mrk.json") for f in shared.glob("*.mrk.json")) == sorted(whole)


def test_an_empty_shard_writes_an_empty_table(tmp_path: Path) -> None:
    assert main(["predict", "--model", str(MEAN_SHAPE), "--out", str(tmp_path), "--shard", "3/3",
                 str(IMAGES[0]), str(IMAGES[1])]) == 0
    assert read_table(tmp_path / "predictions.shard-3-of-3.csv") == {}


# --- streaming through the command ---------------------------------------------------------------------
def test_streamed_predictions_equal_one_image_at_a_time(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "truncated.nii.gz"
    bad.write_bytes(IMAGES[0].read_bytes()[:500])
    images = [str(IMAGES[2]), str(bad), str(IMAGES[0]), str(IMAGES[1])]  # not sorted: the order must be kept
    lines = {}
    for ahead in (0, 2):
        out = tmp_path / f"ahead{ahead}"
        rc = main(["predict", "--model", str(NETWORKS), "--out", str(out), "--prefetch", str(ahead), *images])
        cap = capsys.readouterr()
        assert rc == 1, cap.err
        assert "truncated: skipped" in cap.err and "1 of 4 image(s)" in cap.err
        lines[ahead] = [line.split(":")[0] for line in cap.out.splitlines() if " found (" in line]
    expected = [Path(p).name.removesuffix(".nii.gz") for p in images if p != str(bad)]
    assert lines[0] == lines[2] == expected
    a, b = tmp_path / "ahead0", tmp_path / "ahead2"
    assert (a / "predictions.csv").read_bytes() == (b / "predictions.csv").read_bytes()
    for case in expected:
        assert (a / f"{case}.mrk.json").read_bytes() == (b / f"{case}.mrk.json").read_bytes()
