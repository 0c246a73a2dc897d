"""Time from the REST call to the SR stored in the PACS, per step, for the 192-slice oblique MPRAGE.

Run it inside the test PACS's network namespace (the PACS is reachable only there)::

    export LMK3D_PACS_USER=lmk3d LMK3D_PACS_PASSWORD=$(openssl rand -hex 12)
    scripts/test_pacs.sh start
    scripts/test_pacs.sh exec .venv/bin/python benchmarks/bench_pacs_roundtrip.py --repeats 3
    scripts/test_pacs.sh stop

It starts ``lmk3d serve --studies http://127.0.0.1:8042/dicom-web`` (the shipped
``models/mean_shape-hippocampus``, a temporary cache), and for each repeat uploads the MPRAGE as a
new series by STOW-RS (so each request downloads it afresh), then calls
``POST /infer/mean_shape?image=<SeriesInstanceUID>&output=json`` with ``store_sr: true`` and prints
the steps the server measured:

- download: WADO-RS of the series into the cache (``transfer-syntax=*``), with the geometry check;
- convert: reading the DICOM folder into a volume (``lmk3d.io.read_image``);
- infer: the detector's stages;
- write: building the TID 1500 SR (``build_sr``);
- store: STOW-RS of the SR;
- REST total: the client's wall time from sending the request to the response.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

from pydicom.uid import generate_uid

from lmk3d.serve import start_server, stop_server, wait_until_ready

ROOT = Path(__file__).resolve().parents[1]
MR_SERIES = ROOT.parent / "shared" / "data" / "dicom" / "mr_brain_sagittal_mprage"
HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))
STEPS = ("download", "convert", "infer", "write", "store", "server total", "REST total")


def upload_copy(client: object) -> str:
    """Store the MPRAGE as a new study/series; return its SeriesInstanceUID."""
    import pydicom

    study, series = generate_uid(), generate_uid()
    datasets = []
    for f in sorted(MR_SERIES.iterdir()):
        try:
            ds = pydicom.dcmread(f)
        except pydicom.errors.InvalidDicomError:
            continue
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        datasets.append(ds)
    response = client.store_instances(datasets)  # type: ignore[attr-defined]
    if response.get("FailedSOPSequence"):
        raise SystemExit(f"STOW-RS failed: {response}")
    return series


def infer(url: str, series: str) -> tuple[float, dict]:
    boundary = uuid.uuid4().hex
    params = json.dumps({"store_sr": True, "result_write_to_file": False}).encode()
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"params\"\r\n\r\n".encode() + params
            + f"\r\n--{boundary}--\r\n".encode())
    req = urllib.request.Request(f"{url}/infer/mean_shape?image={series}&output=json", data=body, method="POST")
    req.add_header("Content-Type", f"multipart/form-data; boundary={boundary}")
    t0 = time.perf_counter()
    with HTTP.open(req, timeout=600) as r:
        result = json.loads(r.read())
    return time.perf_counter() - t0, result


def steps(rest_s: float, result: dict) -> dict[str, float]:
    lat = result["latencies"]
    fixed = {"download", "load", "write", "sr_build", "sr_store", "total"}
    return {"download": lat["download"], "convert": lat["load"],
            "infer": sum(v for k, v in lat.items() if k not in fixed),
            "write": lat["sr_build"], "store": lat["sr_store"],
            "server total": lat["download"] + lat["total"], "REST total": rest_s}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pacs", default="http://127.0.0.1:8042/dicom-web")
    ap.add_argument("--port", type=int, default=8010)
    args = ap.parse_args()
    user, password = os.environ.get("LMK3D_PACS_USER"), os.environ.get("LMK3D_PACS_PASSWORD")
    if not (user and password):
        raise SystemExit("set LMK3D_PACS_USER and LMK3D_PACS_PASSWORD (as for scripts/test_pacs.sh)")
    from dicomweb_client.api import DICOMwebClient
    from dicomweb_client.session_utils import create_session_from_user_pass

    client = DICOMwebClient(args.pacs, session=create_session_from_user_pass(user, password))
    with tempfile.TemporaryDirectory(prefix="bench-pacs-") as tmp:
        env = {**os.environ, "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(Path(tmp) / "cache")}
        log = Path(tmp) / "server.log"
        with log.open("wb") as out:
            process = start_server(args.pacs, port=args.port, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_until_ready(f"http://127.0.0.1:{args.port}", process, timeout_s=600, log_file=log)
            rows = []
            for _ in range(args.repeats):
                series = upload_copy(client)
                rest_s, result = infer(f"http://127.0.0.1:{args.port}", series)
                rows.append(steps(rest_s, result))
        finally:
            stop_server(process)
    n_found = sum(1 for it in result["landmarks"] if it["found"])
    print(f"192-slice MPRAGE, model mean_shape ({n_found} landmarks), {args.repeats} fresh series, "
          f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    print("| step | median (s) | min (s) | max (s) |\n|---|---:|---:|---:|")
    for step in STEPS:
        values = [r[step] for r in rows]
        print(f"| {step} | {statistics.median(values):.3f} | {min(values):.3f} | {max(values):.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
