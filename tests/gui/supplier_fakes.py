"""A fake coordinator on loopback: sessions, ``/v1/nodes`` and ``/v1/earnings`` with values a test sets.

Speaks the same contract as the real one where the app relies on it: ``POST /v1/auth/session``
(Bearer account token, ``{"nonce"}`` -> a JWT-shaped session carrying that nonce), 401 without a
valid session when accounts are on, and ``/v1/earnings`` in integer micro-units (404 when
``earnings`` is None, as on a coordinator without the endpoint).
"""

from __future__ import annotations

import base64
import json
import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


class FakeCoordinator:
    def __init__(self, accounts: dict[str, tuple[str, str]] | None = None) -> None:
        #: account token -> (name, role); None: a coordinator without accounts
        self.accounts = accounts
        self.sessions: dict[str, str] = {}
        self.nodes: list[dict[str, Any]] = []
        self.earnings: dict[str, Any] | None = None
        self.requests: list[str] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: Any) -> None:
                pass

            def _send(self, status: int, body: Any) -> None:
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def _bearer(self) -> str:
                return self.headers.get("Authorization", "").removeprefix("Bearer ").strip()

            def do_POST(self) -> None:
                fake.requests.append(f"POST {self.path}")
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length) or b"{}")
                if self.path != "/v1/auth/session":
                    return self._send(404, {"error": {"code": "not_found", "message": "no such path"}})
                if fake.accounts is None:
                    return self._send(401, {"error": {"message": "this coordinator has no accounts (auth is off)"}})
                account = fake.accounts.get(self._bearer())
                if account is None:
                    return self._send(401, {"error": {"message": "unknown account token"}})
                token = f"{_b64({'alg': 'HS256'})}.{_b64({'nonce': body.get('nonce'), 'sub': account[0]})}.sig"
                fake.sessions[token] = account[0]
                return self._send(200, {"session": token, "expires_in": 600, "account": account[0], "role": account[1]})

            def do_GET(self) -> None:
                fake.requests.append(f"GET {self.path}")
                if fake.accounts is not None and self._bearer() not in fake.sessions:
                    return self._send(401, {"error": {"message": "no session token"}})
                if self.path == "/v1/nodes":
                    return self._send(200, {"nodes": fake.nodes})
                if self.path == "/v1/earnings" and fake.earnings is not None:
                    return self._send(200, fake.earnings)
                return self._send(404, {"error": {"code": "not_found", "message": "no such path"}})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> FakeCoordinator:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def set_earnings(self, today: int, week: int, total: int, jobs: int = 1) -> None:
        self.earnings = {
            "account": "alice",
            "today": {"units": today * 10, "amount": today},
            "last_7_days": {"units": week * 10, "amount": week},
            "total": {"units": total * 10, "amount": total},
            "per_job": {f"job-{i}": {"units": 10, "amount": total // max(jobs, 1)} for i in range(jobs)},
            "currency_micro": True,
        }


def new_token() -> str:
    return secrets.token_urlsafe(24)
