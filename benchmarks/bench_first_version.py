"""Own landmarks from zero on the real server: how soon a declared model is first served, and what follows.

    nice -n 5 .venv/bin/python benchmarks/bench_first_version.py
    nice -n 5 .venv/bin/python benchmarks/bench_first_version.py --detector cascade --labels 20 --max-minutes 3 \\
        --runs 3 --out runs/first_version.md

Each run starts a fresh ``lmk3d serve --new-model NAME=DETECTOR`` (``python -m lmk3d.cli serve
--studies DIR --host 127.0.0.1 --port P --models DIR --new-model NAME=DETECTOR``, its own session,
stopped by its process group, torch on ``--threads`` threads) on a temporary studies folder of
``--labels`` hippocampus MR images from ../shared/data with no label and a models folder that is
empty (``--served none``, the default: only the declared model) or holds copies of the shipped
hippocampus models (``--served default``: what ``lmk3d serve`` serves with no ``--models``, whose
background scorer then runs too). The checkout's ``models/`` is never written.

Through REST only, as a user would:

1. ``PUT /datastore/label?image=ID&tag=final`` for every image, a Slicer point list (``.mrk.json``)
   made from the case's row of ``landmarks.csv`` with the landmarks renamed to the user's own names
   (:data:`RENAMED`);
2. ``POST /train/NAME`` with ``{"max_minutes": --max-minutes}``; the clock starts when it answers;
3. every 0.25 s: ``GET /info/`` (is NAME among ``models``? the server starts serving a declared model
   on such a request), ``GET /models/NAME`` (versions, status, validation metrics) and ``GET /train/``;
   as soon as NAME is served, ``POST /infer/NAME?image=ID&output=json`` until it answers 200 with the
   user's landmark names;
4. once the training has ended, one more inference: which version answered.

Prints markdown tables: per run the seconds from ``POST /train`` to the first served version, to an
inference answering 200 with named points, to the declared detector's version and to the gate's
decision (published or rejected), the validation MRE of each version from the registry, medians over
runs, and the issue's target ("the first version is usable within a minute").
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
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench_load import HIPPOCAMPUS, ROOT, _request, machine, stop_server

from lmk3d.io import read_table
from lmk3d.io.markups import write_markups
from lmk3d.landmarks import LandmarkSet

#: The user's own names for the hippocampus landmarks.
RENAMED = {"HIPPO_ANTERIOR_TIP": "ant_tip", "HIPPO_POSTERIOR_TIP": "post_tip",
           "HIPPO_ANTERIOR_CENTROID": "ant_centroid", "HIPPO_POSTERIOR_CENTROID": "post_centroid"}
DETECTORS = ("mean_shape", "prior_guided", "pin", "cascade")
POLL_S = 0.25
TARGET_S = 60.0
# Bounds on a hung server or training, not speed checks.
STARTUP_TIMEOUT_S = 600.0
EXTRA_WAIT_S = 900.0  # after max_minutes: loading, scoring the validation cases, saving


# --- the server -----------------------------------------------------------------------------------
def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(root: Path, cases: Sequence[str], served: str, name: str, detector: str,
          threads: int) -> tuple[subprocess.Popen[bytes], str, Path, float]:
    """Fresh studies (no labels) and models under ``root``; start the server; its process, URL, log, start-up s."""
    from lmk3d.serve import wait_until_ready

    studies, models = root / "studies", root / "models"
    studies.mkdir(parents=True)
    models.mkdir()
    for case in cases:
        shutil.copyfile(HIPPOCAMPUS / "images" / f"{case}.nii.gz", studies / f"{case}.nii.gz")
    if served == "default":
        for checkpoint in sorted((ROOT / "models").glob("*-hippocampus/checkpoint.pt")):
            shutil.copytree(checkpoint.parent, models / checkpoint.parent.name)
    port = _free_port()
    log = root / "server.log"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "MONAI_LABEL_SESSION_PATH": str(root / "sessions"), "XDG_DATA_HOME": str(root / "xdg"),
           "LMK3D_ADMIN_TOKEN": "", "LMK3D_API_TOKEN": ""}
    cmd = [sys.executable, "-m", "lmk3d.cli", "serve", "--studies", str(studies), "--host", "127.0.0.1",
           "--port", str(port), "--models", str(models), "--new-model", f"{name}={detector}"]
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    with log.open("wb") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root,
                                   start_new_session=True)
    try:
        wait_until_ready(url, process, timeout_s=STARTUP_TIMEOUT_S, log_file=log)
    except RuntimeError:
        stop_server(process)
        raise
    return process, url, log, time.perf_counter() - t0


# --- the client -----------------------------------------------------------------------------------
def _multipart(fields: dict[str, tuple[str | None, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for key, (file_name, data) in fields.items():
        disposition = f'form-data; name="{key}"' + (f'; filename="{file_name}"' if file_name is not None else "")
        parts.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def user_label(truth: LandmarkSet) -> LandmarkSet:
    """``truth`` under the user's names (:data:`RENAMED`), the landmarks it has found."""
    return LandmarkSet.from_dict({RENAMED[n]: truth.xyz_mm_ras[i] for i, n in enumerate(truth.names)
                                  if n in RENAMED and bool(truth.found[i])})


