"""Terminal output: progress on stderr (rich), tables on stdout."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

err = Console(stderr=True)
# Piped output (logs, CI, scripts) gets a wide fixed width instead of rich's 80 columns.
out = Console(width=None if sys.stdout.isatty() else 160)


@contextlib.contextmanager
def steps(title: str) -> Iterator:
    """A spinner whose text follows `step(msg)` calls; prints each finished step."""
    with err.status(title) as status:
        last = []

        def step(msg: str) -> None:
            if last:
                err.print(f"[green]✓[/] {last[-1]}")
            last.append(msg)
            status.update(msg)

        yield step
        if last:
            err.print(f"[green]✓[/] {last[-1]}")


@contextlib.contextmanager
def bar(description: str) -> Iterator:
    """A progress bar driven by `tick(fraction_done)`."""
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    ) as progress:
        task = progress.add_task(description, total=1.0)
        yield lambda frac: progress.update(task, completed=frac)


def table(title: str, columns: list[str], rows: list[list]) -> Table:
    t = Table(title=title)
    first = rows[0] if rows else []
    for i, c in enumerate(columns):
        numeric = i < len(first) and isinstance(first[i], int | float) and i > 0
        t.add_column(c, justify="right" if numeric else "left")
    for r in rows:
        t.add_row(*[fmt(v) for v in r])
    return t


def fmt(v) -> str:
    if isinstance(v, float):
        if v == 0:
            return "0"
        return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e5 else f"{v:,.3f}".rstrip("0").rstrip(".")
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return "" if v is None else str(v)
