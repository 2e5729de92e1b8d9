"""A stand-in for ``kluster node --events-jsonl -`` that the supervisor tests run as a real process.

  --mode serve        registered, assigned, ready; a session runs while the file CONTROL/session
                      exists; SIGTERM drains (waits for that file to go, then session_end,
                      drained, stopped; exit 0)
  --mode crash        prints the node's one-line error and exits 2 at once
  --mode crash-once   crashes on its first start (per --count file), serves afterwards
  --mode hang         ignores SIGTERM (tests the supervisor's kill)

Every start appends a line to --count, so tests can count restarts, and writes the variables
it was given to CONTROL/env. Unknown arguments (the real
node's) are accepted and ignored.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path


def emit(event: str, **fields: object) -> None:
    sys.stdout.write(json.dumps({"event": event, "t": time.time(), **fields}) + "\n")
    sys.stdout.flush()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", default="serve")
    p.add_argument("--control", type=Path, required=True)
    p.add_argument("--count", type=Path, required=True)
    args, _ = p.parse_known_args()
    with args.count.open("a") as f:
        f.write("start\n")
    (args.control / "env").write_text(json.dumps({k: os.environ.get(k) for k in ("KLUSTER_TOKEN", "KLUSTER_LOGLEVEL")}))
    starts = len(args.count.read_text().splitlines())
    if args.mode == "crash" or (args.mode == "crash-once" and starts == 1):
        sys.stderr.write("INFO some log line\nkluster: error: cannot reach the coordinator at http://x: boom\n")
        return 2
    stop = {"asked": False}

    def on_term(*_: object) -> None:
        stop["asked"] = True

    signal.signal(signal.SIGTERM, signal.SIG_IGN if args.mode == "hang" else on_term)
    emit("registered", name="fake", peer_id="n-fake")
    emit("assigned", model_id="smollm2-135m", units=[0, 3])
    time.sleep(0.1)
    emit("ready", model_id="smollm2-135m", layers=[0, 30])
    session_file = args.control / "session"
    live = False
    tokens = 0
    while True:
        if session_file.exists() and not live and not stop["asked"]:
            live = True
            emit("session_start", session="s-1", model_id="smollm2-135m", layers=[0, 30])
        if live:
            tokens += 5
            emit("session_progress", session="s-1", tokens=tokens, steps=tokens, seconds=tokens / 50, tokens_per_s=50.0)
            if not session_file.exists():
                live = False
                emit("session_end", session="s-1", tokens=tokens, steps=tokens, seconds=tokens / 50, tokens_per_s=50.0)
        if stop["asked"]:
            emit("draining", sessions=int(live))
            while session_file.exists():
                time.sleep(0.05)
            if live:
                emit("session_end", session="s-1", tokens=tokens, steps=tokens, seconds=1.0, tokens_per_s=50.0)
            emit("drained", sessions_left=0)
            emit("stopped")
            return 0
        time.sleep(0.1)


if __name__ == "__main__":
    raise SystemExit(main())
