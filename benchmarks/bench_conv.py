"""PyTorch's 3D convolution against the slab convolution of ``lmk3d.networks.conv``, on the shipped networks' shapes.

    .venv/bin/python benchmarks/bench_conv.py [--repeat 7] [--threads 1]

For each shape of a convolution that PyTorch runs on its reference code in the shipped models (the
stage-1 U-Net of ``cascade``, the presence network) and a few others, it times ``F.conv3d`` and
``lmk3d.networks.conv.conv3d`` on the same random input (medians of ``--repeat`` calls after one warm-up,
in one process), says which path ``Conv3d`` takes (``uses_reference_path``) and whether the two outputs
are the same bits. A table, not a test; the numbers go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from lmk3d.networks.conv import conv3d, uses_reference_path

# (label, in channels, out channels, size)
SHAPES = [
    ("cascade U-Net, level 1", 8, 8, (48, 48, 48)),
    ("cascade U-Net, level 1 (in)", 1, 8, (48, 48, 48)),
    ("cascade U-Net, level 2", 32, 16, (24, 24, 24)),
    ("cascade U-Net, level 2", 16, 16, (24, 24, 24)),
    ("cascade U-Net, level 2 (down)", 8, 16, (24, 24, 24)),
    ("cascade U-Net, level 3", 64, 32, (12, 12, 12)),
    ("cascade U-Net, level 3", 32, 32, (12, 12, 12)),
    ("cascade U-Net, level 4", 64, 64, (6, 6, 6)),
    ("presence network, layer 1", 2, 8, (40, 40, 40)),
    ("presence network, layer 2", 8, 16, (20, 20, 20)),
    ("odd sizes", 8, 8, (50, 47, 33)),
]


def _median_ms(f: object, repeat: int) -> float:
    f()  # type: ignore[operator]
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        f()  # type: ignore[operator]
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), medians of {args.repeat}")
    print("\n| shape | input | weight | PyTorch ms | slabs ms | ratio | path taken by Conv3d | same bits |")
    print("|---|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for label, cin, cout, size in SHAPES:
            x = torch.randn(1, cin, *size, generator=g)
            w = torch.randn(cout, cin, 3, 3, 3, generator=g)
            b = torch.randn(cout, generator=g)
            ref = _median_ms(lambda: F.conv3d(x, w, b, 1, 1), args.repeat)  # noqa: B023
            ours = _median_ms(lambda: conv3d(x, w, b, (1, 1, 1)), args.repeat)  # noqa: B023
            same = torch.equal(conv3d(x, w, b, (1, 1, 1)), F.conv3d(x, w, b, 1, 1))
            path = "slabs" if uses_reference_path(x, w, (1, 1, 1), (1, 1, 1), (1, 1, 1), 1) else "PyTorch"
            print(f"| {label} | {cin} x {'x'.join(map(str, size))} | {cout} x {cin} x 3^3 | {ref:.2f} | {ours:.2f} | "
                  f"{ours / ref:.2f} | {path} | {'yes' if same else 'NO'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
