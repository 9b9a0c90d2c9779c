"""`llama4-export bench`: a smoke test of the CLI on the shared l4-scoutlike artifact, and the roofline byte count
checked against the checkpoint's own tensors; the benchmarks/ scripts' refusal of bad arguments. Speed targets live in
benchmarks/, never here."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from safetensors import safe_open
from typer.testing import CliRunner

from llama4_export.evaluation.bench import SCRATCH_PREFIX, decode_weight_bytes, kv_bytes_read, peak_rss_mb, spread
from llama4_export.cli.export import export_app
from llama4_export.model.config import Llama4Config


def test_bench_cli_prints_table_and_writes_json(scoutlike_artifact, tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(export_app, [
        "bench", str(scoutlike_artifact), "--prompt", "8", "--prompt", "24", "--decode-prompt", "70",
        "--new-tokens", "5", "--depth", "0", "--depth", "100", "--repeats", "2", "--threads", "1", "--json", str(out),
    ])
    assert result.exit_code == 0, result.output
    assert "benchmark (median" in result.output and "roofline:" in result.output  # the table title, the bound line
    data = json.loads(out.read_text())
    # the kernels' CPU flags beside every measurement, on the console too (they were in the JSON only)
    assert f"cores ({' '.join(data['machine']['cpu_flags']) or 'no listed kernel flags'})" in " ".join(result.output.split())
    assert sorted(data["prefill_tok_s"]) == ["24", "8"]
    assert sorted(data["decode_depth_tok_s"]) == ["0", "100"] and data["settings"]["depths"] == [0, 100]
    for stats in [*data["prefill_tok_s"].values(), *data["decode_depth_tok_s"].values(), data["decode_tok_s"], data["ttft_ms"]]:
        assert len(stats["runs"]) == 2 and stats["min"] <= stats["median"] <= stats["max"] and stats["min"] > 0
    assert data["peak_rss_mb"] > 50  # python + ORT + 53 MB of mapped weights
    # The engine's own process, not this one (which holds torch, transformers and the exporter, as the CLI does).
    assert data["peak_rss_mb"] < peak_rss_mb() - 100, (data["peak_rss_mb"], peak_rss_mb())
    roof = data["roofline"]
    assert roof["bandwidth_gb_s"] > 0.1
    assert np.isclose(roof["bound_tok_s"], roof["bandwidth_gb_s"] * 1e9 / roof["decode_bytes_per_token"], rtol=1e-3)


def test_decode_bytes_count_one_expert_and_one_embedding_row(scoutlike_dir, scoutlike_artifact):
    """Reference: the checkpoint's tensors at fp32, routed experts divided by their count, the embedding one row."""
    config = json.loads((scoutlike_dir / "config.json").read_text())
    experts, vocab = config["num_local_experts"], config["vocab_size"]
    expected = 0
    for shard in sorted(scoutlike_dir.glob("*.safetensors")):
        with safe_open(shard, "np") as f:
            for name in f.keys():
                numel = int(np.prod(f.get_slice(name).get_shape()))
                if ".experts." in name:
                    numel //= experts
                elif "embed_tokens" in name:
                    numel //= vocab
                expected += 4 * numel
    measured = decode_weight_bytes(scoutlike_artifact / "decode.onnx", experts)
    # The exported graph adds only small constants (RoPE tables, masks) to the weights.
    assert expected <= measured <= expected * 1.05, (measured, expected)


