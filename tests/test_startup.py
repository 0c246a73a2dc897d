"""``lmk3d.startup``: no collection inside the block, the collector as it was afterwards, and garbage made
before the block freed rather than frozen."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmk3d.cli import main
from lmk3d.io import read_table
from lmk3d.startup import startup
from tests.conftest import DATA, ROOT


class Node:
    """A container the collector tracks (``me`` makes a reference cycle)."""

    me: Node | None = None


@pytest.fixture(autouse=True)
def collector_restored() -> Iterator[None]:
    """Each test leaves the collector on and nothing frozen, as the rest of the session expects."""
    yield
    gc.enable()
    gc.unfreeze()


def test_collection_is_off_inside_the_block_and_on_after_it() -> None:
    assert gc.isenabled()
    frozen = gc.get_freeze_count()
    with startup():
        assert not gc.isenabled()
        with startup():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the outer block is still running
        kept = [Node() for _ in range(100)]
    assert gc.isenabled()
    assert gc.get_freeze_count() >= frozen + len(kept)  # what the block made and kept is frozen


def test_collection_comes_back_when_the_block_raises() -> None:
    with pytest.raises(RuntimeError), startup():
        raise RuntimeError("in the block")
    assert gc.isenabled()


def test_garbage_from_before_the_block_is_freed_not_frozen() -> None:
    gc.disable()  # so that nothing collects the cycle before the block does
    node = Node()
    node.me = node
    ref = weakref.ref(node)
    del node
    assert ref() is not None  # a cycle: only the collector frees it
    with startup():
        pass
    assert ref() is None
    assert not gc.isenabled()  # it was off before the block, so it stays off


def test_predict_leaves_the_collector_on(tmp_path: Path) -> None:
    image = next((DATA / "hippocampus" / "images").glob("*.nii.gz"))
    out = tmp_path / "out"
    assert main(["predict", "--model", str(ROOT / "models" / "mean_shape-hippocampus"), str(image),
                 "--out", str(out)]) == 0
    assert gc.isenabled()
    assert len(read_table(out / "predictions.csv")) == 1
