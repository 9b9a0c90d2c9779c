"""`llama4-serve ARTIFACT --ray --replicas N`: the same app as a Ray Serve deployment. Each replica is a Ray actor
that loads the artifact and owns its BatchEngine (its KV cache, its sequences); Ray's HTTP proxy routes each request
to one replica. Imported only with --ray: Ray is an optional extra (pip install .[ray]).

Without `address` a new local Ray instance is started (never a cluster that happens to run here) and stopped at the
end. On a cluster, start Ray on every node (`ray start --head` on one, `ray start --address HEAD:6379` on the others),
make the artifact readable at the same path on every node, and run the same command with `--ray-address auto` on a
node of the cluster; with `--gpus-per-replica 1` Ray places one replica per GPU. There the application is deployed
beside the cluster's others and only it is deleted at the end.

/health is a second application at its own route prefix (Ray's proxy takes the longest matching prefix): behind the
first, it waited with the requests or got Ray's 429 when the replicas were full — a load balancer pulled a busy
service — and it spoke for one replica, saying ok while another failed to restart. /metrics is a third (one route
prefix per application, Ray Serve's rule), for the same reasons: a scrape got the 429 exactly when the service was
busy, and each scrape was one replica's series, so counters jumped between replicas as if reset. It answers every
replica's families, as each last reported them, each sample labelled with the replica's rank.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import math
import re
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import ray
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from ray import serve
from ray.serve.config import BackpressureConfig
from ray.serve.exceptions import RayServeException
from ray.serve.schema import ApplicationStatus

from ..errors import ConfigError
from ..runtime.batching import EngineOptions
from .app import ServeSettings, bare_app, create_app, health_response
from .metrics import replicas_exposition
from .server import check_listen_address, check_ray_address, host_port, load_engine

DEPLOYMENT = "llama4-serve"
HEALTH = "/health"
METRICS = "/metrics"
REPORT_S = 0.5  # how often each replica reports its load and metrics: /health and /metrics are this old
GRACEFUL_S = 30.0  # as the single-process server: running requests get this long to finish at shutdown
CANCEL_AHEAD_S = 3.0  # as _DrainingServer's: requests still running this long before the end are cancelled (error events)


@ray.remote(num_cpus=0)
class _Drain:
    """The command's shutdown signal to every replica (a call through Ray Serve reaches one replica, not all), and
    each replica's load and metric families as it last reported them, for /health and /metrics."""

    def __init__(self):
        self._go, self._changed, self._drained, self._reports = False, asyncio.Event(), 0, {}

    def report(self, replica: str, running: int, queued: int, families: list) -> bool:
        """A replica's load and its registry's families now; True once the replicas are to drain."""
        self._reports[replica] = running, queued, families, time.monotonic()
        return self._go

    def _recent(self) -> dict[str, tuple]:
        """The reports of the replicas that reported lately (one that stopped leaves its last report behind)."""
        return {replica: report for replica, report in self._reports.items()
                if time.monotonic() - report[-1] < 4 * REPORT_S}

    def load(self) -> tuple[bool, int, int]:
        """Whether the drain began, and the sequences running and queued on the replicas that reported lately."""
        recent = self._recent().values()
        return self._go, sum(r[0] for r in recent), sum(r[1] for r in recent)

    def families(self) -> list[tuple[str, list]]:
        """(replica, its families) of the replicas that reported lately, by rank."""
        return [(replica, report[2]) for replica, report in sorted(self._recent().items(), key=lambda r: int(r[0]))]

    def start(self) -> None:
        self._go = True

    def drained(self) -> None:
        self._drained += 1
        self._changed.set()

    async def wait_drained(self, replicas: int) -> None:
        while self._drained < replicas:
            self._changed.clear()
            await self._changed.wait()


def _report_until_drain(drain, engine, registry, replica: str) -> None:
    """A replica's load and its registry's families (collected, not rendered: the /metrics application labels them),
    told every REPORT_S, then its side of the shutdown, as the single-process server's: queued requests end at once
    (503 / a stream's error event), new ones get 503, running ones finish, and those still running near the grace's
    end are cancelled so that each ends with its error rather than cut when Ray kills the replica."""

    def report():
        return drain.report.remote(replica, engine.running, engine.queue_depth, list(registry.collect()))

    try:
        while not ray.get(report()):
            time.sleep(REPORT_S)
    except ray.exceptions.RayError:
        return  # the command is gone; the application (on a cluster) serves on
    engine.drain()
    deadline = time.monotonic() + GRACEFUL_S - CANCEL_AHEAD_S
    while engine.running or engine.queue_depth:
        if time.monotonic() > deadline:
            engine.cancel_running()
            deadline = math.inf
        report()
        time.sleep(0.1)
    with contextlib.suppress(ray.exceptions.RayError):
        ray.get(drain.drained.remote())


