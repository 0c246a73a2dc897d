"""Evaluation plots (PNG, matplotlib's Agg backend, no display needed)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from lmk3d.metrics import SDR_RADII_MM, Evaluation


def _pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def error_boxplot(ev: Evaluation, path: str | os.PathLike[str], title: str = "") -> Path:
    """Box plot of radial errors per landmark (missing landmarks annotated, not plotted)."""
    plt = _pyplot()
    data = [ev.errors_mm[:, j][np.isfinite(ev.errors_mm[:, j])] for j in range(len(ev.names))]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * len(ev.names) + 2), 4.2))
    ax.boxplot(data, showmeans=True)
    ax.set_xticks(range(1, len(ev.names) + 1))
    ax.set_xticklabels([f"{n}\n({s.n_missing} missing)" if s.n_missing else n
                        for n, s in ev.per_landmark.items()], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("radial error (mm)")
    ax.set_title(title or f"Radial error per landmark (MRE {ev.overall.mre:.2f} mm, n={ev.overall.n_truth})")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def sdr_curve(ev: Evaluation, path: str | os.PathLike[str], max_radius_mm: float | None = None) -> Path:
    """Successful detection rate against radius (missing landmarks count as failures)."""
    plt = _pyplot()
    e = ev.errors_mm[np.isfinite(ev.errors_mm)]
    top = max_radius_mm or max(10.0, float(np.percentile(e, 99)) if len(e) else 10.0)
    radii = np.linspace(0.0, top, 200)
    n = ev.overall.n_truth
    fig, ax = plt.subplots(figsize=(5.5, 4.0))
    if n:
        ax.plot(radii, [100.0 * np.count_nonzero(e <= r) / n for r in radii], label="all landmarks")
        for j, name in enumerate(ev.names):
            ej = ev.errors_mm[:, j][np.isfinite(ev.errors_mm[:, j])]
            nj = ev.per_landmark[name].n_truth
            if nj and len(ev.names) <= 12:
                ax.plot(radii, [100.0 * np.count_nonzero(ej <= r) / nj for r in radii], lw=0.8, alpha=0.6,
                        label=name)
    for r in SDR_RADII_MM:
        ax.axvline(r, color="grey", lw=0.5, ls=":")
    ax.set_xlabel("radius (mm)")
    ax.set_ylabel("SDR (%)")
    ax.set_ylim(0, 101)
    ax.set_title("Successful detection rate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
