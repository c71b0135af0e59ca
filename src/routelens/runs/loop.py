"""The contract between an analysis and the one run loop that executes every analysis.

An analysis prepares an `AnalysisRun`: what identifies the run (`kind`, `run_config`, the
per-unit `tables`), its units and how they group, the `UnitJob` that computes a group
(here, or on Ray actors: `routelens.distributed`), how progress is counted, and how the
finished tables are summarised. `run_analysis` then owns everything that is the same for
all of them: the run folder (refusing another config, resuming a cut-off run: only the
units not done are computed, and a kill loses at most the units in flight), execution in
this process or on Ray, the progress bar, timings and peak memory, the run-time checks
the job reports, and run.json. A new analysis writes its job and its summary, nothing else.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from routelens.distributed import RaySettings, UnitJob, check_ray_can_load, execute


@dataclass
class AnalysisRun:
    """One analysis prepared for the run loop.

    `units`: how many units (trajectories, items, tokens) the run has, numbered 0..units-1;
    `groups(todo)`: the groups of undone units handed to the job together (default: one
    unit each); `job`: computes a group's tables. Progress counts `progress_label`s: a unit
    weighs `unit_weight(i)` before it is done and `done_weight(tables)` once its tables are
    back (default 1 each). `summarise(folder)` runs on the concatenated tables and returns
    summary.json (it may write more tables); `timings(todo, seconds)` adds to run.json's
    timings what this session did in `seconds`; `summary_checks(summary)` adds to run.json's
    checks what the whole run's tables show (every session's, not this one's alone).
    """

    kind: str
    run_config: dict
    tables: tuple[str, ...]
    units: int
    job: UnitJob
    summarise: Callable
    groups: Callable[[list[int]], list[list[int]]] = lambda todo: [[unit] for unit in todo]
    extra: dict = field(default_factory=dict)
    label: str = ""
    progress_unit: str = "items"
    unit_weight: Callable[[int], int] = lambda unit: 1
    done_weight: Callable[[dict], int] = lambda tables: 1
    timings: Callable[[list[int], float], dict] = lambda todo, seconds: {}
    memory_budget: int | None = None   # peak memory is recorded against it (this process only)
    summary_checks: Callable[[dict], dict] = lambda summary: {}


def run_analysis(run: AnalysisRun, loaded, out: str | None, *, overwrite: bool = False, show_progress: bool = True,
                 ray: RaySettings | None = None):
    """Execute `run` into the run folder `out` (in memory when None), resuming a cut-off run
    of the same config; return the completed run (`RunFolder` or `MemoryRun`)."""
    import torch

    from routelens.engine.readout import peak_memory, reset_peak_memory
    from routelens.progress import progress_bar
    from routelens.results.run_folder import open_run

    check_ray_can_load(loaded, ray)
    folder = open_run(out, run.kind, run.run_config, run.tables, overwrite=overwrite, extra=run.extra)
    todo = [unit for unit in range(run.units) if not folder.is_done(unit)]
    total = sum(run.unit_weight(unit) for unit in range(run.units))
    done = total - sum(run.unit_weight(unit) for unit in todo)
    started = time.perf_counter()
    reset_peak_memory(loaded.device)
    with progress_bar(run.label or run.kind, total, done, show_progress, unit=run.progress_unit) as advance:
        checks = execute(folder, run.job, run.groups(todo), lambda tables: advance(run.done_weight(tables)), loaded, ray)
    seconds = time.perf_counter() - started
    folder.concatenate(list(range(run.units)))
    with torch.no_grad():   # a summary that runs the model makes no graph either
        summary = run.summarise(folder)
    memory = peak_memory(loaded.device, run.memory_budget) if run.memory_budget and ray is None else None
    folder.complete(summary, extra={"timings": {"seconds_this_session": round(seconds, 3), **run.timings(todo, seconds),
                                                **({"memory": memory} if run.memory_budget else {})},
                                    "checks": {**checks, **run.summary_checks(summary)}})
    return folder