def test_decode_bytes_count_one_row_of_a_4bit_embedding(tmp_path):
    """The int4 export's embedding (GatherBlockQuantized, made here by its own lowering pass) counted its whole table
    per decode step — on Scout ~0.5 GB where a token reads one row. Reference: one row of the packed data and scales."""
    import onnx_ir as ir
    from llama4_export.graph_passes.lower_linears import quantize_embedding
    from llama4_export.graph_passes.manager import PassContext
    from llama4_export.graph_passes.quantize import EMBEDDING, QuantSpec
    from llama4_export.model import io_spec

    vocab, hidden, block = 64, 256, 128
    table = np.random.default_rng(0).standard_normal((vocab, hidden), dtype=np.float32)
    ids = onnx.helper.make_tensor_value_info(io_spec.INPUT_IDS, onnx.TensorProto.INT64, [1, 1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    graph = onnx.helper.make_graph([onnx.helper.make_node("Gather", [EMBEDDING, io_spec.INPUT_IDS], ["y"])], "g", [ids], [y],
                                   [onnx.numpy_helper.from_array(table, EMBEDDING)])
    model = ir.from_proto(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)]))
    context = PassContext("onnxruntime", "gather", quantization=QuantSpec("int4", block_size=block, embedding_bits=4))
    assert quantize_embedding(model, context) == 1
    del model.graph.initializers[EMBEDDING]  # the float table, unused now (the export's cleanup drops it)
    ir.save(model, tmp_path / "decode.onnx")
    packed_row, scales_row = hidden // 2, hidden // block * 4  # uint8 nibbles, fp32 scales
    assert decode_weight_bytes(tmp_path / "decode.onnx", num_experts=4) == packed_row + scales_row


def test_kv_bytes_follow_chunk_and_global_layers(scoutlike_dir):
    config = Llama4Config.from_hf_dict(json.loads((scoutlike_dir / "config.json").read_text()))
    per_token = 2 * config.num_key_value_heads * config.head_dim * 4
    # position 70 with chunk 64: RoPE layers see 7 tokens of their chunk, the NoPE layer all 71
    rope_layers = sum(config.uses_rope(i) for i in range(config.num_hidden_layers))
    expected = per_token * (7 * rope_layers + 71 * (config.num_hidden_layers - rope_layers))
    assert kv_bytes_read(config, [70], 4, None) == expected
    assert kv_bytes_read(config, [70], 4, window=20) == per_token * (7 * rope_layers + 20 * (config.num_hidden_layers - rope_layers))


def test_bench_rejects_prompt_beyond_positions(scoutlike_artifact):
    result = CliRunner().invoke(export_app, ["bench", str(scoutlike_artifact), "--decode-prompt", "5000", "--repeats", "1"])
    assert result.exit_code == 2
    assert "exceed the model's 2048 positions" in result.output
    assert "pass a shorter --decode-prompt" in result.output  # the flag that is too long (was "--prompt/--new-tokens")


