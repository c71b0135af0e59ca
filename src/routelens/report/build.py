"""`routelens report`: run folders -> figures (PNG and SVG in RUN_DIR/figures/) and one
self-contained HTML page. Everything shown is read from the run folders' own Parquet
tables, summary.json and run.json; nothing is recomputed but the figures."""

from __future__ import annotations

import os

import pandas as pd

from routelens.errors import RouteLensError
from routelens.report import figures as figs
from routelens.report.page import document, esc, figure_html, fmt, interval, key_values, render_png, table
from routelens.results.run_folder import read_json, read_run_json, write_text_atomic
from routelens.summary_table import step_check_line

KINDS = ("counterfactual", "rollout", "isolation", "semantic-routing", "graft-evaluation", "passk", "router-update")
# what each kind's section reads: all checked before any work
NEEDS = {"counterfactual": ("tokens.parquet", "routes.parquet", "summary.json"),
         "isolation": ("cells.parquet", "calibration.parquet", "summary.json"),
         "passk": ("summary.json",),
         "router-update": ("summary.json", "training_log.jsonl"),
         "rollout": ("rollouts.parquet", "summary.json"),
         "graft-evaluation": ("items.parquet", "summary.json"),
         "semantic-routing": ("scores.parquet", "classification.parquet", "summary.json")}
CONTEXT_BEFORE, CONTEXT_AFTER, WORST_TOKENS = 40, 10, 20


def _run(run_dir: str) -> dict:
    path = os.path.join(run_dir, "run.json")
    if not os.path.exists(path):
        raise RouteLensError(f"{run_dir} is not a run folder (no run.json)")
    run = read_run_json(run_dir)
    if run.get("kind") not in KINDS:
        raise RouteLensError(f"{run_dir} holds a {run.get('kind')!r} run; reports are made of {', '.join(KINDS)} runs")
    if run.get("status") != "complete":
        raise RouteLensError(f"{run_dir} holds an unfinished {run['kind']} run; re-run its command to complete it first")
    missing = [name for name in NEEDS[run["kind"]] if not os.path.isfile(os.path.join(run_dir, name))]
    if missing:
        raise RouteLensError(f"{run_dir} is a complete {run['kind']} run but lacks {', '.join(missing)}; "
                             "re-run its command with the same settings to rebuild it from the run's parts")
    return run


def _p_at_floor(p_value: float, n: int) -> str:
    """The p-value, marked where it sits at the exact signed-rank test's smallest value for n."""
    floor = 2 * 0.5 ** int(n)
    return f"{p_value:.2e}" + (" (floor)" if n <= 50 and abs(p_value - floor) <= floor * 1e-6 else "")


def _figures_html(run_dir: str, figures: list) -> str:
    folder = os.path.join(run_dir, "figures")
    os.makedirs(folder, exist_ok=True)
    parts = []
    for figure in figures:
        png = render_png(figure)
        with open(os.path.join(folder, figure.name + ".png"), "wb") as handle:
            handle.write(png)
        figure.figure.savefig(os.path.join(folder, figure.name + ".svg"), format="svg")
        parts.append(figure_html(figure, png))
    return "\n".join(parts)


def _provenance(run: dict) -> str:
    return ("<details><summary>Config and provenance (run.json)</summary>" + key_values(run["config"])
            + key_values({k: v for k, v in run.items() if k not in ("config",)}) + "</details>")


# ---------------------------------------------------------------------------- token text
def _tokenizer(spec: str):
    from routelens.models.loading import load_tokenizer

    try:
        return load_tokenizer(spec, local_files_only=True)
    except Exception:  # no usable local tokenizer: the table shows token ids instead
        return None


def token_contexts(config: dict, wanted: pd.DataFrame) -> dict[tuple[str, int], tuple[str, str, str]]:
    """(text before and including position t, the next token, a little after) per wanted token,
    decoded with the model's tokenizer when it is available locally, else token ids."""
    from routelens.data.trajectories import load_trajectories

    tokenizer = _tokenizer(config.get("model", ""))
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


