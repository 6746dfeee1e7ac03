"""`wasm-client`: the command line over the Python client.

Output goes to stdout as it is (the plugin's raw bytes for execute and chain); errors go to
stderr as `CODE: message` and the exit status is non-zero (1 for service errors, 2 for usage).
"""

from __future__ import annotations

import argparse
import base64
import sys
import time
from collections.abc import Sequence
from typing import Any

import msgspec

from wasmcore.client.core import Client
from wasmcore.protocol.errors import WasmCoreError

EXIT_ERROR = 1
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wasm-client", description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", help="server endpoint (default: $WASM_CORE_ENDPOINT or "
                        "the per-user ipc socket)")
    parser.add_argument("--tenant", help="tenant name (default: the credentials' tenant, else "
                        "default); with credentials the server goes by the key's tenant")
    parser.add_argument("--credentials", metavar="FILE",
                        help="credentials file from `wasm-core tenant add` (default: "
                        "$WASM_CORE_CREDENTIALS); needed where the server requires keys (tcp)")
    parser.add_argument("--json", action="store_true", help="machine-readable JSON output")
    parser.add_argument("--timeout", dest="client_timeout", type=float, default=30.0,
                        metavar="SECONDS", help="how long to wait for a reply (default 30)")
    sub = parser.add_subparsers(dest="command", required=True)

    load = sub.add_parser("load", help="load a .wasm or .wat; prints its UUID")
    load.add_argument("--path", required=True, help="module file: read here and sent; its "
                      "path names the binary (loading it again updates it)")
    load.add_argument("--name", help="name for the binary (default: the file's stem)")

    for name, helptext in (("execute", "run a binary on an input"),
                           ("chain", "run binaries in order, piping output to input")):
        cmd = sub.add_parser(name, help=helptext)
        if name == "execute":
            cmd.add_argument("--binary-id", required=True)
            cmd.add_argument("--entry", help="entry function (default: process or _start)")
        else:
            cmd.add_argument("--binary-ids", required=True, help="comma-separated UUIDs")
        source = cmd.add_mutually_exclusive_group()
        source.add_argument("--input", default=None, help="input text")
        source.add_argument("--input-file", help="read the input from a file ('-' = stdin)")
        cmd.add_argument("--timeout", type=int, metavar="MS",
                         help="wall-clock limit, up to the server's maximum")
        cmd.add_argument("--memory", type=int, metavar="MB",
                         help="linear memory cap, up to the server's maximum")
        cmd.add_argument("--fuel", type=int, metavar="N",
                         help="fuel cap (default: none, fuel is only metered)")
        cmd.add_argument("--env", action="append", default=[], metavar="K=V",
                         help="environment entry for the plugin (repeatable)")
        cmd.add_argument("--arg", action="append", default=[], dest="args", metavar="ARG",
                         help="argument for a WASI module, argv[1], argv[2]... in order "
                         "(repeatable; argv[0] is the binary's name)")

    sub.add_parser("list", help="list your binaries")
    unload = sub.add_parser("unload", help="remove a binary")
    unload.add_argument("--binary-id", required=True)
    stats = sub.add_parser("stats", help="workers, binaries and queue of the service")
    stats.add_argument("--all", action="store_true", dest="all_tenants",
                       help="every tenant's binaries (admin keys, and the service's own user)")

    bench = sub.add_parser("bench", help="load test: many executes in flight, latency and "
                           "throughput (see docs/performance.md)")
    bench.add_argument("--binary-id", required=True)
    bench_source = bench.add_mutually_exclusive_group()
    bench_source.add_argument("--input", default=None, help="input text")
    bench_source.add_argument("--input-file", help="read the input from a file ('-' = stdin)")
    bench.add_argument("--requests", type=int, default=1000, metavar="N",
                       help="executions to send (default 1000)")
    bench.add_argument("--concurrency", type=int, default=64, metavar="C",
                       help="requests in flight at once (default 64)")
    bench.add_argument("--warmup", type=int, default=0, metavar="N",
                       help="executions sent first and not counted (default 0)")
    return parser


def _input_bytes(args: argparse.Namespace) -> bytes:
    if args.input_file == "-":
        return sys.stdin.buffer.read()
    if args.input_file:
        with open(args.input_file, "rb") as handle:
            return handle.read()
    return (args.input or "").encode()


