"""The app's one shim on MONAI Label: refuse a bad train request before a training process starts.

MONAI Label 0.8.5 answers ``POST /train/<model>`` by calling
``monailabel.utils.async_tasks.task.AsyncTask.run("train", request=..., params=...)``, which starts
``python -m monailabel.interfaces.utils.app -m train`` in a child process and answers 200 at once: a
bad option or an empty datastore would only show up later, in the child's log. The app object sees
the request first nowhere (``AsyncTask.run`` calls only ``info()`` and ``bundle_path(model)`` on it),
so there is no hook to use instead.

:func:`install_request_check` therefore wraps exactly one callable, ``AsyncTask.run``, and only for
``method == "train"``: the wrapper calls the installed check with the merged request and params (the
check raises an ``HTTPException``, a 4xx, to refuse) and then calls the original ``AsyncTask.run``
unchanged, with one change for ``run_sync=true``: MONAI Label would then train inside the server
process; the wrapper starts the usual child process instead and waits for it to end (the server runs
the endpoint in a worker thread, so the wait blocks nothing else), and returns the finished task.
Every other method (``infer``, ``batch_infer``, ``scoring``...) goes straight through. It is installed
once per process (a later call only replaces the check); nothing else of MONAI Label is touched
anywhere in the app.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

__all__ = ["RequestCheck", "install_request_check"]

#: ``check(request)``: raises an ``HTTPException`` (a 4xx) to refuse a train request.
RequestCheck = Callable[[dict[str, Any]], None]

_request_check: RequestCheck | None = None
_MARK = "_lmk3d_train_request_check"
_POLL_S = 0.5


def install_request_check(check: RequestCheck) -> None:
    """Run ``check(request)`` on every train request before MONAI Label starts a training process.

    Args:
        check: called with ``{**request, **params}``; raises an ``HTTPException`` to refuse.
    """
    global _request_check
    _request_check = check
    from monailabel.utils.async_tasks.task import AsyncTask

    if getattr(AsyncTask.run, _MARK, False):
        return
    original = AsyncTask.run

    def run(method: str, request: dict[str, Any] | None = None, params: dict[str, Any] | None = None,
            force_sync: bool = False, enqueue: bool = False) -> Any:
        if method != "train":
            return original(method, request=request, params=params, force_sync=force_sync, enqueue=enqueue)
        if _request_check is not None:
            _request_check({**(request or {}), **(params or {})})
        task, detail = original(method, request=request, params=params, force_sync=False, enqueue=enqueue)
        if force_sync and isinstance(task, dict):
            while task.get("status") in ("SUBMITTED", "RUNNING"):
                time.sleep(_POLL_S)
        return task, detail

    setattr(run, _MARK, True)
    AsyncTask.run = staticmethod(run)  # type: ignore[method-assign,assignment]
