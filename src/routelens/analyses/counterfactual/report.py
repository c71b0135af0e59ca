"""The report section of the counterfactual analysis: its HTML and its figures (read from the run folder)."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from routelens.analyses.counterfactual.table import bin_rule_line, missing_line, precision_line, step_check_line
from routelens.errors import RouteLensError
from routelens.report.build import figures_html, provenance, tokenizer_of
from routelens.report.figures import BIN_COLOURS, Figure, grid, interval_errors, subplots
from routelens.report.formats import p_value_text, q_value_text
from routelens.report.page import esc, fmt, interval, table
from routelens.results.stored import read_json_file, read_table_file

CONTEXT_BEFORE, CONTEXT_AFTER = 40, 10   # characters of text shown around a listed token
WORST_TOKENS = 20                        # Fragile tokens listed with their text


def token_contexts(config: dict, wanted: pd.DataFrame) -> dict[tuple[str, int], tuple[str, str, str]]:
    """(text before and including position t, the next token, a little after) per wanted token,
    decoded with the model's tokenizer when it is available locally, else token ids."""
    from routelens.data.trajectories import load_trajectories

    tokenizer = tokenizer_of(config.get("model", ""))
    try:
        trajectories = load_trajectories(config["trajectories"], tokenizer, None, only_verified=config["only_verified"],
                                         limit=config["max_trajectories"])
    except (RouteLensError, KeyError, OSError):
        return {}
    by_id = {t.id: t.input_ids for t in trajectories}

    def text(ids: list[int], special: bool) -> str:
        if tokenizer is None:
            return " ".join(map(str, ids))
        return tokenizer.decode(ids, skip_special_tokens=not special)

    out = {}
    for tid, position in zip(wanted["trajectory_id"], wanted["position"]):
        ids = by_id.get(tid)
        if ids is None or position + 1 >= len(ids):
            continue
        out[(tid, int(position))] = (text(ids[max(0, position - CONTEXT_BEFORE): position + 1], False),
                                     text([ids[position + 1]], True),
                                     text(ids[position + 2: position + 2 + CONTEXT_AFTER], False))
    return out


def measured(group: dict, key: str) -> str:
    """A statistic with its interval, "-" where a run made before it has none."""
    return interval(group.get(key), group.get(f"{key}_ci", [None, None]))


def chance_line(summary: dict) -> str:
    """What the report's yardsticks are, in words."""
    weights = {"model": "the gating rule's weights (the paper's definition: a route with more gate mass has a larger "
                        "output, so raw comparisons mix choice and scale)",
               "matched-mass": "the gating rule's weights rescaled to the standard route's gate mass (scale-free)"}
    null = summary.get("null_routes")
    return ("Alternatives carry " + weights[summary.get("alternative_weights", "model")] + ". "
            + ("Does the router beat chance: p standard - E[p uniform] compares its route with "
               f"{null} routes of k candidates drawn uniformly per token, weighted alike; 'gain' is what a search of "
               "the router's sampler finds, not a test of the router." if null else
               "No uniform null was scored (null_routes 0, or a run made before it): nothing here tests whether "
               "the router beats chance."))