def get_json(url: str) -> Any:
    status, raw, _ = _request("GET", url)
    if status != 200:
        raise RuntimeError(f"GET {url}: HTTP {status}: {raw[:300].decode('utf-8', 'replace')}")
    return json.loads(raw)


def infer(url: str, model: str, image: str) -> tuple[int, float, dict[str, Any] | str]:
    """One ``POST /infer``: status, seconds, the JSON answer (or the error text)."""
    body, ctype = _multipart({"params": (None, b"{}")})
    t0 = time.perf_counter()
    status, raw, _ = _request("POST", f"{url}/infer/{model}?image={image}&output=json", body, ctype)
    seconds = time.perf_counter() - t0
    if status != 200:
        return status, seconds, raw[:300].decode("utf-8", "replace")
    return status, seconds, json.loads(raw)


def _version_of(answer: dict[str, Any]) -> str:
    """The registry version whose checkpoint answered (``.../versions/<id>/checkpoint.pt``)."""
    path = Path(str((answer.get("checkpoint") or {}).get("path", "")))
    return path.parent.name if path.parent.parent.name == "versions" else str(path)


@dataclass
class Run:
    startup_s: float
    labels_s: float  # all the PUTs
    label_put_s: list[float]
    served_s: float = math.nan  # POST /train answered -> /info/ lists the model
    infer_ok_s: float = math.nan  # -> an inference answered 200 with the user's names
    first_infer_latency_s: float = math.nan
    first_names: list[str] = field(default_factory=list)
    first_served_version: str = ""
    seen_s: dict[str, float] = field(default_factory=dict)  # version id -> first listed in /models/NAME
    decided_s: dict[str, float] = field(default_factory=dict)  # version id -> status other than candidate
    train_end_s: float = math.nan
    train_status: str = ""
    record: dict[str, Any] = field(default_factory=dict)  # GET /models/NAME at the end
    final_version: str = ""  # the version that answered an inference after the training
    details: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def one_run(root: Path, args: argparse.Namespace, say: Callable[[str], None]) -> Run:
    truth = read_table(HIPPOCAMPUS / "landmarks.csv")
    cases = [c for c in sorted(truth) if (HIPPOCAMPUS / "images" / f"{c}.nii.gz").is_file()][:args.labels]
    if len(cases) < args.labels:
        raise SystemExit(f"--labels {args.labels}: only {len(cases)} labelled hippocampus images")
    expected = list(RENAMED.values())
    process, url, log, startup_s = start(root, cases, args.served, args.name, args.detector, args.threads)
    try:
        info = get_json(f"{url}/info/")
        if args.name not in (info.get("untrained_models") or {}):
            raise SystemExit(f"/info/ does not list {args.name!r} as an untrained model: {list(info)}")
        labels = root / "labels"
        labels.mkdir()
        puts = []
        t0 = time.perf_counter()
        for case in cases:
            path = write_markups(labels / f"{case}.mrk.json", user_label(truth[case]))
            body, ctype = _multipart({"params": (None, b"{}"), "label": (path.name, path.read_bytes())})
            t = time.perf_counter()
            status, raw, _ = _request("PUT", f"{url}/datastore/label?image={case}&tag=final", body, ctype)
            puts.append(time.perf_counter() - t)
            if status != 200:
                raise SystemExit(f"PUT label {case}: HTTP {status}: {raw[:300].decode('utf-8', 'replace')}")
        run = Run(startup_s, time.perf_counter() - t0, puts)
        say(f"server up in {startup_s:.1f} s; {len(cases)} labels saved in {run.labels_s:.1f} s; training")

        status, raw, _ = _request("POST", f"{url}/train/{args.name}",
                                  json.dumps({"max_minutes": args.max_minutes}).encode(), "application/json")
        if status != 200:
            raise SystemExit(f"POST /train/{args.name}: HTTP {status}: {raw[:300].decode('utf-8', 'replace')}")
        task_id = json.loads(raw).get("id")
        t_train = time.perf_counter()
        deadline = t_train + args.max_minutes * 60.0 + EXTRA_WAIT_S
        while time.perf_counter() < deadline:
            now = time.perf_counter() - t_train
            info = get_json(f"{url}/info/")
            if math.isnan(run.served_s) and args.name in (info.get("models") or {}):
                run.served_s = now
                say(f"served {now:.1f} s after POST /train")
            if not math.isnan(run.served_s) and math.isnan(run.infer_ok_s):
                code, seconds, answer = infer(url, args.name, cases[-1])
                if code == 200 and isinstance(answer, dict):
                    names = [lm["name"] for lm in answer.get("landmarks", [])]
                    if sorted(names) == sorted(expected):
                        run.infer_ok_s = time.perf_counter() - t_train
                        run.first_infer_latency_s, run.first_names = seconds, names
                        run.first_served_version = _version_of(answer)
                        say(f"inference 200 with {', '.join(names)} {run.infer_ok_s:.1f} s after POST /train "
                            f"(version {run.first_served_version})")
                    else:
                        run.errors.append(f"inference answered names {names}, not {expected}")
                else:
                    run.errors.append(f"inference on the served model: HTTP {code}: {answer}")
            record = get_json(f"{url}/models/{args.name}")
            for v in record.get("versions", []):
                run.seen_s.setdefault(v["id"], now)
                if v["status"] != "candidate" and v["id"] not in run.decided_s:
                    run.decided_s[v["id"]] = now
                    say(f"{v['id']} ({v['detector']}) {v['status']} {now:.1f} s after POST /train")
            state = get_json(f"{url}/train/")
            if state.get("id") == task_id and state.get("status") not in ("SUBMITTED", "RUNNING"):
                run.train_end_s, run.train_status = now, str(state.get("status"))
                run.details = [str(line) for line in state.get("details", [])]
                break
            time.sleep(POLL_S)
        else:
            run.errors.append(f"the training had not ended {EXTRA_WAIT_S:.0f} s after its max_minutes")
        run.record = get_json(f"{url}/models/{args.name}")
        code, _, answer = infer(url, args.name, cases[0])
        if code == 200 and isinstance(answer, dict):
            run.final_version = _version_of(answer)
        else:
            run.errors.append(f"inference after the training: HTTP {code}: {answer}")
        say(f"training {run.train_status} {run.train_end_s:.1f} s after POST /train; served {run.final_version}")
    except BaseException:
        say("the server's last log lines:\n" + "\n".join(log.read_text(errors="replace").splitlines()[-30:]))
        raise
    finally:
        stop_server(process)
    return run


