"""One counterfactual run, single process against Ray Data with local actors, side by side.

    .venv/bin/python benchmarks/ray_pipeline.py                       # 2 actors, the demo model
    .venv/bin/python benchmarks/ray_pipeline.py --workers 4 --layers 0,1,2,3 --routes 64

The run: `routelens counterfactual` on the demo model over `--trajectories` (default: the
demo's 240 sampled trajectories, all of them, every completion token), each way into a
fresh run folder, as the command line runs it (a process each, model loading included).
Ray runs `--workers` actors of one CPU each; the single process uses as many torch threads
as there are actors, so both have the same cores. Prints wall seconds, the ratio, how long
Ray took before its first group landed (start-up: Ray, actors, model loads), and whether
the two runs' tables agree (equal row for row needs equal thread counts per forward, which
they are not here: log-probs are compared to float noise, routes exactly).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import pandas as pd
from demo_counterfactual import demo_trajectories  # the demo's 240 sampled trajectories, or the file given

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def first_part_seconds(out: str, started: float, process) -> float | None:
    """Seconds from the start until the first part file lands (polled while the run goes)."""
    parts = os.path.join(out, "parts")
    while process.poll() is None:
        if os.path.isdir(parts) and any(name.endswith(".parquet") for name in os.listdir(parts)):
            return time.perf_counter() - started
        time.sleep(0.05)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trajectories", default=None)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--layers", default="0,1,2,3")
    parser.add_argument("--routes", type=int, default=32)
    parser.add_argument("--group-tokens", type=int, default=512, help="tokens per group: groups are what actors share")
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="routelens-ray-bench-")
    trajectories = demo_trajectories(args.trajectories, folder)
    base = [sys.executable, "-m", "routelens", "counterfactual", "--model", "demo", "--trajectories", trajectories,
            "--layers", args.layers, "--routes", str(args.routes), "--no-only-step-ok", "--group-tokens",
            str(args.group_tokens), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": os.path.join(REPO, "src")}
    results = {}
    for name, extra, threads in (("single process", [], args.workers),
                                 (f"ray local, {args.workers} actors", ["--ray", "local", "--workers", str(args.workers)], 1)):
        out = os.path.join(folder, name.split(",")[0].replace(" ", "-"))
        started = time.perf_counter()
        process = subprocess.Popen(base + ["--out", out] + extra, env={**env, "OMP_NUM_THREADS": str(threads)},
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        first = first_part_seconds(out, started, process)
        _, stderr = process.communicate()
        seconds = time.perf_counter() - started
        if process.returncode != 0:
            raise SystemExit(f"{name} failed: {stderr.strip().splitlines()[-1] if stderr.strip() else process.returncode}")
        results[name] = {"seconds": seconds, "first_part": first, "out": out}
    run = json.load(open(os.path.join(results["single process"]["out"], "run.json")))
    print(f"counterfactual of the demo: {run['config']['num_trajectories']} trajectories, layers {args.layers}, "
          f"{args.routes} routes, groups of up to {args.group_tokens} tokens, {os.cpu_count()} CPU cores")
    for name, result in results.items():
        print(f"  {name:24s} {result['seconds']:7.2f} s   (first group landed after {result['first_part']:.1f} s)")
    single, ray = (result["seconds"] for result in results.values())
    print(f"  ray / single process: {ray / single:.2f}x")
    a, b = (pd.read_parquet(os.path.join(result["out"], "routes.parquet")) for result in results.values())
    same_routes = len(a) == len(b) and (a["experts"].map(tuple) == b["experts"].map(tuple)).all()
    print(f"  same routes: {bool(same_routes)}; rows {len(a)}; largest log-prob difference "
          f"{(a['logprob'] - b['logprob']).abs().max():.2e} nats")


if __name__ == "__main__":
    main()
