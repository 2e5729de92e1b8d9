"""Blocking work (HTTP to the coordinator) off the Qt thread, results delivered back on it.

A small thread pool and one queued signal: ``Tasks.run(fn, done)`` calls ``fn()`` in a worker
thread and ``done(result)`` later on the Qt thread, where ``result`` is the value or the
exception ``fn`` raised. No Qt object is touched from a worker thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from PySide6.QtCore import QObject, Qt, Signal

log = logging.getLogger(__name__)


class Tasks(QObject):
    _finished = Signal(object, object)

    def __init__(self, workers: int = 2, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="supplier-io")
        self._finished.connect(self._deliver, Qt.ConnectionType.QueuedConnection)
        self._closed = False
        self.pending = 0

    def run(self, fn: Callable[[], Any], done: Callable[[Any], None]) -> None:
        if self._closed:
            return
        self.pending += 1

        def finished(future: Future[Any]) -> None:
            if self._closed or future.cancelled():  # the app is going away: no signal into dying Qt objects
                return
            exc = future.exception()
            self._finished.emit(done, exc if exc is not None else future.result())

        self._pool.submit(fn).add_done_callback(finished)

    def _deliver(self, done: Callable[[Any], None], result: Any) -> None:
        self.pending -= 1
        if self._closed:
            return
        try:
            done(result)
        except Exception:  # a bug in a callback must not take the tray down
            log.exception("error in a background task's callback")

    def close(self) -> None:
        """Drop pending results and wait for running requests (bounded by their timeouts). Idempotent."""
        self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)
