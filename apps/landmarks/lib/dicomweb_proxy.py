"""The DICOMweb the bundled OHIF reads and writes through: ``/proxy/dicom/{qido,wado,stow}/...``.

OHIF's data source (:mod:`lib.ohif`) points at ``/proxy/dicom/qido`` and ``/proxy/dicom/wado`` on the
page's own server, whatever the datastore:

- **a local studies folder**: answered by :class:`lib.local_dicomweb.LocalDicomweb` (each image as a
  DICOM study made on the fly). MONAI Label's own proxy forwards to ``--studies`` as if it were a URL,
  which with a folder fails (OHIF's "Data Source Connection Error");
- **a PACS** (``--studies http://.../dicom-web``): forwarded to it as MONAI Label's proxy does (its
  QIDO, WADO and STOW prefixes and credentials), in a worker thread; an unreachable PACS is 503 and
  a refused request keeps the PACS's status, each with a message.

**Corrections come back as DICOM SEG.** OHIF's segmentation panel stores a segmentation with "Export
DICOM SEG" (STOW-RS to ``/proxy/dicom/wado/studies``). A stored SEG of an image series is decoded to
landmarks (:func:`lmk3d.io.dicom_seg.landmarks_from_seg`: each segment named after a landmark is a
sphere, its centre the landmark, so a moved sphere moves the landmark) on the grid of the image the
detectors read, and saved as the image's ``final`` label through the datastore's ``save_label``, which
checks it like any upload (names a model knows, inside the image): a point list in ``labels/final``
for a studies folder, a "final landmarks" DICOM SR in the PACS (docs/pacs.md). A SEG that does not
decode or fails the check is refused (422 naming the problem) and nothing is stored; with a PACS
the SEG itself is then stored there too. A studies folder takes nothing else by STOW (422); a PACS
gets every other object as it was sent.

:func:`viewer_image_id` turns the SeriesInstanceUID that OHIF's MONAI Label panel sends as the image
to infer on into the studies folder's image id.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
import time
import uuid
from typing import Any

import requests
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from monailabel.config import settings
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.utils.app import app_instance
from starlette.concurrency import run_in_threadpool

from lib.errors import BAD_REQUEST, NOT_FOUND, UNPROCESSABLE, bad_input, http_error
from lib.local_dicomweb import SOP_CLASS, SOP_UID, LocalDicomweb
from lmk3d.io import read_image
from lmk3d.io.dicom_seg import is_segmentation, landmarks_from_seg, referenced_series_uids
from lmk3d.io.markups import write_markups

logger = logging.getLogger(__name__)

PREFIX = "/proxy/dicom"
OPS = ("qido", "wado", "stow")
DICOM_JSON = "application/dicom+json"
#: A bound on a hung PACS, not a speed target.
PACS_TIMEOUT_S = 300.0
#: Response headers passed on from the PACS (the body is decoded, so no encoding or length).
_PASSED_HEADERS = ("content-type", "content-location", "warning")

router = APIRouter(tags=["Others"])
_facades: dict[int, LocalDicomweb] = {}


def _session() -> requests.Session:
    """One connection pool to the PACS (OHIF asks for every slice separately).

    A read is tried again on a dropped keep-alive connection, which a PACS closes when it likes.
    """
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    session = requests.Session()
    retry = Retry(total=2, connect=2, read=2, status=0, allowed_methods=frozenset({"GET", "HEAD"}),
                  raise_on_status=False)
    adapter = HTTPAdapter(pool_connections=4, pool_maxsize=16, max_retries=retry)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


_pacs_session = _session()


def local_dicomweb(instance: Any) -> LocalDicomweb | None:
    """The DICOMweb view of the app's studies folder (one per datastore object), None for a PACS.

    Told apart by the ``--studies`` value, not by class: MONAI Label reloads the app's ``lib`` modules
    when it loads the app, so the datastore's class is not the one this module imported.
    """
    if str(instance.studies).startswith(("http://", "https://")):
        return None
    datastore = instance.datastore()
    facade = _facades.get(id(datastore))
    if facade is None or facade.datastore is not datastore:
        facade = _facades[id(datastore)] = LocalDicomweb(datastore)
    return facade


def viewer_image_id(instance: Any, image: str) -> str:
    """The datastore image id for ``image``: itself, or the image whose OHIF series has this SeriesInstanceUID."""
    facade = local_dicomweb(instance)
    if facade is None or not image or image in facade.datastore.list_images():
        return image
    return facade.image_id(image) or image


# --- the route ------------------------------------------------------------------------------------------
@router.api_route(PREFIX + "/{path:path}", methods=["GET", "POST"], include_in_schema=False)
async def api_dicomweb(request: Request, path: str,
                       user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))) -> Response:
    body = await request.body() if request.method == "POST" else b""
    query = dict(request.query_params)
    headers = {k.lower(): v for k, v in request.headers.items()}
    return await run_in_threadpool(_dicomweb, request.method, path, query, headers, body)


def _dicomweb(method: str, path: str, query: dict[str, str], headers: dict[str, str], body: bytes) -> Response:
    parts = [p for p in path.split("/") if p]
    op = parts.pop(0) if parts and parts[0] in OPS else ""
    instance = app_instance()
    facade = local_dicomweb(instance)
    if method == "POST":
        if parts[:1] != ["studies"] or len(parts) > 2:
            raise http_error(NOT_FOUND, f"POST {PREFIX}/{path}: only STOW-RS (POST .../studies) is offered")
        return _stow(instance, facade, op, parts, headers, body)
    if facade is None:
        return _forward(method, op, parts, query, headers, body)
    return _local_get(facade, parts, query)


def _json(doc: Any) -> Response:
    return Response(json.dumps(doc), media_type=DICOM_JSON)


def _multipart(items: list[bytes], part_type: str) -> Response:
    boundary = uuid.uuid4().hex
    chunks = [f"--{boundary}\r\nContent-Type: {part_type}\r\n\r\n".encode() + item + b"\r\n" for item in items]
    media = part_type.split(";")[0]
    return Response(b"".join(chunks) + f"--{boundary}--\r\n".encode(),
                    media_type=f'multipart/related; type="{media}"; boundary={boundary}')


def _local_get(facade: LocalDicomweb, parts: list[str], query: dict[str, str]) -> Response:
    """QIDO-RS and WADO-RS over the studies folder (the routes in :mod:`lib.local_dicomweb`)."""
    n = len(parts)
    top = parts[0] if parts else ""
    if top == "series" and n == 1:
        return _json(facade.search_series(None, query))
    if top == "instances" and n == 1:
        return _json(facade.search_instances(None, None, query))
    if top == "studies":
        if n == 1:
            return _json(facade.search_studies(query))
        study = parts[1]
        if n == 3 and parts[2] == "metadata":
            return _json(facade.metadata(study))
        if n == 3 and parts[2] == "series":
            return _json(facade.search_series(study, query))
        if n == 3 and parts[2] == "instances":
            return _json(facade.search_instances(study, None, query))
        if n >= 4 and parts[2] == "series":
            series = parts[3]
            if n == 5 and parts[4] == "metadata":
                return _json(facade.metadata(study, series))
            if n == 5 and parts[4] == "instances":
                return _json(facade.search_instances(study, series, query))
            if n >= 6 and parts[4] == "instances":
                sop = parts[5]
                if n == 6:
                    return _multipart([facade.instance(study, series, sop)], "application/dicom")
                if n == 7 and parts[6] == "metadata":
                    return _json(facade.metadata(study, series, sop))
                if n == 8 and parts[6] == "frames":
                    frames = facade.frames(study, series, sop, parts[7])
                    return _multipart(frames, "application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1")
    raise http_error(NOT_FOUND, f"GET {PREFIX}/{'/'.join(parts)}: not offered for a studies folder (QIDO-RS "
                                "studies, series, instances; WADO-RS metadata, frames, instances)")


# --- a PACS -----------------------------------------------------------------------------------------------
def _pacs_auth() -> tuple[Any, dict[str, str]]:
    """``(auth, headers)`` for the PACS: MONAI Label's credentials, or a Google Cloud token for its URLs."""
    if "googleapis.com" in settings.MONAI_LABEL_STUDIES:
        import google.auth
        import google.auth.transport.requests

        credentials, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
        credentials.refresh(google.auth.transport.requests.Request())
        return None, {"Authorization": f"Bearer {credentials.token}"}
    user, password = settings.MONAI_LABEL_DICOMWEB_USERNAME, settings.MONAI_LABEL_DICOMWEB_PASSWORD
    return ((user, password) if user and password else None), {}


