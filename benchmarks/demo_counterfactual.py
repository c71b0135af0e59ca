"""The demo's counterfactual analysis, timed side by side against an earlier release.

    .venv/bin/python benchmarks/demo_counterfactual.py                       # samples the demo's trajectories
    .venv/bin/python benchmarks/demo_counterfactual.py --trajectories runs/demo/trajectories-...jsonl
    .venv/bin/python benchmarks/demo_counterfactual.py --baseline c90f8c5    # the release to compare with

The demo's setting: its verified trajectories (120 problems x 2 samples, temperature 0.8,
seed 0), tokens of right steps only, layers 0, 2 and 3, 32 alternative routes, the fast
engine, the trajectories grouped as a run groups them. The baseline's source (`git archive`
of `--baseline`) and this checkout's each run in their own process on the same
trajectories, alternating, `--repeats` times (the best kept); model loading is not timed.
Their tables must agree to float noise (the same routes; log-probs within 1e-5: batching
the natural forward differently rounds differently). Prints seconds and the speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def time_run(src: str, trajectories_path: str, dump: str) -> dict:
    """In this process, with routelens imported from `src`: score the demo's counterfactual
    (no run folder) and dump the experts and log-probs for the comparison."""
    sys.path.insert(0, src)
    import torch

    import routelens as rl
    from routelens.analyses.counterfactual.analysis import analyse_trajectories, keep_step_ok_tokens, trajectory_groups
    from routelens.analyses.counterfactual.config import CounterfactualConfig
    from routelens.engine import make_engine

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    lens = rl.load("demo")
    trajectories = keep_step_ok_tokens(rl.read_trajectories(trajectories_path, lens, only_verified=True), None)[0]
    layers = [0, 2, 3]
    config = CounterfactualConfig(layers=layers, routes=32, seed=0)
    engine = make_engine(config.engine, lens.adapter, route_batch_size=config.route_batch_size,
                         memory_budget=config.memory_budget)
    groups = trajectory_groups(list(range(len(trajectories))), trajectories, config.group_tokens, engine.max_group)
    started = time.perf_counter()
    tables = [unit for group in groups
              for unit in analyse_trajectories(lens.adapter, engine, [trajectories[i] for i in group], layers, config)]
    seconds = time.perf_counter() - started
    routes = [unit["routes"] for unit in tables]
    np.savez(dump, experts=np.concatenate([np.asarray(r.column("experts").to_pylist()) for r in routes]),
             logprob=np.concatenate([np.asarray(r.column("logprob")) for r in routes]))
    return {"seconds": seconds, "trajectories": len(trajectories),
            "tokens": sum(len(t.scored_positions) for t in trajectories), "threads": torch.get_num_threads(),
            "engine": engine.name}


def demo_trajectories(path: str | None, folder: str) -> str:
    """The trajectory file given, or the demo's (120 problems x 2 samples, temperature 0.8,
    seed 0) sampled into `folder`."""
    if path is not None:
        return os.path.abspath(path)
    sys.path.insert(0, os.path.join(REPO, "src"))
    import routelens as rl
    from routelens.data.sampling import arithmetic_trajectories, write_trajectories

    lens = rl.load("demo")
    path = os.path.join(folder, "trajectories.jsonl")
    write_trajectories(arithmetic_trajectories(lens.loaded, 120, 2, 0.8, 0, show_progress=False), path)
    return path


def baseline_source(revision: str, folder: str) -> str:
    archive = os.path.join(folder, "baseline.tar")
    subprocess.run(["git", "-C", REPO, "archive", "--format=tar", "-o", archive, revision, "src"], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(os.path.join(folder, "baseline"), filter="data")
    return os.path.join(folder, "baseline", "src")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trajectories", default=None, help="the demo's trajectory file (default: sample it again)")
    parser.add_argument("--baseline", default="c90f8c5", help="git revision to compare with (default: the release before)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--time-src", default=None, help=argparse.SUPPRESS)   # internal: one timed run
    parser.add_argument("--dump", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.time_src:
        print(json.dumps(time_run(args.time_src, args.trajectories, args.dump)))
        return
    folder = tempfile.mkdtemp(prefix="routelens-bench-")
    trajectories = demo_trajectories(args.trajectories, folder)
    sources = {f"baseline {args.baseline}": baseline_source(args.baseline, folder),
               "this checkout": os.path.join(REPO, "src")}
    best, info = {name: float("inf") for name in sources}, {}
    for _ in range(args.repeats):
        for index, (name, src) in enumerate(sources.items()):
            out = subprocess.run([sys.executable, __file__, "--time-src", src, "--trajectories", trajectories,
                                  "--dump", os.path.join(folder, f"{index}.npz")],
                                 capture_output=True, text=True, check=True, cwd=folder)
            info[name] = json.loads(out.stdout.strip().splitlines()[-1])
            best[name] = min(best[name], info[name]["seconds"])
    first = next(iter(info.values()))
    print(f"demo counterfactual: {first['trajectories']} trajectories, {first['tokens']} scored tokens x 3 layers, "
          f"32 routes, {first['engine']} engine, torch threads {first['threads']}")
    for name, seconds in best.items():
        print(f"  {name:24s} {seconds:7.2f} s")
    baseline, current = best.values()
    print(f"  speed-up: {baseline / current:.2f}x")
    a, b = (np.load(os.path.join(folder, f"{i}.npz")) for i in range(2))
    same_routes = a["experts"].shape == b["experts"].shape and bool((a["experts"] == b["experts"]).all())
    largest = float(np.abs(a["logprob"] - b["logprob"]).max()) if same_routes else float("nan")
    print(f"  same routes: {same_routes}; largest log-prob difference {largest:.2e} nats")
    if not same_routes or largest > 1e-5:
        raise SystemExit("the two releases disagree beyond float noise")


if __name__ == "__main__":
    main()
