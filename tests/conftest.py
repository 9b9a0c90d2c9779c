"""Shared fixtures: the trained checkpoints in ../shared (skip when absent) and random HF checkpoints made by transformers."""

from __future__ import annotations

import atexit
import gc
import os
import shutil
import socket
from contextlib import contextmanager
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from llama4_export.export import onnx_export
from llama4_export.pipeline import REPRODUCIBLE_CPU_NUMERICS

# What an export sets in its process (pipeline.pin_cpu_numerics), set before any test runs a torch kernel: exports
# made in this process give the bytes of the llama4-export processes the tests start.
for _name, _value in REPRODUCIBLE_CPU_NUMERICS.items():
    os.environ.setdefault(_name, _value)

# The caches under $XDG_CACHE_HOME (calibration, traces, verified files) go to one directory per test session, not
# the user's home: made by the controlling process before pytest-xdist starts its workers, which inherit it (and the
# exports they start, so these share their traces). Tests of a cache's behaviour point it at their own tmp_path.
if "PYTEST_XDIST_WORKER" not in os.environ:
    os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="llama4-export-tests-cache-")
    atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], True)

# A test process keeps every trace it makes (the tests' models are tiny: a trace is a few MB): with the exporter's
# default of the last 4, a module re-traced (~15-50 s each) what a module before it in the same worker had traced.
onnx_export.TRACE_CACHE_SIZE = 64


# trylast: after the last fixtures' teardown; inside pytest-xdist's wrapper, before a worker reports its end
@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session):
    """Collect once, then freeze what is left (imports, the traces kept above: millions of objects by a worker's last
    module). After a worker has reported its end, pytest makes two full collections; on that heap they took 3-9 s, and
    past 5 s execnet interrupts the worker (CI's stray KeyboardInterrupt / PytestUnraisableExceptionWarning). This
    collection runs before the report, and reports any finalizer's error as before. Unfrozen at exit, so the
    interpreter frees them as before."""
    gc.collect()
    gc.freeze()
    atexit.register(gc.unfreeze)


REPO = Path(__file__).resolve().parents[1]
SHARED_CHECKPOINTS = REPO.parent / "shared" / "checkpoints"
SCOUTLIKE = SHARED_CHECKPOINTS / "l4-scoutlike"
# Reference outputs of transformers' Llama 4 image processor, processor and model, with the two tiny multimodal
# checkpoints and the images they were made from (scripts/make_vision_fixtures.py says how to regenerate them).
VISION_FIXTURES = REPO / "tests" / "fixtures" / "vision"

requires_shared = pytest.mark.skipif(
    not (SCOUTLIKE / "config.json").is_file(),
    reason=f"trained test checkpoints not found at {SCOUTLIKE} (CI has ../shared; a plain clone does not)",
)


@pytest.fixture(scope="session")
def scoutlike_dir() -> Path:
    if not (SCOUTLIKE / "config.json").is_file():
        pytest.skip(f"trained test checkpoints not found at {SCOUTLIKE} (CI has ../shared; a plain clone does not)")
    return SCOUTLIKE


@pytest.fixture(scope="session")
def heldout_text() -> str:
    path = SHARED_CHECKPOINTS / "corpus_heldout.txt"
    if not path.is_file():
        pytest.skip(f"held-out corpus not found at {path} (CI has ../shared; a plain clone does not)")
    return path.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def scoutlike_artifact(tmp_path_factory, scoutlike_dir) -> Path:
    """l4-scoutlike exported at fp32 (traced graphs, no passes) once per test session (an export costs ~30 s): treat it
    as read-only."""
    from llama4_export import api

    out = tmp_path_factory.mktemp("export") / "scoutlike"
    api.export_model(out, checkpoint=scoutlike_dir, optimize=False, show_progress=False)
    return out