def _forward(method: str, op: str, parts: list[str], query: dict[str, str], headers: dict[str, str],
             body: bytes) -> Response:
    """Send the request on to the PACS (MONAI Label's prefixes: QIDO, WADO, STOW) and hand back its answer."""
    prefix = {"qido": settings.MONAI_LABEL_QIDO_PREFIX, "wado": settings.MONAI_LABEL_WADO_PREFIX,
              "stow": settings.MONAI_LABEL_STOW_PREFIX}.get(op, "")
    if op == "qido" and parts and parts[-1] == "metadata":  # some OHIF versions ask QIDO for metadata
        prefix = settings.MONAI_LABEL_WADO_PREFIX
    base = settings.MONAI_LABEL_STUDIES.rstrip("/")
    url = "/".join(p.strip("/") for p in (base, prefix or "", *parts) if p)
    auth, extra = _pacs_auth()
    send = {k: v for k, v in headers.items() if k in ("accept", "content-type")}
    send.update(extra)
    t0 = time.perf_counter()
    try:
        reply = _pacs_session.request(method, url, params=query, headers=send, data=body or None, auth=auth,
                                      timeout=PACS_TIMEOUT_S)
    except (requests.ConnectionError, requests.Timeout) as e:
        logger.warning("PACS %s %s: %s", method, url, e)
        raise http_error(503, f"cannot reach the PACS at {base} ({type(e).__name__}); is it running, and is the "
                              "--studies URL right?") from None
    logger.debug("PACS %s %s: %d in %.3f s", method, url, reply.status_code, time.perf_counter() - t0)
    kept = {k: v for k, v in reply.headers.items() if k.lower() in _PASSED_HEADERS}
    return Response(reply.content, status_code=reply.status_code, headers=kept)