# ---------------------------------------------------------------------------- sections
def counterfactual_section(run_dir: str, run: dict) -> str:
    from routelens.config import ALL_TOKENS, BINS

    tokens = pd.read_parquet(os.path.join(run_dir, "tokens.parquet"))
    routes = pd.read_parquet(os.path.join(run_dir, "routes.parquet"))
    summary = read_json(os.path.join(run_dir, "summary.json"))
    rows, attributes = [], []
    for layer, groups in summary["layers"].items():
        for name in (*BINS, ALL_TOKENS):
            g = groups[name]
            rows.append([layer, name, g["tokens"], g["trajectories"], fmt(g["p_standard"]), fmt(g["p_best_alt"]),
                         interval(g["gain"], g["gain_ci"]), interval(g["win_rate"], g["win_rate_ci"]),
                         interval(g.get("tie_rate"), g.get("tie_rate_ci", [None, None])),
                         interval(g.get("loss_rate"), g.get("loss_rate_ci", [None, None])),   # absent in older runs
                         _p_value(g.get("win_loss_sign_test")),
                         interval(g["alignment"], g["alignment_ci"])])
            attributes.append(f' data-layer="{esc(layer)}" data-bin="{esc(name)}"')
    bins = table(["layer", "bin", "tokens", "trajectories", "p standard", "p best alt", "gain [95% CI]",
                  "win rate [95% CI]", "tie rate [95% CI]", "loss rate [95% CI]", "sign test p (alternatives ahead "
                  "vs behind, over trajectories)", "alignment [95% CI]"], rows, "cf-bins",
                 cell_attributes=lambda r, c: attributes[r] + ' class="count"' if c == 2 else "")
    worst = figs.worst_tokens(tokens, WORST_TOKENS)
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
    figures = figs.counterfactual_figures(tokens, routes, summary, run["config"])
    num_routes = run["config"].get("routes", run["config"].get("num_routes"))   # num_routes: runs made before 0.2
    return (f"<h2>Counterfactual routing: {esc(run_dir)}</h2>"
            f"<p>{len(tokens)} scored tokens in {tokens['trajectory_id'].nunique()} trajectories, layers "
            f"{esc(run['config']['resolved_layers'])}, {esc(num_routes)} alternative routes per token. "
            f"Intervals: {esc(summary['interval'])}. Bins: "
            f"{esc('; '.join(f'{name}: {rule}' for name, rule in summary['bins'].items()))}. "
            f"{esc(step_check_line(summary) or 'Intermediate steps not checked (a run made before step checks).')}</p>"
            f"<h3>Per layer and bin</h3>{bins}{_figures_html(run_dir, figures)}"
            f"<h3>Worst-routed tokens: the Fragile tokens with the largest gain</h3>{worst_table}"
            f"{_joint_section(run_dir, summary)}{_provenance(run)}")


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
                     interval(g["interaction"], g["interaction_ci"], 4), g["verdict"] or "-"]
                    + [interval(g[key], g[f"{key}_ci"], 4) for key in ("gain", "max_single_gain", "joint_minus_best_single",
                                                                    "joint_minus_sum")])
    layers = "+".join(map(str, joint["layers"]))
    comparison = table(["bin (joint)", "tokens", "interaction per route", "verdict", "joint gain", "best single gain",
                        "joint - best single", "joint - sum of bests (biased below 0)"], rows, "cf-joint")
    figure = figs.joint_figure(pd.read_parquet(path), summary)
    return (f"<h3>Joint routes: layers {esc(layers)} at once</h3>"
            f"<p>Each joint route forces one alternative at every listed layer together (route r of each layer, "
            f"the same routes scored one layer at a time above), on the same tokens. "
            f"{esc(joint['definitions']['verdict'])}. * fewer than 10 trajectories.</p>"
            f"{comparison}{_figures_html(run_dir, [figure])}")


def _p_value(test: dict | None) -> str:
    """An exact test's p in two significant digits (its dict may be absent in older runs)."""
    return "-" if not test or test.get("p_value") is None else f"{test['p_value']:.2g}"


