"""The report's figures drawn by forked workers: the same PNG and SVG as drawn here, in
order; a figure that fails to draw, or a worker killed, fails the report in one line
without waiting; where fork is refused they are drawn here; ROUTELENS_REPORT_WORKERS is
checked."""

import multiprocessing
import os
import signal
import sys

import pytest
from matplotlib.artist import Artist

from routelens.errors import RouteLensError
from routelens.report import rendering
from routelens.report.figures import Figure, subplots


def _figures(count: int) -> list[Figure]:
    figures = []
    for index in range(count):
        fig, ax = subplots(figsize=(2.5, 2))
        ax.plot(range(index + 2), [value * (index + 1) for value in range(index + 2)])
        ax.set_title(f"figure {index}")
        figures.append(Figure(f"f{index}", f"figure {index}", "", fig))
    return figures


def _drawn_with(monkeypatch, figures: list[Figure], workers: str) -> list[tuple[bytes, str]]:
    monkeypatch.setenv("ROUTELENS_REPORT_WORKERS", workers)
    return rendering.render_figures(figures)


@pytest.mark.quick
@pytest.mark.skipif(sys.platform != "linux", reason="workers fork on Linux only")
def test_workers_draw_what_this_process_draws(monkeypatch):
    figures = _figures(5)
    alone = _drawn_with(monkeypatch, figures, "1")
    pooled = _drawn_with(monkeypatch, figures, "3")
    assert rendering.workers(len(figures)) == 3
    assert [png for png, _ in pooled] == [png for png, _ in alone]          # byte for byte, in order
    assert [svg for _, svg in pooled] == [svg for _, svg in alone]          # fixed ids, no date
    assert len({png for png, _ in pooled}) == 5                              # five different figures


@pytest.mark.quick
@pytest.mark.skipif(sys.platform != "linux", reason="workers fork on Linux only")
def test_a_figure_that_fails_fails_here(monkeypatch):
    figures = _figures(3)
    figures[1].figure.axes[0].set_title(r"$\frac{$")   # mathtext that fails when drawn
    monkeypatch.setenv("ROUTELENS_REPORT_WORKERS", "2")
    with pytest.raises(RouteLensError, match="drawing a report figure failed: ValueError"):
        rendering.render_figures(figures)


@pytest.mark.quick
@pytest.mark.parametrize("value", ["0", "two", "-1", "1.5"])
def test_bad_worker_count_is_refused_in_one_line(monkeypatch, value):
    monkeypatch.setenv("ROUTELENS_REPORT_WORKERS", value)
    with pytest.raises(RouteLensError, match="ROUTELENS_REPORT_WORKERS.*whole number"):
        rendering.workers(1)


@pytest.mark.quick
def test_default_workers_are_the_usable_cores(monkeypatch):
    monkeypatch.delenv("ROUTELENS_REPORT_WORKERS", raising=False)
    assert rendering.workers(1) == 1
    if sys.platform == "linux":
        assert rendering.workers(10) == min(len(os.sched_getaffinity(0)), 4)


class _KillOnDraw(Artist):
    """Kills the process that draws it (a worker the OOM killer takes)."""

    def draw(self, renderer):
        os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.quick
@pytest.mark.skipif(sys.platform != "linux", reason="workers fork on Linux only")
def test_a_killed_worker_fails_the_report_without_waiting(monkeypatch):
    figures = _figures(4)
    figures[2].figure.add_artist(_KillOnDraw())
    monkeypatch.setenv("ROUTELENS_REPORT_WORKERS", "2")
    with pytest.raises(RouteLensError, match=r"ended early \(exit code \[-9\]\)"):
        rendering.render_figures(figures)


@pytest.mark.quick
@pytest.mark.skipif(sys.platform != "linux", reason="workers fork on Linux only")
def test_fork_refused_draws_here(monkeypatch):
    figures = _figures(3)
    alone = _drawn_with(monkeypatch, figures, "1")

    def refuse(self):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(multiprocessing.context.ForkProcess, "start", refuse)
    assert _drawn_with(monkeypatch, figures, "3") == alone
