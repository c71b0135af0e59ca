"""Time the isolation study one item at a time against items grouped, side by side.

    .venv/bin/python benchmarks/isolation_batching.py                        # demo model, CPU
    .venv/bin/python benchmarks/isolation_batching.py --model ./olmoe --items items.jsonl --device cuda \
        --dtype bfloat16 --groups 1,16,64

The same study (every MoE layer, every expert forced, the floor seeds) is run in memory
once per `--groups` value (`group_items`: items sharing one right-padded natural forward
and their scoring passes), in one process on the same items; prints the seconds, the
speed-up over the first value, and the largest difference of any isolation row's score
from the first run's (float rounding of other batch shapes).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

import routelens as rl

KEYS = ["item_id", "layer", "condition", "expert", "floor_seed"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--items", default="arithmetic", help="an item file, or arithmetic (the demo's task)")
    parser.add_argument("--per-domain", type=int, default=25)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--floor-seeds", type=int, default=5)
    parser.add_argument("--groups", default="1,16", help="group_items values to time, comma-separated")
    parser.add_argument("--repeats", type=int, default=1, help="runs per value (the fastest is kept)")
    parser.add_argument("--out", default=None, help="also write the rows as JSON")
    args = parser.parse_args()

    lens = rl.load(args.model, device=args.device, dtype=args.dtype)
    rows, first = [], None
    for group in (int(value) for value in args.groups.split(",")):
        best, result = None, None
        for _ in range(args.repeats):
            started = time.perf_counter()
            result = rl.isolate(lens, args.items, None, per_domain=args.per_domain, floor_seeds=args.floor_seeds,
                                    group_items=group, show_progress=False)
            best = min(best or float("inf"), time.perf_counter() - started)
        table = result.isolation.sort_values(KEYS, ignore_index=True)
        first = table if first is None else first
        row = {"model": args.model, "device": lens.loaded.device, "dtype": lens.loaded.dtype, "group_items": group,
               "items": int(table["item_id"].nunique()), "seconds": round(best, 3),
               "speedup_over_first": round(rows[0]["seconds"] / best, 3) if rows else 1.0,
               "max_abs_diff_from_first": float(np.abs(table["mean_logprob"] - first["mean_logprob"]).max()),
               "checks": result.info.get("checks", {}).get("item_batching")}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
