"""`routelens report`: a report of small real runs (a tiny model saved to a folder) whose
figures and tables agree with the run's Parquet, figures with titles and axis labels, and
the page opened in headless Chromium: no console error, and a trajectory holding
`<script>alert(1)</script>` is shown as text and never runs."""

import json
import os
import re
import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import write_jsonl

from routelens.analyses.counterfactual.report import counterfactual_figures, worst_tokens
from routelens.analyses.isolation.report import isolation_figures
from routelens.analyses.passk.report import passk_figures
from routelens.cli import main
from routelens.results.run_folder import read_json

SCRIPT = "<script>alert(1)</script>"
TRAJECTORIES = [
    {"id": "evil", "prompt": SCRIPT, "completion": "Q:1+1=2#2"},
    {"id": "plain", "prompt": "Q:2+3=", "completion": "A:5#5"},
]
ITEMS = [{"id": f"{d}{i}", "domain": d, "prompt": f"Q:{i}+{i}=", "target": f"{2 * i}#"} for d in ("a", "b") for i in range(5)]
PROBLEMS = [{"id": f"p{i}", "prompt": f"Q:{i}+1=", "answer": str(i + 1)} for i in range(4)]


@pytest.fixture(scope="module")
def runs(saved_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    trajectories = write_jsonl(root / "traj.jsonl", TRAJECTORIES)
    items = write_jsonl(root / "items.jsonl", ITEMS)
    problems = write_jsonl(root / "problems.jsonl", PROBLEMS)
    assert main(["counterfactual", "--model", saved_model, "--trajectories", trajectories, "--layers", "0,-1",
                 "--routes", "6", "--out", str(root / "cf"), "--no-progress"]) == 0
    assert main(["isolate", "--model", saved_model, "--items", items, "--floor-seeds", "2", "--bootstrap-resamples", "100",
                 "--out", str(root / "iso"), "--no-progress"]) == 0
    assert main(["passk", "--model", saved_model, "--problems", problems, "--samples", "4", "--k", "1,2,4",
                 "--max-new-tokens", "6", "--bootstrap-resamples", "100", "--out", str(root / "passk"), "--no-progress"]) == 0
    out = str(root / "report.html")
    assert main(["report", str(root / "cf"), str(root / "iso"), str(root / "passk"), "--out", out]) == 0
    return root, out


def test_report_figures_and_tables_agree_with_the_run(runs):
    root, out = runs
    page = open(out, encoding="utf-8").read()
    # every figure: embedded in the page, and written as PNG and SVG beside the run
    expected = {"cf": ["cf_route_mean_p", "cf_standard_vs_best", "cf_gain_winrate", "cf_null", "cf_gain_by_routes",
                       "cf_alignment", "cf_router_score_examples"],
                "iso": ["iso_delta_heatmap", "iso_verdict_heatmap", "iso_calibration", "iso_dominance", "iso_layers"],
                "passk": ["passk_curves"]}
    for run, names in expected.items():
        for name in names:
            assert f'id="fig-{name}"' in page
            for suffix in (".png", ".svg"):
                path = root / run / "figures" / f"{name}{suffix}"
                assert path.stat().st_size > 1000, path
    assert page.count("data:image/png;base64,") == sum(map(len, expected.values()))

    # the bin counts in the page are those of tokens.parquet
    tokens = pd.read_parquet(root / "cf" / "tokens.parquet")
    cells = re.findall(r'<td data-layer="(\d+)" data-bin="(\w+)" class="count">(\d+)</td>', page)
    assert len(cells) == 2 * 4
    for layer, name, count in cells:
        at = tokens[tokens["layer"] == int(layer)]
        assert int(count) == (len(at) if name == "All" else int((at["bin"] == name).sum()))

    # worst-routed tokens: the Fragile tokens with the largest gain, in order
    worst = re.search(r'<table id="cf-worst">(.*?)</table>', page, re.S).group(1)
    rows = re.findall(r"<tr><td>([^<]*)</td><td>(\d+)</td><td>(\d+)</td>", worst)
    fragile = worst_tokens(tokens, 20)
    assert [(t, int(layer), int(p)) for t, layer, p in rows] == list(zip(fragile["trajectory_id"], fragile["layer"], fragile["position"]))
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script" not in page.lower()

    # isolation and pass@k tables are the summaries'
    iso = read_json(root / "iso" / "summary.json")
    verdict = iso["verdict"]
    assert (f"{verdict['harmful']} of {iso['cells']} cells (domain x layer x expert) harmful, {verdict['helpful']} "
            "helpful against the single-expert floor") in page
    comparisons = re.search(r'<table id="iso-comparisons">(.*?)</table>', page, re.S).group(1)
    for name, counts in iso["comparisons"].items():    # each comparison's row: significant, harmful, helpful
        assert f"<td>{counts['significant']}</td><td>{counts['harmful']}</td><td>{counts['helpful']}</td>" in comparisons, name
    passk = read_json(root / "passk" / "summary.json")
    assert f"{passk['all']['model']['pass@1']['mean']:.3f}" in page
    run = read_json(root / "cf" / "run.json")
    assert run["provenance"]["git"] is None or str(run["provenance"]["git"])[:12] in page


def test_every_figure_has_a_title_and_labelled_axes(runs):
    root, _ = runs
    tokens = pd.read_parquet(root / "cf" / "tokens.parquet")
    routes = pd.read_parquet(root / "cf" / "routes.parquet")
    made = (counterfactual_figures(tokens, routes, read_json(root / "cf" / "summary.json"),
                                        read_json(root / "cf" / "run.json")["config"])
            + isolation_figures(pd.read_parquet(root / "iso" / "cells.parquet"),
                                     pd.read_parquet(root / "iso" / "calibration.parquet"), read_json(root / "iso" / "summary.json"))
            + passk_figures(read_json(root / "passk" / "summary.json")))
    for figure in made:
        axes = [ax for ax in figure.figure.axes if ax.get_visible() and ax.get_label() != "<colorbar>"]
        assert axes, figure.name
        for ax in axes:
            assert ax.get_xlabel() and ax.get_ylabel() and (ax.get_title() or figure.figure._suptitle), figure.name
            assert "[" in ax.get_ylabel() or "(" in ax.get_ylabel(), f"{figure.name}: no unit in {ax.get_ylabel()!r}"


def test_report_refuses_an_unfinished_or_foreign_folder(runs, tmp_path, capsys):
    root, _ = runs
    unfinished = tmp_path / "unfinished"
    shutil.copytree(root / "cf", unfinished)
    run = json.load(open(unfinished / "run.json"))
    run["status"] = "running"
    json.dump(run, open(unfinished / "run.json", "w"))
    assert main(["report", str(unfinished)]) == 2
    assert "holds a running counterfactual run" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert "is not a run folder" in capsys.readouterr().err


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.skipif(_chromium() is None or shutil.which("chromedriver") is None,
                    reason="Chromium / chromedriver not installed (scripts/setup.sh installs Debian's chromium)")
def test_report_loads_in_headless_chromium_without_errors_and_shows_script_as_text(runs, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install -e .[test])")
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    _, out = runs
    options = webdriver.ChromeOptions()
    options.binary_location = _chromium()
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        driver.get("file://" + os.path.abspath(out))
        with pytest.raises(NoAlertPresentException):
            driver.switch_to.alert  # noqa: B018 (reading it raises when no alert is open: alert(1) never ran)
        assert driver.execute_script("return document.scripts.length") == 0
        text = driver.find_element(By.ID, "cf-worst").text
        assert SCRIPT in text                             # shown, as text
        images = driver.find_elements(By.TAG_NAME, "img")
        assert len(images) == 13 and all(driver.execute_script("return arguments[0].naturalWidth", i) > 100 for i in images)
        errors = [entry for entry in driver.get_log("browser") if entry["level"] in ("SEVERE", "ERROR")]
        assert errors == []
    finally:
        driver.quit()


def test_importing_routelens_leaves_matplotlib_as_the_notebook_set_it(cli_env):
    """The report builds standalone figures: no backend switch, no pyplot state, at import or
    while rendering."""
    code = ("import sys, matplotlib; matplotlib.use('svg'); "
            "import routelens, routelens.cli, routelens.report.build, routelens.report.figures as f; "
            "fig, ax = f.subplots(figsize=(2, 2)); ax.plot([0, 1]); fig.savefig(sys.argv[1]); "
            "assert matplotlib.get_backend() == 'svg', matplotlib.get_backend(); "
            "assert 'matplotlib.pyplot' not in sys.modules")
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        png = os.path.join(folder, "f.png")
        result = subprocess.run([sys.executable, "-c", code, png], env=cli_env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"   # rendered through Agg all the same


def test_p_values_at_the_signed_rank_floor_are_marked():
    """The smallest-q table says when p sits at the exact test's smallest value for n items
    (SciPy's exact two-sided Wilcoxon with n same-signed differences)."""
    import scipy.stats as sps

    from routelens.report.build import p_at_floor

    for n in (5, 8, 12):
        smallest = sps.wilcoxon(np.arange(1, n + 1), method="exact").pvalue
        assert p_at_floor(smallest, n).endswith("(floor)")
        mixed = sps.wilcoxon(np.r_[np.arange(1, n), -0.5], method="exact").pvalue
        assert not p_at_floor(mixed, n).endswith("(floor)")
