"""Time the phantom generator on clinical-size volumes and print a table (not a test: the machine may be busy).

    .venv/bin/python benchmarks/phantom_speed.py                 # 512x512x200, 5 cases
    .venv/bin/python benchmarks/phantom_speed.py --size 512,512,300 --n 3

Reports, per case, the generation time (sampling, painting, upsampling, noise, int16), the NIfTI
writing time (gzip), and the process's peak resident memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="512,512,200", help="matrix I,J,K (default 512,512,200)")
    parser.add_argument("--n", type=int, default=5, help="cases (default 5)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from lmk3d.data.phantoms import PROFILES, make_phantom, parse_size
    from lmk3d.io import write_image

    cfg = dataclasses.replace(PROFILES["clinical"], size=parse_size(args.size))
    gen, wrt = [], []
    print("| case | size | spacing (mm) | axes | generate (s) | write .nii.gz (s) | file (MB) |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.n):
            t0 = time.perf_counter()
            ph = make_phantom(args.seed, i, cfg)
            t1 = time.perf_counter()
            path = write_image(Path(tmp) / "case.nii.gz", ph.volume)
            t2 = time.perf_counter()
            gen.append(t1 - t0)
            wrt.append(t2 - t1)
            print(f"| {ph.params.case} | {'x'.join(map(str, ph.volume.shape))} | "
                  f"{' x '.join(f'{s:.2f}' for s in ph.volume.spacing_mm)} | {''.join(ph.volume.axcodes)} | "
                  f"{t1 - t0:.2f} | {t2 - t1:.2f} | {path.stat().st_size / 1e6:.0f} |", flush=True)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nmedian generate {statistics.median(gen):.2f} s, median write {statistics.median(wrt):.2f} s, "
          f"peak RSS {peak_mb:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