def replica_seed(seed: int, rank: int) -> int:
    """The seed of replica `rank`'s draws for requests without one: replica 0 draws as the single-process server does,
    the others their own sequences (one shared sequence repeated its "random" answers across replicas)."""
    if rank == 0:
        return seed
    return int.from_bytes(hashlib.sha256(f"{seed}/{rank}".encode()).digest()[:8], "little")


def application(artifact: Path, settings: ServeSettings, replicas: int, options: EngineOptions,
                threads: int | None = None, window: int | None = None, gpus_per_replica: float = 0, drain=None):
    """The bound Ray Serve application: `replicas` copies of the app, each loading the artifact when it starts;
    `drain`: a _Drain actor whose start() begins every replica's drain."""
    artifact = Path(artifact).resolve()  # replicas run in the raylet's working directory, not this one

    def build_app():  # runs inside each replica
        context = serve.get_replica_context()
        rank = context.rank.rank
        replica_settings = dataclasses.replace(settings, seed=replica_seed(settings.seed, rank))
        engine = load_engine(artifact, options, threads, window)
        app = create_app(engine, replica_settings)
        if drain is not None:
            # by rank, not replica id: Ray gives a replacement the rank of the replica it replaces, so a restart is one
            # series' counter reset in /metrics (Prometheus' rate() takes it), not a new series per restart
            threading.Thread(target=_report_until_drain, args=(drain, engine, app.state.metrics.registry, str(rank)),
                             name="llama4-serve-drain", daemon=True).start()
        return app

    deployment = serve.deployment(
        serve.ingress(build_app)(), name=DEPLOYMENT, num_replicas=replicas,
        # Ray sends a replica no more than its rows and queue hold; what no replica can take waits in Ray's proxy, at
        # most --max-queue per replica more (Ray's queue was unbounded, and --max-queue meant nothing), then 429
        max_ongoing_requests=options.max_batch + options.max_queue,
        max_queued_requests=max(1, replicas * options.max_queue),
        backpressure_config=BackpressureConfig(status_code=429, retry_after_s=1),
        graceful_shutdown_timeout_s=GRACEFUL_S, graceful_shutdown_wait_loop_s=0.5,
        ray_actor_options={"num_cpus": threads or 1, "num_gpus": gpus_per_replica},
    )
    return deployment.bind()


def health_application(settings: ServeSettings, name: str, replicas: int, drain):
    """/health for the whole application `name` (deployed at route prefix HEALTH): 200 and status "ok" while all its
    replicas run, 503 "shutting down" once the drain began, 503 "unavailable" with Ray's reason otherwise; running and
    queued summed over the replicas. Its own limits: the replicas' load never holds it up."""

    async def health() -> JSONResponse:
        try:
            draining, running, queued = await drain.load.remote()
        except ray.exceptions.RayError:  # the command is gone; the application (on a cluster) serves on
            draining, running, queued = False, None, None
        problem, up = _unavailable(await asyncio.to_thread(serve.status), name, replicas)  # asks Serve's controller
        status = "shutting down" if draining else "unavailable" if problem else "ok"
        reason = {"reason": problem} if problem and not draining else {}
        return health_response(settings, status, running, queued, replicas=up, **reason)

    return _side_deployment(settings, "health", health)


def metrics_application(settings: ServeSettings, drain):
    """/metrics for every replica (deployed at route prefix METRICS): the families of the replicas that reported lately
    (as /health's load), each sample labelled `replica` with the replica's rank; its own limits, as /health's."""

    async def prometheus() -> Response:
        try:
            replicas = await drain.families.remote()
        except ray.exceptions.RayError:
            return PlainTextResponse("the replicas' reports are gone: the llama4-serve command that deployed them "
                                     "stopped\n", status_code=503)
        return Response(replicas_exposition(replicas), media_type=CONTENT_TYPE_LATEST)

    return _side_deployment(settings, "metrics", prometheus)


