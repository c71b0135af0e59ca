"""The report's figures (matplotlib), one function per figure, each from a run folder's own
tables. Every figure has a title, and every axis a label with its unit.

Figures are built as `matplotlib.figure.Figure` objects, never through pyplot: no backend
is chosen, no window opens, and importing routelens leaves a notebook's matplotlib as it
was (savefig renders through Agg by itself). Where matplotlib is not loaded yet and no
MPLCONFIGDIR is set, its font cache goes to a temporary folder removed at exit, not into
the user's home (`_import_matplotlib`)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import numpy as np


def _import_matplotlib():
    """matplotlib, with its cache folder (the font list it writes on first use) in a
    temporary folder removed at exit, unless the user chose one (MPLCONFIGDIR) or loaded it
    already. Only the cache moves (XDG_CACHE_HOME): the user's matplotlibrc and styles apply."""
    if "matplotlib" in sys.modules or "MPLCONFIGDIR" in os.environ:
        import matplotlib
        import matplotlib.font_manager  # noqa: F401

        return matplotlib
    import atexit
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="routelens-matplotlib-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    before = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = folder
    try:
        import matplotlib
        import matplotlib.font_manager  # noqa: F401  (builds the font list now, into `folder`)
    finally:   # matplotlib has read it (and caches it): the process's environment is left as it was
        if before is None:
            del os.environ["XDG_CACHE_HOME"]
        else:
            os.environ["XDG_CACHE_HOME"] = before
    return matplotlib


matplotlib = _import_matplotlib()
from matplotlib.figure import Figure as MplFigure  # noqa: E402

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


def grid(count: int, width: float = 4.2, height: float = 3.4, columns: int = 4):
    columns = min(columns, count)
    rows = int(np.ceil(count / columns))
    fig, axes = subplots(rows, columns, figsize=(width * columns, height * rows), squeeze=False)
    for ax in axes.ravel()[count:]:
        ax.set_visible(False)
    return fig, list(axes.ravel()[:count])


def interval_errors(values, intervals) -> np.ndarray:
    """matplotlib yerr [2, n] from means and [low, high] pairs (missing ends -> 0)."""
    low = [v - i[0] if v is not None and i[0] is not None else 0 for v, i in zip(values, intervals)]
    high = [i[1] - v if v is not None and i[1] is not None else 0 for v, i in zip(values, intervals)]
    return np.array([low, high], dtype=float)
