"""Which landmark names a saved label may carry: :class:`LabelNames`, and :func:`read_saved_label`.

Both datastores (``lib.datastore``, ``lib.dicomweb``) decode an uploaded label before storing it. One
datastore serves every model, so a label is checked against the names of all of them:

- a name that some model knows (a served model, or a declared model whose names its first training
  has fixed) is accepted;
- any other name is refused (422, naming it and the known names), **unless** a model declared with
  ``lmk3d serve --new-model`` has no landmark names yet: its names are the ones in the labels the user
  saves, so while it has none every name is accepted;
- a sphere label map sent without ``label_info`` / ``label_names`` is decoded as value ``k + 1`` =
  landmark ``k`` of the default names (the first served model's); with no such names (only models
  without names) it is refused, saying to send the names with it or a point list.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lmk3d.errors import LandmarkFormatError
from lmk3d.io.labels import label_kind, read_label
from lmk3d.landmarks import LandmarkSet

__all__ = ["LabelNames", "as_label_names", "read_saved_label"]


@dataclass(frozen=True)
class LabelNames:
    """The landmark names of the app's models, as a label check needs them.

    Attributes:
        default: the names that value ``k + 1`` of a sphere label map without names stands for (the
            first served model's), empty when no model has names.
        known: every name a served model, or a declared model with fixed names, knows.
        open_models: the declared models that have no landmark names yet (any new name is theirs).
    """

    default: tuple[str, ...] = ()
    known: frozenset[str] = frozenset()
    open_models: tuple[str, ...] = ()


def as_label_names(names: LabelNames | Sequence[str]) -> LabelNames:
    """``names`` as :class:`LabelNames`: a plain sequence is one model's names, every other name refused."""
    if isinstance(names, LabelNames):
        return names
    fixed = tuple(names)
    return LabelNames(default=fixed, known=frozenset(fixed))


def _names_given(params: Mapping[str, Any] | None) -> bool:
    return bool(params and (params.get("label_info") or params.get("label_names")))


def read_saved_label(path: str, params: Mapping[str, Any] | None, names: LabelNames, source: str) -> LandmarkSet:
    """Decode an uploaded label and check its names (see the module docstring).

    Args:
        path: the uploaded file.
        params: the upload's parameters (``label_info`` / ``label_names`` for a label map).
        names: the models' names now.
        source: how to name the label in messages.

    Returns:
        The landmarks, in the default names' order when every placed name is one of them (as the
        served model would read it), else in the file's order.

    Raises:
        LandmarkFormatError: an unreadable label, no placed landmark, a name no model knows while
            every model has names, or a label map without names when no model has names to decode it.
    """
    if label_kind(path) == "label_map" and not _names_given(params):
        if not names.default and names.open_models:
            which = ", ".join(names.open_models)
            raise LandmarkFormatError(
                f"{source}: a sphere label map does not say which value is which landmark, and the model(s) {which} "
                "have no landmark names yet; send the names with it (params label_info [{\"name\": ..., \"idx\": "
                "...}] or label_names {name: value}), or save a point list (.mrk.json, .fcsv)")
        return read_label(path, names.default, params, source=source)
    landmarks = read_label(path, (), params, source=source)
    placed = [n for i, n in enumerate(landmarks.names) if landmarks.found[i]]
    if names.known and not names.open_models:
        unknown = [n for n in placed if n not in names.known]
        if unknown:
            raise LandmarkFormatError(
                f"{source}: unknown landmark(s) {', '.join(unknown)}; the models' landmarks are "
                f"{', '.join(sorted(names.known))} (to label other landmarks, declare a model for them: lmk3d "
                "serve --new-model NAME=DETECTOR)")
    if names.default and all(n in names.default for n in placed):
        landmarks = landmarks.reorder(names.default)
    return landmarks
