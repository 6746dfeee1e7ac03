"""Where one request's round trip goes on an idle service: a timestamp at every hop.

Starts a real service (uppercase.wasm, 100-byte input) whose supervisor and workers load
bench/hop_probe.py at start-up (through a `sitecustomize.py` on PYTHONPATH), sends N requests
one at a time with the blocking `Client`, and prints the median of each segment between
client send, supervisor wake-up / receive / send, worker wake-up / receive, execution start /
end, worker send, supervisor wake-up / receive / send and client wake-up / receive
(CLOCK_MONOTONIC, shared by all processes). In the same run, as baselines:

- the bare ZeroMQ echo (bench/echo.py), one at a time: two hops;
- a pipe ping-pong between two Python processes blocked in `poll` (one OS wake-up per hop,
  no ZeroMQ): the floor of "a sleeping process is woken by another";
- ZeroMQ's own hop, inproc-free: the echo's round trip / 2.

    python -m bench.latency_breakdown [-n 3000] [--workers 2] [--rounds 1]

A request is counted only when every expected event is found in its window, in order (a
heartbeat or a timer turn between two steps moves an event out of order: dropped and counted).
"""

from __future__ import annotations

import argparse
import bisect
import multiprocessing
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

if __package__ in (None, ""):  # `python bench/latency_breakdown.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import hop_probe
from bench.common import PLUGIN, ROOT, make_input, percentile, service_config
from bench.echo import BlockingEcho, EchoServer
from wasmcore.client.launcher import start_service

SITECUSTOMIZE = f"""\
import os
if os.environ.get({hop_probe.ENV!r}):
    import sys
    sys.path.insert(0, {str(ROOT)!r})
    from bench import hop_probe
    hop_probe.install(os.environ[{hop_probe.ENV!r}])
"""

# (segment name, event that starts it, event that ends it); events are "<process>.<kind>".
SEGMENTS = [
    ("client: build + encode the request", "C.call", "C.send0"),
    ("hop 1 client -> supervisor (ZeroMQ + wake-up)", "C.send0", "S.poll1"),
    ("supervisor: poll returns -> message received", "S.poll1", "S.recv_front"),
    ("supervisor: decode, admit, route, pack the job", "S.recv_front", "S.send0_back"),
    ("hop 2 supervisor -> worker (ZeroMQ + wake-up)", "S.send0_back", "W.poll"),
    ("worker: poll returns -> message received", "W.poll", "W.recv"),
    ("worker: decode, limits, module", "W.recv", "W.exec0"),
    ("worker: Sandbox.execute", "W.exec0", "W.exec1"),
    ("worker: encode the reply, dry recv, pack", "W.exec1", "W.send0"),
    ("hop 3 worker -> supervisor (ZeroMQ + wake-up)", "W.send0", "S.poll2"),
    ("supervisor: poll returns -> reply received", "S.poll2", "S.recv_back"),
    ("supervisor: match the reply, forward", "S.recv_back", "S.send0_front"),
    ("hop 4 supervisor -> client (ZeroMQ + wake-up)", "S.send0_front", "C.poll"),
    ("client: poll returns -> reply received", "C.poll", "C.recv"),
    ("client: decode, finish", "C.recv", "C.ret"),
]
# A send_multipart call's own duration, from the sender's clock: it overlaps the hop that
# follows (the woken I/O thread can preempt the sender before the call returns).
SEND_CALLS = [("  client send_multipart call", "C"), ("  supervisor -> worker send call", "S_back"),
              ("  worker send call", "W"), ("  supervisor -> client send call", "S_front")]
HOPS = [name for name, _, _ in SEGMENTS if name.startswith("hop ")]


def pipe_partner(to_child: int, to_parent: int, rounds: int) -> None:
    poller = select.poll()
    poller.register(to_child, select.POLLIN)
    for _ in range(rounds):
        poller.poll()
        os.read(to_child, 1)
        os.write(to_parent, b"x")


