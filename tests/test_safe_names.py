"""lmk3d.safe_names: the one rule for names that become file names."""

from __future__ import annotations

from enum import Enum

import pytest

from lmk3d.errors import LandmarkError
from lmk3d.safe_names import MAX_NAME_LENGTH, check_plain_name, plain_name_problem


class Tag(str, Enum):
    FINAL = "final"


@pytest.mark.parametrize("name", ["hippocampus_004", "1.2.840.10008.5.1.4", "case 7", "a..b", "x" * MAX_NAME_LENGTH,
                                  "naïve-Ω", "final"])
def test_plain_names_pass_unchanged(name: str) -> None:
    assert plain_name_problem(name) == "" and check_plain_name(name, "image") is name


def test_a_str_enum_stays_the_same_object() -> None:
    assert check_plain_name(Tag.FINAL, "tag") is Tag.FINAL


@pytest.mark.parametrize(("name", "why"), [
    ("", "empty"), ("x" * (MAX_NAME_LENGTH + 1), f"{MAX_NAME_LENGTH + 1} characters long"),
    ("../etc", "contains '/'"), ("/etc/passwd", "contains '/'"), ("a\\b", "contains '\\\\'"),
    ("..\\x", "contains '\\\\'"), ("%2e%2e", "contains '%'"), ("..", "starts with '.'"), (".lock", "starts with '.'"),
    ("a\x00b", "U+0000"), ("a\nb", "U+000A"), ("a\x7fb", "U+007F"), ("a\u202eb", "U+202E"),
    (None, "NoneType, not a string"), (7, "int, not a string"),
])
def test_names_that_are_not_plain_are_refused_with_the_reason(name: object, why: str) -> None:
    assert why in plain_name_problem(name)
    with pytest.raises(LandmarkError) as e:
        check_plain_name(name, "parameter 'image'")  # type: ignore[type-var]
    assert str(e.value).startswith("parameter 'image' ") and why in str(e.value) and "plain name" in str(e.value)


def test_a_long_name_is_shortened_in_the_message() -> None:
    with pytest.raises(LandmarkError) as e:
        check_plain_name("/" + "y" * 1000, "tag")
    assert len(str(e.value)) < 400