# --- STOW-RS: corrections as DICOM SEG ----------------------------------------------------------------------
def multipart_parts(body: bytes, content_type: str) -> list[bytes]:
    """The bodies of the parts of a ``multipart/related`` request."""
    params = {}
    for item in content_type.split(";")[1:]:
        key, _, value = item.strip().partition("=")
        params[key.strip().lower()] = value.strip().strip('"')
    boundary = params.get("boundary")
    if not content_type.lower().startswith("multipart/") or not boundary:
        raise http_error(BAD_REQUEST, f"STOW-RS needs a multipart/related body with a boundary; got Content-Type "
                                      f"{content_type!r}")
    out = []
    for section in body.split(b"--" + boundary.encode())[1:]:
        if section.startswith(b"--"):
            break
        _, _, content = section.partition(b"\r\n\r\n")
        out.append(content[:-2] if content.endswith(b"\r\n") else content)
    if not out:
        raise http_error(BAD_REQUEST, "the STOW-RS body holds no part")
    return out


def _read_dicom(data: bytes) -> Any:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(io.BytesIO(data))
    except (InvalidDicomError, OSError, ValueError, EOFError) as e:
        raise http_error(UNPROCESSABLE, f"a STOW-RS part is not a DICOM file ({e})") from None


def save_seg(instance: Any, facade: LocalDicomweb | None, seg: Any) -> dict[str, Any]:
    """Decode the landmarks of the SEG ``seg`` and save them as its image's final label (see the module docstring).

    Returns:
        ``{"image": id, "label": label id, "placed": n, "landmarks": N}``.
    """
    refs = sorted(set(referenced_series_uids(seg)))
    if len(refs) != 1:
        raise http_error(UNPROCESSABLE, f"the SEG must segment one image series; its Referenced Series Sequence names "
                                        f"{len(refs)}")
    series_uid = refs[0]
    datastore = instance.datastore()
    if facade is not None:
        study = facade.by_series(series_uid)
        if study is None:
            raise http_error(NOT_FOUND, f"the SEG segments series {series_uid}, which is not an image of the studies "
                                        "folder (reload the study in OHIF: the image may have been replaced)")
        image_id, series = study.image_id, facade.series(study)
        n_k, n_j, n_i = series.frames.shape
        shape, affine = (n_i, n_j, n_k), series.affine
    else:
        image_id = series_uid
        with bad_input(UNPROCESSABLE, prefix=f"series {series_uid}: "):
            volume = read_image(datastore.get_image_uri(series_uid))
        shape, affine = volume.shape, volume.affine
    with bad_input(UNPROCESSABLE, prefix=f"the exported segmentation of image {image_id!r} holds no usable landmark: "):
        landmarks = landmarks_from_seg(seg, shape, affine)
    info = {"source": "OHIF DICOM SEG", "seg_sop_instance_uid": str(getattr(seg, "SOPInstanceUID", ""))}
    with tempfile.TemporaryDirectory(prefix="lmk3d-seg-") as folder:
        path = os.path.join(folder, f"{image_id}.mrk.json")
        write_markups(path, landmarks, name=image_id)
        label_id = datastore.save_label(image_id, path, "final", info)
    instance.on_save_label(image_id, label_id)
    placed = int(landmarks.found.sum())
    logger.info("OHIF: the SEG of image %s saved as its final label (%d of %d landmarks placed)", image_id, placed,
                len(landmarks))
    return {"image": image_id, "label": label_id, "placed": placed, "landmarks": len(landmarks)}


def _stow(instance: Any, facade: LocalDicomweb | None, op: str, parts: list[str], headers: dict[str, str],
          body: bytes) -> Response:
    datasets = [_read_dicom(p) for p in multipart_parts(body, headers.get("content-type", ""))]
    segs = [ds for ds in datasets if is_segmentation(ds)]
    if facade is not None and len(segs) != len(datasets):
        raise http_error(UNPROCESSABLE, "a studies folder takes only landmark corrections by STOW-RS: DICOM SEG "
                                        "objects exported from OHIF's segmentation panel")
    for seg in segs:
        save_seg(instance, facade, seg)
    if facade is None:
        return _forward("POST", op, parts, {}, headers, body)
    stored = [{SOP_CLASS: {"vr": "UI", "Value": [str(ds.SOPClassUID)]},
               SOP_UID: {"vr": "UI", "Value": [str(ds.SOPInstanceUID)]}} for ds in segs]
    return _json({"00081199": {"vr": "SQ", "Value": stored}})