def pipe_pingpong(rounds: int) -> list[float]:
    """Round trips (us) of one byte between two processes, each blocked in poll(2)."""
    down_r, down_w = os.pipe()
    up_r, up_w = os.pipe()
    child = multiprocessing.get_context("fork").Process(
        target=pipe_partner, args=(down_r, up_w, rounds), daemon=True)
    child.start()
    poller = select.poll()
    poller.register(up_r, select.POLLIN)
    samples = []
    for _ in range(rounds):
        began = time.perf_counter_ns()
        os.write(down_w, b"x")
        poller.poll()
        os.read(up_r, 1)
        samples.append((time.perf_counter_ns() - began) / 1000)
    child.join(5)
    for fd in (down_r, down_w, up_r, up_w):
        os.close(fd)
    return samples[len(samples) // 10:]  # the first tenth warms up


ECHO_SEGMENTS = [
    ("client: send_multipart begins", "C.call", "C.send0"),
    ("hop 1 client -> echo (ZeroMQ + wake-up)", "C.send0", "E.recv"),
    ("echo: received -> send begins", "E.recv", "E.send0"),
    ("hop 2 echo -> client (ZeroMQ + wake-up)", "E.send0", "C.poll"),
    ("client: poll returns -> reply received", "C.poll", "C.recv"),
    ("client: returns", "C.recv", "C.ret"),
]


def echo_roundtrips(payload: bytes, rounds: int, probe_dir: Path) -> tuple[
        list[float], dict[str, list[float]]]:
    """The bare echo's round trips (us) without the probe, then its breakdown with the probe
    in both processes (a separate series: the probe adds its own ~1 us per event)."""
    endpoint = f"ipc://{probe_dir}/e.sock"
    with EchoServer(endpoint) as echo, BlockingEcho(echo.endpoint) as client:
        for _ in range(min(500, rounds)):
            client.call(payload)
        plain = []
        for _ in range(rounds):
            began = time.perf_counter_ns()
            client.call(payload)
            plain.append((time.perf_counter_ns() - began) / 1000)
    hops = probe_dir / "echo-hops"
    hops.mkdir()
    env = {**os.environ, hop_probe.ENV: str(hops), "PYTHONPATH": os.pathsep.join(
        [str(probe_dir / "site"), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    endpoint = f"ipc://{probe_dir}/e2.sock"
    server = subprocess.Popen([sys.executable, "-m", "bench.echo", endpoint], env=env,
                              cwd=ROOT, stdin=subprocess.DEVNULL)
    try:
        hop_probe.install(str(hops), role="client")
        with BlockingEcho(endpoint) as client:
            if client.call(b"ping", timeout_ms=20_000) is None:
                raise RuntimeError("the probed echo server did not answer")
            for _ in range(min(500, rounds)):
                client.call(payload)
            for _ in range(rounds):
                hop_probe.mark("call")
                client.call(payload)
                hop_probe.mark("ret")
        hop_probe._flush()
    finally:
        server.terminate()
        try:
            server.wait(5)
        except subprocess.TimeoutExpired:  # seen once in a while with the probe loaded
            server.kill()
            server.wait(5)
    hop_probe.uninstall()
    return plain, echo_breakdown(load_events(hops, ""))


def echo_breakdown(events: dict[str, list[tuple[int, str]]]) -> dict[str, list[float]]:
    client, echo = events["C"], events["E"]
    times = {who: [t for t, _ in series] for who, series in events.items()}
    calls = [t for t, k in client if k == "call"]
    rets = [t for t, k in client if k == "ret"]
    durations: dict[str, list[float]] = defaultdict(list)
    for call, ret in zip(calls, rets, strict=True):
        found: dict[str, int | None] = {"C.call": call, "C.ret": ret}
        found["C.send0"] = first_after(client, times["C"], "send0", call, ret)
        if found["C.send0"] is not None:
            found["E.recv"] = first_after(echo, times["E"], "recv", found["C.send0"], ret)
        if found.get("E.recv") is not None:
            found["E.send0"] = first_after(echo, times["E"], "send0", found["E.recv"], ret)
        if found.get("E.send0") is not None:
            found["C.recv"] = first_after(client, times["C"], "recv", found["E.send0"], ret)
            found["C.poll"] = (None if found["C.recv"] is None else last_before(
                client, times["C"], "poll", found["E.send0"], found["C.recv"]))
        if any(found.get(end) is None for _, _, end in ECHO_SEGMENTS):
            continue
        for name, start, end in ECHO_SEGMENTS:
            durations[name].append((found[end] - found[start]) / 1000)  # type: ignore[operator]
        durations["total"].append((ret - call) / 1000)
    return durations


def load_events(directory: Path, front: str) -> dict[str, list[tuple[int, str]]]:
    """Per process letter (C client, S supervisor, W worker): sorted (t, kind) events."""
    events: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for path in directory.glob("*.hops"):
        for line in path.read_text().splitlines():
            _pid, role, kind, label, t = line.split(" ")
            who = {"client": "C", "supervisor": "S", "worker": "W", "echo": "E"}[role]
            if label.startswith("inproc://"):  # the client's handshake monitor
                continue
            if kind in ("f0", "f1"):
                kind = f"{kind}:{who}.{label}"
            elif who == "S" and kind != "poll":
                kind += "_front" if label == front else "_back"
            events[who].append((int(t), kind))
    for series in events.values():
        series.sort()
    return events


def first_after(series: list[tuple[int, str]], times: list[int], kind: str, after: int,
                before: int) -> int | None:
    for t, k in series[bisect.bisect_left(times, after):]:
        if t > before:
            return None
        if k == kind:
            return t
    return None


def last_before(series: list[tuple[int, str]], times: list[int], kind: str, after: int,
                before: int) -> int | None:
    for t, k in reversed(series[:bisect.bisect_right(times, before)]):
        if t < after:
            return None
        if k == kind:
            return t
    return None


def breakdown(events: dict[str, list[tuple[int, str]]]) -> tuple[dict[str, list[float]], int]:
    """Per segment, its duration (us) in every request whose events were all found in order."""
    client = events["C"]
    times = {who: [t for t, _ in series] for who, series in events.items()}
    calls = [t for t, k in client if k == "call"]
    rets = [t for t, k in client if k == "ret"]
    durations: dict[str, list[float]] = defaultdict(list)
    dropped = 0
    for call, ret in zip(calls, rets, strict=True):
        found: dict[str, int | None] = {"C.call": call, "C.ret": ret}

        def nxt(who: str, kind: str, after: int | None, ret: int = ret) -> int | None:
            if after is None:
                return None
            return first_after(events[who], times[who], kind, after, ret)

        def woke(who: str, at: int | None, after: int | None) -> int | None:
            if at is None or after is None:
                return None
            return last_before(events[who], times[who], "poll", after, at)

        found["C.send0"] = nxt("C", "send0", call)
        found["S.recv_front"] = nxt("S", "recv_front", found["C.send0"])
        found["S.poll1"] = woke("S", found["S.recv_front"], found["C.send0"])
        found["S.send0_back"] = nxt("S", "send0_back", found["S.recv_front"])
        found["W.recv"] = nxt("W", "recv", found["S.send0_back"])
        found["W.poll"] = woke("W", found["W.recv"], found["S.send0_back"])
        found["W.exec0"] = nxt("W", "exec0", found["W.recv"])
        found["W.exec1"] = nxt("W", "exec1", found["W.exec0"])
        found["W.send0"] = nxt("W", "send0", found["W.exec1"])
        found["S.recv_back"] = nxt("S", "recv_back", found["W.send0"])
        found["S.poll2"] = woke("S", found["S.recv_back"], found["W.send0"])
        found["S.send0_front"] = nxt("S", "send0_front", found["S.recv_back"])
        found["C.recv"] = nxt("C", "recv", found["S.send0_front"])
        found["C.poll"] = woke("C", found["C.recv"], found["S.send0_front"])
        sends = {"C": ("C", "send1", found["C.send0"]),
                 "S_back": ("S", "send1_back", found["S.send0_back"]),
                 "W": ("W", "send1", found["W.send0"]),
                 "S_front": ("S", "send1_front", found["S.send0_front"])}
        if any(v is None for v in found.values()):
            dropped += 1
            missing = next(k for k, v in found.items() if v is None)
            durations[f"missing {missing}"].append(0.0)
            continue
        for name, start, end in SEGMENTS:
            durations[name].append((found[end] - found[start]) / 1000)  # type: ignore[operator]
        for name, key in SEND_CALLS:
            who, kind, began = sends[key]
            assert began is not None
            ended = first_after(events[who], times[who], kind, began, began + 10**9)
            if ended is not None:
                durations[name].append((ended - began) / 1000)
        durations["total (client call -> return)"].append((ret - call) / 1000)
    return durations, dropped


def run_service(args: argparse.Namespace, payload: bytes, probe_dir: Path) -> tuple[
        dict[str, list[float]], int]:
    site = probe_dir / "site"
    hops = probe_dir / "hops"
    hops.mkdir(mode=0o777)
    hops.chmod(0o777)  # a worker that switched users still writes through its open file
    os.environ[hop_probe.ENV] = str(hops)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(site), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    hop_probe.install(str(hops), role="client")
    service = start_service(workers=args.workers, config=service_config())
    try:
        # Through the supervisor (no direct lane): its hops are what this breaks down.
        with service.client(direct=False) as client:
            binary_id = client.load(PLUGIN).binary_id
            for _ in range(500):
                client.execute(binary_id, payload)
            for _ in range(args.iterations):
                hop_probe.mark("call")
                client.execute(binary_id, payload)
                hop_probe.mark("ret")
        hop_probe._flush()
    finally:
        service.cleanup()
    time.sleep(0.5)
    events = load_events(hops, service.endpoint)
    durations, dropped = breakdown(events)
    for name, samples in function_times(events).items():
        durations[f"calls of {name}"] = samples
    return durations, dropped


def function_times(events: dict[str, list[tuple[int, str]]]) -> dict[str, list[float]]:
    """Per function wrapped with --funcs, the duration (us) of each outermost call."""
    durations: dict[str, list[float]] = defaultdict(list)
    for series in events.values():
        open_calls: dict[str, list[int]] = defaultdict(list)
        for t, kind in series:
            if kind.startswith("f0:"):
                open_calls[kind[3:]].append(t)
            elif kind.startswith("f1:") and open_calls[kind[3:]]:
                began = open_calls[kind[3:]].pop()
                if not open_calls[kind[3:]]:
                    durations[kind[3:]].append((t - began) / 1000)
    return durations


def show(label: str, samples: list[float]) -> str:
    ordered = sorted(samples)
    return (f"{label:<52}{percentile(ordered, 0.5):>9.1f}{percentile(ordered, 0.9):>9.1f}"
            f"{percentile(ordered, 0.99):>9.1f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--iterations", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--funcs", default="", help=(
        "also time these calls: comma-separated `supervisor|module:Class.method` or "
        "`worker|module:function` (e.g. supervisor|wasmcore.supervisor.server:Supervisor._flush)"))
    args = parser.parse_args(argv)
    payload = make_input(100)
    if args.funcs:
        os.environ[hop_probe.FUNCS_ENV] = args.funcs
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}; nproc "
          f"{os.cpu_count()}; {args.iterations} requests one at a time, {args.workers} workers")
    pipe = pipe_pingpong(args.iterations)
    with tempfile.TemporaryDirectory(prefix="wc-hops-") as tmp:
        site = Path(tmp) / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
        echo, echo_parts = echo_roundtrips(payload, args.iterations, Path(tmp))
        durations, dropped = run_service(args, payload, Path(tmp))
    kept = len(durations.get("total (client call -> return)", []))
    print(f"requests with every event in order: {kept} (dropped {dropped})")
    lost = {k[8:]: len(v) for k, v in durations.items() if k.startswith("missing ")}
    if lost:
        print(f"  first event not found, by event: {lost}")
    print()
    print(f"{'segment (us)':<52}{'median':>9}{'p90':>9}{'p99':>9}")
    for name, _, _ in SEGMENTS:
        print(show(name, durations[name]))
    print(show("total (client call -> return)", durations["total (client call -> return)"]))
    print("send_multipart calls (overlap the hop after them)")
    for name, _ in SEND_CALLS:
        print(show(name, durations[name]))
    hop_sum = [sum(durations[h][i] for h in HOPS) for i in range(kept)]
    print(show("  of which the four hops", hop_sum))
    print(show("  of which everything else (Python, zmq calls)",
               [t - h for t, h in zip(durations["total (client call -> return)"], hop_sum,
                                      strict=True)]))
    calls = sorted(name for name in durations if name.startswith("calls of "))
    if calls:
        print("\ntimed calls (each outermost call; includes the probe's own ~1 us)")
        for name in calls:
            print(show(f"{name} (x{len(durations[name])})", durations[name]))
    print("\nbaselines in the same run")
    print(show("bare ZeroMQ echo round trip (2 hops)", echo))
    print(f"the echo with the probe ({len(echo_parts['total'])} round trips):")
    for name, _, _ in ECHO_SEGMENTS:
        print(show("  " + name, echo_parts[name]))
    print(show("  total", echo_parts["total"]))
    print(show("pipe ping-pong round trip, poll(2) (2 OS wake-ups)", pipe))
    print(f"\nper hop, medians: service {statistics.median(hop_sum) / 4:.1f} us, echo "
          f"{statistics.median(echo) / 2:.1f} us, pipe {statistics.median(pipe) / 2:.1f} us")


if __name__ == "__main__":
    main()
