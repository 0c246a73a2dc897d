"""Time the box filter (block means) two ways on one thread: PyTorch's ``avg_pool3d`` and ``block_mean``.

    .venv/bin/python benchmarks/bench_block_mean.py            # 200 x 512 x 512, medians of 5

Rows: a dense image, a strided crop of it (165 x 375 x 391, the size of pin's fine crop of the phantom)
and that crop flipped along two axes; PyTorch's column includes the dense copy it needs first
(``contiguous()``, ``flip``). Both give the same values bit for bit (checked here on every row, and in
``tests/transforms/test_block_mean.py``); the table decides ``MAX_DENSE_BLOCK``. A table, not a test.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from lmk3d.transforms import block_mean as bm

FACTORS = ((1, 1, 2), (1, 2, 2), (2, 2, 2), (1, 3, 3), (5, 2, 2), (3, 3, 3))


def _median_ms(fn: Callable[[], torch.Tensor], repeat: int) -> tuple[float, torch.Tensor]:
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    assert out is not None
    return float(np.median(times)) * 1e3, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    bm.MAX_DENSE_BLOCK = 10**9  # always block_mean's own additions, to compare
    gen = torch.Generator().manual_seed(0)
    dense = torch.randn(1, 1, 200, 512, 512, generator=gen) * 1000.0
    crop = dense[..., 20:185, 60:435, 70:461]
    cases: list[tuple[str, torch.Tensor, list[int]]] = [
        ("dense 200 x 512 x 512", dense, []), ("strided crop 165 x 375 x 391", crop, []),
        ("the crop, flipped along 2 axes", crop, [3, 4])]
    print(f"1 torch thread, medians of {args.repeat}; ms")
    print()
    print("| input | block | PyTorch ms | block_mean ms | ratio | same bits |")
    print("|---|---|---|---|---|---|")
    for name, x, flip in cases:
        for f in FACTORS:
            def torch_pool(x: torch.Tensor = x, f: tuple[int, int, int] = f, flip: list[int] = flip) -> torch.Tensor:
                src = x.flip(flip) if flip else x.contiguous()
                return F.avg_pool3d(src, f, f, ceil_mode=True, count_include_pad=False)

            def ours(x: torch.Tensor = x, f: tuple[int, int, int] = f, flip: list[int] = flip) -> torch.Tensor:
                return bm.block_mean(x, f, flip)

            t_ref, ref = _median_ms(torch_pool, args.repeat)
            t_new, new = _median_ms(ours, args.repeat)
            same = torch.equal(ref.view(torch.int32), new.view(torch.int32))
            print(f"| {name} | {'x'.join(map(str, f))} | {t_ref:.1f} | {t_new:.1f} | {t_new / t_ref:.2f} | "
                  f"{'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