def isolation_section(run_dir: str, run: dict) -> str:
    cells = pd.read_parquet(os.path.join(run_dir, "cells.parquet"))
    calibration = pd.read_parquet(os.path.join(run_dir, "calibration.parquet"))
    summary = read_json(os.path.join(run_dir, "summary.json"))
    domains = list(summary["items_per_domain"])
    rows = []
    for domain in domains:
        c = summary["calibration"][domain]
        rows.append([domain, summary["items_per_domain"][domain], summary["significant_by_domain"][domain],
                     interval(c["router_share"]["fisher_z_mean"], c["router_share"]["ci"]),
                     interval(c["selection_share"]["fisher_z_mean"], c["selection_share"]["ci"])])
    counts = table(["domain", "items", "significant cells", "calibration: router share (Fisher-z mean, 95% CI)",
                    "calibration: top-k share"], rows, "iso-domains")
    dominance = {(d["domain"], d["layer"]): d for d in summary["dominance"]}
    layer_rows = []
    for row in summary["layer_table"]:
        d = dominance[(row["domain"], row["layer"])]
        layer_rows.append([row["domain"], row["layer"], row["best_expert"], interval(row["best_median_delta"], row["best_ci"]),
                           fmt(row["floor_median_delta"]), row["significant_cells"], d["most_activated"],
                           fmt(d["vs_uniform"], 2), d["rank_of_most_activated"], "yes" if d["most_activated_is_best"] else "no"])
    layers = table(["domain", "layer", "best expert", "its median delta [95% CI]", "floor delta", "significant cells",
                    "most activated", "share x E", "its rank", "most activated is best"], layer_rows, "iso-layers")
    top = cells.sort_values(["q_value", "median_delta"], ascending=[True, False]).head(20)
    top_table = table(["domain", "layer", "expert", "n", "median delta [95% CI]", "p", "q", "vs floor: median", "q vs floor",
                       "natural share"],
                      [[r["domain"], r["layer"], r["expert"], r["n"], interval(r["median_delta"], [r["ci_low"], r["ci_high"]]),
                        _p_at_floor(r["p_value"], r["n"]), f"{r['q_value']:.2e}", fmt(r["median_delta_vs_floor"]),
                        f"{r['q_value_vs_floor']:.2e}", fmt(r["natural_share"])] for _, r in top.iterrows()], "iso-cells")
    figures = figs.isolation_figures(cells, calibration, summary)
    return (f"<h2>Expert isolation: {esc(run_dir)}</h2>"
            f"<p>{summary['significant_cells']} of {summary['cells']} (domain, layer, expert) cells significant at FDR "
            f"{summary['alpha']} (Benjamini-Hochberg step-up); {summary['significant_better_than_natural']} better than "
            f"natural routing; {summary['significant_vs_floor']} differ from the random floor "
            f"({summary.get('significant_better_than_floor', '?')} better). Score: {esc(summary['score'])}.</p>"
            f"{counts}<h3>Layer table and dominance</h3>{layers}{_figures_html(run_dir, figures)}"
            f"<h3>The 20 cells with the smallest q-values</h3>"
            f"<p>A p marked <em>(floor)</em> is the smallest the exact signed-rank test allows with n items "
            f"(2 / 2<sup>n</sup>): every item moved the same way, and only more items could lower it.</p>"
            f"{top_table}{_provenance(run)}")


def passk_section(run_dir: str, run: dict) -> str:
    summary = read_json(os.path.join(run_dir, "summary.json"))
    arms = summary["arms"]
    rows = []
    blocks = [("all", summary["all"])] + sorted((summary.get("by_group") or {}).items())
    for name, block in blocks:
        for k in summary["ks"]:
            key = f"pass@{k}"
            row = [name, k] + [interval(block[a][key]["mean"], block[a][key]["ci"]) for a in arms]
            if len(arms) == 2:
                row.append(interval(block["difference"][key]["mean"], block["difference"][key]["ci"]))
            rows.append(row)
    headers = ["problems", "k"] + arms + ([f"{arms[1]} - {arms[0]} (paired)"] if len(arms) == 2 else [])
    figures = figs.passk_figures(summary)
    return (f"<h2>pass@k: {esc(run_dir)}</h2><p>{esc(summary['estimator'])}; {esc(summary['interval'])}.</p>"
            f"{table(headers, rows, 'passk')}{_figures_html(run_dir, figures)}{_provenance(run)}")


