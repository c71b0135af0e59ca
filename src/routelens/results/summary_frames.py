"""Summary tables as pandas DataFrames, read off a run's summary.json.

One function per analysis; the result objects' `.summary` and `routelens export` both use
them, so a paper's table and a notebook's frame are the same numbers. Intervals are split
into `<metric>_ci_low` / `<metric>_ci_high` columns.
"""

from __future__ import annotations

import pandas as pd


def _split_intervals(row: dict) -> dict:
    """{"gain_ci": [a, b]} -> {"gain_ci_low": a, "gain_ci_high": b}, other keys kept in order."""
    out = {}
    for key, value in row.items():
        if key.endswith("_ci") or key == "ci":
            low, high = value if value is not None else (None, None)
            out[f"{key}_low"], out[f"{key}_high"] = low, high
        else:
            out[key] = value
    return out


def counterfactual_frame(summary: dict) -> pd.DataFrame:
    """One row per (layer, bin): tokens, trajectories, mean gain and its null, win and tie
    rates, the standard route's percentile and alignment, with 95% intervals (`few_clusters`:
    over fewer than 10 trajectories). The gain as a function of S is in summary.json."""
    rows = [{"layer": int(layer), "bin": name,
             **_split_intervals({k: v for k, v in values.items() if k != "gain_by_routes"})}
            for layer, bins in summary["layers"].items() for name, values in bins.items()]
    return pd.DataFrame(rows)


def joint_frame(summary: dict) -> pd.DataFrame | None:
    """A joint-layers run's comparison (None for other runs): one row per bin of the joint
    routes, with their gain, the sum and the best of the single-layer gains of the same
    tokens, the paired differences with 95% intervals, and the verdict."""
    joint = summary.get("joint")
    if not joint:
        return None
    layers = "+".join(map(str, joint["layers"]))
    return pd.DataFrame([{"layers": layers, "bin": name,
                          **_split_intervals({k: v for k, v in values.items() if k != "gain_by_routes"})}
                         for name, values in joint["bins"].items()])


def isolation_frame(summary: dict) -> pd.DataFrame:
    """One row per (domain, layer): the best forced expert with its median delta, interval
    and q-value, significant cells, and the random floor."""
    return pd.DataFrame([_split_intervals(row) for row in summary["layer_table"]])


def passk_frame(summary: dict) -> pd.DataFrame:
    """One row per (group, arm, k): pass@k with its interval; with two arms, also the paired
    difference (arm "difference")."""
    blocks = {"all": summary["all"], **summary.get("by_group", {})}
    rows = []
    for group, block in blocks.items():
        for arm, values in block.items():
            for metric, value in values.items():
                if not isinstance(value, dict):
                    continue
                rows.append({"group": group, "arm": arm, "k": int(metric.split("@")[1]),
                             **_split_intervals({"pass_at_k": value["mean"], "ci": value["ci"]}),
                             **{extra: value[extra] for extra in ("problems_better", "problems_worse") if extra in value}})
    return pd.DataFrame(rows)


def router_update_frame(summary: dict) -> pd.DataFrame:
    """One row: pairs, preference accuracy before and after, loss, parameters changed."""
    keys = ("layer", "pairs", "pair_tokens", "preference_accuracy_before", "preference_accuracy_after",
            "loss_first_step", "loss_last_step", "parameters_checked", "only_router_changed")
    row = {key: summary[key] for key in keys}
    row["parameters_changed"] = len(summary["parameters_changed"])
    return pd.DataFrame([row])


def rollout_frame(summary: dict) -> pd.DataFrame:
    """One row per bin: tokens, each arm's accuracy, the paired differences against the
    standard route (with 95% intervals) and how often the outcome agrees with the proxy."""
    rows = []
    for name, values in summary["bins"].items():
        outcome = values.get("outcome", {})
        rows.append({"bin": name, **_split_intervals({k: v for k, v in values.items() if k != "outcome"}), **outcome})
    return pd.DataFrame(rows)


def semantic_route_frame(summary: dict) -> pd.DataFrame:
    """One row per (layer set, domain, arm): mean score, the paired difference against natural
    routing with its interval, p and q."""
    rows = []
    for layer_set, block in summary["layer_sets"].items():
        for domain, entry in block.items():
            rows.append({"layer_set": layer_set, "domain": domain, "arm": "natural", "score": entry["natural"],
                         "items": entry["items"]})
            for arm, test in entry.items():
                if isinstance(test, dict):
                    rows.append({"layer_set": layer_set, "domain": domain, "arm": arm, **_split_intervals(
                        {"score": test["score"], **{k: v for k, v in test.items() if k != "score"}})})
    return pd.DataFrame(rows)


def graft_evaluation_frame(summary: dict) -> pd.DataFrame:
    """One row per (domain, measure, slot): before, after, the paired difference with its interval, p and q."""
    rows = []
    for domain, block in summary["domains"].items():
        rows.append({"domain": domain, "measure": "natural", "slot": None, **_split_intervals(block["natural"])})
        for slot, tests in block["pairs"].items():
            rows += [{"domain": domain, "measure": measure, "slot": slot, **_split_intervals(test)}
                     for measure, test in tests.items()]
    return pd.DataFrame(rows)


FRAMES = {"counterfactual": counterfactual_frame, "isolation": isolation_frame, "passk": passk_frame,
          "router-update": router_update_frame, "rollout": rollout_frame, "semantic-routing": semantic_route_frame,
          "graft-evaluation": graft_evaluation_frame}


def summary_frame(kind: str, summary: dict) -> pd.DataFrame:
    """The summary table of a run of `kind` (counterfactual, isolation, passk, router-update)."""
    return FRAMES[kind](summary)