# ---------------------------------------------------------------------------- sections
def section(run_dir: str, run: dict) -> str:
    from routelens.config import ALL_TOKENS, BINS

    tokens = read_table_file(os.path.join(run_dir, "tokens.parquet"))
    routes = read_table_file(os.path.join(run_dir, "routes.parquet"))
    summary = read_json_file(os.path.join(run_dir, "summary.json"))
    rows, attributes = [], []
    for layer, groups in summary["layers"].items():
        for name in (*BINS, ALL_TOKENS):
            g = groups[name]
            rows.append([layer, name, g["tokens"], g.get("clusters", g["trajectories"]), fmt(g["p_standard"]),
                         fmt(g["p_best_alt"]), interval(g["gain"], g["gain_ci"]),
                         {True: "yes", False: "no"}.get(g.get("gain_survives_adjustment"), "-"),   # absent before
                         fmt(g.get("p_uniform_mean")), measured(g, "standard_minus_uniform"),
                         measured(g, "best_minus_uniform_best"),
                         interval(g["win_rate"], g["win_rate_ci"]),
                         interval(g.get("tie_rate"), g.get("tie_rate_ci", [None, None])),
                         interval(g.get("loss_rate"), g.get("loss_rate_ci", [None, None])),   # absent in older runs
                         p_value_text(g.get("win_loss_sign_test")),
                         q_value_text(g.get("win_loss_sign_test")),
                         interval(g["alignment"], g["alignment_ci"]), measured(g, "alignment_mass_partial")])
            attributes.append(f' data-layer="{esc(layer)}" data-bin="{esc(name)}"')
    level = f"{summary.get('confidence', 0.95):.0%} CI"
    unit = summary.get("cluster_unit", "trajectories")
    bins = table(["layer", "bin", "tokens", f"{unit} (clusters)", "p standard", "p best alt", f"gain [{level}]",
                  "gain survives the adjustment over cells (Bonferroni)", "E[p uniform route]",
                  f"p standard - E[p uniform] [{level}]", f"best of m sampled - best of m uniform [{level}]",
                  f"win rate [{level}]", f"tie rate [{level}]",
                  f"loss rate [{level}]", f"sign test p (alternatives ahead vs behind, over {unit})",
                  "sign test q (Benjamini-Hochberg over the cells)", f"alignment, raw [{level}]",
                  f"alignment, gate mass partialled out [{level}]"], rows, "cf-bins",
                 cell_attributes=lambda r, c: attributes[r] + ' class="count"' if c == 2 else "")
    worst = worst_tokens(tokens, WORST_TOKENS)
    contexts = token_contexts(run["config"], worst)
    worst_rows = []
    for _, token in worst.iterrows():
        before, target, after = contexts.get((token["trajectory_id"], int(token["position"])), ("", "", ""))
        context = ("raw", f"{esc(before)}<mark>{esc(target)}</mark>{esc(after)}")
        worst_rows.append([token["trajectory_id"], token["layer"], token["position"], fmt(token["p_standard"]),
                           fmt(token["p_best_alt"]), fmt(token["gain"]), context])
    worst_table = table(["trajectory", "layer", "position", "p standard", "p best alt", "gain",
                         "text (next token marked)"], worst_rows, "cf-worst",
                        cell_attributes=lambda r, c: ' class="text"' if c == 6 else "")
    figures = counterfactual_figures(tokens, routes, summary, run["config"])
    num_routes = run["config"].get("routes", run["config"].get("num_routes"))   # num_routes: runs made before 0.2
    return (f"<h2>Counterfactual routing: {esc(run_dir)}</h2>"
            f"<p>{len(tokens)} scored tokens in {tokens['trajectory_id'].nunique()} trajectories, layers "
            f"{esc(run['config']['resolved_layers'])}, {esc(num_routes)} alternative routes per token. "
            f"Intervals: {esc(summary['interval'])}. Bins: "
            f"{esc('; '.join(f'{name}: {rule}' for name, rule in summary['bins'].items()))}. "
            f"{esc(step_check_line(summary) or 'Intermediate steps not checked (a run made before step checks).')} "
            f"{esc(bin_rule_line(summary))} {esc(missing_line(summary))} {esc(precision_line(summary))}</p>"
            f"<p>{esc(chance_line(summary))}</p>"
            f"<h3>Per layer and bin</h3>{bins}{figures_html(run_dir, figures)}"
            f"<h3>Worst-routed tokens: the Fragile tokens with the largest gain</h3>{worst_table}"
            f"{_joint_section(run_dir, summary)}{provenance(run)}")


