"""A Server-Sent-Events line parser (pure: fed lines, returns events), for ``GET /v1/events``.

Kept apart from the HTTP code so the framing rules (multi-line data, comments, ids) are tested
without a socket. Only what the coordinator sends is interpreted: ``id``, ``event`` and ``data``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class SseParser:
    """Feed it decoded lines (without the newline); it returns a JSON event when one is complete."""

    #: the id of the last complete event, for ``Last-Event-ID`` on reconnect
    last_id: str | None = None
    _data: list[str] = field(default_factory=list)
    _id: str | None = None

    def feed(self, line: str) -> dict[str, Any] | None:
        if line == "":
            return self._dispatch()
        if line.startswith(":"):  # a comment: the coordinator's "connected" and keep-alive pings
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "id":
            self._id = value
        return None  # "event" repeats the JSON's own "kind"; unknown fields are ignored (SSE rules)

    def _dispatch(self) -> dict[str, Any] | None:
        data, self._data = "\n".join(self._data), []
        event_id, self._id = self._id, None
        if event_id is not None:
            self.last_id = event_id
        if not data:
            return None
        try:
            event = json.loads(data)
        except ValueError:
            log.warning("ignoring a malformed event from the coordinator: %.80s", data)
            return None
        return event if isinstance(event, dict) else None
