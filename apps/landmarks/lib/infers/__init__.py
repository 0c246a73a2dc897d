"""Infer tasks: one class serving every detector (see ../shared/DETECTOR_CONTRACT.md).

``make_infer_task`` is the seam ``main.py`` calls for each loaded model. Until the shared task lands
(issue 7: landmarks JSON, markups or sphere label map output, per-stage latencies) it returns
``None`` and the app lists no models, even for a model whose checkpoint loaded.
"""

from __future__ import annotations

from monailabel.interfaces.tasks.infer_v2 import InferTask

from lib.configs import LoadedModel


def make_infer_task(model: LoadedModel) -> InferTask | None:
    """The infer task serving ``model``, or ``None`` where this app version has none."""
    return None
