"""The report's figures (matplotlib), one function per figure, each from a run folder's own
tables. Every figure has a title, and every axis a label with its unit.

Figures are built as `matplotlib.figure.Figure` objects, never through pyplot: no backend
is chosen, no window opens, and importing routelens leaves a notebook's matplotlib as it
was (savefig renders through Agg by itself)."""

from __future__ import annotations

from dataclasses import dataclass

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure as MplFigure

BIN_COLOURS = {"Confident": "#1b9e77", "Ambiguous": "#d95f02", "Fragile": "#7570b3"}
ARM_COLOURS = ["#1f77b4", "#d62728", "#2ca02c"]


def colour(i: int):
    """The i-th colour of matplotlib's tab10 cycle (domains, groups)."""
    return matplotlib.colormaps["tab10"](i % 10)


def subplots(*grid, squeeze=True, **figure_options):
    """A standalone figure and its axes, as pyplot's subplots gives them, without pyplot."""
    fig = MplFigure(**figure_options)
    return fig, fig.subplots(*grid, squeeze=squeeze)


@dataclass
class Figure:
    name: str          # file stem under figures/
    title: str
    caption: str
    figure: MplFigure


def _grid(count: int, width: float = 4.2, height: float = 3.4, columns: int = 4):
    columns = min(columns, count)
    rows = int(np.ceil(count / columns))
    fig, axes = subplots(rows, columns, figsize=(width * columns, height * rows), squeeze=False)
    for ax in axes.ravel()[count:]:
        ax.set_visible(False)
    return fig, list(axes.ravel()[:count])


def _interval_errors(values, intervals) -> np.ndarray:
    """matplotlib yerr [2, n] from means and [low, high] pairs (missing ends -> 0)."""
    low = [v - i[0] if v is not None and i[0] is not None else 0 for v, i in zip(values, intervals)]
    high = [i[1] - v if v is not None and i[1] is not None else 0 for v, i in zip(values, intervals)]
    return np.array([low, high], dtype=float)


# ---------------------------------------------------------------------------- counterfactual
def counterfactual_figures(tokens: pd.DataFrame, routes: pd.DataFrame, summary: dict, config: dict) -> list[Figure]:
    layers = [int(layer) for layer in summary["layers"]]
    bins = list(BIN_COLOURS)
    figures = []

    fig, axes = _grid(len(layers))
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

    fig, axes = _grid(len(layers))
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
        ax.set(xlabel="bin (route-averaged p)", ylabel=label)
        ax.legend(fontsize=8)
    ax_gain.set_title("Mean gain by bin (95% CI)")
    ax_win.set_title("Win rate by bin (95% CI)")
    fig.suptitle("What better routes were there? (intervals: bootstrap over trajectories)")
    fig.tight_layout()
    figures.append(Figure("cf_gain_winrate", "Gain and win rate by bin", "Bars are means; error bars 95% "
                          "percentile bootstrap intervals resampled over trajectories.", fig))
    if "null_gain" in summary["layers"][str(layers[0])]["All"]:   # runs made before the null have none
        figures += _null_figures(summary, layers, bins)

    fig, ax = subplots(figsize=(6.5, 3.8))
    _bars_by_bin(summary, layers, bins, ((ax, "alignment"),))
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(bins)), bins)
    ax.set(title="Router-utility alignment by bin (Fisher-z mean Spearman, 95% CI)", xlabel="bin (route-averaged p)",
           ylabel="alignment [Spearman rho]")
    ax.legend(fontsize=8)
    fig.tight_layout()
    figures.append(Figure("cf_alignment", "Alignment by bin", "Spearman correlation between the routes' router "
                          "score and their log-probability, averaged through Fisher's z.", fig))

    examples = worst_tokens(tokens, 4)
    if len(examples):
        fig, axes = _grid(len(examples), columns=4)
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
    """On each (axes, summary key) panel: one bar per bin and layer, error bars its 95% interval."""
    width = 0.8 / max(len(layers), 1)
    for i, layer in enumerate(layers):
        groups = summary["layers"][str(layer)]
        x = np.arange(len(bins)) + (i - (len(layers) - 1) / 2) * width
        for ax, key in panels:
            values = [groups[b][key] for b in bins]
            ax.bar(x, [np.nan if v is None else v for v in values], width, label=f"layer {layer}",
                   yerr=_interval_errors(values, [groups[b][f"{key}_ci"] for b in bins]), capsize=3)


