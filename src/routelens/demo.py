"""`routelens demo`: the counterfactual analysis and the isolation study end to end,
nothing to download.

On the embedded demo model (a small OLMoE trained by this project on chain-of-thought
arithmetic): sample solutions to arithmetic problems, verify their final answers, and run
the counterfactual analysis on the verified trajectories at the first, a middle and the
last MoE layer, through the same API as `routelens counterfactual`; then the
expert-isolation study on the four arithmetic domains at every MoE layer (as `routelens
isolate`), and rollouts of every Fragile token (as `routelens rollout` with its defaults:
does a better route also end in a better answer? Neither the tokens nor the best
alternative are chosen with the trajectory's next token, so the rollouts can fail the
next-token proxy).
The printed tables are read back from the run folders' summary.json, and the report of
all runs is written to <out>/report.html.
"""

from __future__ import annotations

import os

from routelens.errors import RouteLensError, SettingError


def _demo_trajectories(lens, folder: str, problems: int, samples_per_problem: int, temperature: float, seed: int,
                       show_progress: bool) -> str:
    """Sampled and verified once per setting; reused when the demo runs again."""
    from routelens.api import sample_trajectories

    # "-steps": the records carry step checks (a file sampled before them would silently turn them off)
    path = os.path.join(folder, f"trajectories-n{problems}-s{samples_per_problem}-t{temperature}-seed{seed}-steps.jsonl")
    if not os.path.exists(path):   # an interrupted sampling resumes from path + ".run"
        trajectories = sample_trajectories(lens, n=problems, samples_per_problem=samples_per_problem,
                                           temperature=temperature, seed=seed, out=path, show_progress=show_progress)
        verified = sum(t.verified is True for t in trajectories)
        print(f"sampled {len(trajectories)} solutions to {problems} problems, {verified} verified correct")
    return path


def run_demo(out: str = os.path.join("runs", "demo"), *, device: str = "auto", dtype: str = "auto", device_map=None,
             experts_implementation: str | None = None, problems: int = 120, samples_per_problem: int = 2,
             temperature: float = 0.8, isolation_per_domain: int = 50, layers: list[int] | None = None,
             rollout_samples: int = 8, seed: int = 0, overwrite: bool = False, show_progress: bool = True,
             **counterfactual_options) -> str:
    """Sample and verify trajectories, run the counterfactual analysis (first, middle and
    last MoE layer unless `layers`), the isolation study and the rollouts (`rollout_samples`
    continuations per arm; 0: none) into `out`, and write the report; returns the report's
    path. `counterfactual_options`: CounterfactualConfig fields."""
    from routelens.analyses.counterfactual.config import CounterfactualConfig
    from routelens.analyses.counterfactual.table import print_summary
    from routelens.api import counterfactual
    from routelens.config import positive
    from routelens.lens import load
    from routelens.report.build import build_report
    from routelens.report.rendering import workers as report_workers

    # bad settings fail before the model loads or `out` is made
    CounterfactualConfig(**{"layers": layers, "seed": seed, **counterfactual_options})
    positive("temperature", temperature)
    report_workers(2)   # ROUTELENS_REPORT_WORKERS, checked before the runs rather than at their report
    lens = load("demo", device, dtype, device_map=device_map, experts_implementation=experts_implementation)
    os.makedirs(out, exist_ok=True)
    trajectories = _demo_trajectories(lens, out, problems, samples_per_problem, temperature, seed, show_progress)
    moe = lens.moe_layers
    layers = layers or sorted({moe[0], moe[len(moe) // 2], moe[-1]})
    run_dir = os.path.join(out, "counterfactual")
    routes = counterfactual_options.get("routes", 32)
    print(f"demo: embedded OLMoE ({len(moe)} MoE layers, {lens.num_experts} experts, "
          f"top-{lens.top_k}); verified trajectories; layers {layers}; {routes} alternative routes")
    try:
        result = counterfactual(lens, trajectories, run_dir, only_verified=True, overwrite=overwrite,
                                    show_progress=show_progress, layers=layers, seed=seed, **counterfactual_options)
    except RouteLensError as error:
        if "kept no trajectory" in str(error):
            raise SettingError("the demo model solved none of its sampled arithmetic tasks; "
                               "raise `problems` or `samples_per_problem`", "problems", "samples_per_problem") from None
        raise
    print_summary(result.summary_dict)
    print(f"run folder: {run_dir} (routes.parquet, tokens.parquet, summary.json, run.json)")
    rollout_dir = _demo_rollout(lens, out, run_dir, rollout_samples, temperature, seed, overwrite, show_progress)
    isolation_dir = _demo_isolation(lens, out, isolation_per_domain, seed, overwrite, show_progress,
                                    counterfactual_options.get("memory_budget"))
    # the demo's own report, rebuilt whenever the demo runs again (never a file routelens did not write)
    report = build_report([run_dir] + ([rollout_dir] if rollout_dir else []) + [isolation_dir],
                          os.path.join(out, "report.html"), overwrite=True)
    print(f"report: {report} (open it in a browser; figures in each run folder's figures/)")
    return report


def _demo_rollout(lens, out: str, counterfactual_dir: str, samples: int, temperature: float, seed: int,
                  overwrite: bool, show_progress: bool) -> str | None:
    """Rollouts of every Fragile token, the best alternative chosen without the trajectory's
    next token (the rollout's defaults); None when asked for none or when there is no
    Fragile token (a small demo run)."""
    from routelens.analyses.rollout.analysis import NothingToRollOut
    from routelens.analyses.rollout.table import print_rollout_summary
    from routelens.api import rollout

    if not samples:
        return None
    run_dir = os.path.join(out, "rollout")
    print(f"demo: rollouts of every Fragile token, {samples} continuations per arm (standard, best alternative "
          f"by the standard route's top next tokens, random alternative) at T={temperature}")
    try:
        result = rollout(lens, counterfactual_dir, run_dir, samples=samples, temperature=temperature, seed=seed,
                             overwrite=overwrite, show_progress=show_progress)
    except NothingToRollOut as reason:
        print(f"demo: rollouts skipped: {reason}")
        return None
    print_rollout_summary(result.summary_dict)
    print(f"run folder: {run_dir} (rollouts.parquet, summary.json, run.json)")
    return run_dir


def _demo_isolation(lens, out: str, per_domain: int, seed: int, overwrite: bool, show_progress: bool,
                    memory_budget: int | None) -> str:
    """The expert-isolation study on the four arithmetic domains, every MoE layer."""
    from routelens.analyses.isolation.table import print_isolation_summary
    from routelens.api import isolate

    run_dir = os.path.join(out, "isolation")
    print(f"demo: expert isolation, {per_domain * 4} items in 4 arithmetic domains, every MoE layer, "
          f"{lens.num_experts} forced experts (at weight 1.0 and at the natural gate mass), 5-seed k-expert and "
          "single-expert random floors per layer")
    options = {"memory_budget": memory_budget} if memory_budget else {}
    result = isolate(lens, "arithmetic", run_dir, per_domain=per_domain, seed=seed, overwrite=overwrite,
                         show_progress=show_progress, **options)
    print_isolation_summary(result.summary_dict)
    print(f"run folder: {run_dir} (isolation.parquet, cells.parquet, calibration.parquet, summary.json, run.json)")
    return run_dir
