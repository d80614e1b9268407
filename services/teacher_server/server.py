"""``teacher-server``: one frozen teacher behind plain grpcio, plus an HTTP side port.

    teacher-server --checkpoint checkpoints/mlp-l --port 50051 --http-port 8080

gRPC: the TeacherService of proto/, the standard grpc.health.v1 health service
and server reflection (so grpcurl and grpc_health_probe work unchanged). HTTP:
/healthz, /spec, /metrics. SIGTERM drains: health turns NOT_SERVING, in-flight
requests finish (``--grace`` seconds), then the process exits.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch
import uvicorn
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ddistill.teacher.v1 import teacher_pb2 as pb

from .auth import AuthConfigError, BearerTokenInterceptor, ServerTLS, server_tokens
from .batcher import MicroBatcher
from .checkpoint import CheckpointError, load_teacher
from .http_app import build_http_app
from .kept_graphs import DEFAULT_CAPACITY, DEFAULT_TTL_S, KeptGraphs
from .metrics import TeacherMetrics
from .servicer import TeacherServicer, add_teacher_service
from .tuning import torch_thread_pool, tune_allocator
from .zoo import DTYPE_CHOICES, Teacher, resolve_device

log = logging.getLogger("teacher_server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TeacherService"].full_name
HTTP_STARTUP_TIMEOUT_S = 30.0
MiB = 1 << 20


@dataclass
class ServerConfig:
    host: str = "[::]"
    port: int = 50051  # 0: any free port (see TeacherServer.port)
    # None: no HTTP side port; 0 (default): any free port, logged, so that teachers side by side on one host
    # never collide on it (compose and Kubernetes give a fixed one, --http-port 8080)
    http_port: int | None = 0
    max_rows: int = 65536  # rows per request; more gets RESOURCE_EXHAUSTED
    max_message_mb: int = 256  # gRPC send/receive limit, both directions
    grpc_threads: int = 16  # concurrent RPC handlers (the model itself runs on one worker)
    grace_s: float = 10.0
    keep_graphs: int = DEFAULT_CAPACITY  # answers whose graph waits for their AnswerVJP (0: none, recompute)
    graph_ttl_s: float = DEFAULT_TTL_S  # how long a kept graph waits
    tokens: frozenset[str] | None = None  # bearer tokens accepted on TeacherService RPCs; None: no check
    tls: ServerTLS | None = None  # None: plaintext gRPC

    def grpc_options(self) -> list[tuple[str, int]]:
        size = self.max_message_mb * MiB
        # gRPC sets SO_REUSEPORT by default: a second server on a taken port would then start, silently
        # sharing it with the first (each call answered by either teacher); off, the port is refused.
        return [("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size),
                ("grpc.so_reuseport", 0)]


class PortInUse(OSError):
    """A port the server was told to bind is taken; the message names the flag to change."""


class TeacherServer:
    """A running teacher: gRPC server, micro-batcher and optional HTTP side port."""

    def __init__(self, teacher: Teacher, config: ServerConfig | None = None) -> None:
        self.config = config = config or ServerConfig()
        self.teacher = teacher
        self.spec = teacher.spec.replace(max_rows=config.max_rows)
        self.metrics = TeacherMetrics(teacher.name)
        self.graphs = KeptGraphs(config.keep_graphs, config.graph_ttl_s)
        self.metrics.watch_kept_graphs(self.graphs)
        self.batcher = MicroBatcher(teacher, config.max_rows, self.metrics.observe_batch, self.graphs)
        self.health = health.HealthServicer()
        self._serving = False
        interceptors = []
        if config.tokens is not None:
            on_reject = lambda method: self.metrics.requests.labels(method, "UNAUTHENTICATED").inc()  # noqa: E731
            interceptors.append(BearerTokenInterceptor(config.tokens, on_reject))
        self._grpc = grpc.server(
            torch_thread_pool(config.grpc_threads, "rpc"),
            options=config.grpc_options(),
            interceptors=interceptors,
        )
        add_teacher_service(TeacherServicer(self.spec, self.batcher, self.metrics), self._grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self._grpc,
        )
        address = f"{config.host}:{config.port}"
        taken = PortInUse(f"gRPC port {config.port} on {config.host} is taken (another teacher-server?): choose "
                          "another with --port (0: any free port)")
        try:
            if config.tls is None:
                self.port = self._grpc.add_insecure_port(address)
            else:
                self.port = self._grpc.add_secure_port(address, config.tls.credentials())
        except RuntimeError:  # grpcio's "Failed to bind to address"
            raise taken from None
        if self.port == 0:
            raise taken
        self.http_port: int | None = None
        self._http: uvicorn.Server | None = None
        self._http_thread: threading.Thread | None = None

    def start(self) -> TeacherServer:
        self._grpc.start()
        if self.config.http_port is not None:
            self._start_http()
        self._set_serving(True)
        log.info(
            "serving teacher %s (%s, question %s, hidden %d) on gRPC port %d%s",
            self.spec.name, self.spec.family, list(self.spec.question_shape), self.spec.hidden_size, self.port,
            f", HTTP port {self.http_port}" if self.http_port else "",
        )
        log.info("gRPC security: %s", self.security())
        return self

    def security(self) -> str:
        tls = self.config.tls
        transport = "plaintext" if tls is None else ("mutual TLS" if tls.client_ca else "TLS")
        return f"{transport}, {'bearer token required' if self.config.tokens else 'no token check'}"

    def _start_http(self) -> None:
        host = self.config.host.strip("[]") or "::"
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, self.config.http_port))
        except OSError as err:
            sock.close()
            raise PortInUse(f"HTTP side port {self.config.http_port} on {host} is taken ({err.strerror}): choose "
                            "another with --http-port (0: any free port, -1: none)") from None
        self.http_port = sock.getsockname()[1]
        # Listen now, so that a probe arriving before uvicorn's loop is up waits in the backlog
        # instead of being refused; then wait until uvicorn says it serves.
        sock.listen(128)
        app = build_http_app(self.spec, self.metrics, lambda: self._serving)
        self._http = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self._http_thread = threading.Thread(target=self._http.run, kwargs={"sockets": [sock]}, daemon=True)
        self._http_thread.start()
        deadline = time.monotonic() + HTTP_STARTUP_TIMEOUT_S
        while not self._http.started and self._http_thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self._http.started:
            raise RuntimeError(f"the HTTP side port {self.http_port} did not start within {HTTP_STARTUP_TIMEOUT_S} s")

    def _set_serving(self, serving: bool) -> None:
        self._serving = serving
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        self.health.set("", status)
        self.health.set(SERVICE_NAME, status)

    def stop(self, grace: float | None = None) -> None:
        """Drain and stop: NOT_SERVING first, then let in-flight requests finish."""
        self._set_serving(False)
        self._grpc.stop(self.config.grace_s if grace is None else grace).wait()
        self.batcher.close()
        if self._http is not None:
            self._http.should_exit = True
            self._http_thread.join(timeout=5)

    def wait(self) -> None:
        self._grpc.wait_for_termination()

    def __enter__(self) -> TeacherServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop(grace=0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="teacher-server", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, type=Path, help="teacher checkpoint folder (teacher.yaml + model.safetensors)")
    p.add_argument("--name", help="serve under this name instead of the checkpoint's")
    p.add_argument("--host", default="[::]", help="address to bind (default: all interfaces)")
    p.add_argument("--port", type=int, default=50051, help="gRPC port (0: any free port)")
    p.add_argument("--http-port", type=int, default=0,
                   help="HTTP port for /healthz /spec /metrics (default 0: any free port, logged; -1: none)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (default)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32",
                   help="compute in this dtype (auto: bfloat16 where the device computes it natively, else float32; bfloat16: the LM's Answer ~1.9x faster on a bf16 CPU; answers still "
                   "travel in the caller's dtype)")
    p.add_argument("--max-rows", type=int, default=ServerConfig.max_rows, help="rows per request")
    p.add_argument("--max-message-mb", type=int, default=ServerConfig.max_message_mb, help="gRPC message limit")
    p.add_argument("--token-file", type=Path,
                   help="require a bearer token on every TeacherService RPC: accepted tokens, one per line "
                        "(or set $DDISTILL_TEACHER_TOKENS, comma-separated); health stays open")
    p.add_argument("--tls-cert", type=Path, help="serve gRPC over TLS with this PEM certificate chain")
    p.add_argument("--tls-key", type=Path, help="the PEM private key of --tls-cert")
    p.add_argument("--tls-client-ca", type=Path, help="mutual TLS: require client certificates signed by this CA")
    p.add_argument("--keep-graphs", type=int, default=ServerConfig.keep_graphs,
                   help="answers whose autograd graph is kept for the AnswerVJP that follows (0: recompute it)")
    p.add_argument("--graph-ttl", type=float, default=ServerConfig.graph_ttl_s, help="seconds a kept graph waits")
    p.add_argument("--grace", type=float, default=ServerConfig.grace_s, help="seconds to drain on SIGTERM")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None):
        p.error("--tls-cert and --tls-key go together")
    if args.tls_client_ca is not None and args.tls_cert is None:
        p.error("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tune_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        tokens = server_tokens(args.token_file)
        tls = ServerTLS(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
        if tls is not None:
            tls.credentials()  # read the files now: a bad path stops start-up with a clear message
    except AuthConfigError as err:
        log.error("cannot set up authentication: %s", err)
        return 2
    try:
        teacher = load_teacher(args.checkpoint, name=args.name, device=resolve_device(args.device), dtype=args.dtype)
    except (CheckpointError, FileNotFoundError) as err:
        log.error("cannot load teacher: %s", err)
        return 2
    config = ServerConfig(
        host=args.host,
        port=args.port,
        http_port=None if args.http_port < 0 else args.http_port,
        max_rows=args.max_rows,
        max_message_mb=args.max_message_mb,
        grace_s=args.grace,
        keep_graphs=args.keep_graphs,
        graph_ttl_s=args.graph_ttl,
        tokens=tokens,
        tls=tls,
    )
    try:
        server = TeacherServer(teacher, config)
        try:
            server.start()
        except PortInUse:
            server.stop(grace=0)
            raise
    except PortInUse as err:
        log.error("%s", err)
        return 2
    stopped = threading.Event()

    def on_signal(signum, _frame):
        log.info("signal %d: draining", signum)
        threading.Thread(target=lambda: (server.stop(), stopped.set()), daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stopped.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
