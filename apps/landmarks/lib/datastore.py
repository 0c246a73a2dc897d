"""The local datastore: names that stay inside the studies folder, labels checked first, atomic writes.

MONAI Label's :class:`LocalDatastore` joins whatever image id, label id or tag a request names into a
file path, copies an upload over the stored label before anything checks it, writes files and its
``datastore_v2.json`` in place (a crash leaves half a file), and answers an unknown image with a bare
500. This subclass:

- **keeps every path inside the studies folder**: an image id, label id or tag must be a plain name
  (:func:`lmk3d.safe_names.check_plain_name`: no ``/``, ``\\``, ``%``, control character, not
  starting with ``.``), else 400 naming the parameter; a file that resolves outside the studies folder
  (a symbolic link) is refused with 403. Files whose names are not plain are left out of the listing;
- **checks each label before it is stored**, so a bad upload is a 4xx with a message and the label
  already stored stays byte for byte as it was: an unknown image (404); a file that is not an accepted
  label or does not decode (:func:`lmk3d.io.labels.read_label`), landmark names no model knows (but any
  name while a declared model has no names yet: :mod:`lib.label_names`), a label map on another voxel grid
  than the image's, or points more than :data:`lmk3d.io.labels.LABEL_MARGIN_MM` outside the image
  (:func:`lmk3d.io.labels.check_label_fits`, from the image's header only): 422. An uploaded image must
  have a listed file type and read in full as a 3D image (422);
- **writes atomically** (:mod:`lmk3d.io.atomic`): labels, uploaded images and ``datastore_v2.json`` go to
  a temporary file in the destination folder, are fsynced and renamed over the old file. Construction
  removes the temporary files a killed writer left (:meth:`LandmarkDatastore.remove_stale_temps`).

A ``.json`` point list is stored as ``.mrk.json`` (the datastore's rescans only pick up the file
extensions it lists, and ``.json`` is not one of them), and a new label that replaces one of another
format for the same image and tag removes the old file, so a rescan cannot bring the old one back.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from filelock import FileLock
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore

from lib.errors import BAD_REQUEST, CONFLICT, NOT_FOUND, UNPROCESSABLE, bad_input, http_error, unknown_image
from lib.label_names import LabelNames, as_label_names, read_saved_label
from lmk3d.errors import LandmarkError
from lmk3d.io import landmark_suffix, read_image
from lmk3d.io.atomic import atomic_copy, atomic_write_text, remove_stale_temps
from lmk3d.io.labels import check_label_fits, label_kind, read_grid
from lmk3d.io.markups import write_markups
from lmk3d.safe_names import check_plain_name, plain_name_problem

logger = logging.getLogger(__name__)

FORBIDDEN = 403


class LandmarkDatastore(LocalDatastore):
    """A :class:`LocalDatastore` that confines names to the studies folder, checks labels, writes atomically.

    Args:
        landmark_names: returns the models' landmark names now (:class:`lib.label_names.LabelNames`), or
            a plain sequence of names (value k+1 of a label map = name k; other names refused).
        *args, **kwargs: as for :class:`LocalDatastore`.
    """

    def __init__(self, *args: Any, landmark_names: Callable[[], LabelNames | Sequence[str]], **kwargs: Any) -> None:
        self._landmark_names = landmark_names
        self._ignored_files: set[str] = set()
        super().__init__(*args, **kwargs)
        self.remove_stale_temps()

    # --- names and paths ----------------------------------------------------------------------------
    def _plain(self, value: Any, what: str) -> Any:
        """``value`` if it is a plain name, else a 400 naming ``what``."""
        try:
            return check_plain_name(value, what)
        except LandmarkError as e:
            raise http_error(BAD_REQUEST, str(e)) from None

    def _inside(self, path: str, what: str) -> str:
        """``path`` if its real path (symbolic links followed) is inside the studies folder, else a 403."""
        root = os.path.realpath(self._datastore_path)
        real = os.path.realpath(path)
        if os.path.commonpath([root, real]) != root:
            raise http_error(FORBIDDEN, f"{what} resolves to a file outside the studies folder (a symbolic link?); "
                                        "refused: the studies folder must hold its images and labels itself")
        return path

    def _label_folder(self, tag: str) -> str:
        return os.path.join(self._datastore.label_path(None), tag)

    def _list_files(self, path: str, patterns: Sequence[str]) -> dict[str, str]:
        # A file whose id is not a plain name could never be asked for by name: leave it out, once said.
        kept = {}
        for name, file in super()._list_files(path, patterns).items():
            problem = plain_name_problem(self._to_id(name)[0]) or plain_name_problem(name)
            if problem:
                if os.path.join(path, name) not in self._ignored_files:
                    self._ignored_files.add(os.path.join(path, name))
                    logger.warning("ignoring %s: its name is not a plain name (%s)", os.path.join(path, name), problem)
                continue
            kept[name] = file
        return kept

    def remove_stale_temps(self) -> list[Path]:
        """Remove the temporary files that interrupted atomic writes left in the studies folder.

        Looks in the studies folder, the images folder, the labels folder and each tag's folder; see
        :func:`lmk3d.io.atomic.remove_stale_temps` (each removal is logged).

        Returns:
            The removed files.
        """
        labels = self._datastore.label_path(None)
        folders = [self._datastore_path, self._datastore.image_path(), labels]
        if os.path.isdir(labels):
            folders += [e.path for e in os.scandir(labels) if e.is_dir(follow_symlinks=False)]
        removed: list[Path] = []
        for folder in dict.fromkeys(os.path.realpath(f) for f in folders):
            removed += remove_stale_temps(folder)
        return removed

    # --- reads ---------------------------------------------------------------------------------------
    def get_image_uri(self, image_id: str) -> str:
        uri = super().get_image_uri(self._plain(image_id, "image"))
        return self._inside(uri, f"image {image_id!r}") if uri else uri

    def get_image_info(self, image_id: str) -> dict[str, Any]:
        if not self.get_image_uri(image_id):
            raise unknown_image(image_id, len(self.list_images()))
        info: dict[str, Any] = super().get_image_info(self._plain(image_id, "image"))
        if info.get("path"):
            self._inside(info["path"], f"image {image_id!r}")
        return info

    def get_label_uri(self, label_id: str, label_tag: str) -> str:
        uri = super().get_label_uri(self._plain(label_id, "label"), self._plain(label_tag, "tag"))
        return self._inside(uri, f"label {label_id!r} ({label_tag})") if uri else uri

    def get_label_info(self, label_id: str, label_tag: str) -> dict[str, Any]:
        return dict(super().get_label_info(self._plain(label_id, "label"), self._plain(label_tag, "tag")))

    def get_labels_by_image_id(self, image_id: str) -> dict[str, str]:
        return dict(super().get_labels_by_image_id(self._plain(image_id, "image")))

    def get_label_by_image_id(self, image_id: str, tag: str) -> str:
        return str(super().get_label_by_image_id(self._plain(image_id, "image"), self._plain(tag, "tag")))

    # --- info updates --------------------------------------------------------------------------------
    def update_image_info(self, image_id: str, info: dict[str, Any]) -> None:
        if not self._datastore.objects.get(self._plain(image_id, "image")):
            raise unknown_image(image_id, len(self.list_images()))
        super().update_image_info(image_id, info)

    def update_label_info(self, label_id: str, label_tag: str, info: dict[str, Any]) -> None:
        if not self._datastore.label(self._plain(label_id, "label"), self._plain(label_tag, "tag")):
            raise _no_label(label_id, label_tag)
        super().update_label_info(label_id, label_tag, info)

    # --- removals ------------------------------------------------------------------------------------
    def remove_label(self, label_id: str, label_tag: str) -> None:
        uri = self.get_label_uri(label_id, label_tag)
        if not uri:
            raise _no_label(label_id, label_tag)
        logger.info("removing label %s/%s", label_tag, label_id)
        with FileLock(self._lock_file):
            _unlink_file(uri)
        if not self._auto_reload:
            self.refresh()

    def remove_image(self, image_id: str) -> None:
        obj = self._datastore.objects.get(self._plain(image_id, "image"))
        if not obj:
            raise unknown_image(image_id, len(self.list_images()))
        logger.info("removing image %s and its labels (%s)", image_id, ", ".join(obj.labels) or "none")
        # The tags come from folder names, not from the client: build their paths without the name check.
        paths = [os.path.join(self._datastore.label_path(tag), self._filename(image_id, label.ext))
                 for tag, label in obj.labels.items()]
        paths.append(os.path.join(self._datastore.image_path(), self._filename(image_id, obj.image.ext)))
        with FileLock(self._lock_file):
            for path in paths:
                _unlink_file(self._inside(path, f"image {image_id!r}"))
        if not self._auto_reload:
            self.refresh()

    # --- writes --------------------------------------------------------------------------------------
    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        derived, ext = self._to_id(os.path.basename(image_filename))
        image_id = self._plain(image_id or derived, "image")
        name = self._plain(self._filename(image_id, ext), "image file name")
        if not any(fnmatch.fnmatch(name, pattern) for pattern in self._extensions):
            raise http_error(UNPROCESSABLE, f"image {image_id!r} rejected: file type {ext or '(none)'!r} is not "
                                            f"accepted; send one of {', '.join(self._extensions)}")
        with bad_input(prefix=f"image {image_id!r} rejected: "):
            # In full, as the detectors will: a truncated file has a good header; a single slice is not 3D.
            read_image(image_filename)
        folder = self._inside(self._datastore.image_path(), "the images folder")
        dest = os.path.join(folder, name)
        with FileLock(self._lock_file):
            old = self._datastore.objects.get(image_id)
            previous = os.path.join(folder, self._filename(image_id, old.image.ext)) if old else None
            atomic_copy(image_filename, dest)
            info = dict(image_info or {})
            info.update(ts=int(time.time()), name=name)
            self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info=info, ext=ext))
            self._update_datastore_file(lock=False)
            if previous and previous != dest:
                _unlink_file(previous)
        logger.info("image %s: stored %s", image_id, name)
        return image_id

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        image_id = self._plain(image_id, "image")
        label_tag = self._plain(label_tag, "tag")
        image_uri = self.get_image_uri(image_id)
        if not image_uri:
            raise unknown_image(image_id, len(self.list_images()))
        names = as_label_names(self._landmark_names())
        source = _describe(label_filename)
        with bad_input(prefix=f"label for image {image_id!r} rejected: "):
            landmarks = read_saved_label(label_filename, label_info, names, source=source)
            label_grid = read_grid(label_filename, source=source) if label_kind(label_filename) == "label_map" else None
        try:
            image_grid = read_grid(image_uri, source=f"image {image_id!r}")
        except LandmarkError as e:
            raise http_error(CONFLICT, f"label for image {image_id!r} rejected: the stored image cannot be read, "
                                       f"so the label cannot be checked against it ({e})") from None
        with bad_input(prefix=f"label for image {image_id!r} rejected: "):
            check_label_fits(landmarks, image_grid, label_grid, image_name=f"image {image_id!r}")

        lower = label_filename.lower()
        convert = lower.endswith(".json") and not lower.endswith(".mrk.json")
        ext = ".mrk.json" if convert else self._to_id(os.path.basename(label_filename))[1]
        name = self._plain(self._filename(image_id, ext), "label file name")
        labels = self._inside(self._datastore.label_path(None), "the labels folder")
        with FileLock(self._lock_file):
            folder = self._label_folder(label_tag)
            os.makedirs(folder, exist_ok=True)
            self._inside(folder, f"tag {label_tag!r}")
            dest = os.path.join(folder, name)
            obj = self._datastore.objects[image_id]
            old = obj.labels.get(label_tag)
            previous = os.path.join(labels, label_tag, self._filename(image_id, old.ext)) if old else None
            if convert:
                write_markups(dest, landmarks, name=image_id)
            else:
                atomic_copy(label_filename, dest)
            info = dict(label_info or {})
            info.update(ts=int(time.time()), name=name)
            obj.labels[label_tag] = DataModel(info=info, ext=ext)
            self._update_datastore_file(lock=False)
            if previous and previous != dest and os.path.lexists(previous):
                _unlink_file(previous)
                logger.info("label %s/%s: replaced %s by %s", label_tag, image_id, os.path.basename(previous), name)
        logger.info("label %s/%s: %d of %d landmarks placed", label_tag, image_id, int(landmarks.found.sum()),
                    len(landmarks))
        return image_id

    def _update_datastore_file(self, lock: bool = True) -> None:
        # MONAI Label writes datastore_v2.json in place: a crash mid-write leaves a file it cannot load.
        def write() -> None:
            text = json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str)
            atomic_write_text(self._datastore_config_path, text)
            self._config_ts = os.stat(self._datastore_config_path).st_mtime

        if lock:
            with FileLock(self._lock_file):
                write()
        else:
            write()


def _no_label(label_id: str, tag: str) -> Exception:
    return http_error(NOT_FOUND, f"no label {label_id!r} with tag {tag!r}; list them with GET /datastore/?output=all")


def _unlink_file(path: str) -> None:
    # Only files (or links): MONAI Label's remove_file would delete a whole folder.
    if os.path.lexists(path) and not os.path.isdir(path):
        os.unlink(path)


def _describe(path: str) -> str:
    # The upload sits in a temporary file whose name means nothing to the client; its type does.
    suffix = landmark_suffix(path) or "".join(Path(path).suffixes)
    return f"the uploaded {suffix or 'suffix-less'} file"
