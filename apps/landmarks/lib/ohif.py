"""The bundled OHIF viewer at ``/ohif/``: MONAI Label's build, served with this server's settings.

MONAI Label 0.8.5 ships OHIF v3 (``monailabel/endpoints/static/ohif``) with its MONAI Label panel. This
module serves those files, changed in three places:

- ``app-config.js`` is made here (:func:`app_config`): the DICOMweb data source is this server's
  ``/proxy/dicom/qido`` and ``/proxy/dicom/wado`` (:mod:`lib.dicomweb_proxy`: the studies folder or the
  PACS), named after the datastore; ``lmk3dLabelColors`` gives every landmark name of the served models
  a colour of its own (:func:`label_colors`; OHIF's panel otherwise colours a name by a hash of its
  letters, which gives dark or near-equal colours); ``window.lmk3dNotice`` turns an answer's review header
  (:mod:`lib.review_notice`) into the panel's notification;
- three bundles are patched on the fly (:data:`PATCHES`; a change is made only where each of its
  expected texts occurs exactly once, else it is logged and left out):

  - after a run, the panel shows the answer's review notice instead of "Running Segmentation - Successful":
    why the image was refused, that it is unusual (every score capped), the landmarks not found and the
    points to check (the label map holds no score);
  - the MONAI Label panel connects to the page's own server (``window.location.origin``), not to
    port 8000 of the page's host (nor to a cookie left by another server on the same host, whatever
    its port); it takes segment colours from ``lmk3dLabelColors``, and records each marker's centre
    so that clicking a landmark in the segmentation panel moves the views to it;
  - the MONAI Label mode also shows OHIF's segmentation panel, which it defines but leaves out, with
    the brush, eraser and shape tools of OHIF's segmentation mode (their buttons are taken from that
    mode's bundle): the markers can be listed, moved and stored ("Export DICOM SEG"; the server saves
    the SEG as the final label, :mod:`lib.dicomweb_proxy`);
  - "Export DICOM SEG", which OHIF's SEG extension runs without naming the data source, stores to the
    viewer's, and hands dcmjs the slices in dcmjs's own frame order (else every marker comes back
    mirrored along the slice normal);
- any other path is the file under the OHIF folder, or ``index.html`` for the viewer's own routes
  (``/ohif/viewer?...``); MONAI Label's route turns ``/`` into ``:`` and so answers every file in a
  sub-folder (``assets/...``) with ``index.html``.
"""

from __future__ import annotations

import colorsys
import json
import logging
import mimetypes
import os
import threading
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse, Response
from monailabel.config import settings
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.utils.app import app_instance
from starlette.concurrency import run_in_threadpool

from lib import review_notice
from lib.dicomweb_proxy import local_dicomweb
from lib.errors import NOT_FOUND, http_error

logger = logging.getLogger(__name__)

