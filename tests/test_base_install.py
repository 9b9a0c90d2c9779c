"""The base install (pyproject.toml's dependencies, no extras) runs an artifact; the serve extra adds the server; the
export extra is what exporting needs, and without it llama4-export says so in one line.

Each check runs in a fresh interpreter where every third-party package outside the install under test cannot be
imported: the packages pip would install for those requirements are worked out from this environment's installed
metadata (the requirements' transitive closure), so a runtime module importing torch, or a requirement missing from
pyproject.toml, fails here as it would in a user's deployment.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from llama4_export.errors import EXPORT_PACKAGES, SERVE_PACKAGES

from .conftest import VISION_FIXTURES, llama4_serve

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def installed_closure(requirements: list[str]) -> set[str]:
    """The distributions pip installs for `requirements`: each one's own requirements (and those of the extras it is
    asked with), transitively, as this environment's metadata lists them."""
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [Requirement(text) for text in requirements]
    while todo:
        requirement = todo.pop()
        key = (canonicalize_name(requirement.name), frozenset(requirement.extras))
        if key in seen:
            continue
        seen.add(key)
        for text in metadata.distribution(requirement.name).requires or []:
            needed = Requirement(text)
            if needed.marker is None or any(needed.marker.evaluate({"extra": extra})
                                            for extra in ("", *requirement.extras)):
                todo.append(needed)
    return {name for name, _ in seen}


def import_names(distributions: set[str]) -> set[str]:
    return {module for module, owners in metadata.packages_distributions().items()
            if any(canonicalize_name(owner) in distributions for owner in owners)}


def only_installed(*extras: str) -> str:
    """Python source after which a package installed in site-packages imports only if the base install (plus `extras`)
    brings it."""
    requirements = PROJECT["dependencies"] + [text for extra in extras
                                              for text in PROJECT["optional-dependencies"][extra]]
    allowed = sorted(import_names(installed_closure(requirements)) | {"llama4_export"})
    return (
        "import importlib.abc, importlib.machinery, site, sys\n"
        "class OutsideTheInstall(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if '.' in name or name in {allowed!r}:\n"
        "            return None\n"
        "        found = importlib.machinery.PathFinder.find_spec(name)\n"
        "        places = [] if found is None else [found.origin or '', *(found.submodule_search_locations or [])]\n"
        "        if any(place.startswith(tuple(site.getsitepackages())) for place in places):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r} (outside the install under test)', name=name)\n"
        "sys.meta_path.insert(0, OutsideTheInstall())\n"
    )


FULL = "import sys\n"  # the prelude of a run in this whole environment (the reference)


def run_cli(prelude: str, program: str, *args: str) -> subprocess.CompletedProcess:
    entry = {"llama4-run": "cli.run import main", "llama4-export": "cli.export import main",
             "llama4-serve": "cli import serve_main as main"}[program]  # pyproject.toml's [project.scripts]
    script = f"{prelude}sys.argv = {[program, *args]!r}\nfrom llama4_export.{entry}\nmain()\n"
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    from llama4_export import api

    out = tmp_path_factory.mktemp("base-install") / "scout-tiny"
    # no report: these tests run the artifact, none reads its report.json (~15 s of export)
    api.export_model(out, model="scout-tiny", show_progress=False, quant=api.QuantOptions(report=False))
    return out


def test_the_exporters_packages_are_the_export_extra_and_not_the_base_install():
    base = import_names(installed_closure(PROJECT["dependencies"]))
    export = import_names(installed_closure(PROJECT["optional-dependencies"]["export"]))
    assert EXPORT_PACKAGES <= export and not EXPORT_PACKAGES & base, (EXPORT_PACKAGES - export, EXPORT_PACKAGES & base)
    serve = import_names(installed_closure(PROJECT["optional-dependencies"]["serve"]))
    assert SERVE_PACKAGES <= serve and not SERVE_PACKAGES & base, (SERVE_PACKAGES - serve, SERVE_PACKAGES & base)
    assert PROJECT["scripts"]["llama4-serve"] == "llama4_export.cli:serve_main"  # the entry run_cli runs


def test_the_base_install_runs_an_artifact_and_export_names_the_extra_it_needs(artifact, tmp_path):
    base = only_installed()
    args = ["--prompt", "The history of", "-n", "12", "--json"]
    ran = run_cli(base, "llama4-run", str(artifact), *args)
    assert ran.returncode == 0, ran.stderr
    full = run_cli(FULL, "llama4-run", str(artifact), *args)
    assert json.loads(ran.stdout) == json.loads(full.stdout) and json.loads(ran.stdout)["token_ids"]

    for job in (["inspect", "--model", "scout", "--json"],
                ["plan", "--model", "scout", "--precision", "int4", "--gpu", "h100-80gb"]):
        answered = run_cli(base, "llama4-export", *job)
        assert answered.returncode == 0, (job, answered.stderr)
    # a checkpoint's config.json alone (before downloading its weights) is inspected as the whole checkpoint is
    config_only = tmp_path / "tiny-a"
    config_only.mkdir()
    shutil.copy(VISION_FIXTURES / "tiny-a" / "config.json", config_only)
    alone = run_cli(base, "llama4-export", "inspect", "--checkpoint", str(config_only), "--json")
    whole = run_cli(FULL, "llama4-export", "inspect", "--checkpoint", str(VISION_FIXTURES / "tiny-a"), "--json")
    assert alone.returncode == 0 and json.loads(alone.stdout) == json.loads(whole.stdout), alone.stderr
    missing = run_cli(base, "llama4-export", "inspect", "--checkpoint", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "nowhere: checkpoint directory not found" in missing.stderr, missing.stderr

    out = tmp_path / "never"
    refusals = [("llama4-export", "--model", "scout-tiny", "--out", str(out)),
                ("llama4-export", "passes", str(artifact), "--report"),
                ("llama4-export", "bench", str(artifact), "--prompt", "8"),
                ("llama4-export", "inspect", "--checkpoint", str(VISION_FIXTURES / "tiny-a")),
                # the TensorRT backend needs onnx_ir (its plugin spec) besides TensorRT
                *[("llama4-run", str(artifact), "--backend", backend, *args) for backend in ("torch", "tensorrt")]]
    for command in refusals:
        refused = run_cli(base, *command)
        lines = refused.stderr.strip().splitlines()
        assert refused.returncode == 2 and len(lines) == 1, (command, refused.stderr)
        assert "is not installed" in lines[0] and "pip install 'llama4-export[export]'" in lines[0], lines[0]
    assert not out.exists()
    for args in (["--help"], [str(artifact)]):  # both ended in fastapi's ModuleNotFoundError traceback
        refused = run_cli(base, "llama4-serve", *args)
        assert refused.returncode == 2 and refused.stderr == (
            "error: fastapi is not installed: llama4-serve needs the serve extra (pip install 'llama4-export[serve]')\n"
        ), refused.stderr


def test_the_base_install_with_the_serve_extra_serves_an_artifact(artifact):
    openai = pytest.importorskip("openai")
    expected = json.loads(run_cli(FULL, "llama4-run", str(artifact), "--prompt", "Once", "-n", "8",
                                  "--json").stdout)
    with llama4_serve(artifact, prelude=only_installed("serve")) as (base, _):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
        reply = client.completions.create(model="scout-tiny", prompt="Once", max_tokens=8, temperature=0)
    assert reply.choices[0].text == expected["text"]
