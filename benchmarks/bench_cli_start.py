"""What one ``lmk3d predict`` of one small image costs, process start to process end.

    .venv/bin/python benchmarks/bench_cli_start.py                       # the shipped hippocampus models
    .venv/bin/python benchmarks/bench_cli_start.py --before /tmp/head/src --repeat 5

``benchmarks/bench_speed.py`` times the steps inside a process; this script times the whole command as a
user or a script calling it pays: interpreter start, imports, model load, the prediction (with the
calibration models), the outputs written and the interpreter's exit. On a hippocampus crop (about
35 x 50 x 35 voxels) the prediction itself takes well under 0.1 s, so this is nearly all fixed cost.

Each round runs every model once per tree (``--before SRC``: another commit's ``src``, imported through
``PYTHONPATH``), each in a fresh process, and reads the wall clock around it and the child's CPU time
(user + system, ``resource.getrusage(RUSAGE_CHILDREN)``). The table gives medians over the rounds, and the
ratio after / before where both trees ran.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "hippocampus"
DEFAULT_MODELS = ("models/prior_guided-hippocampus", "models/pin-hippocampus", "models/cascade-hippocampus",
                  "models/consensus-hippocampus", "models/mean_shape-hippocampus")


def one_run(model: str, image: Path, src: str, out: Path) -> tuple[float, float]:
    """``lmk3d predict`` in a fresh process importing ``lmk3d`` from ``src``: (wall s, CPU s)."""
    env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", "import sys; from lmk3d.cli import main; sys.exit(main())",
                           "predict", "--model", model, str(image), "--out", str(out)],
                          capture_output=True, text=True, check=False, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"lmk3d predict --model {model} failed ({src}):\n{done.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", nargs="+", default=list(DEFAULT_MODELS))
    p.add_argument("--image", type=Path, help="default: the first test case of the shipped split")
    p.add_argument("--repeat", type=int, default=3, help="rounds of fresh processes (default 3)")
    p.add_argument("--before", help="another tree's src folder, measured in the same rounds")
    args = p.parse_args()
    if args.repeat < 1:
        sys.exit("--repeat: give 1 or more rounds")
    if args.image is None:
        split = json.loads((ROOT / "models" / "prior_guided-hippocampus" / "split.json").read_text())
        args.image = DATA / "images" / f"{split['test'][0]}.nii.gz"
    trees = [("after", str(ROOT / "src"))] + ([("before", args.before)] if args.before else [])
    load = os.getloadavg()
    runs: dict[tuple[str, str], list[tuple[float, float]]] = {}
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeat):
            for model in args.model:
                for tree, src in trees:
                    runs.setdefault((model, tree), []).append(one_run(model, args.image, src, Path(tmp) / "out"))
    load_after = os.getloadavg()
    print(f"`python benchmarks/bench_cli_start.py {' '.join(sys.argv[1:])}`: `lmk3d predict` of {args.image.name}, "
          f"{args.repeat} rounds in {time.perf_counter() - t_all:.0f} s, "
          f"{time.strftime('%Y-%m-%d %H:%M')}; load average (1, 5, 15 min) before "
          f"{', '.join(f'{v:.1f}' for v in load)}, after {', '.join(f'{v:.1f}' for v in load_after)}\n")
    print("| model | tree | wall s (median) | min | max | CPU s (median) | after / before (wall, CPU) |")
    print("|---|---|---|---|---|---|---|")
    for model in args.model:
        for tree, _ in trees:
            rs = runs[(model, tree)]
            wall = statistics.median(r[0] for r in rs)
            cpu = statistics.median(r[1] for r in rs)
            ratio = ""
            if tree == "after" and (model, "before") in runs:
                b = runs[(model, "before")]
                ratio = (f"{wall / statistics.median(r[0] for r in b):.2f}, "
                         f"{cpu / statistics.median(r[1] for r in b):.2f}")
            print(f"| {Path(model).name} | {tree} | {wall:.3f} | {min(r[0] for r in rs):.3f} | "
                  f"{max(r[0] for r in rs):.3f} | {cpu:.3f} | {ratio} |")


if __name__ == "__main__":
    main()
