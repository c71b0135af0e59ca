"""The short tables printed at the end of a run, read from its summary.json."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from routelens.config import ALL_TOKENS, BINS


def _with_interval(value, interval, digits: int = 3) -> str:
    if value is None:
        return "-"
    low, high = interval
    text = f"{value:.{digits}f}"
    return text if low is None else f"{text} [{low:.{digits}f}, {high:.{digits}f}]"


def _p_value(test: dict | None) -> str:
    if not test or test.get("p_value") is None:
        return "-"
    return f"{test['p_value']:.2g}"


def summary_table(summary: dict) -> Table:
    tolerance = summary.get("win_tolerance")
    table = Table(title="counterfactual routing: per layer x bin (95% bootstrap CI over trajectories; "
                        "* fewer than 10 trajectories)",
                  caption=None if tolerance is None else
                  f"win / tie / loss: p_alt above / within / below p_std by {tolerance}; null: the gain of a random "
                  "draw of the sampler; sign p: exact sign test over trajectories, alternatives ahead vs behind "
                  "(ties aside, unadjusted)")
    for column in ("layer", "bin", "tokens", "traj", "p std", "gain", "null gain", "win rate", "tie", "loss", "sign p",
                   "alignment"):
        table.add_column(column, justify="right" if column not in ("bin",) else "left")
    for layer, groups in summary["layers"].items():
        for name in (*BINS, ALL_TOKENS):
            group = groups[name]
            table.add_row(
                layer, name + ("*" if group.get("few_clusters") else ""), str(group["tokens"]),
                str(group["trajectories"]),
                "-" if group["p_standard"] is None else f"{group['p_standard']:.3f}",
                _with_interval(group["gain"], group["gain_ci"]),
                _with_interval(group.get("null_gain"), group.get("null_gain_ci", (None, None))),
                _with_interval(group["win_rate"], group["win_rate_ci"]),
                "-" if group.get("tie_rate") is None else f"{group['tie_rate']:.3f}",
                "-" if group.get("loss_rate") is None else f"{group['loss_rate']:.3f}",   # absent in older runs
                _p_value(group.get("win_loss_sign_test")),
                _with_interval(group["alignment"], group["alignment_ci"]),
            )
        table.add_section()
    return table


def joint_table(summary: dict) -> Table | None:
    """A joint-layers run: the interaction of the layers on the same routes (the verdict's
    basis), and the best joint gain against the best single-layer gain of the same tokens."""
    joint = summary.get("joint")
    if not joint:
        return None
    layers = "+".join(map(str, joint["layers"]))
    table = Table(title=f"joint routes at layers {layers} against the same routes one layer at a time (95% bootstrap CI "
                        "over trajectories; * fewer than 10 trajectories)",
                  caption="interaction: mean over routes of the joint change minus the sum of the single-layer changes "
                          "(0: additive; the verdict reads its interval)")
    for column in ("bin", "tokens", "interaction", "verdict", "joint gain", "best single", "joint - best single"):
        table.add_column(column, justify="left" if column in ("bin", "verdict") else "right")
    for name in (*BINS, ALL_TOKENS):
        group = joint["bins"][name]
        table.add_row(name + ("*" if group.get("few_clusters") else ""), str(group["tokens"]),
                      _with_interval(group["interaction"], group["interaction_ci"], 4), group["verdict"] or "-",
                      _with_interval(group["gain"], group["gain_ci"], 4),
                      _with_interval(group["max_single_gain"], group["max_single_gain_ci"], 4),
                      _with_interval(group["joint_minus_best_single"], group["joint_minus_best_single_ci"], 4))
    return table


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
    line = step_check_line(summary)
    if line:
        console.print(line)


def _ci(interval) -> str:
    low, high = interval
    return "-" if low is None else f"[{low:+.3f}, {high:+.3f}]"


def isolation_tables(summary: dict) -> list[Table]:
    score = summary["score"]
    counts = Table(title=f"expert isolation: {summary['significant_cells']} of {summary['cells']} cells significant "
                         f"(BH step-up, alpha {summary['alpha']}); {summary['significant_better_than_natural']} "
                         f"better than natural; {summary['significant_vs_floor']} differ from the random floor "
                         f"({summary['significant_better_than_floor']} better)")
    for column in ("domain", "items", "significant", "calibration: router share", "calibration: top-k share"):
        counts.add_column(column, justify="left" if column == "domain" else "right")
    for domain, n in summary["items_per_domain"].items():
        calibration = summary["calibration"][domain]
        counts.add_row(domain, str(n), str(summary["significant_by_domain"][domain]),
                       *(f"{c['fisher_z_mean']:+.3f} {_ci(c['ci'])}" if c["fisher_z_mean"] is not None else "-"
                         for c in (calibration["router_share"], calibration["selection_share"])))
    layers = Table(title=f"per layer: best single expert (median delta of {score} vs natural, 95% CI), "
                         "random floor, most-activated expert")
    for column in ("domain", "layer", "best expert", "median delta", "95% CI", "floor delta",
                   "most activated", "share x E", "its rank"):
        layers.add_column(column, justify="left" if column == "domain" else "right")
    dominance = {(row["domain"], row["layer"]): row for row in summary["dominance"]}
    for row in summary["layer_table"]:
        most = dominance[(row["domain"], row["layer"])]
        layers.add_row(row["domain"], str(row["layer"]), str(row["best_expert"]), f"{row['best_median_delta']:+.3f}",
                       _ci(row["best_ci"]), "-" if row["floor_median_delta"] is None else f"{row['floor_median_delta']:+.3f}",
                       str(most["most_activated"]), f"{most['vs_uniform']:.2f}", str(most["rank_of_most_activated"]))
    return [counts, layers]


def print_isolation_summary(summary: dict, console: Console | None = None) -> None:
    console = console or Console(width=140)
    for table in isolation_tables(summary):
        console.print(table)
    smallest = summary.get("smallest_possible_p")
    if smallest is not None and smallest > summary["alpha"]:
        console.print(f"note: with {min(summary['items_per_domain'].values())} items in a domain the Wilcoxon test "
                      f"cannot give p below {smallest:.3g} > alpha {summary['alpha']}: use more items per domain")


def passk_table(summary: dict) -> Table:
    arms = summary["arms"]
    table = Table(title=f"pass@k, {summary['samples_per_problem']} samples per problem at T={summary['temperature']} "
                        f"(95% bootstrap CI over problems{'; difference paired' if len(arms) == 2 else ''})")
    table.add_column("group")
    table.add_column("k", justify="right")
    for arm in arms:
        table.add_column(arm, justify="right")
    if len(arms) == 2:
        table.add_column(f"{arms[1]} - {arms[0]}", justify="right")
    blocks = [("all", summary["all"])] + sorted((summary.get("by_group") or {}).items())
    for name, block in blocks:
        for k in summary["ks"]:
            key = f"pass@{k}"
            cells = [f"{block[a][key]['mean']:.3f} {_ci(block[a][key]['ci'])}" for a in arms]
            if len(arms) == 2:
                d = block["difference"][key]
                cells.append(f"{d['mean']:+.3f} {_ci(d['ci'])}")
            table.add_row(name, str(k), *cells)
        table.add_section()
    return table


def print_passk_summary(summary: dict, console: Console | None = None) -> None:
    (console or Console(width=140)).print(passk_table(summary))


def rollout_table(summary: dict) -> Table:
    """Accuracy per arm and the paired differences against the standard route, per bin."""
    table = Table(title=f"rollouts: {summary['samples_per_arm']} continuation(s) per arm and token at "
                        f"T={summary['temperature']}, answers checked by {summary['checker']} "
                        "(95% bootstrap CI over trajectories; * fewer than 10 trajectories)")
    for column in ("bin", "tokens", "standard", "best alt", "random alt", "best - standard", "random - standard",
                   "proxy agrees"):
        table.add_column(column, justify="left" if column == "bin" else "right")
    for name, group in summary["bins"].items():
        outcome = group["outcome"]
        agreement = outcome["proxy_agreement"]
        table.add_row(name + ("*" if group["few_clusters"] else ""), str(group["tokens"]),
                      *[_with_interval(group[f"accuracy_{arm}"], group[f"accuracy_{arm}_ci"])
                        for arm in ("standard", "best_alt", "random_alt")],
                      _with_interval(group["best_alt_minus_standard"], group["best_alt_minus_standard_ci"]),
                      _with_interval(group["random_alt_minus_standard"], group["random_alt_minus_standard_ci"]),
                      "-" if agreement is None else
                      f"{agreement:.2f} ({outcome['best_alt_better']} of {outcome['best_alt_better'] + outcome['best_alt_worse']})")
    return table


def print_rollout_summary(summary: dict, console: Console | None = None) -> None:
    console = console or Console(width=190)
    console.print(rollout_table(summary))
    selection = summary["selection"]
    console.print(f"tokens: {selection['chosen']} chosen by --tokens {selection['tokens']}"
                  + (f", {selection['skipped_without_alternative']} skipped (no alternative expert set)"
                     if selection["skipped_without_alternative"] else "")
                  + "; proxy agrees: share of tokens whose outcome differs where the best alternative wins")


def graft_evaluation_table(summary: dict) -> Table:
    """Per domain: the natural score recipient -> grafted, and per grafted slot its selection
    share and the grafted against the original expert forced alone (after - before, 95% CI, q)."""
    table = Table(title="graft evaluation: after - before per item (mean target log-prob in nats; selection share; "
                        f"95% bootstrap CI over items; * q <= {summary['alpha']})")
    for column in ("domain", "items", "natural: recipient -> grafted", "slot", "selected: before -> after",
                   "forced: original -> grafted"):
        table.add_column(column, justify="left" if column in ("domain", "slot") else "right")

    def cell(test: dict, digits: int = 3) -> str:
        star = "*" if test["significant"] else ""
        return (f"{test['before']:.{digits}f} -> {test['after']:.{digits}f} "
                f"({_with_interval(test['difference'], test['ci'], digits)}){star}")

    for domain, block in summary["domains"].items():
        for index, (pair, tests) in enumerate(block["pairs"].items()):
            table.add_row(domain if index == 0 else "", str(block["natural"]["items"]) if index == 0 else "",
                          cell(block["natural"]) if index == 0 else "", pair, cell(tests["selection"], 2),
                          cell(tests["forced"]))
        table.add_section()
    return table


def print_graft_evaluation(summary: dict, console: Console | None = None) -> None:
    (console or Console(width=190)).print(graft_evaluation_table(summary))


def semantic_route_table(summary: dict) -> Table:
    """All domains: each arm's paired difference against natural routing, per layer set."""
    arms = ("semantic", "semantic_token", "oracle", "floor")
    table = Table(title=f"semantic routing ({summary['kind']} fingerprints): arm - natural, {summary['score']}, all "
                        f"evaluation items (95% bootstrap CI; * q <= {summary['alpha']})")
    for column in ("layer set", "items", "natural", *arms):
        table.add_column(column, justify="left" if column == "layer set" else "right")
    for name, block in summary["layer_sets"].items():
        entry = block["All"]
        cells = []
        for arm in arms:
            test = entry.get(arm)
            cells.append("-" if test is None else
                         _with_interval(test["difference"], test["ci"]) + ("*" if test["significant"] else ""))
        table.add_row(name, str(entry["items"]), f"{entry['natural']:.3f}", *cells)
    return table


