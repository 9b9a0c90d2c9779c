"""`llama4-serve ARTIFACT --ray --replicas N`: the same app as a Ray Serve deployment. Each replica is a Ray actor
that loads the artifact and owns its BatchEngine (its KV cache, its sequences); Ray's HTTP proxy routes each request
to one replica. Imported only with --ray: Ray is an optional extra (pip install .[ray]).

On one machine `ray.init()` starts a local Ray instance; on a cluster, start Ray on every node (`ray start --head` on
one, `ray start --address HEAD:6379` on the others), make the artifact readable at the same path on every node, and
run the same command with `--ray-address auto` on a node of the cluster; with `--gpus-per-replica 1` Ray places one
replica per GPU.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import ray
from ray import serve

from ..runtime.batching import EngineOptions
from .app import ServeSettings, create_app
from .server import check_listen_address, check_ray_address, load_engine

DEPLOYMENT = "llama4-serve"


def application(artifact: Path, settings: ServeSettings, replicas: int, options: EngineOptions,
                threads: int | None = None, window: int | None = None, gpus_per_replica: float = 0):
    """The bound Ray Serve application: `replicas` copies of the app, each loading the artifact when it starts."""

    def build_app():  # runs inside each replica
        return create_app(load_engine(artifact, options, threads, window), settings)

    deployment = serve.deployment(
        serve.ingress(build_app)(), name=DEPLOYMENT, num_replicas=replicas,
        # a replica takes its requests into its own queue (429 beyond it), so Ray may send it that many at once
        max_ongoing_requests=options.max_batch + options.max_queue,
        ray_actor_options={"num_cpus": threads or 1, "num_gpus": gpus_per_replica},
    )
    return deployment.bind()


def run(artifact: Path, settings: ServeSettings, host: str, port: int, replicas: int, options: EngineOptions,
        threads: int | None = None, window: int | None = None, gpus_per_replica: float = 0,
        address: str | None = None) -> None:
    """Deploy on Ray (a local instance unless `address`), serve until SIGTERM / SIGINT, then shut the deployment and
    the local Ray instance down."""
    check_listen_address(host, port)
    check_ray_address(address)
    ray.init(address=address, include_dashboard=False, log_to_driver=False)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which installs handlers of its own
        signal.signal(signum, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(application(artifact, settings, replicas, options, threads, window, gpus_per_replica),
                  name=DEPLOYMENT, route_prefix="/")
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
