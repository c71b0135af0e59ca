"""Progress bars (rich) for long work: units done (tokens, steps, ...), units per second, time left."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


@contextmanager
def progress_bar(description: str, total: int, completed: int = 0,
                 enabled: bool = True, unit: str = "tokens") -> Iterator[Callable[[int], None]]:
    """Yields `advance(n)`. Drawn on stderr; a no-op when disabled."""
    if not enabled:
        yield lambda n: None
        return
    columns = (
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn(unit), TaskProgressColumn(),
        TextColumn("{task.fields[rate]} " + unit + "/s"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(file=sys.stderr)) as progress:
        task = progress.add_task(description, total=total, completed=completed, rate="-")

        def advance(n: int) -> None:
            progress.advance(task, n)
            speed = progress.tasks[0].speed
            progress.update(task, rate=f"{speed:.1f}" if speed else "-")

        yield advance
