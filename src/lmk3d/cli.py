"""The ``lmk3d`` command: one entry point with sub-commands.

Each sub-command is a pair of functions (``add_<name>`` builds its parser, ``run_<name>`` runs it)
listed in ``COMMANDS``. Bad input (any :class:`lmk3d.errors.LandmarkError`) exits with status 2
and a one-line message naming the file and the problem.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from lmk3d.errors import LandmarkError


# --- evaluate ------------------------------------------------------------------------------------
def add_evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pred", required=True, help="predicted landmarks: a table CSV, a JSON table, or a folder "
                   "of per-case .mrk.json/.fcsv/.json files")
    p.add_argument("--truth", required=True, help="true landmarks: a table CSV (or any --pred form)")
    p.add_argument("--out", required=True, help="folder for metrics.json and the plots")
    p.add_argument("--title", default="", help="title of the box plot")


def run_evaluate(args: argparse.Namespace) -> int:
    from lmk3d.io import read_collection
    from lmk3d.io.atomic import atomic_write_text
    from lmk3d.metrics import evaluate, format_table
    from lmk3d.plots import error_boxplot, sdr_curve

    truth = read_collection(args.truth)
    pred = read_collection(args.pred)
    ev = evaluate(pred, truth)
    print(format_table(ev))
    if ev.unmatched_cases:
        print(f"{len(ev.unmatched_cases)} truth case(s) without any prediction (all their landmarks counted "
              f"missing): {', '.join(ev.unmatched_cases[:10])}{' ...' if len(ev.unmatched_cases) > 10 else ''}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"pred": str(args.pred), "truth": str(args.truth), **ev.to_dict()}
    atomic_write_text(out / "metrics.json", json.dumps(doc, indent=2))
    error_boxplot(ev, out / "errors_boxplot.png", args.title)
    sdr_curve(ev, out / "sdr_curve.png")
    print(f"wrote {out / 'metrics.json'}, {out / 'errors_boxplot.png'}, {out / 'sdr_curve.png'}")
    return 0


Command = tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
COMMANDS: list[Command] = [
    ("evaluate", "score predictions against a truth table (MRE, SD, SDR, missing) and plot", add_evaluate,
     run_evaluate),
    ("serve", "start the MONAI Label server with the landmarks app (127.0.0.1 unless --host)",
     lambda p: __import__("lmk3d.serve").serve.add_serve(p),
     lambda a: __import__("lmk3d.serve").serve.run_serve(a)),
]


def build_parser() -> argparse.ArgumentParser:
    from lmk3d import __version__

    parser = argparse.ArgumentParser(prog="lmk3d", description="3D anatomical landmark detection.")
    parser.add_argument("--version", action="version", version=f"lmk3d {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text, add, run in COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        add(p)
        p.set_defaults(func=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except LandmarkError as e:
        print(f"lmk3d {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