def _null_figures(summary: dict, layers: list[int], bins: list[str]) -> list[Figure]:
    """The router against chance: gain minus its null and the standard route's percentile by
    bin; and the gain as a function of the number of alternatives S."""
    fig, (ax_null, ax_pct) = subplots(1, 2, figsize=(11, 3.8))
    _bars_by_bin(summary, layers, bins, ((ax_null, "gain_minus_null"), (ax_pct, "standard_percentile")))
    ax_null.axhline(0, color="black", linewidth=0.8)
    ax_pct.axhline(0.5, color="black", linewidth=0.8, linestyle="--")
    for ax, label, title in ((ax_null, "gain - null gain [probability]", "Gain minus the null (below 0: better than chance)"),
                             (ax_pct, "standard route's percentile [share]", "Standard route's percentile (0.5 = chance)")):
        ax.set_xticks(range(len(bins)), bins)
        ax.set(xlabel="bin (route-averaged p)", ylabel=label, title=title)
        ax.legend(fontsize=8)
    fig.suptitle("The router against a random equal-compute route (intervals: bootstrap over trajectories)")
    fig.tight_layout()
    figures = [Figure("cf_null", "Gain against the null", "The null gain is the gain a route drawn from the "
                      "same sampler would show; the percentile is the share of alternatives below the standard "
                      "route, ties half.", fig)]

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


def rollout_figures(per_token: pd.DataFrame, summary: dict) -> list[Figure]:
    """Accuracy of each arm by bin, and per token the outcome difference against the
    proxy's gain (does a larger next-token gain mean a better final answer?)."""
    arms = ("standard", "best_alt", "random_alt")
    bins = list(summary["bins"])
    fig, (ax_bars, ax_points) = subplots(1, 2, figsize=(11, 4.0))
    width = 0.8 / len(arms)
    for i, arm in enumerate(arms):
        values = [summary["bins"][b][f"accuracy_{arm}"] for b in bins]
        ax_bars.bar(np.arange(len(bins)) + (i - 1) * width, [np.nan if v is None else v for v in values], width,
                    color=ARM_COLOURS[i], label=arm.replace("_", " "), capsize=3,
                    yerr=_interval_errors(values, [summary["bins"][b][f"accuracy_{arm}_ci"] for b in bins]))
    ax_bars.set_xticks(range(len(bins)), bins)
    ax_bars.set(xlabel="bin of the token (route-averaged p)", ylabel="final answers correct [share]",
                title="Accuracy of the continuations by arm", ylim=(0, 1.05))
    ax_bars.legend(fontsize=8)
    difference = per_token["accuracy_best_alt"] - per_token["accuracy_standard"]
    for name, colour_of_bin in BIN_COLOURS.items():
        at = per_token["bin"] == name
        ax_points.scatter(per_token["gain"][at], difference[at], s=12, alpha=0.7, color=colour_of_bin, label=name)
    ax_points.axhline(0, color="black", linewidth=0.8)
    ax_points.set(xlabel="proxy gain: p(best alt) - p(standard) of the next token [probability]",
                  ylabel="accuracy best alt - standard [share]", title="Outcome against the proxy, per token")
    ax_points.legend(fontsize=8)
    fig.tight_layout()
    return [Figure("rollout_outcomes", "Rollout outcomes", "Error bars: 95% bootstrap over trajectories. Right: one "
                   "point per token; above 0 the best alternative's continuations end right more often than the "
                   "standard route's.", fig)]


def semantic_route_figures(summary: dict) -> list[Figure]:
    """Each arm's paired difference against natural routing per layer set (all evaluation
    items), and the fingerprints' domain classification accuracy per layer."""
    arms = ("semantic", "semantic_token", "oracle", "floor")
    sets = list(summary["layer_sets"])
    fig, (ax_arms, ax_class) = subplots(1, 2, figsize=(12, 4.0))
    width = 0.8 / len(arms)
    for i, arm in enumerate(arms):
        tests = [summary["layer_sets"][name]["All"].get(arm) for name in sets]
        values = [None if t is None else t["difference"] for t in tests]
        ax_arms.bar(np.arange(len(sets)) + (i - (len(arms) - 1) / 2) * width, [np.nan if v is None else v for v in values],
                    width, label=arm.replace("_", " "), color=colour(i), capsize=3,
                    yerr=_interval_errors(values, [(None, None) if t is None else t["ci"] for t in tests]))
    ax_arms.axhline(0, color="black", linewidth=0.8)
    ax_arms.set_xticks(range(len(sets)), sets)
    ax_arms.set(xlabel="layer set (forced together)", ylabel=f"arm - natural [{summary['score']}]",
                title="Routing by fingerprint against natural routing")
    ax_arms.legend(fontsize=8)
    layers = list(summary["classification"])
    chance = 1 / len(summary["classification"][layers[0]]["by_domain"])
    ax_class.plot(layers, [summary["classification"][layer]["item"] for layer in layers], marker="o", label="item (prompt)")
    ax_class.plot(layers, [summary["classification"][layer]["token"] for layer in layers], marker="s", label="token")
    ax_class.axhline(chance, color="black", linewidth=0.8, linestyle="--", label="chance")
    ax_class.set(xlabel="layer", ylabel="domain classified right [share]", ylim=(0, 1.05),
                 title="Fingerprint classification")
    ax_class.legend(fontsize=8)
    fig.tight_layout()
    return [Figure("semantic_routing", "Semantic routing", "Left: mean paired difference of the target log-prob "
                   "against natural routing, 95% bootstrap interval over items. Right: share of evaluation items "
                   "(and tokens) whose nearest fingerprint is their own domain.", fig)]


