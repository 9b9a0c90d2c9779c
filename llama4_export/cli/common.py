"""What both command lines share: the consoles and the one-line failure (exit 2)."""

from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.markup import escape

console = Console()
err_console = Console(stderr=True)


def fail(exc: Exception | str) -> None:
    # escaped: a message's own brackets (a path "out[int4]", "pip install 'llama4-export[export]'") are text, not markup
    err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def version_option(program: str):
    """--version: the package version (the one an artifact's manifest records under tools.llama4_export), then exit."""
    from .. import __version__

    def show(given: bool) -> None:
        if given:
            console.print(f"{program} {__version__}", highlight=False)
            raise typer.Exit()

    return typer.Option(False, "--version", callback=show, is_eager=True, help="print the version and exit")


def piece_printer():
    """Stream callback: each token's text, or comma-separated ids when the artifact has no tokenizer."""
    printed = 0

    def print_piece(event) -> None:
        nonlocal printed
        if event.text is not None:  # a stop token's event has no text of its own but may carry what was held back
            sys.stdout.write(event.text)
        elif not event.stop:
            sys.stdout.write(f"{',' if printed else ''}{event.token_id}")
            printed += 1
        sys.stdout.flush()

    return print_piece