def _joint_section(run_dir: str, summary: dict) -> str:
    """A joint-layers run: the joint gain against the single-layer gains of the same tokens."""
    from routelens.config import ALL_TOKENS, BINS

    joint = summary.get("joint")
    if not joint:
        return ""
    path = os.path.join(run_dir, "joint_tokens.parquet")
    if not os.path.isfile(path):
        raise RouteLensError(f"{run_dir} is a joint-layers run but lacks joint_tokens.parquet; "
                             "re-run its command with the same settings to rebuild it from the run's parts")
    rows = []
    for name in (*BINS, ALL_TOKENS):
        g = joint["bins"][name]
        rows.append([name + (" *" if g["few_clusters"] else ""), g["tokens"],
                     interval(g["interaction"], g["interaction_ci"], 4),
                     interval(g["interaction"], g.get("interaction_ci_adjusted", [None, None]), 4), g["verdict"] or "-"]
                    + [interval(g[key], g[f"{key}_ci"], 4) for key in ("gain", "max_single_gain", "joint_minus_best_single",
                                                                    "joint_minus_sum")])
    layers = "+".join(map(str, joint["layers"]))
    comparison = table(["bin (joint)", "tokens", "interaction per route", "its interval adjusted over the bins",
                        "verdict (from the adjusted interval)", "joint gain", "best single gain",
                        "joint - best single", "joint - sum of bests (biased below 0)"], rows, "cf-joint")
    figure = joint_figure(read_table_file(path), summary)
    return (f"<h3>Joint routes: layers {esc(layers)} at once</h3>"
            f"<p>Each joint route forces one alternative at every listed layer together (route r of each layer, "
            f"the same routes scored one layer at a time above), on the same tokens. "
            f"{esc(joint['definitions']['verdict'])}. * fewer than 10 trajectories.</p>"
            f"{comparison}{figures_html(run_dir, [figure])}")


# ---------------------------------------------------------------------------- counterfactual
def counterfactual_figures(tokens: pd.DataFrame, routes: pd.DataFrame, summary: dict, config: dict) -> list[Figure]:
    layers = [int(layer) for layer in summary["layers"]]
    bins = list(BIN_COLOURS)
    figures = []

    fig, axes = grid(len(layers))
    for ax, layer in zip(axes, layers):
        at = tokens[tokens["layer"] == layer]
        ax.hist(at["p_route_mean"], bins=40, range=(0, 1), color="#555555")
        ax.set_yscale("log")
        for edge in (config["fragile"], config["confident"]):
            ax.axvline(edge, color="#d62728", linestyle="--", linewidth=1)
            ax.text(edge, ax.get_ylim()[1], f" {edge}", color="#d62728", va="top", fontsize=8)
        ax.set(title=f"layer {layer} ({len(at)} tokens)", xlabel="route-averaged p(next token) [probability]",
               ylabel="tokens (log scale)")
    fig.suptitle("Route-averaged probability of the next token, with the bin edges")
    fig.tight_layout()
    figures.append(Figure("cf_route_mean_p", "Distribution of route-averaged p by layer",
                          "Histogram of the probability of the realised next token averaged over the standard and "
                          "alternative routes; dashed lines are the Fragile / Confident edges.", fig))

    fig, axes = grid(len(layers))
    for ax, layer in zip(axes, layers):
        at = tokens[tokens["layer"] == layer]
        for name in bins:
            part = at[at["bin"] == name]
            if len(part) > 3000:
                part = part.sample(3000, random_state=0)
            ax.scatter(part["p_standard"], part["p_best_alt"], s=6, alpha=0.5, color=BIN_COLOURS[name], label=name)
        ax.plot([0, 1], [0, 1], color="black", linewidth=0.8)
        ax.set(title=f"layer {layer}", xlabel="p(next token), standard route [probability]",
               ylabel="p(next token), best alternative [probability]",
               xlim=(0, 1), ylim=(0, 1))
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("Standard route against the best equal-compute alternative (above the diagonal: an alternative wins)")
    fig.tight_layout()
    figures.append(Figure("cf_standard_vs_best", "Standard vs best alternative",
                          "Each point is a token; at most 3,000 per bin are drawn.", fig))

    fig, (ax_gain, ax_win) = subplots(1, 2, figsize=(11, 3.8))
    _bars_by_bin(summary, layers, bins, ((ax_gain, "gain"), (ax_win, "win_rate")))
    for ax, label in ((ax_gain, "gain: p(best alt) - p(standard) [probability]"),
                      (ax_win, "win rate [share of alternatives]")):
        ax.set_xticks(range(len(bins)), bins)
        ax.set(xlabel="bin", ylabel=label)
        ax.legend(fontsize=8)
    level, unit = f"{summary.get('confidence', 0.95):.0%}", summary.get("cluster_unit", "trajectories")
    ax_gain.set_title(f"Mean gain by bin ({level} CI)")
    ax_win.set_title(f"Win rate by bin ({level} CI)")
    fig.suptitle(f"What better routes were there? (intervals: bootstrap over {unit})")
    fig.tight_layout()
    figures.append(Figure("cf_gain_winrate", "Gain and win rate by bin", f"Bars are means; error bars {level} "
                          f"percentile bootstrap intervals resampled over {unit}.", fig))
    if summary["layers"][str(layers[0])]["All"].get("standard_minus_uniform") is not None:   # runs without the null
        figures += _null_figures(summary, layers, bins)

    fig, ax = subplots(figsize=(6.5, 3.8))
    _bars_by_bin(summary, layers, bins, ((ax, "alignment"),))
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(bins)), bins)
    ax.set(title=f"Router-utility alignment by bin (Fisher-z mean Spearman, {level} CI)", xlabel="bin",
           ylabel="alignment [Spearman rho]")
    ax.legend(fontsize=8)
    fig.tight_layout()
    figures.append(Figure("cf_alignment", "Alignment by bin", "Spearman correlation between the routes' router "
                          "score and their log-probability, averaged through Fisher's z.", fig))

    examples = worst_tokens(tokens, 4)
    if len(examples):
        fig, axes = grid(len(examples), columns=4)
        for ax, (_, token) in zip(axes, examples.iterrows()):
            at = routes[(routes["trajectory_id"] == token["trajectory_id"]) & (routes["position"] == token["position"])
                        & (routes["layer"] == token["layer"])]
            alternatives = at[at["route"] > 0]
            ax.scatter(alternatives["router_score"], alternatives["logprob"], s=14, color="#555555", label="alternatives")
            standard = at[at["route"] == 0]
            ax.scatter(standard["router_score"], standard["logprob"], s=60, marker="*", color="#d62728",
                       label="standard route")
            ax.set(title=f"{token['trajectory_id']} pos {token['position']} (layer {token['layer']})",
                   xlabel="router score [sum of selection scores]", ylabel="log p(next token) [nats]")
            ax.legend(fontsize=7)
        fig.suptitle("Router score against route utility for the Fragile tokens with the largest gain")
        fig.tight_layout()
        figures.append(Figure("cf_router_score_examples", "Router score vs route log-probability",
                              "Each point is one route of the token; the star is the router's own route.", fig))
    return figures


