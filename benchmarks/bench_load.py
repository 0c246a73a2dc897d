"""Load on the real server: sequential inferences, many in flight, and inference while a training runs.

    .venv/bin/python benchmarks/bench_load.py
    .venv/bin/python benchmarks/bench_load.py --model cascade --requests 100 --concurrency 20 --out runs/load.md

Starts ``lmk3d serve`` (``python -m lmk3d.cli serve --studies DIR --host 127.0.0.1 --port P --models DIR``,
in its own session, stopped by its process group) on a temporary studies folder of ``--images`` real
hippocampus MR images from ../shared/data, each with its final label (``labels/final/<id>.mrk.json``
from ``landmarks.csv``) so that a training has something to learn from. The served model folder is a
temporary copy of ``models/<model>-hippocampus``: the training scenario publishes into it, never into
the checkout. The server's torch runs on ``--threads`` threads (``OMP_NUM_THREADS``).

Every inference is ``POST /infer/<model>?image=ID&output=json`` (images taken in turn), timed on the
client from request to parsed answer. A ``503`` is the server saying its queue is full: the client
waits ``Retry-After`` seconds and sends the request again; the request's latency then includes the
waits. A ``503`` without ``Retry-After``, any other status, or a failed connection is an error.
Meanwhile a separate thread asks ``GET /info/`` every 0.2 s: what a viewer sees while others work.

Scenarios, one markdown table each (all in one run, so the ratios compare like with like):

- ``sequential``: ``--sequential`` inferences one after another (after two warm-up requests):
  median latency and throughput;
- ``in flight``: ``--requests`` inferences from ``--concurrency`` client threads: p50/p95 latency,
  throughput and its ratio to sequential, answers by status;
- ``during training``: the idle median (``--sequential`` inferences just before), then
  ``POST /train/<model>`` with ``{"max_minutes": --train-minutes}`` and inferences one after another
  while ``GET /train/`` says RUNNING (a request counts only when training ran from its start to its end);

plus the ``/info/`` poll latencies during each scenario, and the issue's targets (``/info/`` p95 under
1 s with requests in flight, throughput at least sequential's, inference during training at most
twice its idle time) with the measured numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LMK3D_SHARED", ROOT.parent / "shared")).resolve()
HIPPOCAMPUS = SHARED / "data" / "hippocampus"
HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))
INFO_PERIOD_S = 0.2
# Bounds on a hung server, not speed checks.
STARTUP_TIMEOUT_S = 600.0
REQUEST_TIMEOUT_S = 1800.0


# --- the server -----------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_studies(folder: Path, n_images: int) -> list[str]:
    """Copy the first ``n_images`` labelled hippocampus images and write their final labels; return the ids."""
    from lmk3d.io import read_table, write_landmarks

    truth = read_table(HIPPOCAMPUS / "landmarks.csv")
    cases = [c for c in sorted(truth) if (HIPPOCAMPUS / "images" / f"{c}.nii.gz").is_file()][:n_images]
    final = folder / "labels" / "final"
    final.mkdir(parents=True)
    for case in cases:
        shutil.copyfile(HIPPOCAMPUS / "images" / f"{case}.nii.gz", folder / f"{case}.nii.gz")
        write_landmarks(final / f"{case}.mrk.json", truth[case])
    return cases


def start_server(root: Path, studies: Path, models: Path, threads: int,
                 extra_args: Sequence[str]) -> tuple[subprocess.Popen[bytes], str, Path]:
    """Start ``lmk3d serve`` in a new session; return the process, its URL and its log file."""
    from lmk3d.serve import wait_until_ready

    port = _free_port()
    log = root / "server.log"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "MONAI_LABEL_SESSION_PATH": str(root / "sessions")}
    cmd = [sys.executable, "-m", "lmk3d.cli", "serve", "--studies", str(studies), "--host", "127.0.0.1",
           "--port", str(port), "--models", str(models), *extra_args]
    with log.open("wb") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root,
                                   start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, process, timeout_s=STARTUP_TIMEOUT_S, log_file=log)
    except RuntimeError:
        stop_server(process)
        raise
    return process, url, log


def stop_server(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server's process group (the wrapper, monailabel, a training child), SIGKILL after 60 s."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


# --- the client -----------------------------------------------------------------------------------
@dataclass
class Outcome:
    """One logical request: its latency (retries and their waits included) and how it was answered."""

    seconds: float
    status: int  # final status; 0 for a failed connection
    retries_503: int = 0
    error: str = ""


def _request(method: str, url: str, body: bytes | None = None,
             content_type: str | None = None) -> tuple[int, bytes, dict[str, str]]:
    req = urllib.request.Request(url, data=body, method=method)
    if content_type:
        req.add_header("Content-Type", content_type)
    try:
        with HTTP.open(req, timeout=REQUEST_TIMEOUT_S) as r:
            return r.status, r.read(), {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        return e.code, e.read(), {k.lower(): v for k, v in e.headers.items()}


def _infer_body() -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="params"\r\n\r\n{{}}\r\n'
            f"--{boundary}--\r\n").encode()
    return body, f"multipart/form-data; boundary={boundary}"


def infer(url: str, model: str, image: str) -> Outcome:
    """One inference, sent again after ``Retry-After`` seconds while the server answers 503."""
    body, ctype = _infer_body()
    retries = 0
    t0 = time.perf_counter()
    while True:
        try:
            status, raw, headers = _request("POST", f"{url}/infer/{model}?image={image}&output=json", body, ctype)
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
            return Outcome(time.perf_counter() - t0, 0, retries, f"connection: {e}")
        if status == 503:
            wait = headers.get("retry-after")
            try:
                wait_s = float(wait) if wait is not None else math.nan
            except ValueError:
                wait_s = math.nan
            if not math.isfinite(wait_s) or wait_s < 0:
                return Outcome(time.perf_counter() - t0, 503, retries, f"503 with Retry-After {wait!r}")
            retries += 1
            time.sleep(wait_s)
            continue
        seconds = time.perf_counter() - t0
        if status != 200:
            return Outcome(seconds, status, retries, raw[:300].decode("utf-8", "replace"))
        try:
            json.loads(raw)
        except ValueError:
            return Outcome(seconds, status, retries, "200 with a body that is not JSON")
        return Outcome(seconds, status, retries)


class InfoPoller:
    """``GET /info/`` every :data:`INFO_PERIOD_S` seconds in a thread; each answer's latency (s) in ``seconds``."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.seconds: list[float] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> InfoPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.perf_counter()
            try:
                status, _, _ = _request("GET", f"{self.url}/info/")
                if status != 200:
                    self.errors.append(f"HTTP {status}")
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
                self.errors.append(str(e))
            self.seconds.append(time.perf_counter() - t0)
            self._stop.wait(INFO_PERIOD_S)


