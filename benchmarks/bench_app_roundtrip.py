"""Warm MONAI Label round trip per served model, and its overhead over the library's own predict.

For every model the app serves, on a real image (a hippocampus MR) and on a 512 x 512 x 200 CT-like
phantom (when ``lmk3d.data.phantoms`` is there), this measures

- ``library``: ``read_image`` + ``Detector.predict_all`` in this process (what ``lmk3d predict`` does
  per image, minus writing);
- ``server json``: ``POST /infer/<model>?image=ID&output=json`` with ``result_write_to_file: false``
  (no result file is made) on a warm server (the model loaded and one request already answered),
  from request to parsed answer;
- ``server label``: the same with ``output=image`` and ``landmark_output=label`` (the sphere label map
  is drawn, written and sent);

each the median of ``--repeats`` runs, and prints a table (also written to ``--out``). The overhead is
``server json - library``: HTTP, the datastore look-up, MONAI Label's request handling and the JSON.
The detectors run on their input whatever it is: a hippocampus model on the CT phantom measures speed,
not accuracy.

When ``--models`` holds no trained model, every registered detector's ``tiny`` profile is trained for
at most 20 s into a temporary folder and served, so the round trip can still be measured; the page
says so.

Example::

    .venv/bin/python benchmarks/bench_app_roundtrip.py --repeats 5 --out runs/benchmarks_app.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LMK3D_SHARED", ROOT.parent / "shared")).resolve()
HIPPOCAMPUS = SHARED / "data" / "hippocampus"
REAL_CASE = "hippocampus_004"
PHANTOM_CASE = "phantom_512x512x200"
HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _post(url: str, params: dict[str, Any]) -> bytes:
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="params"\r\n\r\n{json.dumps(params)}\r\n'
            f"--{boundary}--\r\n").encode()
    req = urllib.request.Request(url, data=body, method="POST")
    req.add_header("Content-Type", f"multipart/form-data; boundary={boundary}")
    with HTTP.open(req, timeout=1800) as r:
        return bytes(r.read())


def _studies(folder: Path, phantom: bool) -> dict[str, tuple[int, int, int]]:
    """Write the benchmark images; return ``{image id: shape}``."""
    from lmk3d.io import read_image

    folder.mkdir(parents=True, exist_ok=True)
    src = HIPPOCAMPUS / "images" / f"{REAL_CASE}.nii.gz"
    (folder / src.name).write_bytes(src.read_bytes())
    shapes = {REAL_CASE: read_image(src).shape}
    if phantom:
        try:
            from lmk3d.data.phantoms import PROFILES, make_phantom
        except ImportError:
            print("lmk3d.data.phantoms is not there: real image only", file=sys.stderr)
            return shapes
        from lmk3d.io import write_image

        ph = make_phantom(0, 0, dataclasses.replace(PROFILES["clinical"], size=(512, 512, 200)))
        write_image(folder / f"{PHANTOM_CASE}.nii.gz", ph.volume)
        shapes[PHANTOM_CASE] = ph.volume.shape
    return shapes


def _fallback_models(models: Path) -> str:
    """Train every registered detector's smallest profile briefly into ``models``; say what was done."""
    from lmk3d.data.samples import Sample
    from lmk3d.detectors import detector_class, detector_names
    from lmk3d.io import read_table

    truth = read_table(HIPPOCAMPUS / "landmarks.csv")
    cases = [c for c in sorted(truth) if c != REAL_CASE][:8]
    samples = [Sample(c, HIPPOCAMPUS / "images" / f"{c}.nii.gz", truth[c]) for c in cases]
    done = []
    for name in detector_names():
        cls = detector_class(name)
        profile = "tiny" if "tiny" in cls.profiles else next(iter(cls.profiles))
        det = cls.create(truth[cases[0]].names, profile=profile)
        det.fit(samples[:6], samples[6:], seed=0, max_minutes=0.3, progress=False)
        det.save(models / f"{name}-hippocampus")
        done.append(f"{name} ({profile})")
    return (f"{', '.join(done)}, each trained for at most 20 s on {len(samples[:6])} hippocampus cases for this "
            "benchmark: the speeds are those of these profiles, the accuracy means nothing")


