"""The tables `routelens` prints at the end of the counterfactual analysis, read from its summary.json."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from routelens.config import ALL_TOKENS, BINS
from routelens.report.formats import p_value_text, q_value_text, with_interval


def _gain(group: dict) -> str:
    """The gain with its interval, marked † where its interval adjusted over the table's
    cells holds 0 (runs made before the adjustment carry no mark)."""
    return with_interval(group["gain"], group["gain_ci"]) + ("†" if group.get("gain_survives_adjustment") is False else "")


def _measured(group: dict, key: str, digits: int = 3) -> str:
    """A statistic with its interval; "-" where absent (a run made before it existed)."""
    return with_interval(group.get(key), group.get(f"{key}_ci", (None, None)), digits)


def summary_table(summary: dict) -> Table:
    tolerance = summary.get("win_tolerance")
    confidence = summary.get("confidence", 0.95)
    unit = summary.get("cluster_unit", "trajectories")
    table = Table(title=f"counterfactual routing: per layer x bin ({confidence:.0%} bootstrap CI over {unit}; "
                        f"* fewer than 10 {unit})",
                  caption=None if tolerance is None else
                  "std - unif: p_std - mean p of uniformly drawn equal-compute routes (above 0: the router beats "
                  f"chance); win / tie / loss: p_alt above / within / below p_std by {tolerance}; sign p: exact sign "
                  f"test over {unit}, alternatives ahead vs behind (ties aside), q: its Benjamini-Hochberg q over the "
                  "table's cells; † its interval adjusted over the cells (Bonferroni) holds 0; align | mass: "
                  "alignment with the routes' gate mass partialled out (not shown where undefined throughout: the "
                  "router score is the gate mass; --alternative-weights matched-mass asks the question there)")
    partial = any(group.get("alignment_mass_partial") is not None for groups in summary["layers"].values()
                  for group in groups.values())   # undefined throughout where the router score is the gate mass
    for column in ("layer", "bin", "tokens", unit[:4] + ".", "p std", "gain", "std - unif", "win rate", "tie", "loss",
                   "sign p", "q", "alignment") + (("align | mass",) if partial else ()):
        table.add_column(column, justify="right" if column not in ("bin",) else "left")
    for layer, groups in summary["layers"].items():
        for name in (*BINS, ALL_TOKENS):
            group = groups[name]
            table.add_row(
                layer, name + ("*" if group.get("few_clusters") else ""), str(group["tokens"]),
                str(group.get("clusters", group["trajectories"])),
                "-" if group["p_standard"] is None else f"{group['p_standard']:.3f}",
                _gain(group),
                _measured(group, "standard_minus_uniform")
                + ("†" if group.get("standard_minus_uniform_survives_adjustment") is False else ""),
                _measured(group, "win_rate"),
                "-" if group.get("tie_rate") is None else f"{group['tie_rate']:.3f}",
                "-" if group.get("loss_rate") is None else f"{group['loss_rate']:.3f}",   # absent in older runs
                p_value_text(group.get("win_loss_sign_test")), q_value_text(group.get("win_loss_sign_test")),
                _measured(group, "alignment"),
                *((_measured(group, "alignment_mass_partial"),) if partial else ()),
            )
        table.add_section()
    return table


def missing_line(summary: dict) -> str:
    """What an older run's summary lacks (it reads; its missing columns print as "-")."""
    first = next(iter(next(iter(summary["layers"].values())).values()))
    missing = [name for key, name in (("standard_minus_uniform", "the uniform null (std - unif)"),
                                      ("alignment_mass_partial", "alignment with gate mass partialled out"),
                                      ("loss_rate", "loss rates and the sign test"))
               if key not in first]
    if not missing:
        return ""
    return f"this run was made before {', '.join(missing)} existed: shown as '-' (re-run to compute them)"


