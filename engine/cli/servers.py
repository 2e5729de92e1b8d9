"""``kluster coordinator`` and ``kluster node``: the long-running processes.

``kluster coordinator add-user | list-users | disable-user | enable-user`` manage the accounts
file (``engine.coordinator.accounts``) instead of starting a coordinator.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine import aio, paths
from engine.errors import ConfigError

if TYPE_CHECKING:
    from engine.coordinator.accounts import AccountStore
    from engine.coordinator.turn import TurnConfig

DEFAULT_PORT = 8765
DEFAULT_SESSION_TTL_S = 600.0
ACCOUNTS_FILE = "accounts.sqlite3"
LEDGER_FILE = "ledger.sqlite3"


def register(sub: Any) -> None:
    c = sub.add_parser("coordinator", help="run the coordinator (registry, signaling, routes)")
    c.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    c.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 picks a free one)")
    c.add_argument(
        "--pack",
        action="append",
        type=Path,
        default=[],
        help="fragment pack to serve (repeatable); default: the embedded model in 3 fragments",
    )
    c.add_argument("--db", default=None, help="SQLite registry file (default: in the user data dir; ':memory:')")
    c.add_argument("--announce", action="store_true", help="print one JSON line with the URL once listening")
    c.add_argument(
        "--placement-settle",
        type=float,
        default=1.0,
        help="seconds of quiet (no joins, leaves or measurements) before fragments are (re)placed (default 1)",
    )
    c.add_argument(
        "--stun",
        action="append",
        default=[],
        metavar="URL",
        help="STUN server handed to peers, e.g. stun:stun.example.org:3478 (repeatable; peers use the first)",
    )
    c.add_argument(
        "--turn",
        action="append",
        default=[],
        metavar="URL",
        help="TURN server handed to peers with a short-lived credential each, e.g. "
        "turn:turn.example.org:3478?transport=udp (repeatable; peers use the first). Needs the "
        "server's shared secret (coturn static-auth-secret) in $KLUSTER_TURN_SECRET or --turn-secret-file",
    )
    c.add_argument(
        "--turn-secret-file",
        type=Path,
        default=None,
        metavar="PATH",
        help="file whose first line is the TURN shared secret (instead of $KLUSTER_TURN_SECRET)",
    )
    c.add_argument(
        "--turn-ttl",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="lifetime of each TURN credential (default 3600; refreshed every half of it)",
    )
    c.add_argument(
        "--accounts",
        type=Path,
        default=None,
        metavar="PATH",
        help="accounts file (default: accounts.sqlite3 beside the --db file, i.e. in the user data dir)",
    )
    c.add_argument(
        "--auth",
        choices=["on", "off", "auto"],
        default="auto",
        help="require session tokens of accounts (default auto: on once the accounts file has an active account)",
    )
    c.add_argument(
        "--session-secret-file",
        type=Path,
        default=None,
        metavar="PATH",
        help="file whose first line (>= 32 characters) signs session tokens, so they survive a restart "
        "(or $KLUSTER_SESSION_SECRET; default: random per start)",
    )
    c.add_argument(
        "--session-ttl",
        type=float,
        default=DEFAULT_SESSION_TTL_S,
        metavar="SECONDS",
        help=f"lifetime of session tokens (default {DEFAULT_SESSION_TTL_S:.0f})",
    )
    c.add_argument(
        "--rate-ip",
        default="50:500",
        metavar="RATE:BURST",
        help="requests per second and burst allowed per client IP (IPv6: per /64), or 'off' (default 50:500)",
    )
    c.add_argument(
        "--rate-account",
        default="20:200",
        metavar="RATE:BURST",
        help="authenticated requests per second and burst allowed per account, or 'off' (default 20:200)",
    )
    c.add_argument(
        "--rate-audit",
        default="2000:100000",
        metavar="RATE:BURST",
        help="positions spot checks may recompute per second and at once, per account (auth off: per IP), "
        "or 'off' (default 2000:100000)",
    )
    c.add_argument(
        "--ledger",
        default=None,
        metavar="PATH",
        help="SQLite ledger of earnings and spend (default: ledger.sqlite3 beside the --db file; ':memory:')",
    )
    c.add_argument(
        "--prices",
        type=Path,
        default=None,
        metavar="FILE",
        help='JSON {"<model id>": price, ...}: integer micro-units per million tokens per model',
    )
    c.add_argument(
        "--price-per-mtok",
        type=int,
        default=None,
        metavar="MICRO",
        help="price of models --prices does not name, in micro-units per million tokens "
        "(default 200000, i.e. 0.20 per million tokens)",
    )
    c.set_defaults(handler=run_coordinator, default_loglevel="INFO")
    _register_accounts(c)

    n = sub.add_parser("node", help="run a node that hosts the fragments assigned by the coordinator")
    n.add_argument("--coordinator", required=True, help="coordinator URL, e.g. http://127.0.0.1:8765")
    n.add_argument("--name", required=True, help="a name for this node, shown in routes")
    n.add_argument("--cache-dir", type=Path, default=None, help="fragment cache (default: the user cache dir)")
    n.add_argument("--kv-budget-mb", type=int, default=1024, help="memory for KV caches of all sessions (MiB)")
    n.add_argument(
        "--memory-mb",
        type=int,
        default=None,
        help="memory offered to the grid for weights and KV caches (MiB); placement gives the node no more "
        "fragments than fit (default: 90%% of free VRAM, or half of the available RAM)",
    )
    n.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    n.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    n.add_argument(
        "--drain-timeout",
        type=float,
        default=60.0,
        help="on SIGTERM/Ctrl-C, seconds to let live sessions finish before exiting (default 60)",
    )
    n.add_argument(
        "--benchmark-seconds",
        type=float,
        default=1.0,
        help="length of the throughput benchmark placement relies on (default 1)",
    )
    n.add_argument(
        "--throttle",
        type=float,
        default=1.0,
        help="test/demo knob: make this node F times slower, in its benchmark and in serving (default 1)",
    )
    n.add_argument(
        "--claim-layers-per-s",
        type=float,
        default=None,
        help="test knob: a speed to claim to the coordinator, which shows it and never uses it",
    )
    n.add_argument(
        "--perturb",
        type=float,
        default=0.0,
        help="test knob, a Byzantine node: add noise of this relative size to every hidden state it "
        "sends (a last hop returns wrong tokens); spot checks must catch and ban it (default 0)",
    )
    n.add_argument(
        "--identity",
        type=Path,
        default=None,
        metavar="PATH",
        help="this node's long-term ed25519 key, created (mode 0600) if missing; its peer id is derived from it "
        "(default: one per --name in the user data dir, identity/node-NAME.key)",
    )
    n.add_argument(
        "--token-file",
        type=Path,
        default=None,
        metavar="PATH",
        help="file whose first line is this node's supplier account token (default: $KLUSTER_TOKEN; "
        "none: for coordinators with auth off)",
    )
    n.add_argument(
        "--events-jsonl",
        default=None,
        metavar="PATH|-",
        help="write state changes as JSON lines to PATH, or '-' for stdout (for a supervisor such as kluster-supplier)",
    )
    n.set_defaults(handler=run_node, default_loglevel="INFO")


def _register_accounts(c: Any) -> None:
    """``kluster coordinator add-user`` and friends (no coordinator needs to run)."""
    sub = c.add_subparsers(dest="accounts_command", metavar="ACCOUNTS-COMMAND", required=False)
    accounts = argparse.ArgumentParser(add_help=False)
    accounts.add_argument(
        "--accounts",
        type=Path,
        default=None,
        metavar="PATH",
        help="accounts file (default: accounts.sqlite3 in the user data dir)",
    )
    a = sub.add_parser("add-user", parents=[accounts], help="create an account and print its token (shown once)")
    a.add_argument("name", help="account name: letters, digits, '.', '_', '-'")
    a.add_argument("--role", required=True, choices=["supplier", "developer", "admin"], help="what it may do")
    a.add_argument("--json", action="store_true", help="print one JSON object")
    a.set_defaults(handler=run_add_user, default_loglevel="WARNING")
    ls = sub.add_parser("list-users", parents=[accounts], help="list accounts (never their tokens)")
    ls.add_argument("--json", action="store_true", help="print one JSON object")
    ls.set_defaults(handler=run_list_users, default_loglevel="WARNING")
    for name, disabled in (("disable-user", True), ("enable-user", False)):
        d = sub.add_parser(
            name, parents=[accounts], help=f"{name.split('-')[0]} an account (its sessions are refused at next use)"
        )
        d.add_argument("name")
        d.set_defaults(handler=run_set_disabled, disabled=disabled, default_loglevel="WARNING")


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def default_pack(fragments: int = 3) -> Path:
    """The embedded default model packed into ``fragments`` fragments (packed once, then reused)."""
    from engine.fragments.pack import PACK_INDEX, pack_model
    from engine.fragments.store import read_pack
    from engine.models.default_model import DEFAULT_MODEL_ID, ensure_default_model
    from engine.sparsity.importance import CALIBRATION_FILE

    folder = ensure_default_model()
    out = paths.data_dir() / "packs" / f"{DEFAULT_MODEL_ID}-{fragments}"
    calibrated = (folder / CALIBRATION_FILE).is_file()
    # A pack made before the model was calibrated lacks the importance --activation plans from.
    if not (out / PACK_INDEX).is_file() or (calibrated and read_pack(out).manifests[0].importance is None):
        pack_model(folder, out, fragments, model_id=DEFAULT_MODEL_ID)
    return out


def _ice_options(args: argparse.Namespace) -> tuple[tuple[dict[str, Any], ...], TurnConfig | None]:
    """--stun/--turn/--turn-secret-file/--turn-ttl -> (static ice_servers, TurnConfig or None)."""
    from engine.coordinator.turn import build_ice_config, load_secret

    if args.turn_secret_file is not None and not args.turn:
        raise ConfigError("--turn-secret-file needs at least one --turn URL")
    secret = load_secret(args.turn_secret_file) if args.turn else None
    return build_ice_config(stun_urls=args.stun, turn_urls=args.turn, secret=secret, ttl_s=args.turn_ttl)


def _accounts_store(path: Path | None) -> AccountStore:
    from engine.coordinator.accounts import AccountStore

    return AccountStore(path or paths.data_dir() / ACCOUNTS_FILE)


def run_add_user(args: argparse.Namespace) -> int:
    store = _accounts_store(args.accounts)
    try:
        token = store.add(args.name, args.role)
    finally:
        store.close()
    if args.json:
        print(json.dumps({"name": args.name, "role": args.role, "token": token}))
    else:
        print(f"{args.role} account '{args.name}' created. Its token (shown only this once, keep it secret):")
        print(token)
        print("Give it to the account's nodes or clients as $KLUSTER_TOKEN or in a --token-file.", file=sys.stderr)
    return 0


def run_list_users(args: argparse.Namespace) -> int:
    import time

    store = _accounts_store(args.accounts)
    try:
        accounts = store.accounts()
    finally:
        store.close()
    if args.json:
        rows = [{"name": a.name, "role": a.role, "created": a.created, "disabled": a.disabled} for a in accounts]
        print(json.dumps({"accounts": rows}))
        return 0
    print(f"{'name':<24}{'role':<12}{'created':<22}state")
    for a in accounts:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(a.created))
        print(f"{a.name:<24}{a.role:<12}{created:<22}{'disabled' if a.disabled else 'active'}")
    return 0


def run_set_disabled(args: argparse.Namespace) -> int:
    store = _accounts_store(args.accounts)
    try:
        account = store.set_disabled(args.name, args.disabled)
    finally:
        store.close()
    print(f"account '{account.name}' {'disabled' if account.disabled else 'enabled'}")
    return 0


def _auth_options(args: argparse.Namespace, db: str) -> dict[str, Any]:
    """--accounts/--auth/--session-*/--rate-* -> CoordinatorConfig fields."""
    from engine.coordinator.auth import load_session_secret
    from engine.coordinator.ratelimit import RateLimits, parse_limit

    accounts = args.accounts
    if accounts is None:  # beside the registry: a throwaway --db (demo, tests) gets no accounts
        accounts = (paths.data_dir() if db == ":memory:" else Path(db).parent) / ACCOUNTS_FILE
    secret, _ = load_session_secret(args.session_secret_file)
    return {
        "accounts_path": str(accounts),
        "auth": args.auth,
        "session_secret": secret,
        "session_ttl_s": args.session_ttl,
        "rate_limits": RateLimits(
            per_ip=parse_limit(args.rate_ip),
            per_account=parse_limit(args.rate_account),
            audit_positions=parse_limit(args.rate_audit),
        ),
    }


def _ledger_options(args: argparse.Namespace, db: str) -> dict[str, Any]:
    """--ledger/--prices/--price-per-mtok -> CoordinatorConfig fields."""
    from engine.coordinator.billing import DEFAULT_PRICE_PER_MTOK, load_pricing

    default = DEFAULT_PRICE_PER_MTOK if args.price_per_mtok is None else args.price_per_mtok
    if default < 0:
        raise ConfigError(f"--price-per-mtok must be a non-negative integer, got {default}")
    ledger = args.ledger
    if ledger is None:  # beside the registry, like the accounts file
        ledger = str((paths.data_dir() if db == ":memory:" else Path(db).parent) / LEDGER_FILE)
    return {"ledger_path": ledger, "pricing": load_pricing(args.prices, default)}


def run_coordinator(args: argparse.Namespace) -> int:
    from engine.coordinator.app import Coordinator, CoordinatorConfig

    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be 0-65535, got {args.port}")
    ice_servers, turn = _ice_options(args)
    packs = tuple(args.pack) or (default_pack(),)
    if args.db is None:
        paths.data_dir().mkdir(parents=True, exist_ok=True)
    db = args.db or str(paths.data_dir() / "coordinator.sqlite3")
    if not 0 <= args.placement_settle <= 600:
        raise ConfigError("--placement-settle must be between 0 and 600 seconds")
    config = CoordinatorConfig(
        host=args.host,
        port=args.port,
        db_path=db,
        packs=packs,
        placement_settle_s=args.placement_settle,
        ice_servers=ice_servers,
        turn=turn,
        **_auth_options(args, db),
        **_ledger_options(args, db),
    )
    coordinator = Coordinator(config)

    async def main() -> None:
        try:
            port = await coordinator.start()
            url = f"http://{args.host}:{port}"
            if args.announce:
                print(json.dumps({"event": "listening", "coordinator": url}), flush=True)
            else:
                print(f"coordinator listening on {url}", file=sys.stderr, flush=True)
            await _until_signalled()
        finally:
            await coordinator.shutdown()

    aio.run(main())
    return 0


def run_node(args: argparse.Namespace) -> int:
    from engine.coordinator.auth import load_account_token
    from engine.node.events import EventSink
    from engine.node.worker import Node, NodeConfig

    if args.kv_budget_mb <= 0:
        raise ConfigError("--kv-budget-mb must be positive")
    cache = args.cache_dir or paths.cache_dir()
    if not 0.05 <= args.benchmark_seconds <= 60:
        raise ConfigError("--benchmark-seconds must be between 0.05 and 60")
    if args.memory_mb is not None and args.memory_mb <= 0:
        raise ConfigError("--memory-mb must be positive")
    if not 1.0 <= args.throttle <= 1000.0:
        raise ConfigError("--throttle must be between 1 and 1000")
    if args.claim_layers_per_s is not None and not 0 < args.claim_layers_per_s < 1e12:
        raise ConfigError("--claim-layers-per-s must be positive")
    if not 0.0 <= args.perturb <= 100.0:
        raise ConfigError("--perturb must be between 0 and 100")
    node = Node(
        NodeConfig(
            args.coordinator,
            args.name,
            cache,
            args.kv_budget_mb,
            args.threads,
            args.device,
            benchmark_s=args.benchmark_seconds,
            memory_mb=args.memory_mb,
            throttle=args.throttle,
            claimed_layers_per_s=args.claim_layers_per_s,
            perturb=args.perturb,
            identity_path=args.identity,
            account_token=load_account_token(args.token_file),
        )
    )
    node.events = EventSink.open(args.events_jsonl)  # engine.node.events: the local channel to a supervisor

    async def main() -> None:
        serve = asyncio.create_task(node.run())
        stop = asyncio.create_task(_until_signalled())
        try:
            done, _ = await asyncio.wait({serve, stop}, return_when=asyncio.FIRST_COMPLETED)
            if serve in done:
                with node.events.reporting_errors():
                    serve.result()  # re-raise a failure to connect
            else:
                # First signal: drain (no new sessions, live ones finish); a second one stops at once.
                stop = asyncio.create_task(_until_signalled())
                drain = asyncio.create_task(node.drain(args.drain_timeout))
                await asyncio.wait({drain, stop}, return_when=asyncio.FIRST_COMPLETED)
                drain.cancel()
        finally:
            stop.cancel()
            await node.shutdown()
            if not serve.done():
                serve.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await serve
            node.events.close()

    aio.run(main())
    return 0