def run(args: argparse.Namespace) -> str:
    import torch

    from lmk3d.detectors import load_detector
    from lmk3d.io import read_image
    from lmk3d.serve import start_server, stop_server, wait_until_ready

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench_app_"))
    studies = work / "studies"
    shapes = _studies(studies, not args.no_phantom)
    models = Path(args.models).resolve()
    note = ""
    if not any(models.glob(f"*-{args.dataset}/checkpoint.pt")):
        models = work / "models"
        note = f"No trained model in {args.models}: served {_fallback_models(models)}."

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = work / "server.log"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MONAI_LABEL_SESSION_PATH": str(work / "sessions")}
    with log.open("wb") as out:
        process = start_server(studies, port=port, models_dir=models, conf=[("dataset", args.dataset)], env=env,
                               stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    rows = []
    try:
        info = wait_until_ready(url, process, timeout_s=900, log_file=log)
        served = sorted(info["models"])
        if not served:
            raise SystemExit(f"the server serves no model: {info.get('unavailable_models')}")
        for model in served:
            detector = load_detector(models / f"{model}-{args.dataset}")
            for case, shape in shapes.items():
                path = studies / f"{case}.nii.gz"

                def library(p: Path = path, d: Any = detector) -> Any:
                    return d.predict_all(read_image(p))

                def server_json(m: str = model, c: str = case) -> Any:
                    return json.loads(_post(f"{url}/infer/{m}?image={c}&output=json", {"result_write_to_file": False}))

                def server_label(m: str = model, c: str = case) -> Any:
                    return _post(f"{url}/infer/{m}?image={c}&output=image", {"landmark_output": "label"})

                library()
                server_json()  # warm: the first request pays for lazy imports and caches
                # Interleaved, so that the load of other processes on the machine hits all three alike.
                times: dict[str, list[float]] = {"library": [], "json": [], "label": []}
                answers: dict[str, Any] = {}
                for _ in range(args.repeats):
                    for key, fn in (("library", library), ("json", server_json), ("label", server_label)):
                        t0 = time.perf_counter()
                        answers[key] = fn()
                        times[key].append(time.perf_counter() - t0)
                t_lib, t_json, t_label = (statistics.median(times[k]) for k in ("library", "json", "label"))
                lat = answers["json"]["latencies"]
                stages = {k: v for k, v in lat.items() if k not in ("load", "write", "total")}
                label_write = json.loads(_post(f"{url}/infer/{model}?image={case}&output=json",
                                               {"landmark_output": "label"}))["latencies"]["write"]
                rows.append({
                    "model": model, "image": case, "shape": "x".join(map(str, shape)), "library": t_lib,
                    "json": t_json, "label": t_label, "overhead": t_json - t_lib, "label_write": label_write,
                    "server_load": lat["load"], "stages": " + ".join(f"{k} {v:.3f}" for k, v in stages.items()),
                })
                print(f"{model} {case}: library {t_lib:.3f} s, server json {t_json:.3f} s, label {t_label:.3f} s",
                      flush=True)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
        stop_server(process)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    unavailable = info.get("unavailable_models", {})
    if unavailable:
        # The first clause of each reason ("no checkpoint at ...", "loading failed (...)") is enough here.
        reasons = "; ".join(f"{k} ({v.split(';')[0].splitlines()[0]})" for k, v in unavailable.items())
        note = f"{note} Not served: {reasons}.".strip()
    return _report(rows, args, note)


def _report(rows: list[dict[str, Any]], args: argparse.Namespace, note: str) -> str:
    head = ("| model | image | shape | library read+predict (s) | server json (s) | overhead (s) | "
            "server label file (s) | server-side read (s) | server-side stages (s) | label drawn+written (s) |\n"
            "|---|---|---|---:|---:|---:|---:|---:|---|---:|\n")
    body = "".join(
        f"| {r['model']} | {r['image']} | {r['shape']} | {r['library']:.3f} | {r['json']:.3f} | "
        f"{r['overhead']:+.3f} ({100 * r['overhead'] / max(r['library'], 1e-9):+.0f}%) | {r['label']:.3f} | "
        f"{r['server_load']:.3f} | {r['stages']} | {r['label_write']:.3f} |\n" for r in rows)
    cmd = "python benchmarks/bench_app_roundtrip.py " + " ".join(sys.argv[1:])
    summary = ""
    if rows:
        over = sorted(r["overhead"] for r in rows)
        big = [r for r in rows if r["image"] == PHANTOM_CASE]
        summary = (f"Overhead of a warm JSON round trip over the library: median {statistics.median(over):+.3f} s "
                   f"(from {over[0]:+.3f} to {over[-1]:+.3f} s; differences of a few tenths of a second are within "
                   "the noise of a shared machine).")
        if big:
            share = statistics.median(r["label_write"] / max(r["label"], 1e-9) for r in big)
            summary += (f" On the 512 x 512 x 200 phantom, drawing and writing the sphere label map takes "
                        f"{statistics.median(r['label_write'] for r in big):.1f} s (median), {share:.0%} of a "
                        "label round trip: a JSON-only client should send `result_write_to_file: false`.")
        summary += "\n\n"
    return (
        "# MONAI Label round trip\n\n"
        f"Made by `{cmd.strip()}` on {datetime.now():%Y-%m-%d}: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch on {args.threads} thread(s), {_device()}; "
        f"median of {args.repeats} warm requests per cell. {note}\n\n"
        "- *library*: `read_image` + `Detector.predict_all` in one process (no writing).\n"
        "- *server json*: `POST /infer/<model>?image=ID&output=json` with `result_write_to_file: false` (no "
        "result file), from request to parsed answer; the "
        "*overhead* is this minus *library* (HTTP, MONAI Label's request handling, the datastore look-up, "
        "the JSON).\n"
        "- *server label file*: `output=image` with `landmark_output=label` (the sphere label map drawn on "
        "the input grid, written and sent).\n"
        "- The server-side columns are the answer's own `latencies`; *label drawn+written* is its `write` "
        "latency with `landmark_output=label` (the part of *server label file* spent on the label map).\n"
        "- Other processes may have been running on the machine: compare rows of one run, not runs.\n\n"
        + summary + head + body
    )


def _device() -> str:
    import torch

    return f"GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--models", default=str(ROOT / "models"), help="folder of <detector>-<dataset>/checkpoint.pt")
    p.add_argument("--dataset", default="hippocampus", help="which trained models to serve (default hippocampus)")
    p.add_argument("--repeats", type=int, default=5, help="timed requests per cell (default 5)")
    p.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)),
                   help="torch threads, in the server and here (default: up to 2)")
    p.add_argument("--no-phantom", action="store_true", help="real image only")
    p.add_argument("--out", default=None, help="also write the table to this Markdown file")
    p.add_argument("--keep", action="store_true", help="keep the temporary studies/models folder")
    args = p.parse_args(argv)
    text = run(args)
    print(text)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