def _side_deployment(settings: ServeSettings, what: str, answer):
    """A one-replica deployment beside the replicas', with its own limits and no CPU reserved, whose app answers GET /
    HEAD at its route prefix with `answer`."""

    def build_app():  # runs inside the side replica
        app = bare_app(settings)
        # the proxy hands over e.g. /health with root_path /health: path ""
        app.api_route("", methods=["GET", "HEAD"])(answer)
        return app

    deployment = serve.deployment(serve.ingress(build_app)(), name=f"{DEPLOYMENT}-{what}", num_replicas=1,
                                  max_ongoing_requests=64, ray_actor_options={"num_cpus": 0})
    return deployment.bind()


def _unavailable(status, name: str, replicas: int) -> tuple[str | None, int]:
    """Why application `name` cannot take requests as deployed (None when all its replicas run), and how many run."""
    app = status.applications.get(name)
    if app is None:
        return "the application is not deployed", 0
    deployment = app.deployments.get(DEPLOYMENT)
    up = deployment.replica_states.get("RUNNING", 0) if deployment else 0
    if app.status == ApplicationStatus.RUNNING and deployment and deployment.status == "HEALTHY" and up >= replicas:
        return None, up
    said = next((_last_line(m) for m in (deployment.message if deployment else "", app.message) if m), "")
    return (f"{up} of {replicas} replicas running; Ray Serve: application {app.status.value}"
            + (f", deployment {deployment.status.value}" if deployment else "") + (f": {said}" if said else "")), up


def run(artifact: Path, settings: ServeSettings, host: str, port: int, replicas: int, options: EngineOptions,
        threads: int | None = None, window: int | None = None, gpus_per_replica: float = 0,
        address: str | None = None, on_ready=None) -> None:
    """Deploy on Ray (a new local instance unless `address`), serve until SIGTERM / SIGINT, then drain the replicas
    (queued requests end at once, new ones get 503, running ones finish, up to GRACEFUL_S), delete the application and
    stop the local instance."""
    check_listen_address(host, port, bind=address is None)  # a cluster's Serve proxy may hold the port already
    check_ray_address(address)
    stop = threading.Event()

    def take_signals() -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())

    take_signals()  # a Ctrl-C while Ray starts is taken once it has started
    local = address is None
    try:
        with _own_session() if local else contextlib.nullcontext():
            ray.init(address="local" if local else address, include_dashboard=False, log_to_driver=False)
    except ConnectionError as exc:
        found = str(exc).split(". ")[0].rstrip(".")
        if address != "auto":  # check_ray_address connected: the cluster runs, and refused this driver
            raise ConfigError(f"--ray-address {address}: {found}: the cluster refused the connection, most likely by "
                              "its token authentication; set RAY_AUTH_MODE=token and the cluster's token (RAY_AUTH_TOKEN, "
                              "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)") from None
        raise ConfigError(f"--ray-address {address}: {found}; start the cluster (`ray start --head`), or leave "
                          "--ray-address out for a local instance") from None
    take_signals()  # ray.init installs handlers of its own
    name = f"{DEPLOYMENT}-{settings.model_name}"
    started = deployed = running = False
    drain, sides = None, []
    try:
        if local:
            _check_resources(replicas, threads or 1, gpus_per_replica)
        try:
            serve.start(http_options={"host": host, "port": port})
        except (RayServeException, ray.exceptions.RayError) as exc:  # e.g. the port was taken after the check above
            raise ConfigError(f"{host_port(host, port)}: Ray Serve's proxy could not start ({_last_line(str(exc))}); "
                              "stop what holds the port or choose another --port") from None
        started = True
        drain = _Drain.remote()
        try:
            serve._run(application(artifact, settings, replicas, options, threads, window, gpus_per_replica, drain),
                       _blocking=False, name=name, route_prefix="/")
        except (RayServeException, ray.exceptions.RayError) as exc:  # e.g. another application of the cluster is at "/"
            raise ConfigError(f"Ray Serve refused the deployment: {_last_line(str(exc))}") from None
        deployed = True
        for route, side in ((HEALTH, health_application(settings, name, replicas, drain)),
                            (METRICS, metrics_application(settings, drain))):
            side_name = f"{name}-{route[1:]}"
            try:
                serve._run(side, _blocking=False, name=side_name, route_prefix=route)
            except (RayServeException, ray.exceptions.RayError) as exc:  # e.g. another application is at /health
                raise ConfigError(f"Ray Serve refused the {route} application: {_last_line(str(exc))}") from None
            sides.append(side_name)
        if not all(_wait_until_running(app, local, stop) for app in (name, *sides)):
            return
        running = True
        _check_reachable(host, port)
        if on_ready is not None:
            on_ready()
        stop.wait()
    finally:
        if running:
            # the application answers (503) while its replicas drain: deleted, its path was a plain-text 404
            with contextlib.suppress(ray.exceptions.RayError):
                drain.start.remote()
                ray.get(drain.wait_drained.remote(replicas), timeout=GRACEFUL_S)
        for side in sides:  # deleted beside the main application, not one after another (each took ~2 s)
            serve.delete(side, _blocking=False)
        if deployed:
            serve.delete(name)  # the replicas are idle by now (or past the grace): Ray stops them at once
        for side in sides:
            serve.delete(side)  # returns once it is gone
        if local and started:
            serve.shutdown()
        ray.shutdown()


