"""A graft from start to end, in the order that keeps it safe (`routelens graft`, `rl.graft`).

1. Everything that can be refused is checked before anything is written: the settings and
   the expert map (before a model loads), `out` (a folder that may take the graft: not a
   file, writable, empty, new or a graft's own), both models (config, weights, one family,
   the map against their layers, experts and shapes) and, with `evaluate`, the items (the
   file, its domains, at least one item).
2. The grafted model is written whole or not at all (`folder.save_graft`): `out` holding
   this very graft is kept; another graft is replaced only with `overwrite`.
3. The evaluation runs in the run folder `out`/evaluation, one unit per item: a re-run of
   the same command after a kill resumes it (nothing lost or done twice).

A Ctrl-C is reported by what is on disk (`GraftInterrupted`): nothing written, or the
grafted model complete and the evaluation's units done kept.
"""

from __future__ import annotations

import os

from routelens.analyses.graft.config import GraftEvaluationConfig
from routelens.analyses.graft.folder import EVALUATION, check_graft_out, holds, save_graft
from routelens.analyses.graft.result import GraftResult
from routelens.errors import SettingError


class GraftInterrupted(KeyboardInterrupt):
    """A Ctrl-C during a graft; its message says what the interrupted graft left on disk."""


def interrupted_message(out: str, record: dict | None, evaluate: bool) -> str:
    """What is true after a Ctrl-C, read off the disk: the graft is complete at `out` (and
    the evaluation's units done kept), or nothing was written."""
    if record is None:
        return "nothing was written (the models were loading and being checked): re-run the same command"
    if not holds(out, record):
        state = f"{out} is as it was" if os.path.lexists(out) else f"there is no {out}"
        return ("nothing was written (the grafted model is saved beside `out` and moved in only when whole; "
                f"that partial copy was removed) and {state}: re-running starts again")
    evaluation = os.path.join(out, EVALUATION)
    if evaluate and os.path.isfile(os.path.join(evaluation, "run.json")):
        return (f"the grafted model {out} is complete and kept, and so are the evaluation's units done "
                f"({os.path.join(evaluation, 'run.json')} shows how many): re-run the same command to resume")
    if evaluate:
        return f"the grafted model {out} is complete and kept: re-run the same command to evaluate it"
    return f"the grafted model {out} is complete"


def graft(recipient, donor, experts, out: str, *, dtype: str | None = None, device: str = "cpu",
          evaluate: bool = False, items="arithmetic", domains: list[str] | None = None, per_domain: int | None = 50,
          config: GraftEvaluationConfig | None = None, show_progress: bool = False, ray=None,
          workers: int | None = None, overwrite: bool = False, **options) -> GraftResult:
    """`routelens.graft` (see its docstring); `overwrite`: replace another graft at `out`
    (only the files its graft.json lists and its evaluation's outputs) and an evaluation run
    of other settings."""
    from routelens.analyses.graft.evaluation import run_graft_evaluation
    from routelens.analyses.graft.grafting import checkpoint_dtype, graft_record, parse_expert_map, plan_graft, save_model
    from routelens.api import _item_data, make_config
    from routelens.distributed import check_ray_can_load, ray_settings
    from routelens.lens import Lens, load
    from routelens.results.objects import read_run
    from routelens.results.paths import check_apart_from_inputs

    ray = ray_settings(ray, workers)
    settings = make_config(GraftEvaluationConfig, config, **options)   # before any model loads
    mapping = parse_expert_map(experts)
    if ray is not None and not evaluate:
        raise SettingError("`ray` runs the evaluation on Ray actors; give it with `evaluate`", "ray", "evaluate")
    inputs = [path for path in (recipient, donor, items) if isinstance(path, (str, os.PathLike))]
    check_apart_from_inputs(out, [os.fspath(path) for path in inputs])
    check_graft_out(out, overwrite)
    record = None
    try:
        if isinstance(recipient, Lens):   # a loaded model: its own dtype, unless another is asked for
            dtype = dtype or recipient.loaded.dtype
        else:
            dtype = dtype or checkpoint_dtype(recipient)

        def loaded(model, role: str) -> Lens:
            if not isinstance(model, Lens):
                return load(model, device, dtype)
            if not model.loaded.weights or model.loaded.dtype != dtype:
                raise SettingError(f"the {role} Lens ({model.loaded.spec!r}) is {model.loaded.dtype}"
                                   f"{'' if model.loaded.weights else ' without weights'}; grafting in `dtype` {dtype} "
                                   "needs the model loaded with weights in that dtype", "dtype")
            return model

        into, source = loaded(recipient, "recipient"), loaded(donor, "donor")
        plan = plan_graft(into.loaded, source.loaded, mapping)
        if evaluate:
            check_ray_can_load(into.loaded, ray)
            kept, info = _item_data(into, items, domains, per_domain)
            if not kept:
                raise SettingError("no items to evaluate the graft on; check `items` and `domains`", "items", "domains")
        record = graft_record(into.loaded, source.loaded, plan)
        saved, reused = save_graft(out, record, lambda folder: save_model(folder, into.loaded, plan), overwrite)
        del source
        evaluation = None
        if evaluate:
            folder = run_graft_evaluation(into.loaded, plan, kept, os.path.join(out, EVALUATION), info,
                                          seed=settings.seed, bootstrap_resamples=settings.bootstrap_resamples,
                                          alpha=settings.alpha, overwrite=overwrite, show_progress=show_progress,
                                          ray=ray, group_items=settings.group_items)
            evaluation = read_run(folder.path)
    except KeyboardInterrupt:
        raise GraftInterrupted(interrupted_message(out, record, evaluate)) from None
    return GraftResult(out, saved, evaluation, reused=reused)
