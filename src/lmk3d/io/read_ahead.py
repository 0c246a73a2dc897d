"""Read inputs ahead of their use: a background thread reads item k+1 while the caller works on item k.

``lmk3d predict`` over many images spends part of every image reading and decoding the file (gzip,
DICOM) and the rest in the networks. :class:`ReadAhead` overlaps the two: a thread reads up to
``ahead`` items beyond the one the caller holds, so at most ``ahead + 1`` items are in memory. The
items come back **in input order**, each with its value or the error that reading it raised, so the
caller's loop is the same whether reading runs ahead (``ahead >= 1``) or not (``ahead = 0``: every
item is read in the caller's thread when its turn comes).

Example:
    >>> with ReadAhead(["a", "b"], str.upper, ahead=1) as reads:
    ...     [r.value for r in reads]
    ['A', 'B']
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Generic, TypeVar

from lmk3d.errors import LandmarkError

P = TypeVar("P")
T = TypeVar("T")

__all__ = ["Fetched", "ReadAhead"]


@dataclass(frozen=True)
class Fetched(Generic[T]):
    """One item as read: its ``value``, or the ``error`` (one of the caught types) that reading raised.

    Attributes:
        index: the item's position in the input.
        seconds: how long reading it took (in whichever thread read it).
    """

    index: int
    value: T | None
    error: Exception | None
    seconds: float


@dataclass(frozen=True)
class _Crash:
    """An exception of a type the caller did not ask to catch: raised again in the caller's thread."""

    error: BaseException


class ReadAhead(Generic[P, T]):
    """Iterate over ``read(item)`` for ``items`` in order, reading up to ``ahead`` items in advance.

    Args:
        items: what to read (paths), in the order the results are wanted.
        read: reads one item; it runs in a background thread when ``ahead >= 1``, so it must not
            share mutable state with the caller.
        ahead: how many items may be read but not yet taken by the caller (0: no thread, each item
            read in the caller's thread when its turn comes).
        catch: exception types returned as :attr:`Fetched.error` (bad input the caller skips); any
            other exception is raised from the iteration at that item's position, as it would be
            without the thread.

    Use it as a context manager (the thread starts on entering, so the first read overlaps whatever
    the caller does before iterating, e.g. loading a model); leaving early stops the thread after the
    read in progress. The items can be iterated once.
    """

    def __init__(self, items: Sequence[P], read: Callable[[P], T], ahead: int = 1,
                 catch: tuple[type[Exception], ...] = (LandmarkError,)) -> None:
        if ahead < 0:
            raise LandmarkError(f"read ahead: {ahead} items; give 0 (no reading ahead) or more")
        self.items = list(items)
        self.read = read
        self.ahead = ahead
        self.catch = catch
        self._slots = threading.Semaphore(ahead)
        self._ready: queue.Queue[Fetched[T] | _Crash] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._iterated = False

    def _fetch(self, index: int) -> Fetched[T]:
        t0 = time.perf_counter()
        try:
            value = self.read(self.items[index])
        except self.catch as e:
            return Fetched(index, None, e, time.perf_counter() - t0)
        return Fetched(index, value, None, time.perf_counter() - t0)

    def _work(self) -> None:
        for i in range(len(self.items)):
            while not self._slots.acquire(timeout=0.05):  # a free slot, unless the caller has left
                if self._stop.is_set():
                    return
            if self._stop.is_set():
                return
            try:
                got: Fetched[T] | _Crash = self._fetch(i)
            except BaseException as e:  # handed to the caller's thread, which raises it
                self._ready.put(_Crash(e))
                return
            self._ready.put(got)

    def start(self) -> ReadAhead[P, T]:
        """Start the reading thread (once; nothing when ``ahead`` is 0)."""
        if self.ahead > 0 and self._thread is None and self.items:
            self._thread = threading.Thread(target=self._work, name="lmk3d-read-ahead", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop reading: the thread ends after the read in progress (it is not waited for)."""
        self._stop.set()

    def __enter__(self) -> ReadAhead[P, T]:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
                 ) -> None:
        self.close()

    def __iter__(self) -> Iterator[Fetched[T]]:
        if self._iterated:
            raise RuntimeError("ReadAhead: the items can be iterated once")
        self._iterated = True
        if self.ahead == 0:
            for i in range(len(self.items)):
                yield self._fetch(i)
            return
        self.start()
        for _ in range(len(self.items)):
            got = self._ready.get()
            self._slots.release()  # the caller now holds this one: the thread may read the next
            if isinstance(got, _Crash):
                raise got.error
            yield got
        if self._thread is not None:
            self._thread.join()