# --- the report -----------------------------------------------------------------------------------
def _s(value: float, digits: int = 1) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.{digits}f}"


def _median(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def _mre(version: dict[str, Any] | None) -> float:
    value = ((version or {}).get("metrics") or {}).get("val_mre_mm")
    return float(value) if isinstance(value, int | float) else math.nan


def _versions(run: Run) -> dict[str, dict[str, Any]]:
    return {v["id"]: v for v in run.record.get("versions", [])}


def report(args: argparse.Namespace, head: str, runs: list[Run]) -> str:
    lines = [head, ""]
    lines += ["### Seconds after `POST /train` answered", "",
              "| run | server start s | labels saved s | first version served (`/info/`) | inference 200, named "
              "points | its latency s | v0002 added | v0002 decided | training ended | v0002 |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(runs, 1):
        v2 = _versions(r).get("v0002", {})
        lines.append(f"| {i} | {_s(r.startup_s)} | {_s(r.labels_s)} | {_s(r.served_s)} | {_s(r.infer_ok_s)} "
                     f"| {_s(r.first_infer_latency_s, 3)} | {_s(r.seen_s.get('v0002', math.nan))} "
                     f"| {_s(r.decided_s.get('v0002', math.nan))} | {_s(r.train_end_s)} ({r.train_status}) "
                     f"| {v2.get('detector', '-')} {v2.get('status', 'none')} |")
    lines += [f"| **median** | {_s(_median([r.startup_s for r in runs]))} | {_s(_median([r.labels_s for r in runs]))} "
              f"| **{_s(_median([r.served_s for r in runs]))}** | **{_s(_median([r.infer_ok_s for r in runs]))}** "
              f"| {_s(_median([r.first_infer_latency_s for r in runs]), 3)} "
              f"| {_s(_median([r.seen_s.get('v0002', math.nan) for r in runs]))} "
              f"| {_s(_median([r.decided_s.get('v0002', math.nan) for r in runs]))} "
              f"| {_s(_median([r.train_end_s for r in runs]))} | |", ""]

    lines += ["### Versions (from `GET /models/NAME` after the training)", "",
              "| run | version | detector | status | validation MRE mm | found | validation cases | decision |",
              "|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(runs, 1):
        for vid, v in _versions(r).items():
            m = v.get("metrics") or {}
            found = m.get("val_found")
            reason = str((v.get("decision") or {}).get("reason", "")).replace("|", "/")
            lines.append(f"| {i} | {vid} | {v.get('detector')} | {v.get('status')} | {_s(_mre(v), 2)} "
                         f"| {'n/a' if found is None else f'{float(found):.2f}'} | {m.get('n_val', 'n/a')} "
                         f"| {reason} |")
    lines.append("")
    lines += [f"Served after the training (the version that answered an inference): "
              f"{', '.join(r.final_version or '?' for r in runs)}.", ""]

    served = [r.infer_ok_s for r in runs]
    ok = all(math.isfinite(v) and v < TARGET_S for v in served)
    v2_by = [r.decided_s.get("v0002", math.nan) for r in runs]
    lines += ["### Targets (issue 19, item 1)", "", "| target | measured | |", "|---|---|---|",
              f"| the first version is usable within a minute | `POST /train` to an inference with the user's "
              f"names: {', '.join(_s(v) for v in served)} s | {'met' if ok else '**MISSED**'} |",
              f"| the declared detector follows within the budget ({args.max_minutes:g} min) | v0002 decided after "
              f"{', '.join(_s(v) for v in v2_by)} s | "
              f"{'met' if all(math.isfinite(v) and v <= args.max_minutes * 60 for v in v2_by) else '**MISSED**'} |",
              ""]
    errors = [e for r in runs for e in r.errors]
    if errors:
        lines += ["Problems:", "", *[f"- {e}" for e in errors[:10]], ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="skull", help="the declared model's name (default skull)")
    parser.add_argument("--detector", default="cascade", choices=DETECTORS, help="its detector (default cascade)")
    parser.add_argument("--labels", type=int, default=20, help="hippocampus images labelled through REST (default 20)")
    parser.add_argument("--max-minutes", type=float, default=3.0, help="the training's max_minutes (default 3)")
    parser.add_argument("--served", choices=("none", "default"), default="none",
                        help="shipped models served besides the declared one: none (default) or default (copies "
                             "of every models/*-hippocampus)")
    parser.add_argument("--runs", type=int, default=3, help="fresh servers (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="the server's torch threads (default 1)")
    parser.add_argument("--out", help="also write the tables to this markdown file")
    args = parser.parse_args()
    if args.labels < 2 or args.runs < 1 or not args.max_minutes > 0:
        parser.error("--labels must be at least 2, --runs at least 1 and --max-minutes positive")

    def say(message: str) -> None:
        print(f"[bench_first_version] {message}", file=sys.stderr, flush=True)

    head = (f"`python benchmarks/bench_first_version.py {' '.join(sys.argv[1:])}` on "
            f"{time.strftime('%Y-%m-%d %H:%M %Z')}: `--new-model {args.name}={args.detector}`, {args.labels} "
            f"hippocampus images labelled through REST with the user's names, `max_minutes` {args.max_minutes:g}, "
            f"other served models: {args.served}, server torch threads {args.threads}, machine: {machine()}")
    runs = []
    with tempfile.TemporaryDirectory(prefix="lmk3d-first-") as tmp:
        for r in range(args.runs):
            say(f"run {r + 1}/{args.runs}")
            runs.append(one_run(Path(tmp) / f"run{r}", args, say))
            for line in [d for d in runs[-1].details if "it/s" not in d][-8:]:  # no progress bar lines
                say(f"  train: {line}")
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    text = report(args, head, runs) + f"\nLoad average at the end: {load}.\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
