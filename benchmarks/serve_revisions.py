"""``mixtral serve`` at this checkout against itself at another git revision: N concurrent streaming callers (the
``openai`` SDK), the same workload alternating between the servers, to find (or rule out) a cost one change added.

    python benchmarks/serve_revisions.py --against caad8ac [--streams 16] [--tokens 64] [--repeats 30] [--threads 2]

The other revision is checked out in a temporary git worktree and served from it (``PYTHONPATH``), with the same
Python and packages; both serve the random small Mixtral of local_cpu.py, fp32, greedy, each process with
``--threads`` torch threads, and a third server runs this checkout with ``MIXTRAL_LOCAL_MAX_BATCH`` set to
``--max-batch`` (default 16, the engine default before 2026-12-03) so that a change of default is told apart from a
change of code. Medians over ``--repeats`` of: the median and slowest caller's time to first text, and all callers'
tokens/s. Prints a table with ratios (the other revision over this checkout for times, this checkout over it for
tokens/s) and writes benchmarks/results/serve_revisions.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from local_cpu import SHAPE, _cpu_name
from serve import free_port, server, workload

from mixtral_local.tiny import write_tiny_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", required=True, help="a git revision of this repository")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "serve_revisions.json")
    args = parser.parse_args()
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    local = {"MIXTRAL_LOCAL_DTYPE": "float32", "MIXTRAL_LOCAL_DEVICE": "cpu", "MIXTRAL_LOCAL_PROGRESS": "0"}

    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        tree = Path(tmp) / "other"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), args.against], check=True,
                       capture_output=True)
        stack.callback(subprocess.run, ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                       check=False, capture_output=True)
        checkpoint = write_tiny_checkpoint(Path(tmp) / "model", seed=0, **SHAPE)
        variants = {head: {}, f"{head} max_batch {args.max_batch}": {"MIXTRAL_LOCAL_MAX_BATCH": str(args.max_batch)},
                    args.against: {"PYTHONPATH": str(tree)}}
        urls = {}
        for name, env in variants.items():
            port = free_port()
            command = [sys.executable, "-m", "mixtral_client", "serve", "--model-path", str(checkpoint),
                       "--port", str(port), "--model-name", "mixtral"]
            urls[name] = stack.enter_context(server(command, port, args.threads, {**local, **env}))
        for url in urls.values():  # warm up
            asyncio.run(workload(url, "mixtral", 2, 8))
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in urls}
        for _ in range(args.repeats):
            for name, url in urls.items():
                runs[name].append(asyncio.run(workload(url, "mixtral", args.streams, args.tokens)))

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    rows: list[dict[str, Any]] = []
    for name in runs:
        rows.append({"server": name, **{key: med(name, key) for key in ("ttft_median_s", "ttft_max_s", "tok_s")},
                     "tok_s_range": [min(r["tok_s"] for r in runs[name]), max(r["tok_s"] for r in runs[name])],
                     "ttft_ratio": med(args.against, "ttft_median_s") / med(name, "ttft_median_s"),
                     "tok_s_ratio": med(name, "tok_s") / med(args.against, "tok_s")})
    result = {"command": f"python benchmarks/serve_revisions.py --against {args.against} --streams {args.streams} "
                         f"--tokens {args.tokens} --repeats {args.repeats} --threads {args.threads} "
                         f"--max-batch {args.max_batch}",
              "head": head, "cpu": _cpu_name(), "model": SHAPE, "rows": rows, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'server':>24} | {'first token, median':>20} | {'slowest':>9} | {'tokens/s':>9} {'(range)':>15} | "
          f"{'ttft ratio':>10} | {'tok/s ratio':>11}")
    for row in rows:
        low, high = row["tok_s_range"]
        print(f"{row['server']:>24} | {row['ttft_median_s'] * 1e3:>17.1f} ms | {row['ttft_max_s'] * 1e3:>6.1f} ms | "
              f"{row['tok_s']:>9.1f} {f'({low:.0f}-{high:.0f})':>15} | {row['ttft_ratio']:>9.2f}x | "
              f"{row['tok_s_ratio']:>10.2f}x")
    print(f"(ratios against {args.against}: its time over ours, our tokens/s over its; {result['cpu']}, "
          f"{args.streams} callers, {args.tokens} tokens, {args.repeats} repeats)")


if __name__ == "__main__":
    main()
