"""PNG plots of a suite run (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def draw(results: dict[str, Any], out_dir: Path, stem: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths: list[Path] = []
    rows = results["rows"]

    # 1. latency distribution (ECDF) of every row at the smallest payload
    smallest = min(r["size"] for r in rows)
    fig, ax = plt.subplots(figsize=(9, 5.5))
    shown = [r for r in rows if r["size"] == smallest and r["samples_us"]]
    colors = plt.get_cmap("tab20").colors  # a dozen rows: the default cycle repeats at 10
    for n, r in enumerate(shown):
        xs = sorted(r["samples_us"])
        ys = [(i + 1) / len(xs) for i in range(len(xs))]
        ax.step(xs, ys, where="post", label=r["row"], color=colors[(2 * n) % 20 + n // 10],
                linestyle="--" if r["row"].endswith("in flight") else "-")
    ax.set_xscale("log")
    ax.set_xlabel("latency per execution (us, log)")
    ax.set_ylabel("fraction of executions")
    ax.set_title(f"Latency distribution, uppercase.wasm, {smallest}-byte input")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    paths.append(_save(fig, out_dir / f"{stem}-latency.png"))

    # 2. throughput vs worker count
    fig, ax = plt.subplots(figsize=(7, 4.5))
    scaling = results.get("workers_scaling", [])
    for procs in sorted({s["processes"] for s in scaling}):
        points = sorted((s["workers"], s["throughput"]) for s in scaling
                        if s["processes"] == procs)
        ax.plot([w for w, _ in points], [t for _, t in points], marker="o",
                label=f"{procs} client process(es)")
    ax.set_xlabel("workers")
    ax.set_ylabel("executions/s")
    ax.set_title("wasm-core throughput vs workers (ipc, many in flight)")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    if scaling:
        ax.set_xticks(sorted({s["workers"] for s in scaling}))
        ax.legend()
    paths.append(_save(fig, out_dir / f"{stem}-throughput-workers.png"))

    # 3. time vs payload size (median, one request at a time)
    fig, ax = plt.subplots(figsize=(9, 5.5))
    names = list(dict.fromkeys(r["row"] for r in rows if not r["row"].endswith("in flight")))
    for name in names:
        points = sorted((r["size"], r["median_us"]) for r in rows if r["row"] == name)
        ax.plot([s for s, _ in points], [m for _, m in points], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("payload (bytes, log)")
    ax.set_ylabel("median time per execution (us, log)")
    ax.set_title("Time vs payload size, one request at a time")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    paths.append(_save(fig, out_dir / f"{stem}-payload.png"))
    return paths


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
