"""Named steps of a long job, each with a spinner and its elapsed time (rich, on stderr), or silence. Where stderr is
not a terminal (CI logs, a pipe) rich would draw nothing until the job ends, so each step is a line when it starts and
one when it ends, with its time."""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn


class Steps:
    """`with Steps(show) as step: with step("load"): ...` — a failed step's spinner is removed (its error says what
    failed); nothing is printed when show is False."""

    def __init__(self, show: bool = True):
        console = Console(stderr=True)
        self._lines = console if show and not console.is_terminal else None
        self._progress = Progress(
            SpinnerColumn(finished_text="[green]✓"), TextColumn("{task.description}"), TimeElapsedColumn(),
            console=console, disable=not show or self._lines is not None,
        )

    def __enter__(self):
        self._progress.__enter__()
        return self.step

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)

    @contextlib.contextmanager
    def step(self, description: str) -> Iterator[None]:
        description = escape(description)  # a path's brackets ("checkpoint ckpt[bf16]") are text, not rich markup
        if self._lines is not None:
            self._lines.print(f"▸ {description}", highlight=False, soft_wrap=True)
            started = time.monotonic()
            yield
            self._lines.print(f"✓ {description} ({time.monotonic() - started:.1f} s)", highlight=False, soft_wrap=True)
            return
        task = self._progress.add_task(description, total=1)
        try:
            yield
        except BaseException:
            self._progress.remove_task(task)
            raise
        self._progress.update(task, completed=1)

    @staticmethod
    @contextlib.contextmanager
    def silent(description: str) -> Iterator[None]:
        yield


def note(message: str | None, show: bool = True) -> None:
    """One line on stderr beside the steps; nothing for None or when show is False."""
    if message is not None and show:
        Console(stderr=True).print(message, markup=False, highlight=False, soft_wrap=True)