@contextlib.contextmanager
def _own_session():
    """Start the local Ray's processes (GCS, raylet, ...) in a session of their own: a signal to this command's process
    group (systemd's KillMode=control-group, `timeout`, `kill -- -PGID`) killed them at once, and the command then
    waited 60 s for a GCS that was gone. Now only the command gets it, drains and stops Ray itself. They still die
    with this process (Ray's kernel fate-sharing); where that is missing, Ray's reaper needs them in the group."""
    services = ray._private.services
    popen = getattr(services, "ConsolePopen", None)
    if popen is None or sys.platform == "win32" or not ray._private.utils.detect_fate_sharing_support():
        yield
        return

    class SessionPopen(popen):
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("start_new_session", True)
            super().__init__(*args, **kwargs)

    services.ConsolePopen = SessionPopen
    try:
        yield
    finally:
        services.ConsolePopen = popen


def _count(value: float) -> str:
    """1000000, not :g's 1e+06; a fraction as it is (0.5)."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _check_resources(replicas: int, cpus: int, gpus: float) -> None:
    """A replica Ray cannot place waits for ever: refuse up front what this machine cannot hold."""
    have = ray.cluster_resources()
    for resource, each, flag in (("CPU", cpus, "--threads"), ("GPU", gpus, "--gpus-per-replica")):
        if each and replicas * each > have.get(resource, 0):
            raise ConfigError(f"--replicas {replicas} reserve{'s' if replicas == 1 else ''} {_count(each)} {resource} "
                              f"each ({flag}), {_count(replicas * each)} in all, and this machine has "
                              f"{_count(have.get(resource, 0))}; give fewer replicas or a smaller {flag}")


def _wait_until_running(name: str, local: bool, stop: threading.Event) -> bool:
    """Poll the application until it runs (True) or a signal came (False); ConfigError with Ray's reason when it
    failed, or — on a local instance — when replicas cannot be scheduled (a cluster's autoscaler may still add nodes,
    so there its reason is printed once and the wait goes on)."""
    told = None
    while not stop.wait(0.5):
        app = serve.status().applications.get(name)
        if app is None:
            continue
        if app.status == ApplicationStatus.RUNNING:
            return True
        messages = [app.message] + [d.message for d in app.deployments.values()]
        reason = next((_last_line(m) for m in messages if m), "no reason given")
        if app.status == ApplicationStatus.DEPLOY_FAILED:
            raise ConfigError(f"Ray Serve could not start the replicas: {reason}")
        if "to be scheduled" in reason:
            if local:
                raise ConfigError(f"Ray cannot place the replicas: {reason}")
            if reason != told:
                print(f"waiting for the cluster: {reason}", file=sys.stderr, flush=True)
                told = reason
    return False


def _check_reachable(host: str, port: int) -> None:
    """Ray Serve's HTTP options are fixed when Serve first starts on a cluster: another --port is ignored (a warning in
    Ray's log). Say so instead of announcing an address nothing listens on."""
    url = f"http://{host_port('127.0.0.1' if host in ('0.0.0.0', '::') else host, port)}/health"
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(url, timeout=10):
                return
        except urllib.error.HTTPError:  # something answers there: the proxy
            return
        except OSError:
            if time.monotonic() > deadline:
                raise ConfigError(f"--port {port}: Ray Serve on this cluster listens elsewhere (its host and port are "
                                  "set when Serve first starts there); give that port, or `serve shutdown` first") from None
            time.sleep(0.5)


def _last_line(message: str) -> str:
    """The last non-empty line of Ray's message (a replica's traceback ends with its exception), without the
    exception's qualified name."""
    line = next((line.strip() for line in reversed(message.splitlines()) if line.strip()), message)
    return re.sub(r"^[\w.]+(Exception|Error): ", "", line)
