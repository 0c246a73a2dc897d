"""The local datastore, checking each label before it is stored.

MONAI Label's ``PUT /datastore/label`` copies whatever file it gets over the image's label for that tag
and only then calls the app back (``on_save_label``), and answers an unknown image with a bare 500. This
subclass checks first, so a bad upload is a 4xx with a message and the label already stored stays as
it was:

- an unknown image id: 404;
- a file that is not an accepted label, or one that does not decode (see :mod:`lmk3d.io.labels`): 422.

A ``.json`` point list is stored as ``.mrk.json`` (the datastore's rescans only pick up the file
extensions it lists, and ``.json`` is not one of them), and a new label that replaces one of another
format for the same image and tag removes the old file, so a rescan cannot bring the old one back.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from monailabel.datastore.local import LocalDatastore

from lib.errors import bad_input, unknown_image
from lmk3d.io import landmark_suffix
from lmk3d.io.labels import read_label
from lmk3d.io.markups import write_markups

logger = logging.getLogger(__name__)


class LandmarkDatastore(LocalDatastore):
    """A :class:`LocalDatastore` whose ``save_label`` validates landmark labels first.

    Args:
        landmark_names: returns the served models' landmark names (value k+1 of a label map = name k).
        *args, **kwargs: as for :class:`LocalDatastore`.
    """

    def __init__(self, *args: Any, landmark_names: Callable[[], Sequence[str]], **kwargs: Any) -> None:
        self._landmark_names = landmark_names
        super().__init__(*args, **kwargs)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        if not self.get_image_uri(image_id):
            raise unknown_image(image_id, len(self.list_images()))
        names = tuple(self._landmark_names())
        with bad_input(prefix=f"label for image {image_id!r} rejected: "):
            landmarks = read_label(label_filename, names, label_info, source=_describe(label_filename))
        stored = label_filename
        converted = None
        if label_filename.lower().endswith(".json") and not label_filename.lower().endswith(".mrk.json"):
            fd, converted = tempfile.mkstemp(suffix=".mrk.json")
            os.close(fd)
            write_markups(converted, landmarks, name=image_id)
            stored = converted
        previous = self.get_label_uri(image_id, label_tag)
        try:
            label_id = str(super().save_label(image_id, stored, label_tag, label_info))
        finally:
            if converted and os.path.exists(converted):
                os.unlink(converted)
        current = self.get_label_uri(image_id, label_tag)
        if previous and previous != current and os.path.exists(previous):
            os.unlink(previous)
            logger.info("label %s/%s: replaced %s by %s", label_tag, image_id, os.path.basename(previous),
                        os.path.basename(current))
        logger.info("label %s/%s: %d of %d landmarks placed", label_tag, image_id, int(landmarks.found.sum()),
                    len(landmarks))
        return label_id


def _describe(path: str) -> str:
    # The upload sits in a temporary file whose name means nothing to the client; its type does.
    suffix = landmark_suffix(path) or "".join(Path(path).suffixes)
    return f"the uploaded {suffix or 'suffix-less'} file"
