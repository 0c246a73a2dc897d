"""A command's start-up (imports, model load) without the garbage collector rescanning it.

Importing torch and the library and building a model create well over a hundred thousand objects that
live as long as the process. Python's automatic collector runs every few hundred allocations and, each
time an older generation is due, walks them again; during a cold start that is about 0.15 s of CPU spent
finding nothing (docs/benchmarks.md). :func:`startup` turns automatic collection off for the block and then moves
everything the block created into the permanent generation (:func:`gc.freeze`), so later collections
skip it as well (in ``lmk3d predict`` on a small image, the later collections had cost more than the
start-up's: docs/benchmarks.md). The block starts with one collection, so garbage made before it is
freed rather than frozen (in a fresh process there is almost nothing to scan); what the block itself
frees is freed by reference counting as usual, and the frozen survivors are modules, networks and
weights that the process keeps anyway.

Only commands use it (``lmk3d predict``); the library never changes the collector of a process it
is imported into.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def startup() -> Iterator[None]:
    """Run the block with automatic garbage collection off, then freeze what it created.

    Example::

        with startup():
            from lmk3d.detectors import load_detector
            model = load_detector("models/pin-phantom-hn")

    Collection is switched back on afterwards only if it was on before (nested blocks leave it off
    until the outermost one ends).
    """
    was_enabled = gc.isenabled()
    gc.collect()  # what is already garbage is freed, not frozen (frozen objects are never scanned again)
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()
