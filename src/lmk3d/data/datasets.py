"""Dataset readers: one entry point, :func:`load_dataset`, for every way landmark data is laid out.

``SPEC`` (a path) may be:

1. **a table folder**: ``<dir>/landmarks.csv`` (the landmark table: ``case,name,x_ras,y_ras,z_ras``) and
   ``<dir>/images/<case>.nii.gz`` (any image suffix lmk3d reads), the layout of
   ``../shared/data/hippocampus``;
2. **a phantom folder** (written by ``lmk3d phantoms``): a table folder plus ``groups.json`` (the landmark
   groups, see :func:`read_groups`) and ``phantoms.json`` (the generator's parameters);
3. **a per-case folder**: images with one ``<case>.mrk.json`` or ``<case>.fcsv`` each (same stem as the
   image), the landmark files beside the images or in ``<dir>/landmarks/``, the images in
   ``<dir>/images/`` if that folder exists, else in ``<dir>`` itself;
4. **a landmark table CSV** path, with the image folder given as ``images`` (default: ``images/`` beside
   the CSV).

Every form gives the same :class:`Dataset`: a sequence of :class:`~lmk3d.data.samples.Sample` sorted by
case id. A case with an image but no landmarks is an unlabelled sample (``landmarks`` is None); landmarks
whose case has no image are an error that names the case.

Example:
    >>> ds = load_dataset("../shared/data/hippocampus")  # doctest: +SKIP
    >>> len(ds), ds.names[:2], ds[0].case  # doctest: +SKIP
    (200, ('HIPPO_ANTERIOR_CENTROID', 'HIPPO_POSTERIOR_CENTROID'), 'hippocampus_004')
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import numpy as np

from lmk3d import geometry
from lmk3d.data.samples import Sample
from lmk3d.errors import ImageReadError, LandmarkFormatError
from lmk3d.io import read_landmarks, read_table
from lmk3d.io.atomic import atomic_write_text
from lmk3d.io.image import case_id, image_suffix
from lmk3d.landmarks import LandmarkSet, all_names

TABLE_FILE = "landmarks.csv"
GROUPS_FILE = "groups.json"
PER_CASE_SUFFIXES = (".mrk.json", ".fcsv")
AXES = ("LR", "AP", "SI")


@dataclass(frozen=True)
class LandmarkGroup:
    """Landmarks that annotators place on one slice (the prior-guided paper's correlated landmarks).

    Attributes:
        name: group name, e.g. ``mid_sagittal``.
        landmarks: the landmark names in the group.
        axis: the axis perpendicular to the shared (key) slice: ``LR``, ``AP`` or ``SI``.
    """

    name: str
    landmarks: tuple[str, ...]
    axis: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "landmarks": list(self.landmarks), "axis": self.axis}


def read_groups(path: str | os.PathLike[str]) -> tuple[LandmarkGroup, ...]:
    """Read a landmark-group file::

        {"groups": [{"name": "mid_sagittal", "landmarks": ["chin", "occ_bone"], "axis": "LR"}],
         "independent": ["mand_l", "mand_r", "odont_p"], "landmarks": [...all names, in order...]}

    ``independent`` and ``landmarks`` are optional (landmarks in no group are independent).

    Raises:
        LandmarkFormatError: not JSON, no ``groups`` list, a group without a name or landmarks, an axis
            other than LR/AP/SI, or a landmark in two groups.
    """
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LandmarkFormatError(f"{p}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LandmarkFormatError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("groups"), list):
        raise LandmarkFormatError(f"{p}: expected an object with a 'groups' list")
    out: list[LandmarkGroup] = []
    seen: dict[str, str] = {}
    for k, g in enumerate(doc["groups"]):
        if not isinstance(g, dict) or not isinstance(g.get("name"), str) or not g.get("landmarks"):
            raise LandmarkFormatError(f"{p}: group {k} needs a 'name' and a non-empty 'landmarks' list")
        axis = str(g.get("axis", "")).upper()
        if axis not in AXES:
            raise LandmarkFormatError(f"{p}: group {g['name']!r} has axis {g.get('axis')!r}; use one of "
                                      f"{', '.join(AXES)}")
        names = tuple(str(n) for n in g["landmarks"])
        for n in names:
            if n in seen:
                raise LandmarkFormatError(f"{p}: landmark {n!r} is in groups {seen[n]!r} and {g['name']!r}")
            seen[n] = g["name"]
        out.append(LandmarkGroup(g["name"], names, axis))
    return tuple(out)


def write_groups(path: str | os.PathLike[str], groups: Sequence[LandmarkGroup],
                 names: Sequence[str] = ()) -> Path:
    """Write a landmark-group file (see :func:`read_groups`); ``names``: every landmark, in order."""
    grouped = {n for g in groups for n in g.landmarks}
    doc: dict[str, Any] = {"groups": [g.to_dict() for g in groups]}
    if names:
        doc["independent"] = [n for n in names if n not in grouped]
        doc["landmarks"] = list(names)
    return atomic_write_text(path, json.dumps(doc, indent=2) + "\n")


@dataclass(frozen=True)
class Dataset(Sequence[Sample]):
    """Samples of one dataset, sorted by case id.

    Attributes:
        root: the folder (or table file) the dataset was read from.
        samples: the cases; ``landmarks`` is None for unlabelled ones.
        names: every landmark name, in the table's (or group file's) order.
        groups: landmark groups from ``groups.json`` (empty when there is none).
        form: ``table``, ``phantom``, ``per_case`` or ``images`` (no landmarks at all).
    """

    root: Path
    samples: tuple[Sample, ...]
    names: tuple[str, ...]
    groups: tuple[LandmarkGroup, ...] = ()
    form: str = "table"
    _index: dict[str, int] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._index.update({s.case: i for i, s in enumerate(self.samples)})

    def __len__(self) -> int:
        return len(self.samples)

    @overload
    def __getitem__(self, i: int) -> Sample: ...

    @overload
    def __getitem__(self, i: slice) -> Sequence[Sample]: ...

    def __getitem__(self, i: int | slice) -> Sample | Sequence[Sample]:
        return self.samples[i]

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    @property
    def cases(self) -> tuple[str, ...]:
        return tuple(s.case for s in self.samples)

    def labelled(self) -> list[Sample]:
        """The samples that have landmarks."""
        return [s for s in self.samples if s.landmarks is not None]

    def get(self, case: str) -> Sample:
        if case not in self._index:
            raise KeyError(f"no case {case!r} in {self.root}")
        return self.samples[self._index[case]]

    def subset(self, cases: Sequence[str]) -> list[Sample]:
        """The samples of ``cases``, in that order.

        Raises:
            LandmarkFormatError: a case is not in this dataset.
        """
        missing = [c for c in cases if c not in self._index]
        if missing:
            raise LandmarkFormatError(f"{self.root}: no case(s) {', '.join(missing[:5])}"
                                      f"{' ...' if len(missing) > 5 else ''} in this dataset")
        return [self.samples[self._index[c]] for c in cases]

    def truth(self, cases: Sequence[str] | None = None) -> dict[str, LandmarkSet]:
        """``{case: LandmarkSet}`` of the labelled samples (of ``cases`` if given)."""
        chosen = self.subset(cases) if cases is not None else list(self.samples)
        return {s.case: s.landmarks for s in chosen if s.landmarks is not None}


def list_images(folder: str | os.PathLike[str]) -> dict[str, Path]:
    """``{case: image path}`` of the image files in ``folder`` (not recursive; hidden files skipped).

    Raises:
        LandmarkFormatError: two images with the same case id (``a.nii`` and ``a.nii.gz``).
    """
    d = Path(folder)
    out: dict[str, Path] = {}
    for p in sorted(d.iterdir()):
        if p.name.startswith(".") or not p.is_file() or not image_suffix(p) or p.name.lower().endswith(".dcm"):
            continue
        c = case_id(p)
        if c in out:
            raise LandmarkFormatError(f"{d}: two images for case {c!r}: {out[c].name} and {p.name}")
        out[c] = p
    return out


def image_geometry(path: str | os.PathLike[str]) -> tuple[tuple[int, int, int], np.ndarray]:
    """``(shape, affine)`` of an image from its header only (no voxel data is read).

    The affine is the one :func:`lmk3d.io.read_image` gives (ijk -> RAS mm): nibabel's for NIfTI,
    SimpleITK's LPS geometry converted for the others; a DICOM folder is read in full.
    """
    p = Path(path)
    suffix = image_suffix(p)
    if p.is_dir() or suffix == ".dcm" or not suffix:
        from lmk3d.io.image import read_image

        vol = read_image(p)
        return vol.shape, vol.affine
    if not p.is_file():
        raise ImageReadError(f"{p}: no such file")
    if suffix in (".nii", ".nii.gz"):
        import nibabel as nib

        try:
            img: Any = nib.load(str(p))
            shape, affine = tuple(int(v) for v in img.shape[:3]), np.asarray(img.affine)
        except Exception as e:  # nibabel raises many types for corrupt headers
            raise ImageReadError(f"{p}: cannot read NIfTI header ({type(e).__name__}: {e})") from None
    else:
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(p))
        try:
            reader.ReadImageInformation()
        except RuntimeError as e:
            raise ImageReadError(f"{p}: cannot read image header ({str(e).strip().splitlines()[-1]})") from None
        size = reader.GetSize()
        if len(size) != 3:
            raise ImageReadError(f"{p}: expected a 3D image, got {len(size)}D of size {size}")
        shape = (int(size[0]), int(size[1]), int(size[2]))
        affine = geometry.affine_from_itk(reader.GetOrigin(), reader.GetSpacing(), reader.GetDirection())
    if len(shape) != 3:
        raise ImageReadError(f"{p}: expected a 3D image, got shape {shape}")
    try:
        return (shape[0], shape[1], shape[2]), geometry.check_affine(affine)
    except ValueError as e:
        raise ImageReadError(f"{p}: unusable geometry: {e}") from None


def _samples(images: dict[str, Path], labels: dict[str, LandmarkSet], source: str) -> tuple[Sample, ...]:
    orphans = sorted(c for c in labels if c not in images)
    if orphans:
        raise LandmarkFormatError(f"{source}: landmarks for case(s) without an image: {', '.join(orphans[:5])}"
                                  f"{' ...' if len(orphans) > 5 else ''} (no image of that name was found)")
    return tuple(Sample(c, images[c], labels.get(c)) for c in sorted(images))


def _names(labels: dict[str, LandmarkSet], groups_doc: dict[str, Any] | None) -> tuple[str, ...]:
    found = all_names(labels[c] for c in sorted(labels))
    if groups_doc and isinstance(groups_doc.get("landmarks"), list):
        order = [str(n) for n in groups_doc["landmarks"]]
        return tuple(order + [n for n in found if n not in order])
    return found


def _image_folder(root: Path, images: str | os.PathLike[str] | None) -> Path:
    folder = Path(images) if images is not None else (root / "images" if (root / "images").is_dir() else root)
    if not folder.is_dir():
        raise LandmarkFormatError(f"{folder}: image folder not found; give the images with --images DIR "
                                  "(or put them in an images/ folder beside the landmarks)")
    return folder


def load_dataset(spec: str | os.PathLike[str], images: str | os.PathLike[str] | None = None) -> Dataset:
    """Read a dataset in any of the forms listed in the module docstring.

    Args:
        spec: a dataset folder, or a landmark table CSV.
        images: the image folder, overriding the default (``<spec>/images`` or beside the CSV).

    Raises:
        LandmarkFormatError: ``spec`` is missing or of no known form, a folder holds no images, landmarks
            name a case that has no image, a case has two landmark files, or a landmark file is malformed.
    """
    root = Path(spec)
    if not root.exists():
        raise LandmarkFormatError(f"{root}: no such file or folder; a dataset is a folder with landmarks.csv "
                                  "and images/, a folder of images with <case>.mrk.json/.fcsv files, or a "
                                  "landmark table CSV")
    groups: tuple[LandmarkGroup, ...] = ()
    groups_doc: dict[str, Any] | None = None
    if root.is_file():
        if not root.name.lower().endswith(".csv"):
            raise LandmarkFormatError(f"{root}: a dataset file must be a landmark table (.csv); "
                                      "otherwise give a dataset folder")
        table_path, folder, form = root, _image_folder(root.parent, images), "table"
    elif (root / TABLE_FILE).is_file():
        table_path, folder = root / TABLE_FILE, _image_folder(root, images)
        form = "phantom" if (root / "phantoms.json").is_file() else "table"
    else:
        table_path, folder, form = None, _image_folder(root, images), "per_case"
    group_file = (root if root.is_dir() else root.parent) / GROUPS_FILE
    if group_file.is_file():
        groups = read_groups(group_file)
        groups_doc = json.loads(group_file.read_text(encoding="utf-8"))
    imgs = list_images(folder)
    if not imgs:
        raise LandmarkFormatError(f"{folder}: no images (looked for files ending in .nii.gz, .nii, .nrrd, "
                                  ".nhdr, .mha, .mhd)")
    if table_path is not None:
        labels = read_table(table_path)
        source = str(table_path)
    else:
        labels = {}
        places = [d for d in (root / "landmarks", folder, root) if d.is_dir()]
        files: dict[str, Path] = {}
        for d in dict.fromkeys(places):  # each folder once, in order
            for p in sorted(d.iterdir()):
                suf = next((s for s in PER_CASE_SUFFIXES if p.name.lower().endswith(s)), None)
                if suf is None or p.name.startswith("."):
                    continue
                c = p.name[: -len(suf)]
                if c in files and files[c] != p:
                    raise LandmarkFormatError(f"{root}: two landmark files for case {c!r}: {files[c]} and {p}")
                files[c] = p
        labels = {c: read_landmarks(p) for c, p in files.items()}
        source = str(root)
        if not labels:
            form = "images"
    samples = _samples(imgs, labels, source)
    return Dataset(root, samples, _names(labels, groups_doc), groups, form)