OHIF_DIR = Path(__import__("monailabel").__file__).resolve().parent / "endpoints" / "static" / "ohif"
#: Stands, in a replacement, for the toolbar buttons of OHIF's segmentation mode (:func:`_segmentation_buttons`).
SEGMENTATION_BUTTONS = "<segmentation mode buttons>"
#: ``(what it does, ((text in a bundle, replacement), ...))``: a change is made whole or not at all; each
#: text must occur exactly once in the viewer's files.
PATCHES: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("the panel's server is the page's own", (
        ("CookieUtils.getCookieString('MONAILABEL_SERVER_URL', 'http://' + window.location.host.split(':')[0] + "
         "':8000/')", "window.location.origin + '/'"),
        ("this.serverURI = 'http://127.0.0.1:8000';", "this.serverURI = window.location.origin + '/';"),
    )),
    ("segment colours from lmk3dLabelColors", (
        ("function getLabelColor(label, rgb = true, random = true) {\n",
         "function getLabelColor(label, rgb = true, random = true) {\n"
         "  const lmk3dColor = ((window.config || {}).lmk3dLabelColors || {})[label];\n"
         "  if (lmk3dColor) {\n"
         "    return rgb ? { r: lmk3dColor[0], g: lmk3dColor[1], b: lmk3dColor[2] }"
         " : GenericUtils_rgbToHex(lmk3dColor[0], lmk3dColor[1], lmk3dColor[2]);\n"
         "  }\n"),
    )),
    # OHIF moves the views to a segment clicked in the segmentation panel only if it knows the segment's centre.
    ("clicking a landmark in the segmentation panel shows its marker", (
        ("        voxelManager?.setCompleteScalarDataArray(convertedData);\n"
         "        (0,dist_esm.triggerEvent)(dist_esm.eventTarget, esm.Enums.Events.SEGMENTATION_DATA_MODIFIED, {\n"
         "          segmentationId: '1'\n        });",
         "        voxelManager?.setCompleteScalarDataArray(convertedData);\n"
         "        const lmk3dSums = {};\n"
         "        const [lmk3dNx, lmk3dNy] = volumeLoadObject.dimensions;\n"
         "        for (let n = 0; n < convertedData.length; n++) {\n"
         "          const v = convertedData[n];\n"
         "          if (!v) {\n            continue;\n          }\n"
         "          const s = lmk3dSums[v] || (lmk3dSums[v] = [0, 0, 0, 0]);\n"
         "          s[0] += n % lmk3dNx;\n"
         "          s[1] += Math.floor(n / lmk3dNx) % lmk3dNy;\n"
         "          s[2] += Math.floor(n / (lmk3dNx * lmk3dNy));\n"
         "          s[3] += 1;\n"
         "        }\n"
         "        const lmk3dSegmentation = esm.segmentation.state.getSegmentation('1');\n"
         "        for (const [v, s] of Object.entries(lmk3dSums)) {\n"
         "          const segment = lmk3dSegmentation && lmk3dSegmentation.segments[v];\n"
         "          if (segment) {\n"
         "            const world = volumeLoadObject.imageData.indexToWorld([s[0] / s[3], s[1] / s[3], s[2] / s[3]]);\n"
         "            const center = {center: {world: Array.from(world)}};\n"
         "            segment.cachedStats = Object.assign({}, segment.cachedStats, center);\n"
         "          }\n"
         "        }\n"
         "        (0,dist_esm.triggerEvent)(dist_esm.eventTarget, esm.Enums.Events.SEGMENTATION_DATA_MODIFIED, {\n"
         "          segmentationId: '1'\n        });"),
    )),
    # The mode defines the panel and the tool section but adds neither the panel nor the section's buttons;
    # the panel without its buttons stops the viewer, so both or neither.
    # The panel asks for the label map alone, which cannot say that the image was refused, that a landmark was
    # not found or which points to check; the server says it in a header (lib.review_notice).
    ("the panel shows the answer's review notice", (
        ("      this.notification.show({\n        title: 'MONAI Label - ' + model,\n"
         "        message: 'Running Segmentation - Successful',\n        type: 'success',\n        duration: 4000\n"
         "      });\n      this.props.updateView(response, model, label_names);",
         "      this.notification.show((window.lmk3dNotice && window.lmk3dNotice(response, 'MONAI Label - ' + model))"
         " || {\n        title: 'MONAI Label - ' + model,\n"
         "        message: 'Running Segmentation - Successful',\n        type: 'success',\n        duration: 4000\n"
         "      });\n      this.props.updateView(response, model, label_names);"),
    )),
    ("the MONAI Label mode shows the segmentation panel (segments, brush and sphere tools, Export DICOM SEG)", (
        ("rightPanels: [monailabel.monaiLabel],", "rightPanels: [monailabel.monaiLabel, cornerstone.panelTool],"),
        ("// toolbarService.addButtons(segmentationButtons);",
         f"toolbarService.addButtons({SEGMENTATION_BUTTONS});"),
    )),
    # dcmjs puts the SEG's frames in order of position, last along the slice normal first, but fills them
    # with the slices in the order it is given (the viewer's: first along the normal first): every marker
    # would come back mirrored across the volume. Given in dcmjs's own order, each slice keeps its place.
    ("Export DICOM SEG keeps each slice at its own position", (
        ("      const segImages = imageIds.map(imageId => esm.cache.getImage(imageId));\n"
         "      const referencedImages = segImages.map(image => esm.cache.getImage(image.referencedImageId));",
         "      const segImages = imageIds.map(imageId => esm.cache.getImage(imageId));\n"
         "      const lmk3dPlane = image => esm.metaData.get('imagePlaneModule', image.referencedImageId);\n"
         "      const lmk3dRow = lmk3dPlane(segImages[0]).rowCosines;\n"
         "      const lmk3dColumn = lmk3dPlane(segImages[0]).columnCosines;\n"
         "      const lmk3dNormal = [lmk3dRow[1] * lmk3dColumn[2] - lmk3dRow[2] * lmk3dColumn[1],\n"
         "        lmk3dRow[2] * lmk3dColumn[0] - lmk3dRow[0] * lmk3dColumn[2],\n"
         "        lmk3dRow[0] * lmk3dColumn[1] - lmk3dRow[1] * lmk3dColumn[0]];\n"
         "      const lmk3dAlong = image => lmk3dPlane(image).imagePositionPatient.reduce(\n"
         "        (sum, value, axis) => sum + value * lmk3dNormal[axis], 0);\n"
         "      segImages.sort((a, b) => lmk3dAlong(b) - lmk3dAlong(a));\n"
         "      const referencedImages = segImages.map(image => esm.cache.getImage(image.referencedImageId));"),
    )),
    # The panel's "Export DICOM SEG" runs the SEG extension's command without a data source.
    ("Export DICOM SEG stores to the viewer's data source", (
        ("      dataSource\n    }) => {\n      const promptResult = await (0,default_src.createReportDialogPrompt)"
         "(uiDialogService, {\n        extensionManager\n      });",
         "      dataSource\n    }) => {\n      dataSource = dataSource || extensionManager.getActiveDataSource()[0];\n"
         "      const promptResult = await (0,default_src.createReportDialogPrompt)(uiDialogService, {\n"
         "        extensionManager\n      });"),
    )),
)
_BUTTONS_MODULE = "// CONCATENATED MODULE: ../../../modes/segmentation/src/segmentationButtons.ts\n"
_BUTTONS_START = "const segmentationButtons_toolbarButtons = "
_BUTTONS_END = ";\n/* harmony default export */ const segmentationButtons = (segmentationButtons_toolbarButtons);"
#: Hues of the first landmark colours (degrees), far apart on the colour wheel; more names go round again.
_HUES = (0, 120, 240, 60, 180, 300, 30, 150, 270, 90, 210, 330)