def _bars_by_bin(summary: dict, layers: list[int], bins: list[str], panels) -> None:
    """On each (axes, summary key) panel: one bar per bin and layer, error bars its interval."""
    width = 0.8 / max(len(layers), 1)
    for i, layer in enumerate(layers):
        groups = summary["layers"][str(layer)]
        x = np.arange(len(bins)) + (i - (len(layers) - 1) / 2) * width
        for ax, key in panels:
            values = [groups[b][key] for b in bins]
            ax.bar(x, [np.nan if v is None else v for v in values], width, label=f"layer {layer}",
                   yerr=interval_errors(values, [groups[b][f"{key}_ci"] for b in bins]), capsize=3)


def _null_figures(summary: dict, layers: list[int], bins: list[str]) -> list[Figure]:
    """The router against chance: gain minus its null and the standard route's percentile by
    bin; and the gain as a function of the number of alternatives S."""
    fig, (ax_null, ax_pct) = subplots(1, 2, figsize=(11, 3.8))
    _bars_by_bin(summary, layers, bins, ((ax_null, "standard_minus_uniform"), (ax_pct, "best_minus_uniform_best")))
    ax_null.axhline(0, color="black", linewidth=0.8)
    ax_pct.axhline(0, color="black", linewidth=0.8)
    for ax, label, title in ((ax_null, "p standard - E[p uniform route] [probability]",
                              "Standard route against a uniform route (above 0: better than chance)"),
                             (ax_pct, "best of m sampled - best of m uniform [probability]",
                              "The router's sampler against blind search")):
        ax.set_xticks(range(len(bins)), bins)
        ax.set(xlabel="bin", ylabel=label, title=title)
        ax.legend(fontsize=8)
    fig.suptitle(f"The router against uniformly drawn equal-compute routes (intervals: bootstrap over "
                 f"{summary.get('cluster_unit', 'trajectories')})")
    fig.tight_layout()
    figures = [Figure("cf_null", "The router against chance", "Left: p of the standard route minus the mean p of "
                      "uniform null routes (k of the same candidates drawn uniformly, weighted alike). Right: the "
                      "expected best of m sampled alternatives minus the expected best of m uniform routes, "
                      "m = min(S, N).", fig)]

    fig, axes = subplots(1, len(bins), figsize=(4.2 * len(bins), 3.6), squeeze=False)
    for ax, name in zip(axes[0], bins):
        for layer in layers:
            curve = summary["layers"][str(layer)][name]["gain_by_routes"]
            if curve:
                ax.plot([int(m) for m in curve], list(curve.values()), marker="o", label=f"layer {layer}")
        ax.set_xscale("log", base=2)
        ax.set(title=f"{name}", xlabel="alternatives S [routes, log2]", ylabel="expected gain [probability]")
        if ax.get_legend_handles_labels()[0]:   # a bin without tokens has no curve
            ax.legend(fontsize=8)
    fig.suptitle("Gain grows with the number of alternatives scored (exact subsampling of the same rows)")
    fig.tight_layout()
    figures.append(Figure("cf_gain_by_routes", "Gain against S", "Mean over tokens of E[p(best of m alternatives)] "
                          "- p(standard), m drawn without replacement from the S scored (order statistics).", fig))
    return figures


