"""Reading a complete counterfactual run back as the input of a later step (the router
update, rollouts): its run.json, the model it was run on, and its trajectories, read from
the same file and checked unchanged since the run."""

from __future__ import annotations

import os

from routelens.data.trajectories import Trajectory
from routelens.errors import RouteLensError

# what the later steps read of the run's config
CONFIG_READ = ("model", "trajectories", "trajectories_sha256", "only_verified", "max_trajectories", "routes",
               "resolved_layers")


def counterfactual_run(run_dir: str, needed_by: str) -> dict:
    """run.json of a complete counterfactual run whose tables are there and readable, or a
    one-line error naming `needed_by` and the file at fault (`results.stored.StoredRun`):
    the command line calls it before the model loads."""
    from routelens.results.stored import REDO, StoredRun

    stored = StoredRun(run_dir, kind="counterfactual", needed_by=needed_by).require("tokens.parquet", "routes.parquet")
    missing = [key for key in CONFIG_READ if key not in stored.config]
    if missing:
        raise RouteLensError(f"{stored.file('run.json')} lacks {', '.join(missing)} in its config, which {needed_by} "
                             f"reads; {REDO}")
    return stored.state


def check_same_model(run: dict, run_dir: str, loaded, needed_by: str) -> None:
    """The run was made on this model (and router delta): its routes are this model's."""
    if run["config"].get("model") != loaded.spec or run["config"].get("router_delta") != loaded.identity()["router_delta"]:
        raise RouteLensError(f"{run_dir} was run on model {run['config'].get('model')!r}, not {loaded.spec!r}; "
                             f"{needed_by} must use the model the counterfactual run scored")


def run_trajectories(run: dict, run_dir: str, loaded, needed_by: str) -> dict[str, Trajectory]:
    """The run's trajectories by id, read back from the file it scored (or the copy in the run
    folder for trajectories given in memory), refused if the file changed since."""
    from routelens.data.trajectories import IN_MEMORY, file_sha256, load_trajectories
    from routelens.results.run_folder import TRAJECTORIES_FILE

    config = run["config"]
    path = os.path.join(run_dir, TRAJECTORIES_FILE) if config["trajectories"] == IN_MEMORY else config["trajectories"]
    if not os.path.exists(path) or file_sha256(path) != config["trajectories_sha256"]:
        raise RouteLensError(f"the trajectories of {run_dir} ({path}) are missing or changed since the run; "
                             f"{needed_by} reads the same file back")
    trajectories = load_trajectories(path, loaded.tokenizer, loaded.adapter.config.vocab_size,
                                     only_verified=config["only_verified"], limit=config["max_trajectories"])
    return {t.id: t for t in trajectories}
