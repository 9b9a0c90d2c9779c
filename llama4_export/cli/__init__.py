"""The command lines, thin layers over the Python API: `llama4-export` (export.py, over api.py), `llama4-run`
(run.py, over the runtime, so running an artifact loads neither torch nor the exporter) and `llama4-serve` (serve.py,
over serving/, entered through serve_main)."""


def serve_main() -> None:
    """`llama4-serve`: the base install runs artifacts, serving them needs the serve extra; without it the server's
    imports (in serve.py, before its main runs) would end in a ModuleNotFoundError traceback."""
    import sys

    from ..errors import SERVE_PACKAGES, ExtraNotInstalled, needs_extra

    try:
        with needs_extra(SERVE_PACKAGES, "serve", "llama4-serve needs {extra}"):
            from .serve import main
    except ExtraNotInstalled as missing:
        print(f"error: {missing}", file=sys.stderr)
        raise SystemExit(2) from None
    main()
