"""A real coturn TURN server on an emulated host, for NAT-traversal tests.

Why coturn: it is what a deployment runs, and it implements the TURN REST credential scheme the
coordinator mints for (``use-auth-secret``); testing against our own stand-in would only prove
that the two agree with each other. Debian package ``coturn`` (binary ``turnserver``).

Options that matter here (coturn 4.6.1), written to a config file so the shared secret never shows
in the process list:

* ``use-auth-secret`` + ``static-auth-secret``: TURN REST credentials, no user database;
* ``listening-ip``/``relay-ip``: the host's one address (coturn would otherwise listen on every
  interface and pick relay addresses itself);
* ``no-tls``, ``no-dtls``, ``no-cli``: nothing to certify, no admin port;
* ``userdb`` in the run folder: coturn opens a SQLite file even when unused, by default under
  ``/var/lib/turn``;
* ``verbose``, ``log-file=stdout``, ``simple-log``: one line per request ("incoming packet
  ALLOCATE processed, success", "error 401: Unauthorized"), which is what tests assert on.

No option is needed to relay to private (10.x) peers: coturn 4.6.1 denies none by default.
It runs in the foreground; the topology stops it with the host's other processes.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
from pathlib import Path

from engine.wanemu._sh import WanEmuError
from engine.wanemu.topology import Host

log = logging.getLogger(__name__)

TURN_BINARY = "turnserver"
TURN_PORT = 3478
REALM = "kluster"
#: Relay ports handed out (one per allocation): a small range is plenty for a test grid.
RELAY_PORTS = (49152, 49352)
#: coturn prints this once its UDP listener is bound (it is ready for requests then).
_READY_MARK = "UDP listener opened"


def turnserver_unavailable_reason() -> str | None:
    """None if coturn's ``turnserver`` is installed, else a one-line reason to skip."""
    if shutil.which(TURN_BINARY) is None:
        return "TURN tests need coturn's `turnserver` (apt-get install coturn)"
    return None


class TurnServer:
    """coturn with the TURN REST scheme on ``host``, its files (config, log, db) in ``run_dir``."""

    def __init__(self, host: Host, secret: str, run_dir: Path, *, realm: str = REALM) -> None:
        self.host = host
        self.secret = secret
        self.realm = realm
        self.run_dir = run_dir
        self.log_path = run_dir / "turnserver.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The ``turn:`` URL peers use (TURN over UDP, the transport aioice relays on)."""
        return f"turn:{self.host.ip}:{TURN_PORT}?transport=udp"

    @property
    def stun_url(self) -> str:
        return f"stun:{self.host.ip}:{TURN_PORT}"

    def _write_config(self) -> Path:
        lo, hi = RELAY_PORTS
        conf = self.run_dir / "turnserver.conf"
        lines = [
            "use-auth-secret",
            f"static-auth-secret={self.secret}",
            f"realm={self.realm}",
            f"listening-ip={self.host.ip}",
            f"relay-ip={self.host.ip}",
            f"listening-port={TURN_PORT}",
            f"min-port={lo}",
            f"max-port={hi}",
            "no-tls",
            "no-dtls",
            "no-cli",
            "no-software-attribute",
            "no-multicast-peers",
            "verbose",
            "log-file=stdout",
            "simple-log",
            f"userdb={self.run_dir / 'turndb'}",
            f"pidfile={self.run_dir / 'turnserver.pid'}",
        ]
        conf.write_text("\n".join(lines) + "\n", encoding="utf-8")
        conf.chmod(0o600)
        return conf

    def start(self, timeout_s: float = 10.0) -> TurnServer:
        """Start coturn in the foreground and wait until it listens; WanEmuError if it does not."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        conf = self._write_config()
        with self.log_path.open("wb") as out:
            self.proc = self.host.popen([TURN_BINARY, "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while _READY_MARK not in self.log():
            if self.proc.poll() is not None:
                raise WanEmuError(f"turnserver exited with code {self.proc.returncode}: {self.log()[-500:]}")
            if time.monotonic() > deadline:
                raise WanEmuError(f"turnserver did not listen within {timeout_s:g} s; see {self.log_path}")
            time.sleep(0.05)
        log.info("coturn listening on %s:%d (log %s)", self.host.ip, TURN_PORT, self.log_path)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)

    def log(self) -> str:
        """Everything coturn has logged so far."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def lines_for(self, username: str) -> list[str]:
        """Log lines about requests made as ``username`` (``user <...>`` / ``username=<...>``)."""
        return [line for line in self.log().splitlines() if f"<{username}>" in line]

    def lines_for_peer(self, user: str) -> list[str]:
        """Log lines about requests made with any TURN REST credential of ``user`` (``<expiry>:<user>``)."""
        return [line for line in self.log().splitlines() if f":{user}>" in line]
