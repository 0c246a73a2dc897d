"""Bad input as HTTP 4xx answers.

MONAI Label 0.8.5 registers no handler for its own ``MONAILabelException``, so anything the app raises
reaches the client as a bare ``500 Internal Server Error``. FastAPI's ``HTTPException`` is the one
exception its endpoints turn into a status code with a message (``{"detail": "..."}``), from wherever
in the request it is raised (the infer task and the datastore run in the request's own thread), so the
app raises that for input the client got wrong.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from fastapi import HTTPException

from lmk3d.errors import LandmarkError

BAD_REQUEST = 400
NOT_FOUND = 404
CONFLICT = 409
UNPROCESSABLE = 422


def http_error(status: int, message: str) -> HTTPException:
    """An exception MONAI Label's endpoints answer with ``status`` and ``{"detail": message}``."""
    return HTTPException(status_code=status, detail=message)


def unknown_image(image_id: str, n_images: int) -> HTTPException:
    """404 for an image id the datastore does not have."""
    return http_error(NOT_FOUND, f"unknown image {image_id!r}: the datastore has no such image ({n_images} images); "
                                 "list them with GET /datastore/?output=all")


@contextmanager
def bad_input(status: int = UNPROCESSABLE, prefix: str = "") -> Iterator[None]:
    """Turn the library's input errors (:class:`LandmarkError`) raised inside the block into ``status``.

    Programming errors (anything else) stay 500s: they are the server's fault, not the client's.
    """
    try:
        yield
    except LandmarkError as e:
        raise http_error(status, f"{prefix}{e}") from None
