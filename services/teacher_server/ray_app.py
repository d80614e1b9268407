"""The TeacherService on Ray Serve: one deployment class, one application per teacher.

    serve run services.teacher_server.ray_app:build_app checkpoint=checkpoints/mlp-l name=mlp-l
    serve run deploy/serve_movielens.yaml          # the three MovieLens teachers

The gRPC contract is the one of proto/ (``ddistill.teacher.v1.TeacherService``): Serve's
gRPC proxy (``grpc_options.grpc_servicer_functions`` naming the generated
``add_TeacherServiceServicer_to_server``) calls the deployment method of the same name
as the RPC, with the parsed request, and sends back the message it returns. Clients add
the metadata ``("application", NAME)`` to pick the teacher when a Serve cluster hosts
more than one application (with a single application Serve routes every call to it).

Requests are decoded, validated and answered by the same request -> job -> reply
functions as the plain grpcio server (``servicer``), computed by the same ``Teacher.compute_*`` methods and the
plain server's batch merging (``batcher.execute``), and errors get the same gRPC status
codes and details, set on Serve's ``grpc_context`` (see ``TeacherDeployment._rpc``). Answer, AnswerVJP
and Predict go through ``@serve.batch``: concurrent requests to one replica are merged
into one forward pass (``max_batch_size`` requests, waiting at most
``batch_wait_timeout_s`` for more, never more than ``max_rows`` rows per pass).

HTTP (Serve's HTTP proxy, under the application's route prefix): /healthz, /spec and
/metrics (this replica's Prometheus metrics, the plain server's ``TeacherMetrics``).

Each replica keeps its own answers' graphs (``keep_graphs``), under ids that name the replica,
and the deployment's router (``ray_routing.KeptGraphRouter``) sends an AnswerVJP naming one to
the replica that kept it; other calls are routed as by Serve's default router. With Ray's direct
ingress on the nodes (``RAY_SERVE_ENABLE_DIRECT_INGRESS=1``), each replica also serves the
TeacherService on a port of its own, with no proxy or router in between (docs/deploy.md, "Without
the proxy": ~1.2x the plain server's latency where the proxy path costs ~3x).

Differences from the plain server: request bytes that do not parse are rejected by
Serve's proxy before they reach us (UNKNOWN, not INVALID_ARGUMENT); the proxy's
message size limit is the ``RAY_SERVE_GRPC_MAX_MESSAGE_SIZE`` environment variable of
the Ray nodes (default 2 GiB), not a per-teacher option; a bearer token (``token_file``,
or ``$DDISTILL_TEACHER_TOKENS`` in the replicas' environment) is checked by the deployment,
after the proxy has parsed the request (the plain server refuses before parsing); Serve's
proxy has no TLS, so terminate TLS in front of it (an ingress or a service mesh sidecar);
grpc.health.v1 is replaced by Serve's own ``ray.serve.RayServeAPIService/Healthz`` and the
HTTP /healthz.
"""

# No ``from __future__ import annotations``: Serve reads ``build_app``'s annotation at run
# time to turn ``serve run ... key=value`` arguments into a ``TeacherAppArgs``.

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal, Optional, Union

import grpc
import torch
from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.config import RequestRouterConfig

from ddistill.teacher.v1 import teacher_pb2 as pb

from .auth import UNAUTHENTICATED_DETAILS, TokenCheck, server_tokens
from .batcher import Job, execute
from .checkpoint import load_teacher
from .kept_graphs import DEFAULT_CAPACITY, DEFAULT_TTL_S, KeptGraphs
from .metrics import TeacherMetrics
from .ray_routing import KeptGraphRouter
from .servicer import (
    answer_job,
    answer_reply,
    grpc_status,
    predict_job,
    predict_reply,
    vjp_job,
    vjp_reply,
)
from .tuning import torch_thread_pool
from .zoo import DTYPE_CHOICES, resolve_device

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH_SIZE = 16  # requests merged into one forward pass
# How long a batch waits for more requests once one is queued. 0: take what is queued and go. A window
# is paid in full by a lone caller (a trainer's step: 2 ms made Serve's Answer 18.3 ms instead of 13.8,
# docs/deploy.md "Ray Serve", where Serve's time goes); calls already queued when a batch forms still merge. With
# 8 and 64 callers the window merged more calls but gave no more throughput: Serve's proxy and router, not
# the teacher, were the bottleneck. A compute-bound teacher shared by many trainers may want a window.
DEFAULT_BATCH_WAIT_S = 0.0


