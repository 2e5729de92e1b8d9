"""An async client for the coordinator's HTTP API, as the TUI reads it.

Every call has a timeout and every failure becomes one ``KlusterError`` with a one-line message
(``CoordinatorError`` when the coordinator cannot be reached), so the UI shows a line, never a
traceback, and a worker never hangs on a dead socket. The event stream reconnects from
``Last-Event-ID`` so a short outage loses no event (the coordinator keeps the last 256).

Auth: the account token is never sent to the API itself. It is exchanged for short-lived
sessions by ``engine.coordinator.auth.SessionAuth`` (which also notices a coordinator with auth
off and then sends nothing); a 401 gets one fresh session and one retry, since a coordinator
restart invalidates sessions long before they expire. Where that module does not exist yet,
the token goes as a plain bearer header (``StaticToken``).

``GridApi`` is what the app needs; tests of the look (snapshots) pass a fake with fixed data.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from typing import Any, Protocol

import aiohttp

from engine.errors import CoordinatorError, KlusterError, error_for_code

from .sse import SseParser

log = logging.getLogger(__name__)

#: a request that takes longer than this is treated as a coordinator that does not answer
REQUEST_TIMEOUT_S = 10.0
#: the coordinator pings an idle event stream every 15 s; silence much longer means a dead link
STREAM_READ_TIMEOUT_S = 40.0
#: yielded by ``events`` once the stream is attached (not a coordinator event)
STREAM_CONNECTED = "stream.connected"


class Credentials(Protocol):
    """Where request headers come from: ``SessionAuth`` (sessions), or ``StaticToken``."""

    async def headers(self) -> dict[str, str]: ...

    async def refresh(self) -> str: ...

    async def close(self) -> None: ...


class StaticToken:
    """The token itself as a bearer header: for a coordinator without session exchange."""

    def __init__(self, token: str) -> None:
        self._token = token

    async def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token}"}

    async def refresh(self) -> str:
        return self._token

    async def close(self) -> None:
        return None


def engine_session_auth(coordinator: str, token: str | None) -> Credentials | None:
    """The engine's session exchange for ``token`` (None without a token or without that module)."""
    if not token:
        return None
    try:
        from engine.coordinator.auth import SessionAuth
    except ImportError:
        return None
    return SessionAuth(coordinator, token)


def credentials_for(coordinator: str, token: str | None) -> Credentials | None:
    if not token:
        return None
    return engine_session_auth(coordinator, token) or StaticToken(token)


class GridApi(Protocol):
    """The coordinator calls the TUI makes (``CoordinatorApi``, or a fake in snapshot tests)."""

    base: str

    async def nodes(self) -> list[dict[str, Any]]: ...

    async def models(self) -> list[dict[str, Any]]: ...

    async def jobs(self) -> list[dict[str, Any]]: ...

    async def cancel(self, job_id: str, job_token: str | None) -> dict[str, Any]: ...

    def events(self, last_id: str | None) -> AsyncIterator[dict[str, Any]]: ...

    async def close(self) -> None: ...


#: what a user can do about a 401 (where kluster-tui looks for a token, config.py)
TOKEN_HINT = "give a developer token: $KLUSTER_TOKEN, the keyring or ~/.config/kluster/config.toml"


def _error_from_body(status: int, body: Any) -> KlusterError:
    err = body.get("error") if isinstance(body, dict) else None
    message = str(err.get("message") or "") if isinstance(err, dict) else ""
    if status == 401:
        return CoordinatorError(f"the coordinator wants a session ({message or 'HTTP 401'}): {TOKEN_HINT}")
    if isinstance(err, dict):
        return error_for_code(err.get("code"), message or f"HTTP {status}")
    return CoordinatorError(f"the coordinator answered HTTP {status}")


