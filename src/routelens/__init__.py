"""routelens: audit the routers of Mixture-of-Experts language models.

    import routelens as rl
    lens = rl.load("demo")
    trajs = rl.trajectories_from_text(lens.tokenizer, [("Q:3+4=A:", "3+4=7#7")])
    res = rl.counterfactual(lens, trajs, layers=[-1], routes=32, seed=0)
    res.summary

Importing routelens loads nothing heavy and changes no global state (no matplotlib
backend, no torch settings): the names below are imported on first use.
"""

from __future__ import annotations

from routelens.lazy import lazy_getattr

__version__ = "0.1.0"

# name -> module that defines it (imported lazily: `routelens --help` stays fast)
_EXPORTS = {
    "Lens": "routelens.lens", "load": "routelens.lens", "wrap": "routelens.lens", "Routes": "routelens.lens",
    "counterfactual": "routelens.api", "isolate": "routelens.api",
    "passk": "routelens.api", "router_update": "routelens.api",
    "rollout": "routelens.api", "replay": "routelens.api", "graft": "routelens.api", "semantic_route": "routelens.api",
    "trajectories_from_ids": "routelens.api", "trajectories_from_text": "routelens.api",
    "read_trajectories": "routelens.api", "sample_trajectories": "routelens.api",
    "arithmetic_items": "routelens.api", "read_items": "routelens.api",
    "read_routes": "routelens.api", "export_routes": "routelens.data.engine_routes_io",
    "read_run": "routelens.results.objects",
    "CounterfactualResult": "routelens.analyses.counterfactual.result", "IsolationResult": "routelens.analyses.isolation.result",
    "PassKResult": "routelens.analyses.passk.result", "RouterUpdateResult": "routelens.analyses.router_update.result",
    "RolloutResult": "routelens.analyses.rollout.result", "GraftResult": "routelens.analyses.graft.result",
    "GraftEvaluationResult": "routelens.analyses.graft.result", "SemanticRouteResult": "routelens.analyses.semantic_routing.result",
    "CounterfactualConfig": "routelens.analyses.counterfactual.config",
    "IsolationConfig": "routelens.analyses.isolation.config", "PassKConfig": "routelens.analyses.passk.config",
    "RouterUpdateConfig": "routelens.analyses.router_update.config", "RolloutConfig": "routelens.analyses.rollout.config",
    "SemanticRouteConfig": "routelens.analyses.semantic_routing.config",
    "ReplayConfig": "routelens.analyses.replay.config", "ReplayResult": "routelens.analyses.replay.result",
    "EngineRoutes": "routelens.data.engine_routes",
    "EvalProblem": "routelens.analyses.passk.analysis", "Trajectory": "routelens.data.trajectories",
    "TargetItem": "routelens.data.target_items",
    "RouteLensError": "routelens.errors", "SettingError": "routelens.errors", "OverrideNotApplied": "routelens.errors",
    "register_family": "routelens.models.registry",
    "keep_freed_memory": "routelens.allocator",
}

__all__ = ["__version__", *_EXPORTS]


__getattr__ = lazy_getattr(__name__, globals(), _EXPORTS)


def __dir__() -> list[str]:
    return sorted(__all__)
