"""What `routelens.router_update` returns: the run's tables and the router delta."""

from __future__ import annotations

import os

import pandas as pd

from routelens.results.objects import Result
from routelens.results.stored import read_jsonl_file


def router_update_frame(summary: dict) -> pd.DataFrame:
    """One row: pairs, preference accuracy before and after, loss, parameters changed."""
    keys = ("layer", "pairs", "pair_tokens", "preference_accuracy_before", "preference_accuracy_after",
            "loss_first_step", "loss_last_step", "parameters_checked", "only_router_changed")
    row = {key: summary[key] for key in keys}
    row["parameters_changed"] = len(summary["parameters_changed"])
    return pd.DataFrame([row])


class RouterUpdateResult(Result):
    """A router update: `pairs` (the preference pairs), `training_log` (one row per step),
    `delta_path` (apply it with `routelens.load(..., router_delta=...)`), `summary`.

    Examples:
        >>> import routelens as rl
        >>> upd = rl.router_update(rl.load("demo"), demo_run, out=str(tmp / "upd"), steps=2, margin=0.0)
        >>> len(upd.training_log), upd.delta_path.endswith("router_delta.safetensors")
        (2, True)
        >>> rl.load("demo", router_delta=upd.delta_path).family
        'olmoe'
    """

    frame = staticmethod(router_update_frame)   # summary.json -> the summary DataFrame

    kind = "router-update"
    tables = ("pairs", "training_log")

    @property
    def pairs(self) -> pd.DataFrame:
        return self.table("pairs")

    @property
    def training_log(self) -> pd.DataFrame:
        return pd.DataFrame(read_jsonl_file(os.path.join(self.path, "training_log.jsonl")))

    @property
    def delta_path(self) -> str:
        return self.summary_dict["router_delta"]