def router_update_section(run_dir: str, run: dict) -> str:
    import json

    summary = read_json(os.path.join(run_dir, "summary.json"))
    with open(os.path.join(run_dir, "training_log.jsonl"), encoding="utf-8") as handle:
        steps = pd.DataFrame([json.loads(line) for line in handle])
    facts = {"layer": summary["layer"], "preference pairs": summary["pairs"], "tokens with pairs": summary["pair_tokens"],
             "pairs by bin": summary["pairs_by_bin"],
             "preferred route ranked higher, before -> after": f"{summary['preference_accuracy_before']:.3f} -> "
                                                                f"{summary['preference_accuracy_after']:.3f}",
             "loss, first -> last step": f"{summary['loss_first_step']:.4f} -> {summary['loss_last_step']:.4f}",
             "parameters and buffers hashed": summary["parameters_checked"],
             "changed (everything else bit-identical)": summary["parameters_changed"],
             "router delta": summary["router_delta"]}
    changes = summary.get("heldout_route_changes")
    change_table = ""
    if changes:
        change_table = ("<h3>Held-out tokens whose standard route changed</h3>" + table(
            ["bin", "tokens", "route changed", "share"],
            [[b, changes[b]["tokens"], changes[b]["route_changed"], fmt(changes[b]["share"])]
             for b in ("Fragile", "Ambiguous", "Confident", "All")], "update-changes"))
    figures = figs.router_update_figures(steps, summary)
    return (f"<h2>Router-only update: {esc(run_dir)}</h2>{key_values(facts)}{change_table}"
            f"{_figures_html(run_dir, figures)}{_provenance(run)}")


def rollout_section(run_dir: str, run: dict) -> str:
    from routelens.analyses.rollout import per_token

    summary = read_json(os.path.join(run_dir, "summary.json"))
    tokens = per_token(pd.read_parquet(os.path.join(run_dir, "rollouts.parquet")))
    rows = []
    for name, g in summary["bins"].items():
        outcome = g["outcome"]
        rows.append([name + (" *" if g["few_clusters"] else ""), g["tokens"], g["trajectories"],
                     *[interval(g[f"accuracy_{arm}"], g[f"accuracy_{arm}_ci"]) for arm in ("standard", "best_alt", "random_alt")],
                     interval(g["best_alt_minus_standard"], g["best_alt_minus_standard_ci"]),
                     interval(g["random_alt_minus_standard"], g["random_alt_minus_standard_ci"]),
                     f"{outcome['best_alt_better']} / {outcome['best_alt_worse']} / {outcome['tied']}",
                     fmt(outcome["proxy_agreement"], 2)])
    comparison = table(["bin", "tokens", "trajectories", "standard", "best alt", "random alt", "best - standard",
                        "random - standard", "best alt better / worse / tied", "proxy agrees"], rows, "rollout-bins")
    selection = summary["selection"]
    return (f"<h2>Rollouts: {esc(run_dir)}</h2>"
            f"<p>Does the next-token proxy's better route also end in a better answer? {selection['chosen']} tokens of "
            f"{esc(run['config']['counterfactual'])} (--tokens {esc(selection['tokens'])}), each continued "
            f"{summary['samples_per_arm']} time(s) per arm at T={summary['temperature']}, the route forced at that token "
            f"and layer only; answers checked by {esc(summary['checker'])}. Sample s of every arm shares one random "
            f"stream, so arms are paired. Intervals: {esc(summary['interval'])}. <em>Proxy agrees</em>: among tokens "
            f"whose best-alternative and standard accuracies differ, the share where the best alternative wins.</p>"
            f"{comparison}{_figures_html(run_dir, figs.rollout_figures(tokens, summary))}{_provenance(run)}")


