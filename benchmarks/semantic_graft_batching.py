"""Time semantic routing and graft evaluation one item at a time against items grouped, side by side.

    .venv/bin/python benchmarks/semantic_graft_batching.py --threads 1          # demo model, CPU
    .venv/bin/python benchmarks/semantic_graft_batching.py --threads 1 --repeats 5 \
        --out docs/measurements/semantic-graft-batching-demo-cpu.json
    .venv/bin/python benchmarks/semantic_graft_batching.py --model ./olmoe --items items.jsonl --device cuda \
        --dtype bfloat16 --groups 1,16,64

In one process, on the same items, each analysis is run in memory once per `--groups`
value (`group_items`: items sharing one right-padded natural forward and their scoring
passes; 1 is one item at a time, as before grouping), the values interleaved within each
repetition so that load on the machine falls on all of them alike. Semantic routing is
timed without its generation arms (`accuracy` off: greedy answers were already generated
in batches), its calibration included (about a second on the demo); graft evaluation is the in-memory evaluation of a
self-graft (`--experts`), the grafted folder not written. Prints, per analysis and value:
the median wall seconds over `--repeats`, every repetition's, the median CPU seconds of
the process, the ratio of the first value's
median to this one's (the speed-up), the passes through the model's last decoder layer
(one per natural forward and per scoring chunk), and the largest difference of any score
from the first value's (float rounding of other batch shapes).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np
import torch

import routelens as rl

SEMANTIC_KEYS = ["item_id", "layer_set", "arm", "floor_seed"]
GRAFT_KEYS = ["item_id", "pair"]
GRAFT_SCORES = ["natural_recipient", "natural_grafted", "forced_original", "forced_grafted"]


class PassCounter:
    """Calls of the model's last decoder layer: one per forward or scoring chunk."""

    def __init__(self, adapter):
        self.count = 0
        self.handle = adapter.decoder_layers[-1].register_forward_pre_hook(self._seen)

    def _seen(self, module, args):
        self.count += 1


def semantic(lens, args, group: int):
    result = rl.semantic_route(lens, args.items, None, per_domain=args.per_domain, floor_seeds=args.floor_seeds,
                               accuracy=False, bootstrap_resamples=100, group_items=group, show_progress=False)
    table = result.scores.sort_values(SEMANTIC_KEYS, ignore_index=True)
    return table, table[["mean_logprob", "first_logprob"]].to_numpy(float), result.info.get("checks", {})


def graft(lens, args, group: int, plan, items):
    from routelens.analyses.graft.evaluation import run_graft_evaluation

    run = run_graft_evaluation(lens.loaded, plan, items, None, {"items": args.items}, bootstrap_resamples=100,
                               show_progress=False, group_items=group)
    table = run.read("items").sort_values(GRAFT_KEYS, ignore_index=True)
    return table, table[GRAFT_SCORES].to_numpy(float), run.state.get("checks", {})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--items", default="arithmetic", help="an item file, or arithmetic (the demo's task)")
    parser.add_argument("--per-domain", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--floor-seeds", type=int, default=3, help="semantic routing's random-floor seeds")
    parser.add_argument("--experts", default="3:5=3:9,3:1=3:2,0:4=0:7", help="the self-graft evaluated")
    parser.add_argument("--groups", default="1,4,16", help="group_items values to time, comma-separated (first: baseline)")
    parser.add_argument("--repeats", type=int, default=3, help="repetitions per value (the median is reported)")
    parser.add_argument("--analyses", default="semantic,graft", help="which to time, comma-separated")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (1 keeps a shared, loaded CPU from stalling threads that wait on each other)")
    parser.add_argument("--out", default=None, help="also write the rows as JSON")
    args = parser.parse_args()

    from routelens.analyses.graft.grafting import parse_expert_map, plan_graft
    from routelens.api import _item_data

    if args.threads:
        torch.set_num_threads(args.threads)
    lens = rl.load(args.model, device=args.device, dtype=args.dtype)
    groups = [int(value) for value in args.groups.split(",")]
    analyses = args.analyses.split(",")
    plan = plan_graft(lens.loaded, lens.loaded, parse_expert_map(args.experts)) if "graft" in analyses else None
    graft_items = _item_data(lens, args.items, None, args.per_domain)[0] if "graft" in analyses else None
    runners = {"semantic": lambda group: semantic(lens, args, group),
               "graft": lambda group: graft(lens, args, group, plan, graft_items)}
    counter = PassCounter(lens.adapter)
    seconds = {(name, group): [] for name in analyses for group in groups}
    cpu_seconds = {(name, group): [] for name in analyses for group in groups}
    passes, scores, checks, counts = {}, {}, {}, {}
    for _ in range(args.repeats):
        for name in analyses:
            for group in groups:
                counter.count = 0
                started, cpu = time.perf_counter(), time.process_time()
                table, values, seen = runners[name](group)
                seconds[(name, group)].append(time.perf_counter() - started)
                cpu_seconds[(name, group)].append(time.process_time() - cpu)
                passes[(name, group)], scores[(name, group)], checks[(name, group)] = counter.count, values, seen
                counts[(name, group)] = int(table["item_id"].nunique())
    rows = []
    for name in analyses:
        base = statistics.median(seconds[(name, groups[0])])
        for group in groups:
            median = statistics.median(seconds[(name, group)])
            row = {"analysis": {"semantic": "semantic routing (scores, no generation)",
                                "graft": f"graft evaluation ({args.experts})"}[name],
                   "model": args.model, "device": lens.loaded.device, "dtype": lens.loaded.dtype,
                   "group_items": group, "items_scored": counts[(name, group)],
                   "median_seconds": round(median, 3), "seconds": [round(s, 3) for s in seconds[(name, group)]],
                   "speedup_over_first": round(base / median, 3),
                   "median_cpu_seconds": round(statistics.median(cpu_seconds[(name, group)]), 3),
                   "last_layer_passes": passes[(name, group)],
                   "max_abs_score_diff_from_first": float(np.nanmax(np.abs(scores[(name, group)]
                                                                           - scores[(name, groups[0])]))),
                   "item_batching": checks[(name, group)].get("item_batching")}
            rows.append(row)
            print(json.dumps(row), flush=True)
    for name in analyses:
        print(f"{name}: one at a time / groups of {groups[-1]} = "
              f"{statistics.median(seconds[(name, groups[0])]) / statistics.median(seconds[(name, groups[-1])]):.2f}x "
              f"(medians of {args.repeats}, side by side)")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"command": "benchmarks/semantic_graft_batching.py " + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out" and v is not None),
                       "machine": {"platform": platform.platform(), "processor": platform.processor(),
                                   "torch_threads": torch.get_num_threads()},
                       "versions": {"routelens": rl.__version__, "torch": torch.__version__},
                       "date": time.strftime("%Y-%m-%d"), "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