def semantic_accuracy_table(summary: dict) -> Table:
    """All domains: greedy accuracy per arm and its paired difference against natural routing."""
    arms = ("semantic", "semantic_token", "oracle", "floor")
    table = Table(title="semantic routing: greedy accuracy of the final answers, all evaluation items "
                        "(arm - natural, 95% bootstrap CI; exact McNemar p)")
    for column in ("layer set", "items", "natural", *arms):
        table.add_column(column, justify="left" if column == "layer set" else "right")
    for name, block in summary["accuracy"].items():
        entry = block["All"]
        table.add_row(name, str(entry["items"]), f"{entry['natural']:.2f}",
                      *["-" if arm not in entry else f"{entry[arm]['accuracy']:.2f} "
                        f"({_with_interval(entry[arm]['difference'], entry[arm]['ci'], 2)}, p {entry[arm]['p_value']:.2g})"
                        for arm in arms])
    return table


def print_semantic_route_summary(summary: dict, console: Console | None = None) -> None:
    console = console or Console(width=190)
    console.print(semantic_route_table(summary))
    if summary.get("accuracy"):
        console.print(semantic_accuracy_table(summary))
    console.print("fingerprint classification of evaluation items (nearest domain of the prompt; chance "
                  f"1/{len(next(iter(summary['classification'].values()))['by_domain'])}): " + "; ".join(
                      f"layer {layer} {c['item']:.2f} (tokens {c['token']:.2f})"
                      for layer, c in summary["classification"].items()))
