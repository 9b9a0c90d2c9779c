"""The layering (import-linter contracts, DESIGN.md §1), the torch-free runtime, and the artifact format version."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llama4_export.artifact import FORMAT_VERSION

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root,
                          capture_output=True, text=True, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})


def test_import_contracts_are_kept_and_an_upward_import_breaks_them(tmp_path):
    kept = _lint(REPO)
    assert kept.returncode == 0 and "0 broken" in kept.stdout, kept.stdout + kept.stderr
    # the same tree with one deliberate upward import: the model stage importing the runtime
    shutil.copytree(REPO / "llama4_export", tmp_path / "llama4_export", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    config = tmp_path / "llama4_export" / "model" / "config.py"
    config.write_text(config.read_text() + "\nfrom ..runtime import sampling  # noqa: E402,F401\n")
    broken = _lint(tmp_path)
    assert broken.returncode != 0 and "Stages import only downward BROKEN" in broken.stdout, broken.stdout
    assert "llama4_export.model.config -> llama4_export.runtime.sampling" in broken.stdout


def test_running_an_artifact_imports_neither_torch_nor_the_exporter(scoutlike_artifact):
    """llama4-run's whole path on an ONNX Runtime artifact, in a fresh interpreter. Nor the graph passes and the
    TensorRT stage (onnx_ir and its sympy), nor ml_dtypes, which a text generation on fp32 never needs: together
    ≈ 0.9 s of every llama4-run/llama4-serve start."""
    script = (
        "import sys\n"
        "from llama4_export.cli.run import main\n"
        f"sys.argv = ['llama4-run', {str(scoutlike_artifact)!r}, '--prompt', 'The', '-n', '3', '--json']\n"
        "try:\n    main()\nexcept SystemExit as exit:\n    assert not exit.code, exit.code\n"
        "heavy = sorted(m for m in sys.modules if m in ('torch', 'onnx_ir', 'ml_dtypes', 'sympy') or m.startswith(("
        "'llama4_export.export', 'llama4_export.weights', 'llama4_export.calib', 'llama4_export.graph_passes', "
        "'llama4_export.tensorrt', 'llama4_export.pipeline')))\n"
        "print('HEAVY', heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[0])["token_ids"] and "HEAVY []" in result.stdout, result.stdout


@pytest.mark.parametrize("args", [["--help"], ["inspect", "--model", "scout", "--json"],
                                  ["plan", "--model", "scout", "--precision", "int4", "--gpu", "h100-80gb"]])
def test_export_cli_answers_without_torch_or_onnx(args):
    """`llama4-export --help`, `inspect --model` and `plan` need only configs: the api imports the jobs that need torch
    or onnx on first use (≈ 3 s of every start before)."""
    script = (
        "import sys\n"
        "from llama4_export.cli.export import main\n"
        f"sys.argv = ['llama4-export', *{args!r}]\n"
        "try:\n    main()\nexcept SystemExit as exit:\n    assert not exit.code, exit.code\n"
        "print('HEAVY', sorted(m for m in sys.modules if m in ('torch', 'onnx', 'onnx_ir', 'onnxruntime', 'safetensors')))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout, result.stdout


def test_every_api_name_resolves():
    from llama4_export import api

    assert all(callable(getattr(api, name)) for name in api.__all__)


def test_an_artifact_of_another_format_version_is_refused_with_one_line(scoutlike_artifact, tmp_path):
    from typer.testing import CliRunner

    from llama4_export.cli.run import run_app

    other = tmp_path / "other"
    shutil.copytree(scoutlike_artifact, other)
    manifest = json.loads((other / "manifest.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION
    manifest["format_version"] = FORMAT_VERSION + 1
    (other / "manifest.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(run_app, [str(other), "--ids", "1,2", "-n", "2"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert f"artifact format version {FORMAT_VERSION + 1}" in lines[0] and f"reads version {FORMAT_VERSION}" in lines[0]


@pytest.mark.parametrize("package", ["graph_passes", "tensorrt", "export", "calib", "evaluation"])
def test_stage_packages_import_nothing_on_their_own(package):
    """A stage's __init__ holds no imports, so reading one light module (e.g. trt_plugin_spec) loads no other stage."""
    source = (REPO / "llama4_export" / package / "__init__.py").read_text()
    assert "import" not in source.split('"""')[-1], package