# --- statistics -----------------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), linear between order statistics; NaN for no values."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _s(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.3f}"


@dataclass
class Run:
    """Inferences of one scenario and the ``/info/`` latencies measured meanwhile."""

    outcomes: list[Outcome]
    wall_s: float
    info_s: list[float]
    info_errors: list[str] = field(default_factory=list)

    @property
    def ok_seconds(self) -> list[float]:
        return [o.seconds for o in self.outcomes if o.status == 200 and not o.error]

    @property
    def throughput(self) -> float:
        return len(self.ok_seconds) / self.wall_s if self.wall_s > 0 else math.nan

    @property
    def errors(self) -> list[str]:
        return [o.error for o in self.outcomes if o.error]


def sequential(url: str, model: str, images: Sequence[str], n: int) -> Run:
    with InfoPoller(url) as poller:
        t0 = time.perf_counter()
        outcomes = [infer(url, model, images[i % len(images)]) for i in range(n)]
        wall = time.perf_counter() - t0
    return Run(outcomes, wall, poller.seconds, poller.errors)


def in_flight(url: str, model: str, images: Sequence[str], n: int, concurrency: int) -> Run:
    """``n`` inferences from ``concurrency`` threads, each taking the next request number until none is left."""
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    counter = iter(range(n))

    def client() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            o = infer(url, model, images[i % len(images)])
            with lock:
                outcomes.append(o)

    with InfoPoller(url) as poller:
        threads = [threading.Thread(target=client) for _ in range(concurrency)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    return Run(outcomes, wall, poller.seconds, poller.errors)


@dataclass
class TrainingRun:
    during: Run
    final_status: str
    train_s: float
    answer: str


def during_training(url: str, model: str, images: Sequence[str], minutes: float,
                    say: Callable[[str], None]) -> TrainingRun:
    """Start a training and infer one request after another while ``GET /train/`` says RUNNING."""
    status, raw, _ = _request("POST", f"{url}/train/{model}", json.dumps({"max_minutes": minutes}).encode(),
                              "application/json")
    answer = raw[:300].decode("utf-8", "replace")
    if status != 200:
        return TrainingRun(Run([], 0.0, []), f"HTTP {status}", 0.0, answer)
    state = {"status": "SUBMITTED"}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            try:
                s, body, _ = _request("GET", f"{url}/train/")
                if s == 200:
                    info = json.loads(body)
                    state["status"] = str(info.get("status", "?")) if isinstance(info, dict) else "?"
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError, ValueError):
                pass
            if state["status"] not in ("SUBMITTED", "RUNNING"):
                done.set()
            done.wait(0.5)

    t0 = time.perf_counter()
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    while state["status"] == "SUBMITTED" and not done.is_set():
        time.sleep(0.1)
    say(f"training {state['status']}; inferring while it runs")
    outcomes = []
    i = 0
    with InfoPoller(url) as poller:
        t_inf = time.perf_counter()
        while not done.is_set():
            running_before = state["status"] == "RUNNING"
            o = infer(url, model, images[i % len(images)])
            i += 1
            if running_before and state["status"] == "RUNNING":
                outcomes.append(o)
        wall = time.perf_counter() - t_inf
    watcher.join()
    return TrainingRun(Run(outcomes, wall, poller.seconds, poller.errors), state["status"],
                       time.perf_counter() - t0, answer)