def test_bench_measures_a_prefill_up_to_the_context_whatever_new_tokens_says(scoutlike_artifact):
    """--new-tokens is what the decode runs generate; a prefill run generates 2 (its warm-up). `--prompt 2000` was
    refused on a 2048-position model because 2000 + 128 new tokens were counted."""
    bench = ["bench", str(scoutlike_artifact), "--decode-prompt", "8", "--new-tokens", "64", "--repeats", "1", "--threads", "1"]
    result = CliRunner().invoke(export_app, [*bench, "--prompt", "2046"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(export_app, [*bench, "--prompt", "2047"])
    assert result.exit_code == 2 and "--prompt 2047 + 2 generated tokens = 2049 tokens exceed the model's 2048 " \
        "positions; pass a shorter --prompt" in result.output, result.output


@pytest.mark.parametrize("args, expected", [
    (["--json", "/nonexistent-dir/bench.json"], "--json /nonexistent-dir/bench.json: its directory /nonexistent-dir does "
                                                "not exist"),  # was a traceback after the whole benchmark had run
    (["--json", "/proc/bench.json"], "--json /proc/bench.json: cannot write there"),  # was an error after measuring
    (["--backend", "tflite"], "backend 'tflite' is unknown; choose one of: onnxruntime, tensorrt, torch"),
    (["--depth", "-1"], "depth=-1: must be >= 0"),  # was answered about repeats, new tokens and prompts
])
def test_bench_refuses_bad_flags_in_one_line_before_measuring(scoutlike_artifact, args, expected):
    result = CliRunner().invoke(export_app, ["bench", str(scoutlike_artifact), "--repeats", "1", *args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], result.stderr


def test_bench_json_cut_short_keeps_the_previous_file(scoutlike_artifact, tmp_path):
    """--json was written in place: a full disk (here a file size limit, EFBIG) left the file cut short, invalid
    JSON, and the results it held before gone. The limit is set once the measurement is done (its process writes its
    own result file)."""
    out = tmp_path / "bench.json"
    out.write_text('{"previous": "results"}\n')
    code = ("import resource, sys\nfrom llama4_export import api\nfrom llama4_export.cli.export import main\n"
            "measure = api.bench_artifact\n"
            "def measured_then_limited(*args, **kwargs):\n"
            "    result = measure(*args, **kwargs)\n"
            "    resource.setrlimit(resource.RLIMIT_FSIZE, (200, 200))\n"
            "    return result\n"
            "api.bench_artifact = measured_then_limited\nmain()")
    done = subprocess.run([sys.executable, "-c", code, "bench", str(scoutlike_artifact), "--prompt", "8",
                           "--decode-prompt", "8", "--new-tokens", "2", "--repeats", "1", "--threads", "1", "--json",
                           str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.strip() == f"error: --json {out}: cannot write it (File too large)", \
        done.stderr
    assert out.read_text() == '{"previous": "results"}\n' and list(tmp_path.iterdir()) == [out]


def test_bench_that_cannot_write_its_result_file_names_the_temp_directory(scoutlike_artifact, tmp_path):
    """The benchmark's process writes its result to a temp file; a full disk there (here a file size limit, EFBIG)
    was `error: OSError: [Errno 28] No space left on device`, naming neither the place nor what to do."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (200, 200))\n"
            "from llama4_export.cli.export import main; main()")
    done = subprocess.run([sys.executable, "-c", code, "bench", str(scoutlike_artifact), "--prompt", "8",
                           "--decode-prompt", "8", "--new-tokens", "2", "--repeats", "1", "--threads", "1"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "TMPDIR": str(temp)})
    assert done.returncode == 2 and " ".join(done.stderr.split()) == (
        f"error: {temp}: cannot write the benchmark's result file in this temp directory (File too large); free "
        "space there or set TMPDIR to a directory with room"), done.stderr
    assert [path.name for path in temp.iterdir() if "llama4" in path.name] == []  # its own (others write here)


def test_bench_that_cannot_create_its_scratch_names_the_temp_directory(scoutlike_artifact, tmp_path, monkeypatch):
    """Its scratch directory refused (here the temp directory was removed after Python chose it; a full disk alike):
    one line naming the temp directory and TMPDIR, before any process starts."""
    import tempfile

    gone = tmp_path / "removed"
    monkeypatch.setattr(tempfile, "tempdir", str(gone))
    result = CliRunner().invoke(export_app, ["bench", str(scoutlike_artifact), "--repeats", "1"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"{gone}: cannot create a directory there (No such file or directory)" in lines[0] \
        and "the benchmark's temp directory: set TMPDIR to a writable directory with room" in lines[0], result.stderr


def test_spread_reports_median_and_range():
    assert spread([3.0, 1.0, 2.0, 10.0]) == {"median": 2.5, "min": 1.0, "max": 10.0, "runs": [3.0, 1.0, 2.0, 10.0]}


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("script, args, expected", [
    ("gqa_depth.py", ["--depth", "-5"], "argument --depth: -5 is not an integer of 0 or more"),  # was a traceback
    ("gqa_depth.py", ["--heads", "7", "--kv-heads", "4"], "--heads 7 is not a multiple of --kv-heads 4"),
    ("kv_memory.py", ["--window", "0"], "argument --window: 0 is not an integer of 1 or more"),  # was the child's
    ("compare_peers.py", ["{tmp}", "--llamacpp", "BOGUS"], "unknown GGUF type BOGUS"),  # was after a llama.cpp build
    ("report_time.py", ["{tmp}", "{tmp}"], "config.json"),
    ("scout_shapes.py", ["--preset", "nope"], "argument --preset: invalid choice: 'nope'"),  # was after the bandwidth
    ("runtime_decode.py", ["{tmp}", "--backend", "foo"], "argument --backend: invalid choice: 'foo'"),  # the package's CheckpointError, without its traceback
])
def test_benchmark_scripts_refuse_bad_input_in_one_line(tmp_path, script, args, expected):
    args = [a.format(tmp=tmp_path) for a in args]
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{script}: ") and expected in lines[0], result.stderr
    assert "machine:" not in result.stdout  # refused before the machine line's bandwidth copy, the first slow step


def test_bench_stopped_by_sigterm_to_it_alone_ends_its_engine_process(scoutlike_artifact, tmp_path):
    """`kill PID` or a container's stop sends SIGTERM to the command alone, not its process group: the engine's
    process it spawned ran on, orphaned, measuring for minutes, and its temp directory stayed in TMPDIR. A second
    bench started beside it (whose start removes the scratch of killed benches) leaves a running one's alone."""
    import signal

    temp = tmp_path / "tmp"
    temp.mkdir()
    with _bench_and_its_engine(scoutlike_artifact, temp, stderr=subprocess.PIPE) as (process, engine):
        (own,) = _scratch(temp)
        with _bench_and_its_engine(scoutlike_artifact, temp):  # its start's sweep is done once its engine runs
            assert own in _scratch(temp) and len(_scratch(temp)) == 2
        process.send_signal(signal.SIGTERM)
        stderr = process.communicate(timeout=60)[1]
        assert process.returncode == 143 and stderr.splitlines()[-1] == (
            "stopped by SIGTERM: this job's temp files were removed"), stderr[-2000:]
        assert ENGINE not in _cmdline(engine)
        assert not own.exists() and not list(temp.glob(".llama4-new-*"))


@pytest.mark.parametrize("measuring", [False, True], ids=["while-it-starts", "while-it-measures"])
def test_bench_sigkilled_takes_its_engine_process_with_it(scoutlike_artifact, tmp_path, measuring):
    """The OOM killer or a CI runner's hard kill SIGKILLs the bench: no handler runs, and the engine's process it
    spawned ran on, orphaned, measuring for a minute here. Killed while the engine starts, before it can ask the kernel
    to end it with its parent, or once it has loaded the weights and measures. Its scratch directory, which no handler
    could remove, stayed in TMPDIR for good: the next bench removes it, and says so."""
    import time

    with _bench_and_its_engine(scoutlike_artifact, tmp_path) as (process, engine):
        (left,) = _scratch(tmp_path)
        deadline = time.monotonic() + 120
        while measuring and "model.data" not in Path(f"/proc/{engine}/maps").read_text():
            assert time.monotonic() < deadline
            time.sleep(0.02)  # until it has mapped the weights: past its start
        process.kill()
        process.wait()
        deadline = time.monotonic() + 10
        while ENGINE in _cmdline(engine) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ENGINE not in _cmdline(engine)
    assert _scratch(tmp_path) == [left]
    with _bench_and_its_engine(scoutlike_artifact, tmp_path, stderr=subprocess.PIPE) as (process, _):
        assert not left.exists() and len(_scratch(tmp_path)) == 1  # its own
        process.kill()
        stderr = " ".join(process.communicate(timeout=60)[1].split())
    assert f"removed {left.name} (0.0 MB) from {tmp_path}: left by a job killed before it cleaned up" in stderr, stderr


ENGINE = b"llama4_export.evaluation.bench"  # in the engine process's command line


@contextlib.contextmanager
def _bench_and_its_engine(artifact: Path, temp: Path, stderr=subprocess.DEVNULL):
    """(the process, its engine's pid) of `llama4-export bench ARTIFACT --repeats 50` (minutes) under TMPDIR=temp,
    once its engine's process runs; an engine (or bench) still running at the end, a failed test's, is killed."""
    import signal
    import time

    process = subprocess.Popen([sys.executable, "-c", "from llama4_export.cli.export import main; main()", "bench",
                                str(artifact), "--repeats", "50"], stdout=subprocess.DEVNULL, stderr=stderr, text=True,
                               env={**os.environ, "TMPDIR": str(temp)})
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children")
    deadline = time.monotonic() + 120
    while not any(ENGINE in _cmdline(pid) for pid in children.read_text().split()):
        assert process.poll() is None and time.monotonic() < deadline, (process.communicate()[1] or "")[-2000:]
        time.sleep(0.02)  # until the engine's process runs
    engine = children.read_text().split()[0]
    try:
        yield process, engine
    finally:
        if ENGINE in _cmdline(engine):
            os.kill(int(engine), signal.SIGKILL)
        if process.poll() is None:
            process.kill()
            process.wait()


def _scratch(temp: Path) -> list[Path]:
    """The bench scratch directories in the temp directory `temp`."""
    return sorted(temp.glob(f"{SCRATCH_PREFIX}*"))


def _cmdline(pid: str) -> bytes:
    """The command line of process `pid`; b"" once it has ended."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""
