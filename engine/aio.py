"""Running the event loop: uvloop when installed (``KLUSTER_UVLOOP=0`` turns it off).

Why: aiortc's SCTP/DTLS work is pure Python on the event loop, and uvloop's cheaper I/O callbacks
cut the per-packet cost of every hop of every token.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    if os.environ.get("KLUSTER_UVLOOP", "1") != "0":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(coro)
    return asyncio.run(coro)