def worst_tokens(tokens: pd.DataFrame, count: int) -> pd.DataFrame:
    """The Fragile tokens with the largest gain (ties: earlier trajectory and position first)."""
    fragile = tokens[tokens["bin"] == "Fragile"]
    return fragile.sort_values(["gain", "trajectory_id", "position"], ascending=[False, True, True]).head(count)


# ---------------------------------------------------------------------------- isolation
def isolation_figures(cells: pd.DataFrame, calibration: pd.DataFrame, summary: dict) -> list[Figure]:
    domains = list(summary["items_per_domain"])
    layers = summary["layers"]
    experts = summary["num_experts"]
    figures = []

    fig, axes = _grid(len(domains), width=min(0.32 * experts + 2.5, 9), height=0.45 * len(layers) + 2.2, columns=2)
    limit = float(np.nanmax(np.abs(cells["median_delta"]))) or 1.0
    for ax, domain in zip(axes, domains):
        at = cells[cells["domain"] == domain]
        grid = at.pivot(index="layer", columns="expert", values="median_delta").reindex(index=layers, columns=range(experts))
        image = ax.imshow(grid.to_numpy(), cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
        significant = at[at["significant"]]
        ax.scatter(significant["expert"], [layers.index(layer) for layer in significant["layer"]], marker=".", s=12,
                   color="black", label="significant (BH)")
        ax.set_yticks(range(len(layers)), layers)
        ax.set(title=f"{domain} ({summary['items_per_domain'][domain]} items)", xlabel="forced expert [expert id]",
               ylabel="layer [decoder-layer index]")
        fig.colorbar(image, ax=ax, label="median delta vs natural [nats]")
    fig.suptitle(f"Forcing one expert per layer: median change of the {summary['score']} "
                 f"(dot: significant at FDR {summary['alpha']})")
    fig.tight_layout()
    figures.append(Figure("iso_delta_heatmap", "Delta per (layer, expert)", "Blue: forcing the expert helps; red: it "
                          "hurts. Dots mark cells that survive the Benjamini-Hochberg step-up procedure.", fig))

    fig, axes = _grid(len(layers))
    for ax, layer in zip(axes, layers):
        for i, domain in enumerate(domains):
            at = cells[(cells["domain"] == domain) & (cells["layer"] == layer)]
            row = calibration[(calibration["domain"] == domain) & (calibration["share"] == "router_share")
                              & (calibration["layer"] == layer)]
            rho = row["spearman"].iloc[0] if len(row) else np.nan
            ax.scatter(at["natural_share"], at["mean_delta"], s=14, color=colour(i), label=f"{domain} (rho {rho:+.2f})")
        ax.set(title=f"layer {layer}", xlabel="natural share [mean router probability]", ylabel="mean delta [nats]")
        ax.legend(fontsize=7)
    fig.suptitle("Calibration: does the router prefer the experts that hurt least when forced alone?")
    fig.tight_layout()
    figures.append(Figure("iso_calibration", "Calibration per layer", "One point per expert; rho is Spearman's "
                          "correlation between share and mean delta in that domain and layer.", fig))

    dominance = pd.DataFrame(summary["dominance"])
    fig, ax = subplots(figsize=(7, 3.8))
    width = 0.8 / max(len(domains), 1)
    for i, domain in enumerate(domains):
        at = dominance[dominance["domain"] == domain].set_index("layer").reindex(layers)
        ax.bar(np.arange(len(layers)) + (i - (len(domains) - 1) / 2) * width, at["vs_uniform"], width, label=domain,
               color=colour(i))
    ax.axhline(1, color="black", linestyle="--", linewidth=1, label="uniform (1/E)")
    ax.set_xticks(range(len(layers)), layers)
    ax.set(title="Dominance: the most-activated expert's top-k share against uniform", xlabel="layer [decoder-layer index]",
           ylabel="share x E [ratio to uniform]")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    figures.append(Figure("iso_dominance", "Dominance", "Top-k selection share of each layer's most-activated "
                          "expert, divided by the uniform share 1/E.", fig))

    table = pd.DataFrame(summary["layer_table"])
    fig, ax = subplots(figsize=(7, 3.8))
    for i, domain in enumerate(domains):
        at = table[table["domain"] == domain].set_index("layer").reindex(layers)
        values = at["best_median_delta"].tolist()
        ax.errorbar(layers, values, yerr=_interval_errors(values, at["best_ci"].tolist()), marker="o", capsize=3,
                    color=colour(i), label=f"{domain}: best expert")
        ax.plot(layers, at["floor_median_delta"], linestyle=":", marker="x", color=colour(i), label=f"{domain}: random floor")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(layers)
    ax.set(title="Effect by layer: the best single expert and the random-routing floor", xlabel="layer [decoder-layer index]",
           ylabel="median delta vs natural [nats]")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    figures.append(Figure("iso_layers", "Layer table", "Best single expert per layer (95% CI of the median) "
                          "against random equal-compute routes.", fig))
    return figures


# ---------------------------------------------------------------------------- pass@k
def passk_figures(summary: dict) -> list[Figure]:
    arms, ks = summary["arms"], summary["ks"]
    blocks = [("all problems", summary["all"])] + sorted((summary.get("by_group") or {}).items())
    fig, axes = _grid(len(blocks), width=4.0, height=3.4)
    for ax, (name, block) in zip(axes, blocks):
        for i, arm in enumerate(arms):
            means = [block[arm][f"pass@{k}"]["mean"] for k in ks]
            low = [block[arm][f"pass@{k}"]["ci"][0] for k in ks]
            high = [block[arm][f"pass@{k}"]["ci"][1] for k in ks]
            ax.plot(ks, means, marker="o", color=ARM_COLOURS[i], label=arm)
            ax.fill_between(ks, [np.nan if v is None else v for v in low], [np.nan if v is None else v for v in high],
                            color=ARM_COLOURS[i], alpha=0.2)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set(title=name, xlabel="k [samples]", ylabel="pass@k [share of problems]", ylim=(0, 1.02))
        ax.legend(fontsize=8)
    fig.suptitle(f"pass@k with 95% bootstrap intervals ({summary['samples_per_problem']} samples per problem, "
                 f"T={summary['temperature']})")
    fig.tight_layout()
    figures = [Figure("passk_curves", "pass@k curves", "Unbiased pass@k; bands are 95% percentile bootstrap "
                      "intervals over problems.", fig)]
    if len(arms) == 2:
        fig, ax = subplots(figsize=(6.5, 3.8))
        for i, (name, block) in enumerate(blocks):
            means = [block["difference"][f"pass@{k}"]["mean"] for k in ks]
            intervals = [block["difference"][f"pass@{k}"]["ci"] for k in ks]
            ax.errorbar(np.array(ks) * (1 + 0.04 * i), means, yerr=_interval_errors(means, intervals), marker="o",
                        capsize=3, label=name)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set(title=f"{arms[1]} - {arms[0]}: paired difference of pass@k (95% CI)", xlabel="k [samples]",
               ylabel="difference of pass@k [share of problems]")
        ax.legend(fontsize=7)
        fig.tight_layout()
        figures.append(Figure("passk_difference", "Paired difference", "Problems resampled together for both "
                              "arms (the same problems and sampling seeds).", fig))
    return figures


# ---------------------------------------------------------------------------- router update
def router_update_figures(steps: pd.DataFrame, summary: dict) -> list[Figure]:
    fig, (ax_loss, ax_margin) = subplots(1, 2, figsize=(11, 3.6))
    ax_loss.plot(steps["step"], steps["loss"], color=ARM_COLOURS[0])
    ax_loss.set(title="DPO loss per step", xlabel="optimizer step [count]", ylabel="loss [nats]")
    ax_margin.plot(steps["step"], steps["reward_margin"], color=ARM_COLOURS[1])
    ax_margin.set(title="Implicit reward margin per step", xlabel="optimizer step [count]",
                  ylabel="margin [nats of log-probability ratio]")
    fig.suptitle(f"Router-only update of layer {summary['layer']}: {summary['pairs']} preference pairs")
    fig.tight_layout()
    return [Figure("update_training", "Training curve", "Minibatch loss and mean margin (log pi - log pi_ref of the "
                   "preferred minus the rejected route).", fig)]
