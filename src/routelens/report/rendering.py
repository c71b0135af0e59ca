"""Figures drawn to PNG bytes and SVG text, a section's figures in parallel.

Drawing is most of a report's time (a full draw per format, in single-threaded Python).
On Linux the figures of a section are drawn by forked worker processes, each given a fixed
share of the figures and its own pipe (no queue or lock shared between processes, so a
worker killed by Ctrl-C, a job's SIGTERM or the OOM killer cannot leave this process
waiting: its pipe closes and the report fails in one line). The workers inherit the
figures as they are; only the drawn bytes come back, and the caller writes the files, so
what a run folder lists is kept in one process. With one figure, on a system without
fork, where fork fails (no memory to spare), or with ROUTELENS_REPORT_WORKERS=1 they are
drawn here, in turn. With the same matplotlib, FreeType and fonts, the bytes do not depend
on where or when a figure was drawn (the SVG's ids are salted with a fixed string and it
carries no date).
"""

from __future__ import annotations

import io
import multiprocessing
import os
import signal
import sys
from multiprocessing.connection import wait

from routelens.errors import RouteLensError

__all__ = ["render_png", "render_svg", "render_figures", "workers"]

PNG_DPI = 110


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


def workers(count: int) -> int:
    """Processes to draw `count` figures with: ROUTELENS_REPORT_WORKERS, else the usable
    cores (at most 4); 1 where there is no fork (macOS and Windows spawn, which would
    import everything again). A value that is not a whole number >= 1 is refused."""
    chosen = os.environ.get("ROUTELENS_REPORT_WORKERS", "").strip()
    if chosen and not (chosen.isascii() and chosen.isdecimal() and int(chosen) >= 1):
        raise RouteLensError(f"ROUTELENS_REPORT_WORKERS={chosen!r}: give a whole number of processes >= 1 "
                             "(1: draw the figures in this process)")
    if sys.platform != "linux" or count < 2:
        return 1
    return min(count, int(chosen) if chosen else min(len(os.sched_getaffinity(0)), 4))


def _draw_share(figures: list, indices: list[int], connection) -> None:
    """A worker: draw its figures and send (index, png, svg) or the error, then exit."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # Ctrl-C is the parent's to handle: it stops the workers
    signal.signal(signal.SIGTERM, signal.SIG_DFL)    # not the CLI's handler (it raises KeyboardInterrupt)
    try:
        for index in indices:
            connection.send((index, *_drawn(figures[index])))
    except BaseException as error:   # noqa: BLE001  (sent to the parent, which raises it)
        connection.send(("error", f"{type(error).__name__}: {error}"))
    finally:
        connection.close()


def render_figures(figures: list) -> list[tuple[bytes, str]]:
    """(PNG bytes, SVG text) of each figure, in order."""
    processes = workers(len(figures))
    if processes < 2:
        return [_drawn(figure) for figure in figures]
    context = multiprocessing.get_context("fork")
    started = []   # (worker, its pipe, the figure indices it draws)
    try:
        for share in range(processes):
            indices = list(range(share, len(figures), processes))
            receive, send = context.Pipe(duplex=False)
            worker = context.Process(target=_draw_share, args=(figures, indices, send), daemon=True)
            try:
                worker.start()
            except OSError:   # fork refused (memory): draw what no worker took here
                receive.close()
                send.close()
                break
            send.close()
            started.append((worker, receive, indices))
        drawn: dict[int, tuple[bytes, str]] = {}
        open_pipes = [receive for _, receive, _ in started]
        while open_pipes:   # whichever worker has drawn something (a full pipe would stall its worker)
            for receive in wait(open_pipes):
                try:
                    message = receive.recv()
                except (EOFError, OSError):   # the worker's pipe closed: done, or killed
                    open_pipes.remove(receive)
                    continue
                if message[0] == "error":
                    raise RouteLensError(f"drawing a report figure failed: {message[1]}")
                drawn[message[0]] = (message[1], message[2])
        for worker, _, _ in started:
            worker.join()
        taken = {index for _, _, indices in started for index in indices}
        if any(index not in drawn for index in taken):
            codes = sorted({worker.exitcode for worker, _, _ in started if worker.exitcode})
            raise RouteLensError(f"a worker drawing the report's figures ended early (exit code {codes or '?'}); "
                                 "nothing was written for its figures. Rerun the report; ROUTELENS_REPORT_WORKERS=1 "
                                 "draws the figures in this process")
        for index in range(len(figures)):
            if index not in taken:
                drawn[index] = _drawn(figures[index])
        return [drawn[index] for index in range(len(figures))]
    finally:
        for worker, receive, _ in started:
            if worker.is_alive():
                worker.kill()
            worker.join()
            receive.close()