def joint_table(summary: dict) -> Table | None:
    """A joint-layers run: the interaction of the layers on the same routes (the verdict's
    basis), and the best joint gain against the best single-layer gain of the same tokens."""
    joint = summary.get("joint")
    if not joint:
        return None
    layers = "+".join(map(str, joint["layers"]))
    unit = joint.get("cluster_unit", "trajectories")
    level = f"{summary.get('confidence', 0.95):.0%}"
    table = Table(title=f"joint routes at layers {layers} against the same routes one layer at a time ({level} bootstrap CI "
                        f"over {unit}; * fewer than 10 {unit})",
                  caption="interaction: mean over routes of the joint change minus the sum of the single-layer changes "
                          "(0: additive); adjusted: its interval adjusted over the bins (Bonferroni), which the verdict "
                          "reads (runs made before it: the unadjusted one)")
    for column in ("bin", "tokens", "interaction", "adjusted", "verdict", "joint gain", "best single",
                   "joint - best single"):
        table.add_column(column, justify="left" if column in ("bin", "verdict") else "right")
    for name in (*BINS, ALL_TOKENS):
        group = joint["bins"][name]
        table.add_row(name + ("*" if group.get("few_clusters") else ""), str(group["tokens"]),
                      with_interval(group["interaction"], group["interaction_ci"], 4),
                      "-" if group.get("interaction_ci_adjusted") is None else
                      with_interval(group["interaction"], group["interaction_ci_adjusted"], 4), group["verdict"] or "-",
                      with_interval(group["gain"], group["gain_ci"], 4),
                      with_interval(group["max_single_gain"], group["max_single_gain_ci"], 4),
                      with_interval(group["joint_minus_best_single"], group["joint_minus_best_single_ci"], 4))
    return table


def precision_line(summary: dict) -> str:
    """What low precision did: tokens the standard-route check flagged and the audit's share
    of scores resting on an upper-layer route flip (bf16/fp16 runs; "" otherwise)."""
    layers = (summary.get("precision") or {}).get("layers") or {}
    audited = sum(layer["audited_scores"] for layer in layers.values())
    flagged = sum(layer["flagged_tokens"] for layer in layers.values())
    if not audited and not flagged:
        return ""
    flipped = sum(layer["scores_with_upper_route_flip"] for layer in layers.values())
    dtype = summary["precision"].get("dtype", "")
    return (f"low precision ({dtype}): {flipped} of {audited} audited scores ({flipped / audited:.1%}) rest on a router "
            "above the layer choosing other experts than in float32 (upper_route_flip)" if audited else
            f"low precision ({dtype}): no score audited") + \
        (f"; {flagged} tokens flagged by the standard-route check (precision_flag)" if flagged else "")


def step_check_line(summary: dict) -> str:
    """What was scored: tokens of right steps only, or every token with steps unchecked."""
    check = summary.get("step_check")
    if check is None:
        return ""
    if check["only_step_ok"]:
        return (f"step checks: {check['tokens_scored']} tokens of right intermediate steps scored; "
                f"{check['tokens_excluded']} tokens of wrong or uncheckable steps excluded"
                + (f" ({check['trajectories_excluded']} trajectories left with none)" if check["trajectories_excluded"] else ""))
    return ("intermediate steps not checked: every completion token scored (only final answers are verified)"
            if not check["steps_checked"] else "step checks present but off (--no-only-step-ok): every token scored")


def print_summary(summary: dict, console: Console | None = None) -> None:
    console = console or Console(width=190)
    console.print(summary_table(summary))
    joint = joint_table(summary)
    if joint is not None:
        console.print(joint)
    for line in (step_check_line(summary), bin_rule_line(summary), missing_line(summary), precision_line(summary)):
        if line:
            console.print(line)


def bin_rule_line(summary: dict) -> str:
    """Which p bins the tokens, and how many tokens the other rule bins elsewhere."""
    changes = summary.get("bin_changes")
    if not changes:
        return ""
    rule = {"route-mean": "the route-averaged p", "standard": "the standard route's p"}
    moved = ", ".join(f"layer {layer}: {change['tokens']}" for layer, change in changes.items())
    return (f"bins by {rule[summary['bin_rule']]}; tokens {rule[next(iter(changes.values()))['other_rule']]} would bin "
            f"elsewhere: {moved}")
