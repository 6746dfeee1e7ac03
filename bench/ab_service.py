"""Before/after: run bench_service for two checkouts of wasm-core, interleaved, and print
the round trip and throughput of each round side by side.

Each checkout needs its own venv with wasm-core installed (editable), because the service
under test is started with that venv's interpreter. Example (the checkout of the old commit
made with `git worktree add`):

    python -m bench.ab_service --before /work/wt/base --after . --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
from pathlib import Path


def run_once(checkout: Path, args: argparse.Namespace) -> dict:
    python = checkout / ".venv" / "bin" / "python"
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run(
            [str(python), "-m", "bench.bench_service", "--transports", "ipc",
             "-n", str(args.iterations), "--requests", str(args.requests),
             "--concurrency", str(args.concurrency), "--processes", "1",
             "--json", out.name],
            cwd=checkout, check=True, capture_output=True, timeout=900)
        return json.loads(Path(out.name).read_text())


def summary(result: dict) -> tuple[float, float, float, float]:
    """(service median us, echo median us, service exec/s, echo msg/s) from one run."""
    serial = result["serial"]["ipc"]
    loaded = max((r for r in result["inflight"] if r["transport"] == "ipc"),
                 key=lambda r: r["service"]["throughput"])
    return (serial["service"]["median_us"], serial["echo"]["median_us"],
            loaded["service"]["throughput"], loaded["echo"]["throughput"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True)
    parser.add_argument("--after", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("-n", "--iterations", type=int, default=3000)
    parser.add_argument("--requests", type=int, default=30000)
    parser.add_argument("--concurrency", default="512")
    args = parser.parse_args()
    rows: dict[str, list[tuple[float, float, float, float]]] = {"before": [], "after": []}
    for round_ in range(args.rounds):
        order = ("before", "after") if round_ % 2 == 0 else ("after", "before")
        for label in order:
            rows[label].append(summary(run_once(getattr(args, label), args)))
            rt, echo, tput, echo_tput = rows[label][-1]
            print(f"round {round_ + 1} {label:6}: round trip {rt:6.0f} us (echo {echo:4.0f}, "
                  f"{rt / echo:4.2f}x)  throughput {tput:8,.0f}/s (echo {echo_tput:8,.0f}/s)",
                  flush=True)
    for label, values in rows.items():
        rts = [v[0] for v in values]
        tputs = [v[2] for v in values]
        print(f"{label:6}: round trip median of medians {statistics.median(rts):.0f} us "
              f"(range {min(rts):.0f}-{max(rts):.0f}); throughput median "
              f"{statistics.median(tputs):,.0f}/s (range {min(tputs):,.0f}-{max(tputs):,.0f})")


if __name__ == "__main__":
    main()
