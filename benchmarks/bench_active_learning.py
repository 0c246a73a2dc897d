"""Active learning on the real server: how soon ``least_confident`` answers, and from which scores.

    nice -n 5 .venv/bin/python benchmarks/bench_active_learning.py --models prior_guided
    nice -n 5 .venv/bin/python benchmarks/bench_active_learning.py --models default --runs 3 --out runs/al.md

Each run starts a fresh ``lmk3d serve`` (``python -m lmk3d.cli serve --studies DIR --host 127.0.0.1
--port P --models DIR``, its own session, stopped by its process group, torch on ``--threads``
threads) on a temporary studies folder of ``--images`` unlabelled hippocampus MR images from
../shared/data and a temporary copy of the shipped model folders (``--models``: detector names, or
``default`` for every ``models/*-hippocampus`` folder with a checkpoint, which is what ``lmk3d serve``
serves when given no ``--models``); the checkout's ``models/`` is never written. The score cache lives
in the server's memory, so every fresh server starts cold.

Two kinds of run, ``--runs`` of each:

- **pass**: the client polls ``GET /info/`` every 0.05 s from the launch; the moment it answers 200
  is "up". ``POST /activelearning/least_confident`` is sent at once (the cold call), then every
  ``--poll-s`` seconds, once per served model (``{"model": NAME}``), until every model has scores
  for every unlabelled image from its served checkpoint (``scored == candidates``) or
  ``--max-pass-s`` has passed. Each answer's latency, ``basis`` (``scores``, ``earlier_scores``,
  ``unscored``: a random pick) and ``scored``/``candidates`` are recorded. Then ``--warm`` calls
  back to back (the cache warm, the scorer idle), then ``--infers`` inferences on the default model
  ``--gap-s`` seconds apart: the idle inference latency.
- **busy**: a fresh server again, the cold call, then ``--infers`` inferences ``--gap-s`` seconds
  apart (after a first, untimed one) while the background scorer still has work. The scorer waits
  until no interactive inference has run for 1 s before each image, so a gap over 1 s lets it start
  an image that the next inference then competes with: this is the worst case for a user clicking
  every ``--gap-s`` seconds. Only inferences that started while the scorer had work left count.

Every inference is ``POST /infer/<model>?image=ID&output=json`` with ``params {}``, timed on the client.
Prints markdown tables: the per-run cold call, the timeline of the first pass run, medians over runs,
warm latencies (median, p95), idle against busy inference latency, and the issue's target
("``least_confident`` within 2 s once the server is up").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench_load import HIPPOCAMPUS, ROOT, _request, infer, machine, percentile, stop_server

STRATEGY = "least_confident"
# Bounds on a hung server, not speed checks.
STARTUP_TIMEOUT_S = 600.0
INFO_POLL_S = 0.05
TARGET_S = 2.0
TIMELINE_ROWS = 15


# --- the server -----------------------------------------------------------------------------------
def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def model_folders(spec: str) -> list[Path]:
    """The shipped model folders to copy: ``default`` (every ``models/*-hippocampus`` with a checkpoint) or names."""
    if spec == "default":
        folders = sorted(p.parent for p in (ROOT / "models").glob("*-hippocampus/checkpoint.pt"))
    else:
        folders = [ROOT / "models" / f"{name.strip()}-hippocampus" for name in spec.split(",") if name.strip()]
    missing = [str(f.relative_to(ROOT)) for f in folders if not (f / "checkpoint.pt").is_file()]
    if missing or not folders:
        raise SystemExit(f"--models {spec!r}: no checkpoint in {', '.join(missing) or 'models/*-hippocampus'}; "
                         "give detector names with a shipped hippocampus model, or 'default'")
    return folders


def unlabelled_cases(n: int) -> list[str]:
    """The first ``n`` hippocampus image ids, sorted."""
    cases = sorted(p.name.removesuffix(".nii.gz") for p in (HIPPOCAMPUS / "images").glob("*.nii.gz"))
    if len(cases) < n:
        raise SystemExit(f"--images {n}: only {len(cases)} images in {HIPPOCAMPUS / 'images'}")
    return cases[:n]


@dataclass
class Launched:
    process: subprocess.Popen[bytes]
    url: str
    log: Path
    startup_s: float  # launch -> first 200 from /info/
    info: dict[str, Any]
    up: float  # time.perf_counter() when /info/ first answered 200


def launch(root: Path, folders: Sequence[Path], cases: Sequence[str], threads: int) -> Launched:
    """Fresh studies (``cases``, no labels) and model copies under ``root``; start the server, wait for /info/."""
    studies, models = root / "studies", root / "models"
    studies.mkdir(parents=True)
    for case in cases:
        shutil.copyfile(HIPPOCAMPUS / "images" / f"{case}.nii.gz", studies / f"{case}.nii.gz")
    for folder in folders:
        shutil.copytree(folder, models / folder.name)
    port = _free_port()
    log = root / "server.log"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "MONAI_LABEL_SESSION_PATH": str(root / "sessions"), "XDG_DATA_HOME": str(root / "xdg"),
           "LMK3D_ADMIN_TOKEN": "", "LMK3D_API_TOKEN": ""}
    cmd = [sys.executable, "-m", "lmk3d.cli", "serve", "--studies", str(studies), "--host", "127.0.0.1",
           "--port", str(port), "--models", str(models)]
    url = f"http://127.0.0.1:{port}"
    with log.open("wb") as out:
        t0 = time.perf_counter()
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root,
                                   start_new_session=True)
    while True:
        if process.poll() is not None:
            tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-30:])
            raise SystemExit(f"the server exited with status {process.returncode}:\n{tail}")
        try:
            status, raw, _ = _request("GET", f"{url}/info/")
            if status == 200:
                up = time.perf_counter()
                return Launched(process, url, log, up - t0, json.loads(raw), up)
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        if time.perf_counter() - t0 > STARTUP_TIMEOUT_S:
            stop_server(process)
            raise SystemExit(f"{url}/info/ did not answer within {STARTUP_TIMEOUT_S:.0f} s; see {log}")
        time.sleep(INFO_POLL_S)


def served_models(info: dict[str, Any]) -> list[str]:
    """The models ``least_confident`` ranks for, default first (from ``/info/``)."""
    strategy = (info.get("strategies") or {}).get(STRATEGY)
    if not isinstance(strategy, dict):
        raise SystemExit(f"/info/ lists no {STRATEGY} strategy; models: {list(info.get('models') or {})}")
    return list(strategy["config"]["model"])


# --- the client -----------------------------------------------------------------------------------
@dataclass
class Call:
    """One ``least_confident`` answer."""

    at_s: float  # request sent, seconds after "up"
    seconds: float  # latency
    model: str
    status: int
    basis: str = ""
    scored: int = 0
    candidates: int = 0
    background: int = 0  # images the scorer has scored since the start, all models

    @property
    def done(self) -> bool:
        return self.status == 200 and self.candidates > 0 and self.scored == self.candidates


def least_confident(url: str, up: float, model: str | None = None) -> Call:
    body = json.dumps({"model": model} if model else {}).encode()
    t0 = time.perf_counter()
    status, raw, _ = _request("POST", f"{url}/activelearning/{STRATEGY}", body, "application/json")
    seconds = time.perf_counter() - t0
    if status != 200:
        return Call(t0 - up, seconds, model or "?", status, basis=raw[:200].decode("utf-8", "replace"))
    doc = json.loads(raw)
    return Call(t0 - up, seconds, str(doc.get("model")), status, str(doc.get("basis")), int(doc.get("scored", 0)),
                int(doc.get("candidates", 0)), int((doc.get("background") or {}).get("inferences", 0)))


@dataclass
class PassRun:
    startup_s: float
    models: list[str]
    first: Call
    calls: list[Call] = field(default_factory=list)  # every call of the pass, all models, in order
    done_s: dict[str, float] = field(default_factory=dict)  # model -> first call seen done (s after up)
    first_scores_s: dict[str, float] = field(default_factory=dict)  # model -> first basis "scores" answer
    warm: list[Call] = field(default_factory=list)
    idle_infer_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@dataclass
class BusyRun:
    startup_s: float
    first: Call
    infer_s: list[float] = field(default_factory=list)
    scored_meanwhile: int = 0  # images the scorer finished during the counted inferences
    errors: list[str] = field(default_factory=list)


def timed_inferences(url: str, model: str, images: Sequence[str], n: int, gap_s: float,
                     keep_going: Callable[[], bool] = lambda: True) -> tuple[list[float], list[str]]:
    """``n`` inferences ``gap_s`` apart (after each answer) while ``keep_going()``; latencies and errors."""
    seconds, errors = [], []
    for i in range(n):
        if not keep_going():
            break
        o = infer(url, model, images[i % len(images)])
        if o.error or o.status != 200:
            errors.append(f"HTTP {o.status}: {o.error}")
        else:
            seconds.append(o.seconds)
        time.sleep(gap_s)
    return seconds, errors


def pass_run(root: Path, folders: Sequence[Path], cases: Sequence[str], args: argparse.Namespace,
             say: Callable[[str], None]) -> PassRun:
    s = launch(root, folders, cases, args.threads)
    try:
        models = served_models(s.info)
        run = PassRun(s.startup_s, models, least_confident(s.url, s.up))
        say(f"up after {s.startup_s:.1f} s; models {', '.join(models)}; first call {run.first.seconds:.3f} s "
            f"({run.first.basis}, {run.first.scored}/{run.first.candidates} scored)")
        for c in [run.first]:
            if c.basis == "scores":
                run.first_scores_s[c.model] = c.at_s + c.seconds
        while len(run.done_s) < len(models) and time.perf_counter() - s.up < args.max_pass_s:
            time.sleep(args.poll_s)
            for model in models:
                if model in run.done_s:
                    continue
                c = least_confident(s.url, s.up, model)
                run.calls.append(c)
                if c.status != 200:
                    run.errors.append(f"{STRATEGY} HTTP {c.status}: {c.basis}")
                if c.basis == "scores":
                    run.first_scores_s.setdefault(model, c.at_s + c.seconds)
                if c.done:
                    run.done_s[model] = c.at_s + c.seconds
                    say(f"{model}: every image scored {run.done_s[model]:.1f} s after up")
        missing = [m for m in models if m not in run.done_s]
        if missing:
            run.errors.append(f"not every image scored within {args.max_pass_s:g} s for {', '.join(missing)}")
        run.warm = [least_confident(s.url, s.up) for _ in range(args.warm)]
        run.idle_infer_s, errors = timed_inferences(s.url, models[0], cases, args.infers + 1, args.gap_s)
        run.idle_infer_s = run.idle_infer_s[1:]  # the first interactive inference of a server is not counted
        run.errors += errors
    except BaseException:
        say("the server's last log lines:\n" + "\n".join(s.log.read_text(errors="replace").splitlines()[-30:]))
        raise
    finally:
        stop_server(s.process)
    return run


def busy_run(root: Path, folders: Sequence[Path], cases: Sequence[str], args: argparse.Namespace,
             say: Callable[[str], None]) -> BusyRun:
    s = launch(root, folders, cases, args.threads)
    try:
        models = served_models(s.info)
        run = BusyRun(s.startup_s, least_confident(s.url, s.up))
        timed_inferences(s.url, models[0], cases, 1, args.gap_s)  # the first inference of a server: not counted

        def work_left() -> bool:
            return not all(least_confident(s.url, s.up, m).done for m in models)

        before = least_confident(s.url, s.up).background
        run.infer_s, run.errors = timed_inferences(s.url, models[0], cases, args.infers, args.gap_s, work_left)
        run.scored_meanwhile = least_confident(s.url, s.up).background - before
        say(f"busy: {len(run.infer_s)} inferences, median {statistics.median(run.infer_s or [math.nan]):.3f} s; "
            f"the scorer finished {run.scored_meanwhile} image(s) meanwhile")
        if len(run.infer_s) < args.infers:
            run.errors.append(f"the scorer ran out of work after {len(run.infer_s)} of {args.infers} inferences")
    except BaseException:
        say("the server's last log lines:\n" + "\n".join(s.log.read_text(errors="replace").splitlines()[-30:]))
        raise
    finally:
        stop_server(s.process)
    return run


# --- the report -----------------------------------------------------------------------------------
def _s(value: float, digits: int = 3) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.{digits}f}"


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def report(args: argparse.Namespace, head: str, passes: list[PassRun], busy: list[BusyRun]) -> str:
    models = passes[0].models
    default = models[0]
    lines = [head, "", f"Served models (from `/info/`, `{STRATEGY}`'s default first): {', '.join(models)}.", ""]

    lines += ["### The first call on a fresh server (cold cache)", "",
              "| run | kind | start to `/info/` s | up to answer s | latency s | basis | scored / candidates |",
              "|---|---|---|---|---|---|---|"]
    firsts = [("pass", p.startup_s, p.first) for p in passes] + [("busy", b.startup_s, b.first) for b in busy]
    for i, (kind, startup, c) in enumerate(firsts, 1):
        lines.append(f"| {i} | {kind} | {startup:.1f} | {_s(c.at_s + c.seconds)} | {_s(c.seconds)} | {c.basis} "
                     f"| {c.scored} / {c.candidates} |")
    cold = [c.at_s + c.seconds for _, _, c in firsts]
    lines += [f"| **median** | | {_s(_median([f[1] for f in firsts]), 1)} | **{_s(_median(cold))}** "
              f"| {_s(_median([c.seconds for _, _, c in firsts]))} | | |", ""]

    lines += ["### Scores filling in (pass runs, medians over runs)", "",
              "Seconds after `/info/` first answered; each model's calls name it (`{\"model\": NAME}`).", "",
              "| model | first answer ranked by scores s | every image scored s | runs done |",
              "|---|---|---|---|"]
    for m in models:
        first = [p.first_scores_s[m] for p in passes if m in p.first_scores_s]
        done = [p.done_s[m] for p in passes if m in p.done_s]
        lines.append(f"| {m} | {_s(_median(first), 1)} | {_s(_median(done), 1)} | {len(done)} / {len(passes)} |")
    lines.append("")

    p0 = passes[0]
    lines += [f"### Timeline of pass run 1, model {default} (at most {TIMELINE_ROWS + 1} of its calls)", "",
              "| sent at s | latency s | basis | scored / candidates | images scored (all models) |",
              "|---|---|---|---|---|"]
    timeline = [p0.first, *[c for c in p0.calls if c.model == default]]
    step = max(1, math.ceil(len(timeline) / TIMELINE_ROWS))  # every step-th call, and the last
    for c in [*timeline[:-1:step], timeline[-1]] if len(timeline) > 1 else timeline:
        lines.append(f"| {c.at_s:.1f} | {_s(c.seconds)} | {c.basis} | {c.scored} / {c.candidates} | {c.background} |")
    lines.append("")

    during = [c.seconds for p in passes for c in [p.first, *p.calls] if c.status == 200]
    warm = [c.seconds for p in passes for c in p.warm if c.status == 200]
    lines += [f"### `{STRATEGY}` latency", "",
              "| when | calls | median s | p95 s | max s |", "|---|---|---|---|---|",
              f"| cache filling (every call of the pass runs) | {len(during)} | {_s(_median(during))} "
              f"| {_s(percentile(during, 95))} | {_s(max(during, default=math.nan))} |",
              f"| cache warm, scorer idle ({args.warm} per run, back to back) | {len(warm)} | {_s(_median(warm))} "
              f"| {_s(percentile(warm, 95))} | {_s(max(warm, default=math.nan))} |", ""]

    idle = [x for p in passes for x in p.idle_infer_s]
    busy_s = [x for b in busy for x in b.infer_s]
    ratio = _median(busy_s) / _median(idle) if idle and busy_s else math.nan
    lines += [f"### Inference on {default} ({args.gap_s:g} s between requests)", "",
              "| scorer | inferences | median s | p95 s | max s | images the scorer finished meanwhile |",
              "|---|---|---|---|---|---|",
              f"| idle (pass runs, everything scored) | {len(idle)} | {_s(_median(idle))} | {_s(percentile(idle, 95))} "
              f"| {_s(max(idle, default=math.nan))} | 0 |",
              f"| scoring in the background (busy runs) | {len(busy_s)} | {_s(_median(busy_s))} "
              f"| {_s(percentile(busy_s, 95))} | {_s(max(busy_s, default=math.nan))} "
              f"| {sum(b.scored_meanwhile for b in busy)} |",
              f"| ratio (busy / idle) | | {ratio:.2f}x | | | |", ""]

    worst = max(cold + during + warm, default=math.nan)
    n_calls = len(cold) + len(during) + len(warm)
    ok = math.isfinite(worst) and worst < TARGET_S
    lines += ["### Target (issue 19, item 5)", "", "| target | measured | |", "|---|---|---|",
              f"| `{STRATEGY}` answers within {TARGET_S:g} s once the server is up | first call "
              f"{_s(_median(cold))} s after up (median of {len(cold)}); slowest of all {n_calls} calls"
              f" {_s(worst)} s | {'met' if ok else '**MISSED**'} |", ""]
    errors = [e for p in passes for e in p.errors] + [e for b in busy for e in b.errors]
    if errors:
        lines += ["Problems:", "", *[f"- {e}" for e in errors[:10]], ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="prior_guided",
                        help="detectors whose models/<d>-hippocampus are copied and served, comma-separated, or "
                             "'default' (every models/*-hippocampus with a checkpoint); default prior_guided")
    parser.add_argument("--images", type=int, default=40, help="unlabelled hippocampus images (default 40)")
    parser.add_argument("--runs", type=int, default=3, help="fresh servers of each kind, pass and busy (default 3)")
    parser.add_argument("--poll-s", type=float, default=1.0,
                        help=f"seconds between {STRATEGY} calls while the cache fills (default 1)")
    parser.add_argument("--max-pass-s", type=float, default=900.0,
                        help="give up waiting for every image to be scored after this (default 900)")
    parser.add_argument("--warm", type=int, default=10, help=f"{STRATEGY} calls with the cache warm (default 10)")
    parser.add_argument("--infers", type=int, default=8, help="timed inferences idle and busy per run (default 8)")
    parser.add_argument("--gap-s", type=float, default=1.5, help="seconds between inferences (default 1.5; over "
                        "the scorer's 1 s quiet time, so it resumes between them)")
    parser.add_argument("--threads", type=int, default=1, help="the server's torch threads (default 1)")
    parser.add_argument("--out", help="also write the tables to this markdown file")
    args = parser.parse_args()
    for name in ("images", "runs", "infers"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} {getattr(args, name)} must be at least 1")
    folders = model_folders(args.models)
    cases = unlabelled_cases(args.images)

    def say(message: str) -> None:
        print(f"[bench_active_learning] {message}", file=sys.stderr, flush=True)

    head = (f"`python benchmarks/bench_active_learning.py {' '.join(sys.argv[1:])}` on "
            f"{time.strftime('%Y-%m-%d %H:%M %Z')}: model folders {', '.join(f.name for f in folders)} (copies), "
            f"{args.images} unlabelled hippocampus images, server torch threads {args.threads}, "
            f"machine: {machine()}")
    passes: list[PassRun] = []
    busy: list[BusyRun] = []
    with tempfile.TemporaryDirectory(prefix="lmk3d-al-") as tmp:
        for r in range(args.runs):
            say(f"pass run {r + 1}/{args.runs}")
            passes.append(pass_run(Path(tmp) / f"pass{r}", folders, cases, args, say))
            say(f"busy run {r + 1}/{args.runs}")
            busy.append(busy_run(Path(tmp) / f"busy{r}", folders, cases, args, say))
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    text = report(args, head, passes, busy) + f"\nLoad average at the end: {load}.\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
