"""`wasm-core`: run the service (`wasm-core [options]`) or show it working (`wasm-core demo`)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

import msgspec
import zmq

from wasmcore.supervisor.config import ConfigError, load_config, resolved, runtime_dir, validate
from wasmcore.supervisor.confinement import ConfinementError
from wasmcore.supervisor.server import EndpointInUse, Supervisor


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wasm-core",
        description="Multi-tenant WebAssembly execution service. `wasm-core demo` starts it "
        "with the sample plugins and shows a few requests.",
    )
    parser.add_argument("--config", help="TOML config file (default: built-in defaults; "
                        "config/wasm-core.toml shows every setting)")
    parser.add_argument("--endpoint", help="ipc://PATH or tcp://HOST:PORT to serve on")
    parser.add_argument("--workers", type=int, help="worker processes (default: one per core)")
    parser.add_argument("--data-dir", help="where binaries and the registry are kept")
    parser.add_argument("--log-level", help="debug, info, warning or error")
    return parser


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
        supervisor = Supervisor(config, runtime_dir(), config_path=args.config)
        return supervisor.serve()
    except (EndpointInUse, ConfinementError) as exc:
        print(f"wasm-core: {exc}", file=sys.stderr)
        return 2
    except (OSError, zmq.ZMQError) as exc:
        print(f"wasm-core: cannot start: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