def joint_figure(joint_tokens: pd.DataFrame, summary: dict) -> Figure:
    """Per token: the mean per-route interaction of the listed layers (left; 0 where their
    changes to the same route add up) and the joint routes' gain against the best of the
    same token's single-layer gains (right), coloured by bin."""
    layers = "+".join(map(str, summary["joint"]["layers"]))
    fig, (ax_interaction, ax_best) = subplots(1, 2, figsize=(11, 4.2))
    values = joint_tokens["interaction"].to_numpy()
    edges = np.linspace(float(values.min()), float(values.max()), 41) if values.size and np.ptp(values) > 0 else 40
    for name, colour_of_bin in BIN_COLOURS.items():
        at = joint_tokens[joint_tokens["bin"] == name]
        ax_interaction.hist(at["interaction"], bins=edges, alpha=0.6, color=colour_of_bin, label=f"{name} ({len(at)})")
        ax_best.scatter(at["max_single_gain"], at["gain"], s=8, alpha=0.6, color=colour_of_bin, label=f"{name} ({len(at)})")
    ax_interaction.axvline(0.0, color="black", linewidth=0.8, linestyle="--")
    ax_interaction.set(xlabel="mean over routes of (p_joint - p_std) - sum of single-layer (p_l - p_std) [probability]",
                       ylabel="tokens", title=f"Interaction of layers {layers} on the same routes")
    both = np.concatenate([joint_tokens["max_single_gain"].to_numpy(), joint_tokens["gain"].to_numpy()])
    low, high = (float(both.min()), float(both.max())) if both.size else (0.0, 1.0)
    ax_best.plot([low, high], [low, high], color="black", linewidth=0.8, linestyle="--")
    ax_best.set(xlabel="best single-layer gain [probability]", ylabel=f"joint gain, layers {layers} [probability]",
                title="Joint gain against the best single-layer gain")
    for ax in (ax_interaction, ax_best):
        ax.legend(fontsize=8)
    fig.suptitle("Routes changed at several layers at once, against the same routes one layer at a time")
    fig.tight_layout()
    return Figure("cf_joint", "Joint against single-layer changes", "Left: per token, the mean over alternative routes "
                  "of the joint change minus the sum of the single-layer changes of the same route (0: additive; "
                  "the verdict reads its interval). Right: below the diagonal the best joint route gains less than "
                  "the best single layer alone. The best joint gain is not compared with the sum of the per-layer "
                  "bests: that difference is below 0 even for additive layers.", fig)


def worst_tokens(tokens: pd.DataFrame, count: int) -> pd.DataFrame:
    """The Fragile tokens with the largest gain (ties: earlier trajectory and position first)."""
    fragile = tokens[tokens["bin"] == "Fragile"]
    return fragile.sort_values(["gain", "trajectory_id", "position"], ascending=[False, True, True]).head(count)