# --- the report -----------------------------------------------------------------------------------
def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, load average at start {load}"


def _target(ok: bool) -> str:
    return "met" if ok else "**MISSED**"


def report(args: argparse.Namespace, seq: Run, par: Run, idle: Run, train: TrainingRun, head: str) -> str:
    lines = [head, ""]
    seq_med = statistics.median(seq.ok_seconds) if seq.ok_seconds else math.nan
    lines += ["### Sequential", "",
              "| requests | ok | median s | min s | max s | throughput req/s | errors |",
              "|---|---|---|---|---|---|---|",
              f"| {len(seq.outcomes)} | {len(seq.ok_seconds)} | {_s(seq_med)} "
              f"| {_s(min(seq.ok_seconds, default=math.nan))} "
              f"| {_s(max(seq.ok_seconds, default=math.nan))} | {seq.throughput:.2f} | {len(seq.errors)} |", ""]

    ratio = par.throughput / seq.throughput if seq.throughput > 0 else math.nan
    n503 = sum(o.retries_503 for o in par.outcomes)
    lines += [f"### {args.concurrency} in flight", "",
              "| requests | client threads | p50 s | p95 s | max s | throughput req/s | vs sequential | 200 "
              "| 503 answers (retried) | errors |",
              "|---|---|---|---|---|---|---|---|---|---|",
              f"| {len(par.outcomes)} | {args.concurrency} | {_s(percentile(par.ok_seconds, 50))} "
              f"| {_s(percentile(par.ok_seconds, 95))} | {_s(max(par.ok_seconds, default=math.nan))} "
              f"| {par.throughput:.2f} | {ratio:.2f}x | {len(par.ok_seconds)} | {n503} | {len(par.errors)} |", ""]

    idle_med = statistics.median(idle.ok_seconds) if idle.ok_seconds else math.nan
    busy_med = statistics.median(train.during.ok_seconds) if train.during.ok_seconds else math.nan
    slow = busy_med / idle_med if idle_med > 0 else math.nan
    lines += ["### Inference during training", "",
              f"Training: `POST /train/{args.model}` with `{{\"max_minutes\": {args.train_minutes:g}}}`, "
              f"ended {train.final_status} after {train.train_s:.0f} s.", "",
              "| when | requests | median s | p95 s | max s | errors |",
              "|---|---|---|---|---|---|",
              f"| idle (just before) | {len(idle.outcomes)} | {_s(idle_med)} | {_s(percentile(idle.ok_seconds, 95))} "
              f"| {_s(max(idle.ok_seconds, default=math.nan))} | {len(idle.errors)} |",
              f"| training RUNNING | {len(train.during.outcomes)} | {_s(busy_med)} "
              f"| {_s(percentile(train.during.ok_seconds, 95))} "
              f"| {_s(max(train.during.ok_seconds, default=math.nan))} | {len(train.during.errors)} |",
              f"| ratio (training / idle) | | {slow:.2f}x | | | |", ""]

    lines += [f"### `GET /info/` every {INFO_PERIOD_S:g} s meanwhile", "",
              "| during | polls | p50 s | p95 s | max s | errors |", "|---|---|---|---|---|---|"]
    for name, r in (("sequential", seq), (f"{args.concurrency} in flight", par), ("idle (before training)", idle),
                    ("training", train.during)):
        lines.append(f"| {name} | {len(r.info_s)} | {_s(percentile(r.info_s, 50))} | {_s(percentile(r.info_s, 95))} "
                     f"| {_s(max(r.info_s, default=math.nan))} | {len(r.info_errors)} |")
    lines.append("")

    info_p95 = percentile(par.info_s, 95)
    lines += ["### Targets (issue 17)", "",
              "| target | measured | |", "|---|---|---|",
              f"| `/info/` p95 < 1 s with {args.concurrency} in flight | {_s(info_p95)} s "
              f"| {_target(info_p95 < 1.0)} |",
              f"| throughput with {args.concurrency} in flight >= sequential | {ratio:.2f}x | "
              f"{_target(ratio >= 1.0)} |",
              f"| inference during training <= 2x idle (median) | {slow:.2f}x | {_target(slow <= 2.0)} |",
              f"| no errors | {len(seq.errors) + len(par.errors) + len(idle.errors) + len(train.during.errors)} "
              f"| {_target(not (seq.errors or par.errors or idle.errors or train.during.errors))} |", ""]
    errors = seq.errors + par.errors + idle.errors + train.during.errors
    if errors:
        lines += ["First errors:", "", *[f"- {e}" for e in errors[:5]], ""]
    if train.final_status != "DONE":
        lines += [f"The training did not end DONE ({train.final_status}); its answer: `{train.answer}`", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="prior_guided", help="served detector (default prior_guided); "
                        "models/<model>-hippocampus is copied to a temporary folder and served from there")
    parser.add_argument("--requests", type=int, default=100, help="inferences in the in-flight scenario (default 100)")
    parser.add_argument("--concurrency", type=int, default=20, help="client threads in flight (default 20)")
    parser.add_argument("--sequential", type=int, default=20,
                        help="inferences in the sequential and idle scenarios (default 20)")
    parser.add_argument("--threads", type=int, default=1, help="the server's torch threads, OMP_NUM_THREADS "
                        "(default 1)")
    parser.add_argument("--images", type=int, default=8, help="hippocampus images in the studies folder (default 8)")
    parser.add_argument("--train-minutes", type=float, default=1.0, help="max_minutes of the training (default 1)")
    parser.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for lmk3d serve, repeatable (e.g. --server-arg=--infer-workers=2)")
    parser.add_argument("--out", help="also write the tables to this markdown file")
    args = parser.parse_args()
    for name in ("requests", "concurrency", "sequential", "threads", "images"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} {getattr(args, name)} must be at least 1")
    if not args.train_minutes > 0:
        parser.error(f"--train-minutes {args.train_minutes} must be positive")
    source = ROOT / "models" / f"{args.model}-hippocampus"
    if not (source / "checkpoint.pt").is_file():
        parser.error(f"no shipped model {source.relative_to(ROOT)}/checkpoint.pt; choose a detector with one")

    def say(message: str) -> None:
        print(f"[bench_load] {message}", file=sys.stderr, flush=True)

    head = (f"`python benchmarks/bench_load.py {' '.join(sys.argv[1:])}`: model {args.model} "
            f"(a copy of models/{args.model}-hippocampus), {args.images} hippocampus images, server torch threads "
            f"{args.threads}, machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="lmk3d-load-") as tmp:
        root = Path(tmp)
        models = root / "models"
        shutil.copytree(source, models / source.name)
        images = make_studies(root / "studies", args.images)
        say("starting the server")
        process, url, log = start_server(root, root / "studies", models, args.threads, args.server_arg)
        try:
            for i in range(2):  # warm-up: first-request costs are not what this measures
                w = infer(url, args.model, images[i % len(images)])
                if w.error:
                    raise SystemExit(f"warm-up inference failed: HTTP {w.status}: {w.error}")
            say(f"sequential: {args.sequential} inferences")
            seq = sequential(url, args.model, images, args.sequential)
            say(f"in flight: {args.requests} inferences from {args.concurrency} threads")
            par = in_flight(url, args.model, images, args.requests, args.concurrency)
            say(f"idle: {args.sequential} inferences")
            idle = sequential(url, args.model, images, args.sequential)
            say(f"training for at most {args.train_minutes:g} min")
            train = during_training(url, args.model, images, args.train_minutes, say)
        except BaseException:
            tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-40:]
            say("the server's last log lines:\n" + "\n".join(tail))
            raise
        finally:
            stop_server(process)
    text = report(args, seq, par, idle, train, head)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
