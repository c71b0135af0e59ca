"""Figures drawn to PNG bytes and SVG text, a section's figures in parallel.

Drawing is most of a report's time (a full draw per format, in single-threaded Python).
On Linux the figures of a section are drawn by forked worker processes, which inherit
the figures as they are (nothing is pickled but the drawn bytes); the caller writes the
files, so what a run folder lists is kept in one process. With one figure, on a system
without fork, or with ROUTELENS_REPORT_WORKERS=1 they are drawn here, in turn. The bytes
do not depend on where or when a figure was drawn (the SVG's ids are salted with a fixed
string and it carries no date).
"""

from __future__ import annotations

import io
import multiprocessing
import os
import signal
import sys

from routelens.errors import RouteLensError

__all__ = ["render_png", "render_svg", "render_figures", "workers"]

PNG_DPI = 110
_pending: list = []   # the figures the forked workers draw, by index


def render_png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.figure.savefig(buffer, format="png", dpi=PNG_DPI)
    return buffer.getvalue()


def render_svg(figure) -> str:
    """The same text for the same figure: ids from a fixed salt, no date."""
    import matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": "routelens"}):
        figure.figure.savefig(buffer, format="svg", metadata={"Date": None})
    return buffer.getvalue()


def _drawn(figure) -> tuple[bytes, str]:
    return render_png(figure), render_svg(figure)


def _drawn_at(index: int) -> tuple[bytes, str]:
    return _drawn(_pending[index])


def _worker_signals() -> None:
    # Ctrl-C or a SIGTERM ends a worker quietly; the parent stops the pool and says what happened
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def workers(count: int) -> int:
    """Processes to draw `count` figures with: ROUTELENS_REPORT_WORKERS, else the usable
    cores (at most 4); 1 where there is no fork (macOS and Windows spawn, which would
    import everything again)."""
    chosen = os.environ.get("ROUTELENS_REPORT_WORKERS", "").strip()
    if chosen and not (chosen.isdigit() and int(chosen) >= 1):
        raise RouteLensError(f"ROUTELENS_REPORT_WORKERS={chosen!r}: give a whole number of processes >= 1 "
                             "(1: draw the figures in this process)")
    if sys.platform != "linux" or count < 2:
        return 1
    return min(count, int(chosen) if chosen else min(len(os.sched_getaffinity(0)), 4))


def render_figures(figures: list) -> list[tuple[bytes, str]]:
    """(PNG bytes, SVG text) of each figure, in order."""
    global _pending
    processes = workers(len(figures))
    if processes < 2:
        return [_drawn(figure) for figure in figures]
    _pending = list(figures)
    pool = multiprocessing.get_context("fork").Pool(processes, initializer=_worker_signals)
    try:
        drawn = pool.map(_drawn_at, range(len(figures)), chunksize=1)
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()
        _pending = []
    return drawn
