"""Plain names: the one rule for ids that become file names (image ids, label tags, model names...).

A client names an image, a label tag or a model, and the server turns that name into a file path
(``<studies>/labels/<tag>/<image>.nii.gz``). A name that is a path instead (``../../etc``,
``/abs``, ``a\\b``), that a proxy or a second decoding could turn into one (``%2e%2e``), or that
names a hidden or temporary file (``.lock``, ``.staging-...``) must never get that far. The HTTP
guard and the local datastore both apply :func:`check_plain_name`, so they cannot disagree.

Example:
    >>> check_plain_name("hippocampus_004", "image")
    'hippocampus_004'
    >>> plain_name_problem("../x")
    "it contains '/'"
"""

from __future__ import annotations

import unicodedata
from typing import TypeVar

from lmk3d.errors import LandmarkError

__all__ = ["MAX_NAME_LENGTH", "PLAIN_NAME_RULE", "check_plain_name", "plain_name_problem"]

#: The longest name most file systems accept for one path part.
MAX_NAME_LENGTH = 255
#: What a plain name is, for error messages.
PLAIN_NAME_RULE = (f"a plain name is 1-{MAX_NAME_LENGTH} characters with no '/', '\\', '%' or control "
                   "character, and does not start with '.'")

_S = TypeVar("_S", bound=str)


def plain_name_problem(value: object) -> str:
    """Why ``value`` is not a plain name, or ``""`` when it is one (see :data:`PLAIN_NAME_RULE`)."""
    if not isinstance(value, str):
        return f"it is a {type(value).__name__}, not a string"
    if not value:
        return "it is empty"
    if len(value) > MAX_NAME_LENGTH:
        return f"it is {len(value)} characters long (at most {MAX_NAME_LENGTH})"
    for ch in ("/", "\\", "%"):
        if ch in value:
            return f"it contains {ch!r}"
    for ch in value:
        # Cc: NUL, newline, DEL...; Cf: invisible format characters (bidi overrides) that disguise a name.
        if unicodedata.category(ch) in ("Cc", "Cf"):
            return f"it contains the control character U+{ord(ch):04X}"
    if value.startswith("."):
        return "it starts with '.'"
    return ""


def check_plain_name(value: _S, what: str) -> _S:
    """Return ``value`` unchanged (the same object, so a ``str`` enum stays one) if it is a plain name.

    Args:
        value: the name a client sent.
        what: what it names, for the message (``"image"``, ``"tag"``, ``"parameter 'model'"``...).

    Raises:
        LandmarkError: ``value`` is not a plain name; the message names ``what``, shows the value
            (truncated) and says why.
    """
    problem = plain_name_problem(value)
    if problem:
        shown = value if not isinstance(value, str) or len(value) <= 80 else value[:80] + "..."
        raise LandmarkError(f"{what} {shown!r} is not a plain name: {problem}; {PLAIN_NAME_RULE}")
    return value
