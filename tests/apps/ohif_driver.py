"""Drive the bundled OHIF in Debian's chromium (headless, through playwright) as a radiologist would.

Used by ``tests/apps/test_ohif_browser.py`` and by ``benchmarks/ohif_screenshots.py`` (the pictures
in docs/). Playwright drives the system's ``/usr/bin/chromium`` (``executable_path``); it never
downloads a browser. The page may load nothing but the server under test: every other request (the
web fonts OHIF's page names) is aborted, so the browser touches only loopback.

:class:`Ohif` walks the viewer the way a user does (study list, MONAI Label mode, the panel's
"Connect" and "Run", the segmentation panel's "Export DICOM SEG") and reads OHIF's own state through
the objects it exposes on ``window`` (``services``, ``cornerstone``, ``cornerstoneTools``) to check
what it shows: segment names, each marker's voxels and world position (LPS mm), pixel colours.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

CHROMIUM = Path("/usr/bin/chromium")
#: Bounds on a hung viewer, not speed checks (OHIF renders in software here: no GPU).
LOAD_TIMEOUT_MS = 120_000
ACTION_TIMEOUT_MS = 60_000
VIEWPORT = {"width": 1400, "height": 900}

# OHIF's segmentation '1' (the MONAI Label panel's): each value's voxel count and centre (world LPS mm).
_MARKERS_JS = """() => {
  const lab = window.services.segmentationService.getLabelmapVolume('1');
  if (!lab) { return null; }
  const data = lab.voxelManager.getCompleteScalarDataArray();
  const [nx, ny] = lab.dimensions;
  const sums = {};
  for (let n = 0; n < data.length; n++) {
    const v = data[n];
    if (!v) { continue; }
    const s = sums[v] || (sums[v] = [0, 0, 0, 0]);
    s[0] += n % nx; s[1] += Math.floor(n / nx) % ny; s[2] += Math.floor(n / (nx * ny)); s[3] += 1;
  }
  const out = {};
  for (const [v, s] of Object.entries(sums)) {
    const ijk = [s[0] / s[3], s[1] / s[3], s[2] / s[3]];
    out[v] = {voxels: s[3], lps: Array.from(lab.imageData.indexToWorld(ijk))};
  }
  return {markers: out, spacing: lab.spacing, direction: Array.from(lab.direction), dimensions: lab.dimensions};
}"""
# Move every voxel of segment `index` by `shift` voxels along the volume's first axis (a user's correction).
_MOVE_JS = """([index, shift]) => {
  const lab = window.services.segmentationService.getLabelmapVolume('1');
  const data = lab.voxelManager.getCompleteScalarDataArray();
  const nx = lab.dimensions[0];
  const out = new data.constructor(data.length);
  let moved = 0;
  for (let n = 0; n < data.length; n++) { if (data[n] && data[n] !== index) { out[n] = data[n]; } }
  for (let n = 0; n < data.length; n++) {
    if (data[n] === index && (n % nx) + shift < nx) { out[n + shift] = index; moved++; }
  }
  lab.voxelManager.setCompleteScalarDataArray(out);
  window.cornerstone.triggerEvent(window.cornerstone.eventTarget,
    window.cornerstoneTools.Enums.Events.SEGMENTATION_DATA_MODIFIED, {segmentationId: '1'});
  return moved;
}"""
_ANY_MARKER_JS = """() => {
  const v = window.services.segmentationService.getLabelmapVolume('1');
  return Boolean(v && v.voxelManager.getCompleteScalarDataArray().some(x => x > 0));
}"""
_SEGMENTS_JS = """() => window.services.segmentationService.getSegmentations().map(
  s => Object.values(s.segments || {}).filter(x => x).map(x => [x.segmentIndex, x.label]))"""


def why_no_browser() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if not CHROMIUM.exists() and not shutil.which("chromium"):
        return f"Debian's chromium is not installed ({CHROMIUM}; scripts/install_system_tools.sh installs it)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[dev]' installs it; never `playwright install`)"
    return None


@dataclass
class Ohif:
    """One browser page on the server at ``base`` (``http://127.0.0.1:PORT``)."""

    page: Any
    base: str
    errors: list[str] = field(default_factory=list)

    # --- navigation ---------------------------------------------------------------------------------------
    def study_list(self, expected: str) -> str:
        """Open ``/ohif/``, wait until the study list shows ``expected``, and return the page's text."""
        self.page.goto(f"{self.base}/ohif/")
        self.page.get_by_text(expected, exact=True).first.wait_for(timeout=LOAD_TIMEOUT_MS)
        return str(self.page.inner_text("body"))

    def open_from_list(self, patient: str) -> None:
        """Open the study of ``patient`` from the study list in the MONAI Label mode."""
        self.page.get_by_text(patient, exact=True).first.click()
        self.page.get_by_role("button", name="MONAI Label").click()
        self._wait_for_viewer()

    def open_study(self, study_uid: str) -> None:
        """Open a study by its StudyInstanceUID in the MONAI Label mode."""
        self.page.goto(f"{self.base}/ohif/monai-label?StudyInstanceUIDs={study_uid}")
        self._wait_for_viewer()

    def _wait_for_viewer(self) -> None:
        self.page.locator(".settingsTable button.actionButton").wait_for(timeout=LOAD_TIMEOUT_MS)
        # The image volume is loaded when every slice of it is in the cache.
        self.page.wait_for_function("""() => {
          const vols = [...window.cornerstone.cache._volumeCache.values()].map(v => v.volume || v);
          return vols.some(v => String(v.volumeId).startsWith('cornerstoneStreamingImageVolume')
                                && v.loadStatus && v.loadStatus.loaded);
        }""", timeout=LOAD_TIMEOUT_MS)

    # --- the MONAI Label panel ------------------------------------------------------------------------------
    def server_field(self) -> str:
        """The server address in the MONAI Label panel."""
        return str(self.page.locator("#monailabelServerURL").input_value())

    def run_model(self, model: str, markers: bool = True) -> dict[str, Any] | None:
        """Connect the panel, choose ``model`` and run it; wait until its markers are in OHIF's segmentation
        (``markers`` False: an answer without any, an image the model refused).

        Returns the answer's review notice (its ``X-Lmk3d-Review`` header, :mod:`lib.review_notice`), or None.
        """
        self.page.locator(".settingsTable button.actionButton").click()
        select = self.page.locator("select.selectBox").first
        select.wait_for(timeout=ACTION_TIMEOUT_MS)
        select.select_option(model)
        with self.page.expect_response(lambda r: "/infer/" in r.url, timeout=LOAD_TIMEOUT_MS) as reply:
            self.page.locator("button[title='Run Segmentation']").click()
        if reply.value.status != 200:
            raise AssertionError(f"inference answered {reply.value.status}: {reply.value.text()[:300]}")
        notice = reply.value.headers.get("x-lmk3d-review")
        if markers:
            self.page.wait_for_function(_ANY_MARKER_JS, timeout=ACTION_TIMEOUT_MS)
        self.page.wait_for_timeout(1000)  # the panel colours the segments a second after making them
        return json.loads(notice) if notice else None

    def notification(self, text: str) -> str:
        """Wait until a notification holding ``text`` shows; its whole text."""
        shown = self.page.get_by_text(text, exact=False).first
        shown.wait_for(timeout=ACTION_TIMEOUT_MS)
        return str(shown.inner_text())

    # --- what OHIF shows ------------------------------------------------------------------------------------
    def any_marker(self) -> bool:
        """Whether OHIF's segmentation holds any marker voxel."""
        return bool(self.page.evaluate(_ANY_MARKER_JS))

    def segments(self) -> dict[int, str]:
        """``{segment index: name}`` of OHIF's segmentation."""
        groups = self.page.evaluate(_SEGMENTS_JS)
        return {int(i): str(name) for group in groups for i, name in group}

    def markers(self) -> dict[int, tuple[int, np.ndarray]]:
        """``{segment index: (voxels, centre LPS mm)}`` of the markers in OHIF's segmentation volume."""
        doc = self.page.evaluate(_MARKERS_JS)
        if doc is None:
            return {}
        return {int(k): (int(v["voxels"]), np.array(v["lps"], dtype=float)) for k, v in doc["markers"].items()}

    def first_axis_step_lps(self) -> np.ndarray:
        """The world step (LPS mm) of one voxel along the segmentation volume's first axis."""
        doc = self.page.evaluate(_MARKERS_JS)
        return np.array(doc["direction"][:3], dtype=float) * float(doc["spacing"][0])

    def open_segmentation_panel(self) -> None:
        self.page.locator("[data-cy=panelSegmentationWithTools-btn]").click()
        self.page.get_by_text("Add Segment").first.wait_for(timeout=ACTION_TIMEOUT_MS)

    def view_planes(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each viewport's plane: ``(a point on it, its normal)``, world LPS mm."""
        planes = self.page.evaluate(
            "() => window.cornerstone.getRenderingEngines()[0].getViewports().map(vp => {"
            " const c = vp.getCamera(); return [Array.from(c.focalPoint), Array.from(c.viewPlaneNormal)]; })")
        return [(np.array(p, dtype=float), np.array(n, dtype=float)) for p, n in planes]

    def show_segment(self, name: str) -> None:
        """Click a landmark in the segmentation panel: OHIF moves the views to its marker."""
        self.page.locator("[data-cy=data-row]").filter(has_text=name).first.click()
        self.page.wait_for_timeout(1500)  # the views glide there and the marker flashes

    def colour_pixels(self, rgb: tuple[int, int, int], tolerance: int = 40) -> int:
        """How many pixels of the viewports are within ``tolerance`` of ``rgb`` (each channel)."""
        from io import BytesIO

        from PIL import Image

        png = self.page.locator("[data-cy=viewport-grid]").screenshot()
        pixels = np.asarray(Image.open(BytesIO(png)).convert("RGB")).astype(int)
        return int((np.abs(pixels - np.array(rgb)).max(axis=-1) <= tolerance).sum())

    # --- a correction -----------------------------------------------------------------------------------------
    def move_segment(self, index: int, voxels: int) -> int:
        """Move segment ``index`` by ``voxels`` along the first axis (as a brush would redraw it); voxels moved."""
        return int(self.page.evaluate(_MOVE_JS, [index, voxels]))

    def export_seg(self, name: str) -> tuple[int, str]:
        """The segmentation panel's "Export DICOM SEG": ``(status, body)`` of the server's STOW-RS answer."""
        row = self.page.locator("div", has=self.page.get_by_role("combobox")).filter(
            has=self.page.locator("button[aria-haspopup=menu]")).last
        row.locator("button[aria-haspopup=menu]").first.click()
        self.page.get_by_role("menuitem", name="Export & Download").click()
        self.page.get_by_role("menuitem", name="Export DICOM SEG").click()
        self.page.get_by_role("textbox").last.fill(name)
        with self.page.expect_response(lambda r: r.request.method == "POST" and "/proxy/dicom/" in r.url,
                                       timeout=ACTION_TIMEOUT_MS) as reply:
            self.page.get_by_role("button", name="Save").click()
        return reply.value.status, reply.value.text()

    def screenshot(self, path: str | Path) -> None:
        """Save the page as a PNG (written atomically)."""
        from lmk3d.io.atomic import atomic_write_bytes

        atomic_write_bytes(path, self.page.screenshot())


@contextmanager
def ohif(base: str) -> Iterator[Ohif]:
    """A headless chromium page on the server at ``base``; requests anywhere else are aborted."""
    from playwright.sync_api import sync_playwright

    executable = str(CHROMIUM if CHROMIUM.exists() else shutil.which("chromium"))
    with sync_playwright() as p:
        # --no-sandbox: chromium's sandbox needs user namespaces a root test runner does not have.
        browser = p.chromium.launch(executable_path=executable, headless=True,
                                    args=["--no-sandbox", "--enable-unsafe-swiftshader"])
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(ACTION_TIMEOUT_MS)
            viewer = Ohif(page, base)
            page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(base)
                       else route.abort())
            page.on("pageerror", lambda e: viewer.errors.append(f"page error: {e}"))
            yield viewer
        finally:
            browser.close()


def describe(markers: dict[int, tuple[int, np.ndarray]]) -> str:
    return json.dumps({k: [v[0], [round(float(x), 2) for x in v[1]]] for k, v in markers.items()})