def semantic_route_section(run_dir: str, run: dict) -> str:
    summary = read_json(os.path.join(run_dir, "summary.json"))
    arms = ("semantic", "semantic_token", "oracle", "floor")
    rows = []
    for name, block in summary["layer_sets"].items():
        for domain, entry in block.items():
            cells = [("-" if entry.get(arm) is None else interval(entry[arm]["difference"], entry[arm]["ci"])
                      + (" *" if entry[arm]["significant"] else "")) for arm in arms]
            rows.append([name, domain, entry["items"], fmt(entry["natural"]), *cells])
    comparison = table(["layer set", "domain", "items", "natural", *[f"{arm} - natural" for arm in arms]], rows,
                       "semantic-arms")
    classes = table(["layer", "items classified right", "tokens classified right", "by domain"],
                    [[layer, fmt(c["item"], 2), fmt(c["token"], 2),
                      ", ".join(f"{d} {v:.2f}" for d, v in c["by_domain"].items())]
                     for layer, c in summary["classification"].items()], "semantic-classification")
    return (f"<h2>Semantic routing: {esc(run_dir)}</h2>"
            f"<p>{summary['calibration_items']} calibration and {summary['evaluation_items']} evaluation items; "
            f"{esc(summary['kind'])} fingerprints. Arms: "
            f"{esc('; '.join(f'{arm}: {text}' for arm, text in summary['arms'].items()))}. {esc(summary['interval'])}; "
            f"* q &lt;= {summary['alpha']}.</p>{comparison}{_semantic_accuracy(summary)}"
            f"<h3>Fingerprint classification</h3>{classes}"
            f"{_figures_html(run_dir, figs.semantic_route_figures(summary))}{_provenance(run)}")


def _semantic_accuracy(summary: dict) -> str:
    if not summary.get("accuracy"):
        return ""
    arms = ("semantic", "semantic_token", "oracle", "floor")
    rows = []
    for name, block in summary["accuracy"].items():
        for domain, entry in block.items():
            rows.append([name, domain, entry["items"], fmt(entry["natural"], 2)]
                        + [("-" if arm not in entry else f"{entry[arm]['accuracy']:.2f}: "
                            f"{interval(entry[arm]['difference'], entry[arm]['ci'], 2)}, p {entry[arm]['p_value']:.2g}")
                           for arm in arms])
    return (f"<h3>Accuracy of generated answers</h3><p>{esc(summary['accuracy_definition'])}.</p>"
            + table(["layer set", "domain", "items", "natural", *[f"{arm}: accuracy, minus natural" for arm in arms]],
                    rows, "semantic-accuracy"))


def graft_evaluation_section(run_dir: str, run: dict) -> str:
    summary = read_json(os.path.join(run_dir, "summary.json"))

    def cell(test: dict, digits: int = 3) -> str:
        return (f"{test['before']:.{digits}f} -> {test['after']:.{digits}f}: "
                f"{interval(test['difference'], test['ci'], digits)}, q {test['q_value']:.2g}")

    rows = []
    for domain, block in summary["domains"].items():
        for pair, tests in block["pairs"].items():
            rows.append([domain, block["natural"]["items"], cell(block["natural"]), pair, cell(tests["selection"], 2),
                         cell(tests["forced"])])
    comparison = table(["domain", "items", "natural score: recipient -> grafted", "slot (L:e=L2:e2)",
                        "selection share: before -> after", "slot forced alone: original -> grafted"], rows, "graft")
    return (f"<h2>Graft evaluation: {esc(run_dir)}</h2>"
            f"<p>{esc(run['config']['model'])} with donor experts grafted ({esc(', '.join(summary['pairs']))}), "
            f"paired per item: after - before with {esc(summary['interval'])}; scores are {esc(summary['score'])}.</p>"
            f"{comparison}{_provenance(run)}")


SECTIONS = {"counterfactual": counterfactual_section, "rollout": rollout_section, "isolation": isolation_section,
            "semantic-routing": semantic_route_section, "graft-evaluation": graft_evaluation_section,
            "passk": passk_section, "router-update": router_update_section}


def build_report(run_dirs: list[str], out: str | None = None) -> str:
    """Write the report of one or several run folders; returns the HTML file's path."""
    runs = [(run_dir, _run(run_dir)) for run_dir in run_dirs]   # every folder checked before any work
    if out is None:
        out = os.path.join(run_dirs[0], "report.html") if len(run_dirs) == 1 else "routelens-report.html"
    body = "\n".join(SECTIONS[run["kind"]](run_dir, run) for run_dir, run in runs)
    kinds = ", ".join(dict.fromkeys(run["kind"] for _, run in runs))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    write_text_atomic(out, document(f"routelens report: {kinds}", body))
    return out
