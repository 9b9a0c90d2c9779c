"""The benchmarks/ scripts run as subprocesses: bad input refused in one line before any measuring, the results they
write (units, the machine line), and their --help. No llama.cpp build, no download: each test takes seconds."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import small_hf_config
from llama4_export.artifact import FORMAT, FORMAT_VERSION
from llama4_export.model.config import Llama4Config

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))


def script(name: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCHMARKS / name), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def one_line(result: subprocess.CompletedProcess, name: str) -> str:
    lines = result.stderr.splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"{name}: "), result.stderr
    assert "machine:" not in result.stdout  # before the first slow step
    return lines[0]


# ------------------------------------------------------------------------------------------------ compare_peers
@pytest.fixture
def checkpoint_and_artifact(tmp_path) -> tuple[Path, Path]:
    """A checkpoint (config.json only) and an artifact directory whose manifest names it, at fp32."""
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    small_hf_config().to_json_file(checkpoint / "config.json")
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    digest = hashlib.sha256((checkpoint / "config.json").read_bytes()).hexdigest()
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "files": {}, "precision": "fp32",
                "source": {"checkpoint": "ckpt", "files": {"config.json": digest}}}
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    return checkpoint, artifact


def test_compare_peers_refuses_an_artifact_of_another_precision(checkpoint_and_artifact):
    checkpoint, artifact = checkpoint_and_artifact
    result = script("compare_peers.py", checkpoint, "--artifact", f"int4={artifact}", "--llamacpp", "",
                    "--no-transformers")
    assert f"--artifact int4={artifact}: the artifact is fp32, not int4" in one_line(result, "compare_peers.py")


def test_compare_peers_refuses_an_artifact_of_another_checkpoint(checkpoint_and_artifact):
    checkpoint, artifact = checkpoint_and_artifact
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "rope_theta": 1234.0}))  # same shapes, other model
    result = script("compare_peers.py", checkpoint, "--artifact", f"fp32-a={artifact}", "--llamacpp", "",
                    "--no-transformers")
    assert "exported from another checkpoint ('ckpt'): its config.json differs" in one_line(result, "compare_peers.py")


def test_compare_peers_without_depths(scoutlike_dir, scoutlike_artifact, tmp_path):
    """--depth -1 (documented as none): no depth columns (was a TypeError in max(decode_prompt, *[]))."""
    out = tmp_path / "peers.json"
    result = script("compare_peers.py", scoutlike_dir, "--artifact", f"fp32={scoutlike_artifact}", "--llamacpp", "",
                    "--no-transformers", "--rounds", "1", "--prompt", "8", "--decode-prompt", "16", "--new-tokens", "3",
                    "--depth", "-1", "--threads", "1", "--json", out)
    assert result.returncode == 0, result.stderr
    [ours] = json.loads(out.read_text())["results"]
    assert ours["decode_depth_tok_s"] == {} and ours["decode_tok_s"]["median"] > 0


def test_llamacpp_kv_counts_scouts_chunk():
    """llama.cpp attends within 8,192-token chunks whatever the config says: at position 300 every layer of a
    config with 8-token chunks reads 301 tokens of f16 K and V there."""
    import compare_peers

    config = Llama4Config.from_hf_dict(small_hf_config().to_dict())
    per_token = 2 * config.num_key_value_heads * config.head_dim * 2
    assert config.attention_chunk_size == 8
    assert compare_peers.llamacpp_kv_bytes(config, [300]) == 301 * per_token * config.num_hidden_layers


def test_llamacpp_build_is_announced_with_how_to_skip(tmp_path, capsys):
    import llamacpp

    llamacpp.announce_build(tmp_path, "measure without llama.cpp: --llamacpp ''")
    line = capsys.readouterr().err
    assert line.count("\n") == 1 and f"llama.cpp is not built in {tmp_path}" in line and "--llamacpp ''" in line
    bin_dir = llamacpp.build_dir(tmp_path, llamacpp.ggml_options(llamacpp.cpu_flags())) / "bin"
    bin_dir.mkdir(parents=True)
    for target in llamacpp.BUILD_TARGETS:
        (bin_dir / target).touch()
    llamacpp.announce_build(tmp_path, "--llamacpp ''")
    assert capsys.readouterr().err == ""  # built: nothing to say


# --------------------------------------------------------------------------------------------- other scripts
def test_rss_where_refuses_an_unwritable_output_before_the_export():
    """The output is written at exit: an unwritable one was a traceback after the whole export, and exit 0."""
    result = script("rss_where.py", "/proc/rss.txt", "--", "--help")
    assert "/proc/rss.txt: cannot write the output file there" in one_line(result, "rss_where.py")
    assert "Usage" not in result.stdout  # the export (here its --help) never started


def test_rss_where_help():
    result = script("rss_where.py", "--help")
    assert result.returncode == 0 and "OUT.txt: the peak (VmRSS and anonymous memory)" in result.stdout


def test_peak_rss_is_in_decimal_megabytes():
    """400,000,000 bytes written raise the peak by 400 MB (MiB would read 381)."""
    code = ("from llama4_export.evaluation.bench import peak_rss_mb\n"
            "before = peak_rss_mb()\nblock = b'\\x01' * 400_000_000\nprint(peak_rss_mb() - before)")
    grown = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 396 < grown < 412, grown


def test_op_profile_json_names_the_machine(scoutlike_artifact, tmp_path):
    out = tmp_path / "ops.json"
    result = script("op_profile.py", scoutlike_artifact, "--prompt", "8", "--steps", "3", "--threads", "1", "--json", out)
    assert result.returncode == 0, result.stderr
    machine = json.loads(out.read_text())["machine"]
    assert machine["cpu"] and isinstance(machine["cpu_flags"], list) and machine["copy_bandwidth_gb_s"] > 0
    assert f"{machine['copy_bandwidth_gb_s']:.1f} GB/s" in result.stdout  # the bandwidth the printed line shows


def test_the_printed_bandwidth_is_the_one_the_json_records(monkeypatch, capsys):
    """The machine line printed the measured bandwidth to 0.1 and the JSON kept it rounded to 0.01: 27.9549 GB/s
    printed 28.0 and was recorded as 27.95 (27.9), so one run's two records disagreed (the test above failed by chance
    in a CI run)."""
    import common

    from llama4_export.evaluation import bench

    monkeypatch.setattr(bench, "memory_bandwidth_gb_s", lambda threads: 27.9549)
    recorded = common.machine_json(common.print_machine(2), 2)["copy_bandwidth_gb_s"]
    assert f"copy bandwidth {recorded:.1f} GB/s (2 threads)" in capsys.readouterr().out


OPTIONS_HELPED = ["batch_profile.py", "cpp_decode.py", "decode_breakdown.py", "op_profile.py", "int4_speed.py",
                  "kv_memory.py", "nbits_forms.py", "moe_lowering.py"]


@pytest.mark.parametrize("name", [*OPTIONS_HELPED, "report_time.py", "vision_bench.py"])
def test_help_describes_the_script_and_every_option(name):
    result = script(name, "--help")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    description = " ".join(text.split("\n\n")[1].split())
    assert description.endswith("."), description  # the docstring's whole first paragraph, not its first line
    options = text.split("options:\n", 1)[1].splitlines() if name in OPTIONS_HELPED else []
    for i, line in enumerate(options):
        if re.match(r"  -", line) and not line.startswith("  -h, --help"):
            described = re.search(r"\S  +\S", line.strip()) or (i + 1 < len(options) and options[i + 1].startswith(" " * 8))
            assert described, f"{name}: {line.strip()} has no help"
