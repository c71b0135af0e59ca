"""`routelens demo`: the counterfactual analysis and the isolation study end to end,
nothing to download.

On the embedded demo model (a small OLMoE trained by this project on chain-of-thought
arithmetic): sample solutions to arithmetic problems, verify their final answers, and run
the counterfactual analysis on the verified trajectories at the first, a middle and the
last MoE layer, through the same code path as `routelens counterfactual`; then the
expert-isolation study on the four arithmetic domains at every MoE layer (as `routelens
isolate`). The printed tables are read back from the run folders' summary.json, and the
report of both runs is written to <out>/report.html.
"""

from __future__ import annotations

import os

from routelens.errors import RouteLensError
from routelens.results.run_folder import read_json


def _demo_trajectories(loaded, folder: str, args) -> str:
    """Sampled and verified once per setting; reused when the demo runs again."""
    from routelens.data.sampling import arithmetic_trajectories, write_trajectories

    path = os.path.join(folder, f"trajectories-n{args.problems}-s{args.samples_per_problem}"
                                f"-t{args.sample_temperature}-seed{args.seed}.jsonl")
    if not os.path.exists(path):
        records = arithmetic_trajectories(loaded.adapter.model, loaded.tokenizer, args.problems,
                                          args.samples_per_problem, args.sample_temperature, args.seed,
                                          show_progress=not args.no_progress)
        write_trajectories(records, path)
        verified = sum(r["verified"] for r in records)
        print(f"sampled {len(records)} solutions to {args.problems} problems, {verified} verified correct")
    return path


def run_demo(args) -> int:
    from routelens.cli import run_counterfactual_command
    from routelens.models.loading import load_model
    from routelens.summary_table import print_summary

    loaded = load_model("demo", args.device, args.dtype, device_map=args.device_map,
                        experts_implementation=args.experts_implementation)
    os.makedirs(args.out, exist_ok=True)
    trajectories = _demo_trajectories(loaded, args.out, args)
    moe = loaded.adapter.moe_layers
    layers = args.layers or sorted({moe[0], moe[len(moe) // 2], moe[-1]})
    run_dir = os.path.join(args.out, "counterfactual")
    print(f"demo: embedded OLMoE ({len(moe)} MoE layers, {loaded.adapter.num_experts} experts, "
          f"top-{loaded.adapter.top_k}); verified trajectories; layers {layers}; {args.routes} alternative routes")
    try:
        run_counterfactual_command("demo", trajectories, run_dir, args, layers, only_verified=True,
                                   preloaded=loaded)
    except RouteLensError as error:
        if "kept no trajectory" in str(error):
            raise RouteLensError("the demo model solved none of the sampled problems; "
                                 "raise --problems or --samples-per-problem") from None
        raise
    print_summary(read_json(os.path.join(run_dir, "summary.json")))
    print(f"run folder: {run_dir} (routes.parquet, tokens.parquet, summary.json, run.json)")
    isolation_dir = _demo_isolation(loaded, args)
    from routelens.report.build import build_report

    report = build_report([run_dir, isolation_dir], os.path.join(args.out, "report.html"))
    print(f"report: {report} (open it in a browser; figures in each run folder's figures/)")
    return 0


def _demo_isolation(loaded, args) -> str:
    """The expert-isolation study on the four arithmetic domains, every MoE layer."""
    from routelens.analyses.isolation import IsolationConfig, run_isolation
    from routelens.data.target_items import arithmetic_items
    from routelens.summary_table import print_isolation_summary

    run_dir = os.path.join(args.out, "isolation")
    items = arithmetic_items(loaded.tokenizer, args.isolation_per_domain)
    print(f"demo: expert isolation, {len(items)} items in 4 arithmetic domains, every MoE layer, "
          f"{loaded.adapter.num_experts} forced experts and a 5-seed random floor per layer")
    config = IsolationConfig(seed=args.seed, memory_budget=args.memory_budget)
    run_isolation(loaded, items, config, run_dir, {"items": "task:arithmetic", "per_domain": args.isolation_per_domain,
                                                   "num_items": len(items)},
                  overwrite=args.overwrite, show_progress=not args.no_progress)
    print_isolation_summary(read_json(os.path.join(run_dir, "summary.json")))
    print(f"run folder: {run_dir} (isolation.parquet, cells.parquet, calibration.parquet, summary.json, run.json)")
    return run_dir