#: ``window.lmk3dNotice(response, title)``: the notification for an infer answer, from its review header
#: (:mod:`lib.review_notice`); null when the answer has none (the panel then says what it always says).
_NOTICE_JS = f"""window.lmk3dNotice = function (response, title) {{
  const raw = response && response.headers ? response.headers['{review_notice.HEADER.lower()}'] : undefined;
  if (!raw) {{
    return null;
  }}
  try {{
    const notice = JSON.parse(raw);
    return {{title: title, message: notice.message, type: notice.level,
      duration: notice.level === 'success' ? 6000 : 60000}};
  }} catch (e) {{
    return null;
  }}
}};
"""

router = APIRouter(tags=["Others"])
_patched: dict[str, str] | None = None  # file name -> patched text
_patch_lock = threading.Lock()


def label_colors(names: list[str]) -> dict[str, list[int]]:
    """``{name: [r, g, b]}``: bright, well separated colours, in sorted name order (as the panel lists them).

    Example:
        >>> label_colors(["b", "a"])
        {'a': [255, 0, 0], 'b': [0, 255, 0]}
    """
    out = {}
    for n, name in enumerate(sorted(set(names))):
        lightness = 0.5 if (n // len(_HUES)) % 2 == 0 else 0.7  # the second round lighter
        r, g, b = colorsys.hls_to_rgb(_HUES[n % len(_HUES)] / 360.0, lightness, 1.0)
        out[name] = [round(r * 255), round(g * 255), round(b * 255)]
    return out


def app_config(instance: Any) -> str:
    """``app-config.js``: OHIF's configuration for this server (see the module docstring)."""
    local = local_dicomweb(instance) is not None
    info = instance.info()
    names: list[str] = list(info.get("labels") or [])
    for model in (info.get("models") or {}).values():
        labels = model.get("labels") or {}
        names += list(labels) if isinstance(labels, (dict, list)) else []
    config = {
        "routerBasename": "/ohif/",
        "showStudyList": True,
        "extensions": [],
        "modes": [],
        "showWarningMessageForCrossOrigin": True,
        "showCPUFallbackMessage": True,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "defaultDataSourceName": "dicomweb",
        "useSharedArrayBuffer": "FALSE",
        "investigationalUseDialog": {"option": "never"},
        "lmk3dLabelColors": label_colors(names),
        "dataSources": [{
            "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
            "sourceName": "dicomweb",
            "configuration": {
                "friendlyName": "lmk3d studies folder" if local else "PACS (through lmk3d)",
                "name": "lmk3d",
                "wadoUriRoot": "/proxy/dicom/wado",
                "qidoRoot": "/proxy/dicom/qido",
                "wadoRoot": "/proxy/dicom/wado",
                "qidoSupportsIncludeField": not local,
                "supportsReject": False,
                "imageRendering": "wadors",
                "thumbnailRendering": "wadors",
                "enableStudyLazyLoad": False,
                "supportsFuzzyMatching": True,
                "supportsWildcard": True,
                "dicomUploadEnabled": not local,
                "bulkDataURI": {"enabled": True},
            },
        }],
    }
    return f"window.config = {json.dumps(config, indent=2)};\n{_NOTICE_JS}"


def _segmentation_buttons(texts: dict[str, str]) -> str | None:
    """The toolbar buttons (a JavaScript array) of OHIF's segmentation mode, from its bundle; None if not found."""
    found = [t for t in texts.values() if t.count(_BUTTONS_MODULE) == 1]
    if len(found) != 1:
        return None
    text = found[0][found[0].index(_BUTTONS_MODULE):]
    start, end = text.find(_BUTTONS_START), text.find(_BUTTONS_END)
    if start < 0 or end < start:
        return None
    return text[start + len(_BUTTONS_START):end]


def patch_bundles(folder: Path = OHIF_DIR) -> tuple[dict[str, str], list[str]]:
    """The viewer's JavaScript files that :data:`PATCHES` change, patched; and the changes that could not be made.

    Returns:
        ``({file name: patched text}, [description of each change whose texts are not each in exactly one
        place])``.
    """
    texts = {f.name: f.read_text(encoding="utf-8") for f in sorted(folder.glob("*.js"))}
    buttons = _segmentation_buttons(texts)
    patched: dict[str, str] = {}
    missing = []
    for what, changes in PATCHES:
        trial = dict(patched)
        for old, new in changes:
            if SEGMENTATION_BUTTONS in new:
                if buttons is None:
                    break
                new = new.replace(SEGMENTATION_BUTTONS, buttons)
            current = {**texts, **trial}
            places = [name for name, text in current.items() if old in text]
            if len(places) != 1 or current[places[0]].count(old) != 1:
                break
            trial[places[0]] = current[places[0]].replace(old, new)
        else:
            patched = trial
            continue
        missing.append(what)
    return patched, missing


def _patched_file(name: str) -> str | None:
    """The patched text of the viewer file ``name``, or None when no patch changes it."""
    global _patched
    with _patch_lock:
        if _patched is None:
            _patched, missing = patch_bundles()
            for what in missing:
                logger.error("OHIF: cannot apply the change %r: its text is not in the viewer's files exactly once "
                             "(another MONAI Label version?); served without it", what)
        return _patched.get(name)


def _file(path: str) -> Response:
    root = OHIF_DIR.resolve()
    target = (root / path).resolve() if path else root / "index.html"
    if root not in target.parents and target != root:
        raise http_error(NOT_FOUND, f"/ohif/{path}: not a file of the viewer")
    if not target.is_file():
        if "." in os.path.basename(path):  # a missing file, not one of the viewer's routes
            raise http_error(NOT_FOUND, f"/ohif/{path}: no such file")
        target = root / "index.html"
    patched = _patched_file(target.name) if target.parent == root else None
    if patched is not None:
        return Response(patched, media_type="application/javascript")
    media = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
    if target.suffix == ".wasm":
        media = "application/wasm"
    return FileResponse(target, media_type=media)


@router.get("/ohif/app-config.js", include_in_schema=False)
async def api_app_config(user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))) -> Response:
    text = await run_in_threadpool(lambda: app_config(app_instance()))
    return Response(text, media_type="application/javascript", headers={"Cache-Control": "no-store"})


@router.get("/ohif/{path:path}", include_in_schema=False)
async def api_ohif(path: str, user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))) -> Response:
    return await run_in_threadpool(_file, path)