# Serve's gRPC option grpc_servicer_functions: what registers the TeacherService on the proxy's server
SERVICER_FUNCTION = "ddistill.teacher.v1.teacher_pb2_grpc.add_TeacherServiceServicer_to_server"
# A Ray on one machine, for the tests and benches: no cluster token to set up, no usage report sent, and
# 30 s (not 5 and 10) for the proxy to answer Serve's ready and health checks: on 2 busy cores its start-up
# took longer than 5 s, Serve killed and restarted it until serve.start gave up after 60 s.
LOCAL_RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                 "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "30", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "30"}


def direct_ingress_env(grpc_port: int, http_port: int, draining_s: float | None = None) -> dict[str, str]:
    """The Ray nodes' environment for Serve's direct ingress (docs/deploy.md, "Without the proxy"): each
    ingress replica also serves on a port of its own, taken in order from these ranges, so the first
    replica on a node serves gRPC on ``grpc_port``. ``draining_s``: how long a stopping replica stays up
    for a load balancer to deregister it (None: Ray's default, 30 s; 0 where nothing sits in front)."""
    env = {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
           "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(grpc_port),
           "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(grpc_port + 50),
           "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(http_port),
           "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(http_port + 50)}
    if draining_s is not None:
        env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = f"{draining_s:g}"
    return env


def split_by_rows(jobs: list[Job], max_rows: int) -> list[list[Job]]:
    """Consecutive groups of jobs of one ``batch_key`` with at most ``max_rows`` rows each (a job
    alone may have up to ``max_rows``: validation refused bigger ones), so no forward pass exceeds it."""
    groups: list[list[Job]] = []
    rows = 0
    for job in jobs:
        if groups and rows + job.n_rows <= max_rows and job.batch_key == groups[-1][0].batch_key:
            groups[-1].append(job)
            rows += job.n_rows
        else:
            groups.append([job])
            rows = job.n_rows
    return groups


# ---------------------------------------------------------------------------------------
# The deployment
# ---------------------------------------------------------------------------------------

http_app = FastAPI(title="ddistill teacher on Ray Serve", docs_url=None, redoc_url=None)


@serve.deployment(
    name="Teacher",
    ray_actor_options={"num_cpus": 0.5},  # a whole CPU each by default: a 2-core node fits one teacher
    max_ongoing_requests=64,  # enough queued requests per replica for @serve.batch to merge
    health_check_period_s=10,
)
@serve.ingress(http_app)
class TeacherDeployment:
    """One frozen teacher per replica, behind the TeacherService RPCs and /healthz /spec /metrics."""

    def __init__(
        self,
        checkpoint: str,
        name: Optional[str] = None,
        device: str = "auto",
        dtype: str = "float32",
        max_rows: int = 65536,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        batch_wait_timeout_s: float = DEFAULT_BATCH_WAIT_S,
        torch_threads: Optional[int] = None,
        token_file: Optional[str] = None,
        keep_graphs: int = DEFAULT_CAPACITY,
        graph_ttl_s: float = DEFAULT_TTL_S,
    ) -> None:
        tokens = server_tokens(token_file)
        self._token_ok = TokenCheck(tokens) if tokens else None
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.teacher = load_teacher(checkpoint, name=name, device=resolve_device(device), dtype=dtype)
        self.spec = self.teacher.spec.replace(max_rows=max_rows)
        self._spec_proto = self.spec.to_proto()
        self.metrics = TeacherMetrics(self.spec.name)
        replica = serve.get_replica_context().replica_id.unique_id  # graph ids name it, for KeptGraphRouter
        self.graphs = KeptGraphs(keep_graphs, graph_ttl_s, owner=replica)
        self.metrics.watch_kept_graphs(self.graphs)
        self._compute_lock = asyncio.Lock()  # one forward pass at a time, as in the plain server
        self._compute_thread = torch_thread_pool(1, "compute")  # torch_threads applies there too
        self.set_batching(max_batch_size, batch_wait_timeout_s)
        log.info(
            "teacher %s (%s) from %s on %s, batches of up to %d requests / %d rows, waiting %g s",
            self.spec.name, self.spec.family, checkpoint, device, max_batch_size, max_rows, batch_wait_timeout_s,
        )

    def set_batching(self, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        """Requests merged per forward pass, and how long a batch waits for more (also callable
        through a DeploymentHandle)."""
        if max_batch_size < 1 or batch_wait_timeout_s < 0:
            raise ValueError(f"max_batch_size {max_batch_size} must be >= 1, batch_wait_timeout_s >= 0")
        for handler in (self._answer_batch, self._vjp_batch, self._predict_batch):
            handler.set_max_batch_size(max_batch_size)
            handler.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.batching = {"max_batch_size": max_batch_size, "batch_wait_timeout_s": batch_wait_timeout_s}

    def reconfigure(self, user_config: dict) -> None:
        """``user_config`` of the Serve config: max_batch_size and/or batch_wait_timeout_s, changed
        without restarting the replica (keys left out keep their value)."""
        unknown = set(user_config) - set(self.batching)
        if unknown:
            raise ValueError(f"user_config: unknown key(s) {sorted(unknown)}; known: {sorted(self.batching)}")
        batching = {**self.batching, **user_config}
        self.set_batching(int(batching["max_batch_size"]), float(batching["batch_wait_timeout_s"]))

    # -- the TeacherService RPCs: method names equal the RPC names --------------------------

    async def _rpc(self, method: str, grpc_context, reply_type, handle: Callable[[], Awaitable]):
        """Runs one RPC: times and counts it, and maps an error to the plain server's status
        code and details on Serve's gRPC context.

        A bad request (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, CANCELLED) returns an empty reply
        with the code set: the client sees only the status, as with the plain server, and
        Serve's proxy logs no traceback for it. A failure inside the teacher (INTERNAL) is
        raised with the code set; the proxy logs it and sends that code and details. Called
        without a gRPC context (a DeploymentHandle), errors are raised as they are.

        With tokens set, a gRPC call without a valid bearer token gets UNAUTHENTICATED and
        nothing else runs; DeploymentHandle calls come from inside the Ray cluster and pass.
        """
        if self._token_ok is not None and grpc_context is not None:
            if not self._token_ok(grpc_context.invocation_metadata()):
                self.metrics.requests.labels(method, "UNAUTHENTICATED").inc()
                grpc_context.set_code(grpc.StatusCode.UNAUTHENTICATED)
                grpc_context.set_details(UNAUTHENTICATED_DETAILS)
                return reply_type()
        start = time.perf_counter()
        self.metrics.in_flight.inc()
        code = grpc.StatusCode.OK
        try:
            return await handle()
        except asyncio.CancelledError:  # the caller went away; Serve answers CANCELLED
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as err:
            code, details = grpc_status(err, method)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("%s failed", method)
            if grpc_context is None:
                raise
            grpc_context.set_code(code)
            grpc_context.set_details(details)
            if code == grpc.StatusCode.INTERNAL:
                raise
            return reply_type()
        finally:
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(method, code.name).inc()
            self.metrics.latency.labels(method).observe(time.perf_counter() - start)

    async def Describe(self, request: pb.DescribeRequest, grpc_context=None) -> pb.TeacherSpec:
        async def handle():
            return self._spec_proto

        return await self._rpc("Describe", grpc_context, pb.TeacherSpec, handle)

    async def Answer(self, request: pb.AnswerRequest, grpc_context=None) -> pb.AnswerResponse:
        async def handle():
            job, out_dtype = answer_job(self.spec, request)
            result = await self._answer_batch(job)
            self.metrics.rows.labels("Answer").inc(job.n_rows)
            return answer_reply(result, out_dtype)

        return await self._rpc("Answer", grpc_context, pb.AnswerResponse, handle)

    async def AnswerVJP(self, request: pb.AnswerVJPRequest, grpc_context=None) -> pb.AnswerVJPResponse:
        async def handle():
            job, out_dtype = vjp_job(self.spec, request, self.graphs)
            result = await self._vjp_batch(job)
            self.metrics.rows.labels("AnswerVJP").inc(job.n_rows)
            return vjp_reply(result, out_dtype)

        return await self._rpc("AnswerVJP", grpc_context, pb.AnswerVJPResponse, handle)

    async def Predict(self, request: pb.PredictRequest, grpc_context=None) -> pb.PredictResponse:
        async def handle():
            job, out_dtype = predict_job(self.spec, request)
            result = await self._predict_batch(job)
            self.metrics.rows.labels("Predict").inc(job.n_rows)
            return predict_reply(result, out_dtype)

        return await self._rpc("Predict", grpc_context, pb.PredictResponse, handle)

    # -- merged computation -------------------------------------------------------------------
    # One @serve.batch queue per kind (a batch holds one kind of job); the sizes set here are
    # replaced in __init__ / reconfigure.

    @serve.batch(max_batch_size=DEFAULT_MAX_BATCH_SIZE, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_S)
    async def _answer_batch(self, jobs: list[Job]) -> list[tuple]:
        return await self._compute(jobs)

    @serve.batch(max_batch_size=DEFAULT_MAX_BATCH_SIZE, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_S)
    async def _vjp_batch(self, jobs: list[Job]) -> list[tuple]:
        return await self._compute(jobs)

    @serve.batch(max_batch_size=DEFAULT_MAX_BATCH_SIZE, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_S)
    async def _predict_batch(self, jobs: list[Job]) -> list[tuple]:
        return await self._compute(jobs)

    async def _compute(self, jobs: list[Job]) -> list[tuple]:
        """Each job's outputs, computed in merged forward passes of at most max_rows rows, in a
        worker thread: the replica's event loop keeps taking (and validating) requests, which
        queue up for the next batch."""
        results: list[tuple] = []
        loop = asyncio.get_running_loop()
        async with self._compute_lock:
            for group in split_by_rows(jobs, self.spec.max_rows):
                results.extend(await loop.run_in_executor(self._compute_thread, execute, self.teacher, group, self.graphs))
                self.metrics.observe_batch(group[0].metric_kind, len(group), sum(j.n_rows for j in group))
        return results

    # -- HTTP, under the application's route prefix -------------------------------------------

    @http_app.get("/healthz")
    def healthz(self) -> JSONResponse:
        return JSONResponse({"status": "SERVING", "teacher": self.spec.name})

    @http_app.get("/spec")
    def get_spec(self) -> dict:
        return self.spec.to_dict()

    @http_app.get("/metrics")
    def get_metrics(self) -> Response:
        return Response(self.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


# ---------------------------------------------------------------------------------------
# The application builder
# ---------------------------------------------------------------------------------------


class TeacherAppArgs(BaseModel):
    """Arguments of ``build_app`` (``serve run ...:build_app key=value ...``, or ``args:`` of an
    application in a Serve config file). Replica count and actor options given here are the
    defaults; a config file's ``deployments:`` section overrides them."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str = Field(description="teacher checkpoint folder, as seen by the replicas")
    name: Optional[str] = Field(None, description="serve under this name instead of the checkpoint's")
    device: str = Field("auto", description="cpu, cuda, cuda:N or auto (the GPU when the replica has one)")
    dtype: Literal[DTYPE_CHOICES] = Field(
        "float32", description="compute dtype: float32, bfloat16, float16 or auto (bfloat16 where native, else float32)")
    max_rows: int = Field(65536, gt=0, description="rows per request and per forward pass")
    max_batch_size: int = Field(DEFAULT_MAX_BATCH_SIZE, gt=0, description="requests merged into one pass")
    batch_wait_timeout_s: float = Field(DEFAULT_BATCH_WAIT_S, ge=0, description="wait for more requests")
    torch_threads: Optional[int] = Field(None, gt=0, description="torch intra-op threads per replica")
    num_cpus: float = Field(0.5, ge=0, description="CPUs reserved per replica (fractional is fine)")
    num_gpus: float = Field(0, ge=0, description="GPUs per replica (0.5: two replicas share one GPU)")
    num_replicas: Optional[Union[int, str]] = Field(
        None, description="replicas; 'auto' for Serve's default autoscaling; None: 1 unless autoscaling is set"
    )
    min_replicas: Optional[int] = Field(None, ge=0, description="autoscaling: fewest replicas")
    max_replicas: Optional[int] = Field(None, gt=0, description="autoscaling: most replicas")
    target_ongoing_requests: float = Field(8, gt=0, description="autoscaling: ongoing requests per replica")
    max_ongoing_requests: int = Field(64, gt=0, description="requests a replica takes at once")
    token_file: Optional[str] = Field(
        None, description="accepted bearer tokens, one per line, as seen by the replicas (a mounted secret)"
    )
    keep_graphs: int = Field(DEFAULT_CAPACITY, ge=0, description="answers' graphs kept for their AnswerVJP, per replica")
    graph_ttl_s: float = Field(DEFAULT_TTL_S, gt=0, description="seconds a kept graph waits")
    kept_graph_routing: bool = Field(
        True, description="send each AnswerVJP to the replica that kept its graph (KeptGraphRouter); "
                          "false: Serve's default router, which sends it to any replica"
    )


def deployment_options(args: TeacherAppArgs) -> dict[str, Any]:
    """The ``TeacherDeployment.options(...)`` for ``args``."""
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": args.num_cpus, "num_gpus": args.num_gpus},
        "max_ongoing_requests": args.max_ongoing_requests,
        "request_router_config": RequestRouterConfig(request_router_class=KeptGraphRouter)
        if args.kept_graph_routing else RequestRouterConfig(),
    }
    if args.min_replicas is not None or args.max_replicas is not None:
        if args.num_replicas not in (None, "auto"):
            raise ValueError("give num_replicas, or min_replicas/max_replicas for autoscaling, not both")
        low = 1 if args.min_replicas is None else args.min_replicas
        high = max(low, 1) if args.max_replicas is None else args.max_replicas
        if high < low:
            raise ValueError(f"max_replicas {high} < min_replicas {low}")
        options["autoscaling_config"] = {
            "min_replicas": low,
            "max_replicas": high,
            "target_ongoing_requests": args.target_ongoing_requests,
        }
    elif args.num_replicas is not None:
        if isinstance(args.num_replicas, str) and args.num_replicas != "auto":
            options["num_replicas"] = int(args.num_replicas)
        else:
            options["num_replicas"] = args.num_replicas
    return options


def build_app(args: TeacherAppArgs) -> serve.Application:
    """One teacher as a Serve application (``serve run`` passes the key=value arguments)."""
    if not isinstance(args, TeacherAppArgs):
        args = TeacherAppArgs.model_validate(args)
    device = args.device
    if device == "auto" and args.num_gpus == 0:
        device = "cpu"  # no GPU reserved for this replica: do not grab one that another actor owns
    return TeacherDeployment.options(**deployment_options(args)).bind(
        args.checkpoint,
        name=args.name,
        device=device,
        dtype=args.dtype,
        max_rows=args.max_rows,
        max_batch_size=args.max_batch_size,
        batch_wait_timeout_s=args.batch_wait_timeout_s,
        torch_threads=args.torch_threads,
        token_file=args.token_file,
        keep_graphs=args.keep_graphs,
        graph_ttl_s=args.graph_ttl_s,
    )