def random_moe_weights(rng: np.random.Generator, experts: int, hidden: int, inter: int, gate_up_scale: float, scale: float) -> dict:
    """fp32 weights of one fused MoE layer in checkpoint layout, keyed as graph_passes.moe_reference.llama4_moe takes them."""
    weights = {
        "router": rng.standard_normal((experts, hidden)), "gate_up": rng.standard_normal((experts, hidden, 2 * inter)) * gate_up_scale,
        "down": rng.standard_normal((experts, inter, hidden)) * scale, "shared_gate": rng.standard_normal((inter, hidden)) * scale,
        "shared_up": rng.standard_normal((inter, hidden)) * scale, "shared_down": rng.standard_normal((hidden, inter)) * scale,
    }
    return {k: v.astype(np.float32) for k, v in weights.items()}


def small_hf_config(**overrides):
    """A transformers Llama4TextConfig small enough for a test, every Llama 4 feature on by default."""
    from transformers import Llama4TextConfig

    base = dict(
        vocab_size=128, hidden_size=64, intermediate_size=48, intermediate_size_mlp=80, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=1,
        interleave_moe_layer_step=1, attention_chunk_size=8, use_qk_norm=True, attn_temperature_tuning=True,
        floor_scale=4, attn_scale=0.1, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    base.update(overrides)
    return Llama4TextConfig(**base)


def make_hf_checkpoint(directory: Path, seed: int = 0, dtype: torch.dtype = torch.bfloat16, max_shard_size=None, **overrides) -> Path:
    """Random-weight Llama4ForCausalLM saved by transformers' own save_pretrained (the format users have)."""
    from transformers import Llama4ForCausalLM

    torch.manual_seed(seed)
    model = Llama4ForCausalLM(small_hf_config(**overrides)).to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    return Path(directory)


def initializer_bytes(artifact: Path) -> int:
    """Bytes of every initializer the artifact's graphs hold (external or inline), each tensor once."""
    stored = {}
    for graph in ("prefill.onnx", "decode.onnx"):
        for tensor in onnx.load(artifact / graph, load_external_data=False).graph.initializer:
            where = {entry.key: entry.value for entry in tensor.external_data}
            stored[where.get("offset", tensor.name)] = (int(where["length"]) if "length" in where
                                                        else onnx.numpy_helper.to_array(tensor).nbytes)
    return sum(stored.values())


def start_llama4_serve(artifact: Path, *options: str, seconds: float = 240, prelude: str = "", own_group: bool = False):
    """(base URL, process): `llama4-serve ARTIFACT OPTIONS` on a free loopback port, once /health answers 200;
    `prelude`: Python source the server's interpreter runs first; `own_group`: in a session of its own, so that a test
    can signal its process group (as systemd or `timeout` do)."""
    import httpx  # the serve extra: only the server tests (which skip without it) call this

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-c", f"{prelude}\nfrom llama4_export.cli.serve import main; main()", str(artifact), "--port",
               str(port), *options]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=own_group)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + seconds
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return base, process
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"llama4-serve did not come up: {process.communicate()[0][-3000:]}")
        time.sleep(0.3)


@contextmanager
def llama4_serve(artifact: Path, *options: str, prelude: str = ""):
    """start_llama4_serve for a `with` block (a module fixture's life); the server is killed at its end if still up."""
    base, process = start_llama4_serve(artifact, *options, prelude=prelude)
    try:
        yield base, process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def run_with_file_size_limit(limit: int, *args: str) -> subprocess.CompletedProcess:
    """`llama4-export ARGS` under RLIMIT_FSIZE (`ulimit -f`): a write past `limit` bytes fails with EFBIG, as a file
    past FAT32's 4 GB does (Python ignores SIGXFSZ)."""
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]),) * 2); "
            "from llama4_export.cli.export import main; sys.argv[1:] = sys.argv[2:]; main()")
    return subprocess.run([sys.executable, "-c", code, str(limit), *args], capture_output=True, text=True, timeout=300)
