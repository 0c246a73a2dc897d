"""Figures for docs/: an `lmk3d evaluate` example plot and the AFIDs AC/PC overlay on the MNI template.

Run: .venv/bin/python benchmarks/make_docs_figures.py
The evaluate example scores AFIDs rater 1 against the AFIDs ground truth (a real inter-rater
comparison on the MNI152 template; rater 3's file is refused for a duplicate name, see the tests).
"""

from __future__ import annotations

from pathlib import Path

from lmk3d.cli import main as lmk3d
from lmk3d.io import read_image, read_landmarks
from lmk3d.io.table import write_table

ROOT = Path(__file__).resolve().parents[1]
AFIDS = ROOT.parent / "shared" / "data" / "afids_mni152"
DOCS = ROOT / "docs" / "figures"


def afids_overlay(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vol = read_image(AFIDS / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    gt = read_landmarks(AFIDS / "tpl-MNI152NLin2009cSym_res-1_desc-groundtruth_afids.fcsv")
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    ac, pc = vol.ras_to_ijk(gt.position("AC")), vol.ras_to_ijk(gt.position("PC"))
    i = int(round(ac[0]))
    # sagittal slice through AC (x = const); the array is RAS-ordered (i: R, j: A, k: S)
    axes[0].imshow(vol.array[i].T, origin="lower", cmap="gray")
    for p, name, c in ((ac, "AC", "lime"), (pc, "PC", "magenta")):
        axes[0].plot(p[1], p[2], "+", color=c, ms=14, mew=2)
        axes[0].annotate(name, (p[1] + 3, p[2] + 3), color=c, fontsize=11)
    axes[0].set_title(f"sagittal, x = {gt.position('AC')[0]:.1f} mm (RAS)")
    for ax, p, name in ((axes[1], ac, "AC"), (axes[2], pc, "PC")):
        k = int(round(p[2]))
        j0, j1 = int(p[1]) - 25, int(p[1]) + 25
        i0, i1 = int(p[0]) - 25, int(p[0]) + 25
        ax.imshow(vol.array[i0:i1, j0:j1, k].T, origin="lower", cmap="gray", extent=(i0, i1, j0, j1))
        ax.plot(p[0], p[1], "+", color="lime", ms=16, mew=2)
        ax.set_title(f"axial zoom at {name} (z = {gt.position(name)[2]:.1f} mm)")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("AFIDs ground truth on the MNI152 2009 template: AC and PC on the midline commissures")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def evaluate_example(out_dir: Path) -> None:
    truth = read_landmarks(AFIDS / "tpl-MNI152NLin2009cSym_res-1_desc-groundtruth_afids.fcsv")
    rater = read_landmarks(AFIDS / "tpl-MNI152NLin2009cSym_res-1_desc-rater01_afids.fcsv")
    tmp = ROOT / "runs" / "docs_figures"
    write_table(tmp / "truth.csv", {"mni152": truth}, with_scores=False)
    write_table(tmp / "rater01.csv", {"mni152": rater})
    lmk3d(["evaluate", "--pred", str(tmp / "rater01.csv"), "--truth", str(tmp / "truth.csv"), "--out", str(tmp),
           "--title", "AFIDs rater 1 vs ground truth (MNI152, 32 landmarks)"])
    for name in ("errors_boxplot.png", "sdr_curve.png"):
        (out_dir / f"evaluate_example_{name}").write_bytes((tmp / name).read_bytes())


if __name__ == "__main__":
    DOCS.mkdir(parents=True, exist_ok=True)
    afids_overlay(DOCS / "afids_ac_pc_overlay.png")
    evaluate_example(DOCS)
    print(f"wrote figures to {DOCS}")
