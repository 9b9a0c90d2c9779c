"""llama4-serve --ray --replicas 2: a local Ray instance on this machine (loopback only), the same openai client as
the single-process server; both replicas answer (X-Served-By), each with the tokens Generator gives alone."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client.parser import text_string_to_metric_families

pytest.importorskip("ray.serve", reason="Ray Serve is not installed here (pip install .[ray])")
httpx = pytest.importorskip("httpx", reason="the serve extra is not installed (pip install .[serve])")
openai = pytest.importorskip("openai", reason="the serve extra is not installed (pip install .[serve])")

from llama4_export import api  # noqa: E402
from llama4_export.runtime import Generator  # noqa: E402

from .conftest import start_llama4_serve  # noqa: E402

MODEL = "tiny"


def wait_until_both_replicas_answer(base: str, seconds: float = 60) -> None:
    """Ray's proxy learns of a replica asynchronously after `serve.run` returns: until it has, it routes everything to
    the one it knows. Poll /v1/models (its X-Served-By names the replica; /health is an application of its own) until
    both have answered."""
    seen, deadline = set(), time.monotonic() + seconds
    while len(seen) < 2:
        assert time.monotonic() < deadline, f"only {sorted(seen)} answered /v1/models within {seconds} s"
        seen.add(httpx.get(f"{base}/v1/models", timeout=10).headers["x-served-by"])
        time.sleep(0.1)


def samples(scrape: httpx.Response) -> dict[str, list]:
    """A /metrics answer read by prometheus_client's own parser: each family's samples, by family name."""
    assert scrape.status_code == 200, scrape.text
    return {family.name: family.samples for family in text_string_to_metric_families(scrape.text)}


def by_replica(samples: list) -> dict[str, float]:
    return {sample.labels["replica"]: sample.value for sample in samples}


def closed_requests(base: str, seconds: float = 30) -> float:
    """The replicas' 499 counts of /v1/completions, summed from a scrape that holds both replicas; 0 if none has
    counted one by then."""
    deadline = time.monotonic() + seconds
    while True:
        families = samples(httpx.get(f"{base}/metrics", timeout=10))
        assert by_replica(families["llama4_running_sequences"]).keys() == {"0", "1"}, families  # one scrape, both
        closed = sum(s.value for s in families["llama4_requests"] if s.name == "llama4_requests_total"
                     and s.labels["endpoint"] == "/v1/completions" and s.labels["status"] == "499")
        if closed or time.monotonic() > deadline:
            return closed
        time.sleep(0.1)


def test_two_ray_replicas_answer_the_openai_client(tmp_path):
    """Both replicas answer, each with Generator's tokens; each replica draws its own seeds for unseeded requests (one
    shared sequence gave every replica's first "random" answer the same text); a client gone mid-request is a 499 in
    /metrics; with the replicas full, /health and /metrics answer for both (they got Ray's 429). SIGTERM to the
    process group drains the replicas as the single-process server does: a queued request gets 503 at once (it
    started once a row was free, and a stream queued past the grace was cut), a new one 503 with an OpenAI error
    (Ray's plain-text 404 once the application was deleted), running streams finish; the command exits 0 (the signal
    killed Ray's GCS too, and it hung 60 s then exited 1)."""
    artifact = tmp_path / MODEL
    api.export_model(artifact, model="scout-tiny", precision="fp32", target="onnxruntime", layers=2, random_weights=True,
                     show_progress=False, quant=api.QuantOptions(report=False))
    # one sequence and three waiting requests per replica: the 8 concurrent prompts below fit, and both get work
    base, process = start_llama4_serve(artifact, "--max-batch", "1", "--max-queue", "3", "--threads", "1", "--ray",
                                       "--replicas", "2", seconds=240, own_group=True)
    try:
        wait_until_both_replicas_answer(base)
        first_sampled = {}
        while len(first_sampled) < 2:
            raw = httpx.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": "A", "max_tokens": 16,
                                                              "temperature": 1.0}, timeout=60)
            first_sampled.setdefault(raw.headers["x-served-by"], raw.json()["choices"][0]["text"])
        assert len(set(first_sampled.values())) == 2, first_sampled

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

        # a non-streamed client gone mid-request counts as 499 on its replica (Ray cancelled the handler before our
        # count ran: no replica ever showed one). One gone while Ray's proxy was still routing it never reached a
        # replica (a loaded CI machine took over 0.25 s once), so the client waits a little longer on a second try;
        # the request must outlast both: 3 choices of 4,000 tokens take a replica's one row about 3 s (one choice
        # alone finished within the second try's wait on an idle machine, and a finished request is no 499)
        for attempt, patience in enumerate((0.25, 0.8), 1):
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{base}/v1/completions", timeout=patience,
                           json={"model": MODEL, "prompt": "A", "max_tokens": 4000, "n": 3, "ignore_eos": True})
            closed = closed_requests(base, seconds=15)
            if closed:
                break
        assert 1 <= closed <= attempt

        # both replicas full (a row and 3 queued requests each) and Ray's queue too (3 per replica): a completion
        # gets Ray's 429, and /health and /metrics still answer for the whole application (they waited or got the
        # 429 with them; a scrape was one replica's series). A request takes its row about 1 s (the first may end
        # before the probe on a loaded machine: then again); the clients give up at 3 s, which cancels those still
        # waiting
        held = {"model": MODEL, "prompt": "A", "max_tokens": 4000, "ignore_eos": True}
        for _ in range(3):
            # one client: creating one (its TLS context) takes ~0.1 s, and 14 made in threads had not all sent in time
            connections = httpx.Limits(max_connections=14)
            with ThreadPoolExecutor(14) as pool, httpx.Client(timeout=3, limits=connections) as holder:
                holding = [pool.submit(holder.post, f"{base}/v1/completions", json=held) for _ in range(14)]
                time.sleep(0.5)  # they reach the replicas and Ray's queue
                refused = None
                with contextlib.suppress(httpx.ReadTimeout):  # the probe was taken: not full any more
                    refused = httpx.post(f"{base}/v1/completions", json=held, timeout=1)
                health = httpx.get(f"{base}/health", timeout=10)
                scrape = httpx.get(f"{base}/metrics", timeout=10)
                for request in holding:  # the first ones finish in time, the rest are given up
                    with contextlib.suppress(httpx.ReadTimeout):
                        request.result()
            idle_by = time.monotonic() + 30
            while (load := httpx.get(f"{base}/health", timeout=10).json())["running"] or load["queued"]:
                assert time.monotonic() < idle_by, f"the abandoned requests still run or wait after 30 s: {load}"
                time.sleep(0.2)  # the replicas cancel the abandoned requests (their loads are reported every 0.5 s)
            if refused is not None and refused.status_code == 429:
                break
        assert refused is not None and refused.status_code == 429, refused and refused.text
        assert health.status_code == 200 and health.json()["status"] == "ok", health.text
        assert health.json()["replicas"] == 2 and health.json()["model"] == MODEL, health.text
        # each replica's one row busy, as each reported it (their reports are at most 0.5 s old)
        assert by_replica(samples(scrape)["llama4_running_sequences"]) == {"0": 1, "1": 1}, scrape.text
        # Ray's router may still count the abandoned requests on one replica and send both streams below to the other
        wait_until_both_replicas_answer(base)

        # a stream running on each replica, and a request queued behind one of them
        streams, served = [], set()
        for _ in range(2):
            raw = client.completions.with_raw_response.create(model=MODEL, prompt="A", max_tokens=4000, stream=True,
                                                               extra_body={"ignore_eos": True})
            served.add(raw.headers["x-served-by"])
            streams.append(iter(raw.parse()))
            streams[-1] = [next(streams[-1])], streams[-1]  # its first chunk: the row is taken
        assert len(served) == 2, served
        with ThreadPoolExecutor(1) as pool:
            queued = pool.submit(httpx.post, f"{base}/v1/completions", timeout=60,
                                 json={"model": MODEL, "prompt": "A", "max_tokens": 5})
            time.sleep(1)  # it reaches a replica (Ray sends a replica up to its rows + queue places)
            os.killpg(process.pid, signal.SIGTERM)  # the whole group, as systemd / `timeout` do: Ray's processes too
            signalled = time.monotonic()
            answer = queued.result()
        # drained as the single-process server: the queue ends at once, new requests get 503, running ones finish
        assert answer.status_code == 503 and time.monotonic() - signalled < 10, answer.text
        late = httpx.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": "A", "max_tokens": 5}, timeout=60)
        assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down", late.text
        health = httpx.get(f"{base}/health", timeout=10)
        assert health.status_code == 503 and health.json()["status"] == "shutting down", health.text
        for chunks, rest in streams:
            chunks += list(rest)
            assert len(chunks) == 4000 and chunks[-1].choices[0].finish_reason == "length"
        code = process.wait(timeout=90)
        assert time.monotonic() - signalled < 60  # Ray's GCS was killed by the group signal: a 60 s wait, exit 1
    finally:
        if process.poll() is None:
            process.kill()
    assert code == 0, process.communicate()[0][-3000:]


