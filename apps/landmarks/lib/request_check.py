"""The app's one shim on MONAI Label: refuse a bad train (or batch infer, scoring) request before a process starts.

MONAI Label 0.8.5 answers ``POST /train/<model>`` by calling
``monailabel.utils.async_tasks.task.AsyncTask.run("train", request=..., params=...)``, which starts
``python -m monailabel.interfaces.utils.app -m train`` in a child process and answers 200 at once: a
bad option or an empty datastore would only show up later, in the child's log. The app object sees
the request first nowhere (``AsyncTask.run`` calls only ``info()`` and ``bundle_path(model)`` on it),
so there is no hook to use instead.

:func:`install_request_check` therefore wraps exactly one callable, ``AsyncTask.run`` (which serves
``train``, ``batch_infer`` and ``scoring``): the wrapper calls the installed check with the method and
the merged request and params (the check raises an ``HTTPException``, a 4xx, to refuse) and then calls
the original ``AsyncTask.run`` unchanged, with one change for a train request with ``run_sync=true``:
MONAI Label would then train inside the server process; the wrapper starts the usual child process
instead and waits for it to end (the server runs the endpoint in a worker thread, so the wait blocks
nothing else), and returns the finished task. It is installed once per process (a later call only
replaces the check); nothing else of MONAI Label is touched anywhere in the app.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

__all__ = ["RequestCheck", "install_request_check"]

#: ``check(method, request)``: raises an ``HTTPException`` (a 4xx) to refuse a background task request.
RequestCheck = Callable[[str, dict[str, Any]], None]

_request_check: RequestCheck | None = None
_MARK = "_lmk3d_train_request_check"
_POLL_S = 0.5


def install_request_check(check: RequestCheck) -> None:
    """Run ``check(method, request)`` before MONAI Label starts a background process (train, batch infer, scoring).

    Args:
        check: called with the method and ``{**request, **params}``; raises an ``HTTPException`` to refuse.
    """
    global _request_check
    _request_check = check
    from monailabel.utils.async_tasks.task import AsyncTask

    if getattr(AsyncTask.run, _MARK, False):
        return
    original = AsyncTask.run

    def run(method: str, request: dict[str, Any] | None = None, params: dict[str, Any] | None = None,
            force_sync: bool = False, enqueue: bool = False) -> Any:
        if _request_check is not None:
            _request_check(method, {**(request or {}), **(params or {})})
        if method != "train":
            return original(method, request=request, params=params, force_sync=force_sync, enqueue=enqueue)
        task, detail = original(method, request=request, params=params, force_sync=False, enqueue=enqueue)
        if force_sync and isinstance(task, dict):
            while task.get("status") in ("SUBMITTED", "RUNNING"):
                time.sleep(_POLL_S)
        return task, detail

    setattr(run, _MARK, True)
    AsyncTask.run = staticmethod(run)  # type: ignore[method-assign,assignment]
