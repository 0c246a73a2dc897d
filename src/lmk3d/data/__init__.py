"""Datasets: samples, dataset readers, splits, and the synthetic phantom generator."""

from __future__ import annotations

from lmk3d.data.samples import Sample

__all__ = ["Sample"]
