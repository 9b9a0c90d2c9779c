"""llama4-serve --ray --replicas 2: a local Ray instance on this machine (loopback only), the same openai client as
the single-process server; both replicas answer (X-Served-By), each with the tokens Generator gives alone."""

from __future__ import annotations

import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("ray.serve", reason="Ray Serve is not installed here (pip install .[ray])")
httpx = pytest.importorskip("httpx", reason="the serve extra is not installed (pip install .[serve])")
openai = pytest.importorskip("openai", reason="the serve extra is not installed (pip install .[serve])")

from llama4_export import api  # noqa: E402
from llama4_export.runtime import Generator  # noqa: E402

from .conftest import start_llama4_serve  # noqa: E402

MODEL = "tiny"


def wait_until_both_replicas_answer(base: str, seconds: float = 60) -> None:
    """Ray's proxy learns of a replica asynchronously after `serve.run` returns: until it has, it routes everything to
    the one it knows. Poll /health (its X-Served-By names the replica) until both have answered."""
    seen, deadline = set(), time.monotonic() + seconds
    while len(seen) < 2:
        assert time.monotonic() < deadline, f"only {sorted(seen)} answered /health within {seconds} s"
        seen.add(httpx.get(f"{base}/health", timeout=10).headers["x-served-by"])
        time.sleep(0.1)


def test_two_ray_replicas_answer_the_openai_client(tmp_path):
    artifact = tmp_path / MODEL
    api.export_model(artifact, model="scout-tiny", precision="fp32", target="onnxruntime", layers=2, random_weights=True,
                     show_progress=False)
    # one sequence and one waiting request per replica: Ray holds the rest back, so both replicas get work
    base, process = start_llama4_serve(artifact, "--max-batch", "1", "--max-queue", "1", "--threads", "1", "--ray",
                                       "--replicas", "2", seconds=240)
    try:
        wait_until_both_replicas_answer(base)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
        generator = Generator.load(artifact, threads=1)
        prompts = ["The history of", "A", "Once upon a time", "xyz"] * 2
        expected = [generator.generate(p, max_new_tokens=40).text for p in prompts]

        def complete(prompt):
            raw = client.completions.with_raw_response.create(model=MODEL, prompt=prompt, max_tokens=40)
            return raw.parse().choices[0].text, raw.headers["x-served-by"]

        with ThreadPoolExecutor(len(prompts)) as pool:
            texts, served_by = zip(*pool.map(complete, prompts))
        assert list(texts) == expected
        assert len(set(served_by)) == 2, served_by  # answered by both replicas
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    assert code == 0