class CoordinatorApi:
    """One aiohttp session to one coordinator (created on first use, inside the running loop)."""

    def __init__(self, base: str, credentials: Credentials | None = None, timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        self.base = base.rstrip("/")
        self._credentials = credentials
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=min(5.0, timeout_s))
        self._http: aiohttp.ClientSession | None = None

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(timeout=self._timeout)
        return self._http

    async def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        auth = await self._credentials.headers() if self._credentials is not None else {}
        return {**auth, **(extra or {})}

    def _unreachable(self, exc: BaseException) -> CoordinatorError:
        reason = str(exc) or type(exc).__name__
        if isinstance(exc, TimeoutError):
            reason = "no answer within the timeout"
        elif isinstance(exc, aiohttp.ClientConnectorError) and exc.os_error.errno:
            reason = os.strerror(exc.os_error.errno).lower()  # "connection refused", not aiohttp's paragraph
        return CoordinatorError(f"cannot reach the coordinator at {self.base}: {reason}")

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        for attempt in range(2):
            try:
                headers = await self._headers()
                async with self._session().request(method, self.base + path, json=body, headers=headers) as resp:
                    try:
                        data = await resp.json(content_type=None)
                    except ValueError:
                        data = None
                    status = resp.status
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                raise self._unreachable(exc) from None
            if status == 401 and attempt == 0 and self._credentials is not None:
                await self._credentials.refresh()  # the coordinator restarted, or the session aged out
                continue
            if status >= 400:
                raise _error_from_body(status, data)
            return data
        raise CoordinatorError(f"the coordinator at {self.base} keeps refusing our session")  # not reached

    async def _list(self, path: str, key: str) -> list[dict[str, Any]]:
        data = await self._call("GET", path)
        items = data.get(key) if isinstance(data, dict) else None
        if not isinstance(items, list):
            raise CoordinatorError(f"the coordinator sent a malformed answer to {path}")
        return [i for i in items if isinstance(i, dict)]

    async def nodes(self) -> list[dict[str, Any]]:
        return await self._list("/v1/nodes", "nodes")

    async def models(self) -> list[dict[str, Any]]:
        return await self._list("/v1/models", "models")

    async def jobs(self) -> list[dict[str, Any]]:
        return await self._list("/v1/jobs", "jobs")

    async def cancel(self, job_id: str, job_token: str | None) -> dict[str, Any]:
        """Cancel a job; the coordinator wants the submitter's job token (the TUI holds it for its own jobs)."""
        data = await self._call("POST", f"/v1/jobs/{job_id}/cancel", {"token": job_token})
        return data if isinstance(data, dict) else {}

    async def events(self, last_id: str | None) -> AsyncIterator[dict[str, Any]]:
        """Job and node events from one connection to ``GET /v1/events``, from after ``last_id``.

        Ends (raising ``CoordinatorError``) when the stream breaks; the caller reconnects with the
        last ``seq`` it saw. Each coordinator event carries its ``seq``; the first item is a local
        ``stream.connected`` marker (no ``seq``), so the UI can say "live" before any event comes.
        """
        headers = await self._headers({"Last-Event-ID": last_id} if last_id else None)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5.0, sock_read=STREAM_READ_TIMEOUT_S)
        parser = SseParser(last_id)
        try:
            async with self._session().get(self.base + "/v1/events", headers=headers, timeout=timeout) as resp:
                if resp.status >= 400:
                    try:
                        body = await resp.json(content_type=None)
                    except ValueError:
                        body = None
                    if resp.status == 401 and self._credentials is not None:
                        await self._credentials.refresh()  # the reconnect carries a fresh session
                    raise _error_from_body(resp.status, body)
                yield {"kind": STREAM_CONNECTED}
                async for raw in resp.content:
                    event = parser.feed(raw.decode("utf-8", "replace").rstrip("\r\n"))
                    if event is not None:
                        yield event
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise self._unreachable(exc) from None
        raise CoordinatorError(f"the coordinator at {self.base} closed the event stream")

    async def close(self) -> None:
        if self._credentials is not None:
            await self._credentials.close()
        if self._http is not None:
            await self._http.close()
            self._http = None
