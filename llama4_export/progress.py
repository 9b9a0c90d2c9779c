"""Named steps of a long job, each with a spinner and its elapsed time (rich, on stderr), or silence."""

from __future__ import annotations

import contextlib
from typing import Iterator

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn


class Steps:
    """`with Steps(show) as step: with step("load"): ...` — a failed step's spinner is removed (its error says what
    failed); nothing is printed when show is False."""

    def __init__(self, show: bool = True):
        self._progress = Progress(
            SpinnerColumn(finished_text="[green]✓"), TextColumn("{task.description}"), TimeElapsedColumn(),
            console=Console(stderr=True), disable=not show,
        )

    def __enter__(self):
        self._progress.__enter__()
        return self.step

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)

    @contextlib.contextmanager
    def step(self, description: str) -> Iterator[None]:
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