@pytest.fixture(scope="module")
def one_layer(tmp_path_factory):
    artifact = tmp_path_factory.mktemp("ray") / MODEL
    api.export_model(artifact, model="scout-tiny", precision="fp32", target="onnxruntime", layers=1, random_weights=True,
                     show_progress=False, quant=api.QuantOptions(report=False))
    return artifact


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_port_taken_before_rays_proxy_binds_it_is_one_line(one_layer):
    """The port is checked before Ray starts, and Ray's proxy binds it seconds later: taken in between, it was a
    traceback (exit 1)."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-c", "from llama4_export.cli.serve import main; main()",
                                str(one_layer), "--ray", "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output = []
        for line in process.stdout:  # Ray has started: the check is behind, Serve's proxy not yet up
            output.append(line)
            if "Started a local Ray instance" in line:
                break
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", port))
            taken.listen()
            output += process.stdout.readlines()
            code = process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert code == 2, "".join(output)[-3000:]
    assert "Traceback" not in "".join(output), "".join(output)[-3000:]
    assert output[-1].startswith(f"error: 127.0.0.1:{port}: Ray Serve's proxy could not start ("), output[-1]


def test_replicas_this_machine_cannot_place_are_refused_in_one_line(one_layer):
    """Ray waits for ever for resources a replica reserves and no node has (and the command ignored Ctrl-C meanwhile):
    on a local instance they are counted first, in whole numbers (:g wrote 1.024e+06)."""
    done = subprocess.run([sys.executable, "-c", "from llama4_export.cli.serve import main; main()", str(one_layer),
                           "--ray", "--replicas", "1000", "--threads", "1024", "--port", str(free_port())],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith(
        "error: --replicas 1000 reserve 1024 CPU each (--threads), 1024000 in all, and this machine has "), done.stderr[-2000:]


def test_health_names_what_ray_serve_says_is_wrong():
    """/health's verdict over Ray Serve's own status objects (what serve.status() returns): ok only while the
    application runs with every replica; otherwise why not, in Ray's words. A replica restarting was ok before (the
    one that answered was fine)."""
    from ray.serve._private.common import DeploymentStatus, DeploymentStatusTrigger
    from ray.serve.schema import ApplicationStatus, ApplicationStatusOverview, DeploymentStatusOverview, ServeStatus

    from llama4_export.serving.ray_serve import DEPLOYMENT, _unavailable

    def status(app_status, deployment_status, replica_states, message=""):
        deployment = DeploymentStatusOverview(status=deployment_status, replica_states=replica_states, message=message,
                                              status_trigger=DeploymentStatusTrigger.HEALTH_CHECK_FAILED)
        return ServeStatus(applications={"app": ApplicationStatusOverview(
            status=app_status, message="", last_deployed_time_s=0.0, deployments={DEPLOYMENT: deployment})})

    healthy = status(ApplicationStatus.RUNNING, DeploymentStatus.HEALTHY, {"RUNNING": 2})
    assert _unavailable(healthy, "app", 2) == (None, 2)
    restarting = status(ApplicationStatus.UNHEALTHY, DeploymentStatus.UNHEALTHY, {"RUNNING": 1, "STARTING": 1},
                        "replica 1 failed its health check\nTraceback (most recent call last): ...\nRuntimeError: the artifact is gone")
    problem, up = _unavailable(restarting, "app", 2)
    assert up == 1 and problem == ("1 of 2 replicas running; Ray Serve: application UNHEALTHY, deployment UNHEALTHY: "
                                   "the artifact is gone"), problem
    assert _unavailable(healthy, "another", 2) == ("the application is not deployed", 0)


def test_replicas_metrics_are_one_exposition_labelled_by_replica():
    """Two registries' families as one /metrics body: prometheus_client's parser reads back each registry's own
    exposition, every sample with its replica's label, and each family once."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

    from llama4_export.serving.metrics import replicas_exposition

    registries = {}
    for replica, scale in (("0", 1), ("1", 3)):
        r = registries[replica] = CollectorRegistry()
        Gauge("llama4_running_sequences", "Sequences holding a row", registry=r).set(scale)
        requests = Counter("llama4_requests", "Finished HTTP requests", ["endpoint", "status"], registry=r)
        requests.labels("/v1/completions", "200").inc(2 * scale)
        requests.labels("/v1/completions", "499" if replica == "1" else "200").inc()  # a label set one replica has
        Histogram("llama4_time_to_first_token_seconds", "From arrival to first token", buckets=(0.1, 1),
                  registry=r).observe(0.5 * scale)
    merged = replicas_exposition((replica, list(r.collect())) for replica, r in registries.items())

    def parsed(text: str, **label) -> dict[str, tuple[str, set]]:
        return {f.name: (f.type, {(s.name, frozenset({**s.labels, **label}.items()), s.value) for s in f.samples})
                for f in text_string_to_metric_families(text)}

    got = parsed(merged.decode())
    alone = [parsed(generate_latest(r).decode(), replica=replica) for replica, r in registries.items()]
    assert got == {name: (kind, alone[0][name][1] | alone[1][name][1]) for name, (kind, _) in alone[0].items()}
    assert merged.decode().count("# TYPE llama4_requests_total counter") == 1
