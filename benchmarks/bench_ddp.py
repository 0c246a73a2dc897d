"""Seconds per training epoch: one process against ``torchrun --nproc_per_node N`` (gloo, CPU).

    .venv/bin/python benchmarks/bench_ddp.py
    .venv/bin/python benchmarks/bench_ddp.py --detector pin --profile tiny --cases 40 --max-epochs 3

Trains ``--detector`` (``--profile``) on the first ``--cases`` labelled hippocampus cases
(``../shared/data``; validation 0.1, no test split) for ``--max-epochs`` epochs per phase, once as one
process and once under torchrun with ``--nproc`` processes, each with one torch thread, ``--repeat``
times alternating. Each phase's seconds per epoch come from ``train_report.json`` (the phase's
``seconds`` over its ``epochs``: the gradient steps over the rank's shard, then validation on the whole
validation set, which every rank does). The table prints the medians and the ratio N processes / one;
a ratio near 1/N needs N free cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HIPPO = ROOT.parent / "shared" / "data" / "hippocampus"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def phases(fit: Any) -> dict[str, tuple[int, float]]:
    """``{phase name: (epochs, seconds)}`` of every loop report in a ``train_report.json`` ``fit``."""
    out: dict[str, tuple[int, float]] = {}
    if isinstance(fit, dict):
        if "history" in fit and "epochs" in fit and "name" in fit:
            out[str(fit["name"])] = (int(fit["epochs"]), float(fit["seconds"]))
        for v in fit.values():
            out.update(phases(v))
    elif isinstance(fit, list):
        for v in fit:
            out.update(phases(v))
    return out


def train(nproc: int, args: argparse.Namespace, table: Path, work: Path) -> dict[str, Any]:
    out = work / f"model-{nproc}-{len(list(work.iterdir()))}"
    cli = ["-m", "lmk3d.cli", "train", "--detector", args.detector, "--profile", args.profile, "--data", str(table),
           "--images", str(HIPPO / "images"), "--test-fraction", "0", "--max-epochs", str(args.max_epochs),
           "--seed", "0", "--device", "cpu", "--no-progress", "--out", str(out)]
    launch = [] if nproc == 1 else ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
                                    "127.0.0.1", "--master_port", str(free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, *launch, *cli], capture_output=True, text=True, env=env, cwd=ROOT,
                          check=False)
    if done.returncode != 0:
        raise SystemExit(f"training failed ({nproc} process(es)):\n{done.stderr[-3000:]}")
    report: dict[str, Any] = json.loads((out / "train_report.json").read_text())
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--detector", default="cascade", help="detector (default cascade)")
    parser.add_argument("--profile", default="cpu", help="config profile (default cpu)")
    parser.add_argument("--cases", type=int, default=40, help="labelled hippocampus cases (default 40)")
    parser.add_argument("--max-epochs", type=int, default=2, help="epochs per phase (default 2)")
    parser.add_argument("--nproc", type=int, default=2, help="processes of the data-parallel run (default 2)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per setting (default 3)")
    args = parser.parse_args()

    from lmk3d.io import read_table, write_table

    truth = read_table(HIPPO / "landmarks.csv")
    with tempfile.TemporaryDirectory(prefix="bench-ddp-") as tmp:
        work = Path(tmp)
        table = work / "landmarks.csv"
        write_table(table, {c: truth[c] for c in sorted(truth)[:args.cases]}, with_scores=False)
        (work / "runs").mkdir()
        load0 = os.getloadavg()[0]
        reports: dict[int, list[dict[str, Any]]] = {1: [], args.nproc: []}
        for _ in range(args.repeat):
            for n in reports:
                reports[n].append(train(n, args, table, work / "runs"))
        load1 = os.getloadavg()[0]
    first = reports[1][0]
    print(f"`python benchmarks/bench_ddp.py {' '.join(sys.argv[1:])}` on {date.today().isoformat()}: "
          f"{platform.machine()}, {os.cpu_count()} CPU(s), CPU only, gloo, 1 torch thread per process; "
          f"{args.detector} ({args.profile}), {first['counts']['train']} training / {first['counts']['val']} "
          f"validation cases, median of {args.repeat} runs; load average {load0:.2f} at the start, {load1:.2f} "
          "at the end\n")
    print(f"| phase | epochs | 1 process (s/epoch) | {args.nproc} processes (s/epoch) | ratio |")
    print("|---|---|---|---|---|")
    per: dict[int, dict[str, float]] = {}
    for n, reps in reports.items():
        names = phases(reps[0]["fit"])
        per[n] = {name: statistics.median(phases(r["fit"])[name][1] / max(phases(r["fit"])[name][0], 1)
                                          for r in reps) for name in names}
    for name, (epochs, _) in phases(first["fit"]).items():
        a, b = per[1][name], per[args.nproc][name]
        print(f"| {name} | {epochs} | {a:.2f} | {b:.2f} | {b / a:.2f} |")
    ta = statistics.median(r["train_seconds"] for r in reports[1])
    tb = statistics.median(r["train_seconds"] for r in reports[args.nproc])
    print(f"| whole fit (s) | | {ta:.1f} | {tb:.1f} | {tb / ta:.2f} |")
    digests = {x["weights_sha256"] for r in reports[args.nproc] for x in r["distributed"]["ranks"]}
    print(f"\nranks' weights equal within each data-parallel run: "
          f"{all(len({x['weights_sha256'] for x in r['distributed']['ranks']}) == 1 for r in reports[args.nproc])}"
          f" ({len(digests)} distinct digest(s) over {args.repeat} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