def _env(pairs: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--env takes KEY=VALUE, got {pair!r}")
        env[key] = value
    return env


def _output_fields(output: bytes) -> dict[str, str | None]:
    """A plugin's output in JSON without loss: `output_base64` always holds the exact bytes;
    `output` is the same bytes as text when they are valid UTF-8, else null (never a lossy
    decoding that would pass for the output)."""
    data = bytes(output)
    try:
        text: str | None = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    return {"output": text, "output_base64": base64.b64encode(data).decode("ascii")}


def _print_json(value: Any) -> None:
    sys.stdout.write(msgspec.json.encode(value).decode() + "\n")


def _print_binaries(binaries: Sequence[Any], tenants: bool = False) -> None:
    if not binaries:
        print("no binaries loaded")
        return
    print(f"{'BINARY ID':36}  {'VER':>3}  {'KIND':4}  {'RUNS':>6}  "
          f"{'TENANT / ' if tenants else ''}NAME / PATH")
    for b in binaries:
        where = f"{b.tenant}: {b.path or b.name}" if tenants else b.path or b.name
        line = f"{b.binary_id:36}  {b.version:>3}  {b.kind:4}  {b.executions:>6}  {where}"
        if b.last_error:
            line += f"  [last reload failed: {b.last_error}]"
        print(line)


def _print_stats(stats: Any, tenants: bool = False) -> None:
    print(f"uptime {stats.uptime_s:.0f}s  requests {stats.requests}  queue {stats.queue_depth}"
          f"  in flight {stats.in_flight}")
    print(f"{'SLOT':>4}  {'PID':>7}  {'STATE':9}  {'RSS MiB':>8}  {'EXECUTIONS':>10}  "
          "OS SANDBOX")
    for w in stats.workers:
        print(f"{w.slot:>4}  {w.pid or '-':>7}  {w.state:9}  {w.rss_bytes / 2**20:>8.1f}  "
              f"{w.executions:>10}  {','.join(w.protections) or 'none'}")
    for w in stats.compile_workers:
        print(f"{'c' + str(w.slot):>4}  {w.pid:>7}  {w.state:9}  {w.rss_bytes / 2**20:>8.1f}  "
              f"{w.executions:>10}  {','.join(w.protections) or 'none'}  "
              f"(compile lane, {stats.compile_queue_depth} waiting)")
    if stats.restarts_by_cause:
        causes = ", ".join(f"{k}={v}" for k, v in sorted(stats.restarts_by_cause.items()))
        print(f"restarts: {causes}")
    if stats.config_error:
        print(f"config change refused (running config kept): {stats.config_error}")
    for problem in stats.registry_problems:
        print(f"registry problem: {problem}")
    if stats.errors_by_code:
        codes = ", ".join(f"{k}={v}" for k, v in sorted(stats.errors_by_code.items()))
        print(f"errors: {codes}")
    _print_binaries(stats.binaries, tenants)


def _bench(args: argparse.Namespace) -> int:
    # Imported here: asyncio and the load generator are only needed by this command.
    import asyncio

    from wasmcore.client import loadgen

    if args.requests < 1 or args.concurrency < 1:
        raise ValueError("--requests and --concurrency must be at least 1")
    payload = _input_bytes(args)
    raw = asyncio.run(loadgen.execute_load(args.endpoint, args.tenant, args.binary_id, payload,
                                           args.requests, args.concurrency,
                                           args.client_timeout, args.warmup,
                                           args.credentials))
    rep = loadgen.report(raw, args.requests, args.concurrency, input_bytes=len(payload))
    if args.json:
        _print_json(rep)
    else:
        print(loadgen.format_report(rep))
    sys.stdout.flush()
    # Every request failing (wrong id, service down) is an error; some failing is a result.
    return EXIT_ERROR if rep["ok"] == 0 else 0


def run(args: argparse.Namespace) -> int:
    if args.command == "bench":
        return _bench(args)
    with Client(args.endpoint, tenant=args.tenant, timeout_s=args.client_timeout,
                credentials=args.credentials) as client:
        match args.command:
            case "load":
                started = time.perf_counter()
                loaded = client.load(args.path, name=args.name)
                if args.json:
                    _print_json({**msgspec.to_builtins(loaded),
                                 "elapsed_ms": (time.perf_counter() - started) * 1000})
                else:
                    print(loaded.binary_id)
            case "execute":
                result = client.execute(args.binary_id, _input_bytes(args),
                                        timeout_ms=args.timeout, memory_mb=args.memory,
                                        fuel=args.fuel, env=_env(args.env), entry=args.entry,
                                        args=args.args)
                if args.json:
                    _print_json({**_output_fields(result.output),
                                 "logs": result.logs, "metering": result.metering,
                                 "binary_id": result.binary_id, "version": result.version,
                                 "worker_pid": result.worker_pid})
                else:
                    for line in result.logs:
                        print(f"[log] {line}", file=sys.stderr)
                    sys.stdout.buffer.write(result.output)
                    if sys.stdout.isatty() and not result.output.endswith(b"\n"):
                        sys.stdout.buffer.write(b"\n")
            case "chain":
                ids = [i.strip() for i in args.binary_ids.split(",") if i.strip()]
                chained = client.chain(ids, _input_bytes(args), timeout_ms=args.timeout,
                                       memory_mb=args.memory, fuel=args.fuel, env=_env(args.env),
                                       args=args.args)
                if args.json:
                    _print_json({**_output_fields(chained.output), "steps": chained.steps})
                else:
                    sys.stdout.buffer.write(chained.output)
                    if sys.stdout.isatty() and not chained.output.endswith(b"\n"):
                        sys.stdout.buffer.write(b"\n")
            case "list":
                binaries = client.list()
                _print_json(binaries) if args.json else _print_binaries(binaries)
            case "unload":
                client.unload(args.binary_id)
                if args.json:
                    _print_json({"unloaded": args.binary_id})
                else:
                    print(f"unloaded {args.binary_id}")
            case "stats":
                stats = client.stats(all_tenants=args.all_tenants)
                _print_json(stats) if args.json else _print_stats(stats, args.all_tenants)
    sys.stdout.flush()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args)
    except WasmCoreError as exc:
        if args.json:
            sys.stderr.write(msgspec.json.encode(
                {"error": {"code": exc.code, "message": exc.message, "details": exc.details}}
            ).decode() + "\n")
        else:
            print(f"{exc.code}: {exc.message}", file=sys.stderr)
        return EXIT_ERROR
    except (ValueError, OSError) as exc:
        print(f"wasm-client: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
