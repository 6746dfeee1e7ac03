"""`wasm-core`: run the service (`wasm-core [options]`), show it working (`wasm-core demo`), or
manage tenant keys (`wasm-core tenant add|list|remove`)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence

import msgspec
import zmq

from wasmcore.supervisor.auth import AuthSetupError
from wasmcore.supervisor.config import ConfigError, load_config, resolved, runtime_dir, validate
from wasmcore.supervisor.confinement import ConfinementError
from wasmcore.supervisor.keystore import KeyStore, KeyStoreError
from wasmcore.supervisor.lifeline import exit_when_closed
from wasmcore.supervisor.server import EndpointInUse, Supervisor


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wasm-core",
        description="Multi-tenant WebAssembly execution service. `wasm-core demo` starts it "
        "with the sample plugins and shows a few requests; `wasm-core tenant add|list|remove` "
        "manages the tenants' keys (`wasm-core tenant -h`).",
    )
    parser.add_argument("--config", help="TOML config file (default: built-in defaults; "
                        "config/wasm-core.toml shows every setting)")
    parser.add_argument("--endpoint", help="ipc://PATH or tcp://HOST:PORT to serve on")
    parser.add_argument("--workers", type=int, help="worker processes (default: one per core)")
    parser.add_argument("--data-dir", help="where binaries and the registry are kept")
    parser.add_argument("--log-level", help="debug, info, warning or error")
    parser.add_argument("--exit-with-fd", type=int, metavar="FD",
                        help="stop (draining, as on SIGTERM) when this inherited fd reads end "
                        "of file: a launcher holding the pipe's write end takes the service "
                        "with it when it dies (wasmcore.client.launcher.start_service)")
    return parser


def build_tenant_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wasm-core tenant",
        description="Tenant keys (CURVE) in <data dir>/keys. A running server picks up every "
        "change at once: a new key works, a removed or replaced one stops working.")
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--config", help="the server's TOML config (for its data dir and "
                       "endpoint)")
    where.add_argument("--data-dir", help="the server's data dir (overrides the config)")
    sub = parser.add_subparsers(dest="action", required=True)
    add = sub.add_parser("add", parents=[where], help="make a tenant's key pair; writes its "
                         "credentials file and prints its path")
    add.add_argument("name")
    add.add_argument("--admin", action="store_true",
                     help="this key sees every tenant in stats, and worker pids")
    add.add_argument("--rotate", action="store_true",
                     help="replace an existing tenant's key (its old credentials stop working)")
    add.add_argument("--endpoint", help="the endpoint its clients connect to, written into the "
                     "credentials (default: server.endpoint, if it is one a client can use)")
    sub.add_parser("list", parents=[where], help="the tenants with keys")
    remove = sub.add_parser("remove", parents=[where], help="stop accepting a tenant's key")
    remove.add_argument("name")
    return parser


def tenant_main(argv: list[str]) -> int:
    args = build_tenant_parser().parse_args(argv)
    try:
        config = load_config(args.config)
    except (ConfigError, OSError) as exc:
        print(f"wasm-core tenant: cannot read config: {exc}", file=sys.stderr)
        return 2
    if args.data_dir:
        config = msgspec.structs.replace(
            config, server=msgspec.structs.replace(config.server, data_dir=args.data_dir))
    keys = KeyStore(resolved(config).server.data_dir)
    try:
        if args.action == "add":
            endpoint = args.endpoint or _client_endpoint(config.server.endpoint)
            credentials, path = keys.add(args.name, admin=args.admin, rotate=args.rotate,
                                         endpoint=endpoint)
            print(path)
            print(f"tenant {credentials.tenant}{' (admin)' if credentials.admin else ''}: "
                  f"give this file to its client (it holds the tenant's secret key); "
                  f"`wasm-client --credentials {path} ...`", file=sys.stderr)
            if not endpoint:
                print("no endpoint written (the server's is the default ipc socket, or binds "
                      "every address): pass --endpoint for remote clients", file=sys.stderr)
        elif args.action == "list":
            tenants = keys.tenants()
            if not tenants:
                print(f"no tenant keys in {keys.tenants_file}")
            for name, record in sorted(tenants.items()):
                made = time.strftime("%Y-%m-%d %H:%M", time.localtime(record.created_at))
                print(f"{name:24} {'admin' if record.admin else 'tenant':6}  {made}  "
                      f"{record.public_key}")
        elif args.action == "remove":
            if not keys.remove(args.name):
                print(f"wasm-core tenant: no tenant {args.name!r} has a key", file=sys.stderr)
                return 1
            print(f"removed {args.name}: its key stops working now")
    except KeyStoreError as exc:
        print(f"wasm-core tenant: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"wasm-core tenant: {exc}", file=sys.stderr)
        return 1
    return 0


def _client_endpoint(endpoint: str) -> str:
    """The server's endpoint as a client would dial it: not the default socket (clients find
    that themselves) and not a bind-everything address."""
    if not endpoint or "://*" in endpoint or "://0.0.0.0" in endpoint or "://[::]" in endpoint:
        return ""
    return endpoint


def configure(args: argparse.Namespace):  # noqa: ANN201 - returns Config
    config = load_config(args.config)
    server = config.server
    if args.endpoint:
        server = msgspec.structs.replace(server, endpoint=args.endpoint)
    if args.data_dir:
        server = msgspec.structs.replace(server, data_dir=args.data_dir)
    if args.log_level:
        server = msgspec.structs.replace(server, log_level=args.log_level)
    pool = config.pool
    if args.workers is not None:
        pool = msgspec.structs.replace(pool, workers=args.workers)
    config = msgspec.structs.replace(config, server=server, pool=pool)
    return resolved(validate(config))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:
        # The demo drives the server from outside, as a client does: it runs as its own
        # program, so the supervisor package never imports the client's.
        demo = [sys.executable, "-m", "wasmcore.client.demo", *argv[1:]]
        os.execv(demo[0], demo)
    if argv[:1] == ["tenant"]:
        return tenant_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        config = configure(args)
    except ConfigError as exc:
        print(f"wasm-core: invalid config: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"wasm-core: cannot read config: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=getattr(logging, config.server.log_level.upper(), logging.INFO),
        format="%(asctime)s wasm-core[%(process)d] %(levelname)s %(message)s",
    )
    try:
        if args.exit_with_fd is not None:
            exit_when_closed(args.exit_with_fd)
        supervisor = Supervisor(config, runtime_dir(), config_path=args.config)
        return supervisor.serve()
    except (EndpointInUse, AuthSetupError, KeyStoreError, ConfinementError) as exc:
        print(f"wasm-core: {exc}", file=sys.stderr)
        return 2
    except (OSError, zmq.ZMQError) as exc:
        print(f"wasm-core: cannot start: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
