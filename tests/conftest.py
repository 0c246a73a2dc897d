"""Shared test fixtures: the real data in ../shared/data and small synthetic volumes."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LMK3D_SHARED", ROOT.parent / "shared")).resolve()
DATA = SHARED / "data"
SCHEMA = SHARED / "schemas" / "markups-schema-v1.0.3.json"


_DATA_HOME: str | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _DATA_HOME
    # Nothing a test starts writes under the user's home: a server on a DICOMweb URL keeps its registry
    # workspace in $XDG_DATA_HOME, which would carry models from one run into the next.
    _DATA_HOME = tempfile.mkdtemp(prefix="lmk3d-test-data-home-")
    os.environ["XDG_DATA_HOME"] = _DATA_HOME
    # Tests run torch on one thread: with two threads on two cores, another busy process slows it 6-9x.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    if not DATA.is_dir():
        raise pytest.UsageError(f"the shared data folder {DATA} is missing; tests read ../shared/data in place")


def pytest_unconfigure(config: pytest.Config) -> None:
    if _DATA_HOME is not None:
        shutil.rmtree(_DATA_HOME, ignore_errors=True)


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` imported as module ``name`` (benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up while the class is made
    spec.loader.exec_module(mod)
    return mod


def oblique_affine(rng: np.random.Generator, spacing: tuple[float, float, float] = (0.7, 0.9, 2.5),
                   flip: tuple[int, int, int] = (1, -1, 1)) -> np.ndarray:
    """A random rotation (any angle), anisotropic spacing, an axis flip and an offset."""
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    w, x, y, z = q
    rot = np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])
    a = np.eye(4)
    a[:3, :3] = rot @ np.diag(np.array(spacing) * np.array(flip))
    a[:3, 3] = rng.uniform(-100, 100, size=3)
    return a


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
