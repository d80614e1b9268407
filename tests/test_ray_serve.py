"""The TeacherService on Ray Serve (services/teacher_server/ray_app.py): the same contract,
client and trainer as the plain grpcio server, with @serve.batch merging concurrent calls.

One Ray instance (2 CPUs, no dashboard) and one Serve instance (gRPC and HTTP proxies on free
loopback ports) for the whole module; skipped when Ray is not installed (the ``ray`` extra).
"""

import dataclasses
import json
import os
import re
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import yaml

serve = pytest.importorskip("ray.serve")
import ray  # noqa: E402
from ddistill.teacher.v1 import teacher_pb2 as pb  # noqa: E402
from ray.serve.config import RequestRouterConfig, gRPCOptions  # noqa: E402
from ray.serve.schema import ServeDeploySchema  # noqa: E402

from conftest import console_script, free_port  # noqa: E402
from services.teacher_server.auth import ClientAuth  # noqa: E402
from services.teacher_server.checkpoint import load_teacher  # noqa: E402
from services.teacher_server.client import LocalTeacher, RemoteTeacher, Unauthenticated  # noqa: E402
from services.teacher_server.codec import decode, encode  # noqa: E402
from services.teacher_server.kept_graphs import graph_owner  # noqa: E402
from services.teacher_server.ray_app import (  # noqa: E402
    LOCAL_RAY_ENV,
    SERVICER_FUNCTION,
    TeacherAppArgs,
    build_app,
    deployment_options,
    direct_ingress_env,
)
from services.teacher_server.validation import InvalidRequest, TooManyRows  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MAX_ROWS = 4096


def remote(target: str, application: str | None = None, **options) -> RemoteTeacher:
    return RemoteTeacher(target, timeout_s=30, auth=ClientAuth(application=application), **options)


def _processes_of(session_dir: str) -> dict[int, str]:
    """pid -> command line of the processes whose command line names this Ray session."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if session_dir in cmdline and int(proc.name) != os.getpid():
            found[int(proc.name)] = cmdline
    return found


@dataclasses.dataclass
class Cluster:
    grpc_target: str  # Serve's gRPC proxy
    http_url: str
    checkpoints: dict
    direct_target: str  # the first replica's own gRPC port (direct ingress)


def start_ray(attempts: int = 2) -> None:
    """``ray.init``, tried again once when the local node does not come up in Ray's fixed 30 s
    (seen once on this 2-core machine, raylet without a log line; ray-project/ray#62883, #47087)."""
    for attempt in range(1, attempts + 1):
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            return
        except Exception as err:  # noqa: BLE001 - Ray raises a bare Exception for this
            ray.shutdown()  # stops what the failed start left running
            if attempt == attempts or "timed out during startup" not in str(err):
                raise


@pytest.fixture(scope="module")
def cluster(teacher_dirs):
    grpc_port, http_port, direct_grpc, direct_http = free_port(), free_port(), free_port(), free_port()
    env = {**LOCAL_RAY_ENV, **direct_ingress_env(direct_grpc, direct_http, draining_s=0)}  # apps delete at once
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    start_ray()
    session_dir = ray._private.worker._global_node.get_session_dir_path()
    try:
        serve.start(
            http_options={"host": "127.0.0.1", "port": http_port},
            grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=[SERVICER_FUNCTION]),
        )
        app = build_app({
            "checkpoint": str(teacher_dirs["mlp-l"]), "max_rows": MAX_ROWS, "num_cpus": 0.25, "torch_threads": 1,
        })
        serve.run(app, name="mlp-l", route_prefix="/mlp-l")
        yield Cluster(f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}", teacher_dirs,
                      f"127.0.0.1:{direct_grpc}")
    finally:
        serve.shutdown()
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        deadline = time.monotonic() + 20
        while (left := _processes_of(session_dir)) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in left:  # ours: started by this fixture's ray.init
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        assert not left, f"Ray processes left after ray.shutdown(): {left}"


@pytest.fixture(scope="module")
def local(teacher_dirs):
    return LocalTeacher(load_teacher(teacher_dirs["mlp-l"]), max_rows=MAX_ROWS)


@pytest.fixture(scope="module")
def client(cluster):
    endpoint = remote(cluster.grpc_target, "mlp-l")
    yield endpoint
    endpoint.close()


def http_get(cluster: Cluster, path: str) -> bytes:
    with urllib.request.urlopen(cluster.http_url + path, timeout=10) as response:
        return response.read()


def metric(text: str, name: str, **labels) -> float:
    """A sample's value in a Prometheus exposition (0 when absent)."""
    for line in text.splitlines():
        match = re.match(rf"{name}\{{(.*)\}} (\S+)$", line)
        if match and all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
            return float(match.group(2))
    return 0.0


def questions(spec, rows: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, *spec.question_shape, generator=torch.Generator().manual_seed(seed))


def test_describe_is_the_local_teachers_spec(client, local, cluster):
    assert client.spec == local.spec
    assert client.spec.name == "mlp-l" and client.spec.max_rows == MAX_ROWS
    assert json.loads(http_get(cluster, "/mlp-l/spec")) == json.loads(json.dumps(local.spec.to_dict()))
    assert json.loads(http_get(cluster, "/mlp-l/healthz")) == {"status": "SERVING", "teacher": "mlp-l"}


def test_answer_vjp_and_predict_equal_the_local_teacher(client, local):
    question = questions(local.spec, 7, seed=1)
    got, want = client.answer(question), local.answer(question)
    torch.testing.assert_close(got.hidden, want.hidden, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.prediction, want.prediction, rtol=1e-5, atol=1e-6)

    hidden_cot = torch.randn(7, local.spec.hidden_size)
    pred_cot = torch.randn(7, *local.spec.prediction_shape)
    for kwargs in ({"hidden_cotangent": hidden_cot}, {"prediction_cotangent": pred_cot},
                   {"hidden_cotangent": hidden_cot, "prediction_cotangent": pred_cot}):
        torch.testing.assert_close(client.answer_vjp(question, **kwargs), local.answer_vjp(question, **kwargs),
                                   rtol=1e-5, atol=1e-6)
        client.answer(question, keep_graph=True)  # the VJP then runs on the replica's kept graph
        torch.testing.assert_close(client.answer_vjp(question, **kwargs), local.answer_vjp(question, **kwargs),
                                   rtol=1e-5, atol=1e-6)

    ids = torch.tensor([[1, 2], [3, 4], [5, 6]])
    got, want = client.predict({"ids": ids}), local.predict({"ids": ids})
    for field in ("question", "hidden", "prediction"):
        torch.testing.assert_close(getattr(got, field), getattr(want, field), rtol=1e-5, atol=1e-6)


def test_bad_requests_get_the_plain_servers_status_codes(client, local, cluster):
    def same_error(call, error_type):
        with pytest.raises(error_type) as local_err:
            call(local)
        with pytest.raises(error_type) as remote_err:
            call(client)
        # the client maps INVALID_ARGUMENT / RESOURCE_EXHAUSTED back to these types, details intact
        assert str(remote_err.value) == f"{cluster.grpc_target}: {local_err.value}"

    same_error(lambda t: t.answer(torch.randn(4, 3)), InvalidRequest)
    same_error(lambda t: t.answer(torch.full((2, *local.spec.question_shape), float("nan"))), InvalidRequest)
    same_error(lambda t: t.answer(questions(local.spec, MAX_ROWS + 1, seed=0)), TooManyRows)
    same_error(lambda t: t.answer_vjp(questions(local.spec, 2, seed=0)), InvalidRequest)  # no cotangent
    same_error(lambda t: t.predict({"ids": torch.zeros(2, 3, dtype=torch.int64)}), InvalidRequest)

    # Bytes that are not a request never reach the deployment: Serve's proxy fails to parse them.
    with grpc.insecure_channel(cluster.grpc_target) as channel:
        with pytest.raises(grpc.RpcError) as err:
            channel.unary_unary("/ddistill.teacher.v1.TeacherService/Answer")(b"\xff\xff\xff", timeout=10)
    assert err.value.code() == grpc.StatusCode.UNKNOWN and "DecodeError" in err.value.details()

    metrics = http_get(cluster, "/mlp-l/metrics").decode()
    assert metric(metrics, "teacher_requests_total", method="Answer", code="INVALID_ARGUMENT") >= 2
    assert metric(metrics, "teacher_requests_total", method="Answer", code="RESOURCE_EXHAUSTED") >= 1
    assert client.answer(questions(local.spec, 1, seed=0)).hidden.shape == (1, local.spec.hidden_size)  # still serving


def test_direct_ingress_serves_the_replica_itself_with_the_same_answers_and_errors(cluster, local):
    """The replica's own port (no proxy, no router; ~1.2x the plain server where the proxy costs ~3x,
    docs/deploy.md): the same spec, answers, kept-graph VJPs, predictions and status codes."""
    direct = remote(cluster.direct_target)  # no application metadata: the port is the replica
    assert direct.spec == local.spec
    question = questions(local.spec, 5, seed=3)
    got, want = direct.answer(question, keep_graph=True), local.answer(question)
    torch.testing.assert_close(got.hidden, want.hidden, rtol=1e-5, atol=1e-6)
    cotangent = torch.randn(5, local.spec.hidden_size)
    torch.testing.assert_close(direct.answer_vjp(question, hidden_cotangent=cotangent),
                               local.answer_vjp(question, hidden_cotangent=cotangent), rtol=1e-5, atol=1e-6)
    assert direct.graphs_missed == 0  # one replica behind the port: the VJP found its graph
    ids = torch.tensor([[1, 2], [3, 4]])
    torch.testing.assert_close(direct.predict({"ids": ids}).prediction, local.predict({"ids": ids}).prediction,
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(InvalidRequest) as local_err:
        local.answer(torch.randn(4, 3))
    with pytest.raises(InvalidRequest) as remote_err:
        direct.answer(torch.randn(4, 3))
    assert str(remote_err.value) == f"{cluster.direct_target}: {local_err.value}"
    with pytest.raises(TooManyRows):
        direct.answer(questions(local.spec, MAX_ROWS + 1, seed=0))
    assert direct.answer(questions(local.spec, 1, seed=0)).hidden.shape == (1, local.spec.hidden_size)
    direct.close()


def test_concurrent_requests_are_merged_by_serve_batch(client, local, cluster):
    handle = serve.get_app_handle("mlp-l")
    # what a config file's user_config does, with a wide window so that the merge is certain
    handle.reconfigure.remote({"batch_wait_timeout_s": 0.25}).result()
    with pytest.raises(Exception, match="unknown key"):
        handle.reconfigure.remote({"max_batch": 4}).result()
    try:
        before = http_get(cluster, "/mlp-l/metrics").decode()
        n = 8
        qs = [questions(local.spec, 3 + i, seed=10 + i) for i in range(n)]
        results: list = [None] * n
        barrier = threading.Barrier(n)

        def ask(i):
            barrier.wait()
            results[i] = client.answer(qs[i])

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        after = http_get(cluster, "/mlp-l/metrics").decode()
    finally:
        handle.reconfigure.remote({"batch_wait_timeout_s": 0.002}).result()
    for q, got in zip(qs, results):  # a merged batch gives each caller its own rows
        want = local.answer(q)
        torch.testing.assert_close(got.hidden, want.hidden, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.prediction, want.prediction, rtol=1e-5, atol=1e-6)
    def delta(name):
        return metric(after, name, kind="answer") - metric(before, name, kind="answer")

    batches, merged = delta("teacher_batches_total"), delta("teacher_merged_requests_total")
    assert 1 <= batches < n and merged >= 2, (batches, merged)


def test_train_against_the_ray_serve_teacher(cluster, synthetic_dir, tmp_path):
    """The unchanged trainer CLI: one Serve application answers calls without the metadata."""
    run = tmp_path / "run"
    result = subprocess.run(
        [console_script("ddistill"), "--threads", "1", "train", "--teacher", f"grpc://{cluster.grpc_target}",
         "--teacher", f"local:{cluster.checkpoints['mlp-m']}", "--data", str(synthetic_dir), "--run-dir", str(run),
         "--steps", "40", "--batch-size", "16", "--d-emb", "16", "--d-m", "8", "--gate-warmup", "20",
         "--eval-every", "20", "--checkpoint-every", "40", "--device", "cpu"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout)
    assert out["steps"] == 40 and set(out["teachers"]) == {"mlp-l", "mlp-m"} and out["rows_sent"]["mlp-l"] > 0
    assert np.isfinite(out["test_mse"])
    committee = yaml.safe_load((run / "config.yaml").read_text())["committee"]
    assert committee[0]["url"] == f"grpc://{cluster.grpc_target}" and committee[0]["name"] == "mlp-l"
    metrics = http_get(cluster, "/mlp-l/metrics").decode()
    for method in ("Answer", "AnswerVJP", "Predict"):  # the trainer used every RPC through Serve
        assert metric(metrics, "teacher_requests_total", method=method, code="OK") > 0, method
    assert metric(metrics, "teacher_batches_total", kind="vjp_kept") > 0  # VJPs ran on the answers' graphs


def test_applications_are_picked_by_metadata(cluster, teacher_dirs):
    serve.run(build_app({"checkpoint": str(teacher_dirs["mlp-m"]), "num_cpus": 0.25, "torch_threads": 1}),
              name="mlp-m", route_prefix="/mlp-m")
    try:
        for app in ("mlp-m", "mlp-l"):
            endpoint = remote(cluster.grpc_target, app)
            assert endpoint.spec.name == app
            endpoint.close()
        with pytest.raises(RuntimeError, match="NOT_FOUND"):  # two applications: the proxy needs the name
            remote(cluster.grpc_target, None)
        with pytest.raises(RuntimeError, match="NOT_FOUND"):
            remote(cluster.grpc_target, "no-such-teacher")
        assert json.loads(http_get(cluster, "/mlp-m/spec"))["name"] == "mlp-m"
    finally:
        serve.delete("mlp-m")


def test_vjps_reach_the_replica_that_kept_their_graph(cluster, local):
    """Two replicas: Answers are spread over both, and every AnswerVJP naming a kept graph reaches
    the replica that kept it (``KeptGraphRouter``), over the raw wire contract and through the client;
    Serve's default router sent a VJP to the other replica about every second step."""
    serve.run(build_app({"checkpoint": str(cluster.checkpoints["mlp-l"]), "name": "pair", "num_replicas": 2,
                         "num_cpus": 0.25, "torch_threads": 1}),
              name="pair", route_prefix="/pair")
    try:
        endpoint = remote(cluster.grpc_target, "pair")
        metadata = (("application", "pair"),)
        owners = []
        for step in range(16):
            question = questions(local.spec, 4, seed=step)
            answer = endpoint.stub.Answer(pb.AnswerRequest(question=encode(question), keep_graph=True),
                                          metadata=metadata, timeout=30)
            owners.append(graph_owner(answer.graph_id))
            cotangent = torch.randn(4, *local.spec.prediction_shape)
            vjp = endpoint.stub.AnswerVJP(  # NOT_FOUND (an RpcError) if routed to the other replica
                pb.AnswerVJPRequest(graph_id=answer.graph_id, prediction_cotangent=encode(cotangent)),
                metadata=(*metadata, ("session_id", answer.graph_id)), timeout=30)
            torch.testing.assert_close(decode(vjp.question_grad),
                                       local.answer_vjp(question, prediction_cotangent=cotangent),
                                       rtol=1e-5, atol=1e-6)
        assert None not in owners and len(set(owners)) == 2, owners  # both replicas answered

        for step in range(16):
            question = questions(local.spec, 4, seed=100 + step)
            endpoint.answer(question, keep_graph=True)
            cotangent = torch.randn(4, local.spec.hidden_size)
            torch.testing.assert_close(endpoint.answer_vjp(question, hidden_cotangent=cotangent),
                                       local.answer_vjp(question, hidden_cotangent=cotangent),
                                       rtol=1e-5, atol=1e-6)
        assert endpoint.graphs_missed == 0
        endpoint.close()
    finally:
        serve.delete("pair")


def test_bearer_tokens_are_checked_by_the_deployment(cluster, local, tmp_path):
    token_file = tmp_path / "tokens"
    token_file.write_text("# accepted\nserve-secret\n")
    serve.run(build_app({"checkpoint": str(cluster.checkpoints["mlp-l"]), "name": "guarded", "num_cpus": 0.25,
                         "torch_threads": 1, "token_file": str(token_file)}),
              name="guarded", route_prefix="/guarded")
    try:
        for token in (None, "wrong", "serve-secretx"):
            with pytest.raises(Unauthenticated, match="bearer token"):
                RemoteTeacher(cluster.grpc_target, timeout_s=30, auth=ClientAuth(token=token, application="guarded"))
        endpoint = RemoteTeacher(cluster.grpc_target, timeout_s=30,
                                 auth=ClientAuth(token="serve-secret", application="guarded"))
        question = questions(local.spec, 5, seed=3)
        torch.testing.assert_close(endpoint.answer(question).hidden, local.answer(question).hidden,
                                   rtol=1e-5, atol=1e-6)
        endpoint.close()
        metrics = http_get(cluster, "/guarded/metrics").decode()
        assert metric(metrics, "teacher_requests_total", method="Describe", code="UNAUTHENTICATED") == 3
        assert metric(metrics, "teacher_requests_total", method="Answer", code="OK") == 1
        assert json.loads(http_get(cluster, "/guarded/healthz"))["status"] == "SERVING"  # probes need no secret
    finally:
        serve.delete("guarded")


def test_app_args_and_config_files_are_valid():
    options = deployment_options(TeacherAppArgs(checkpoint="x", min_replicas=1, max_replicas=3, num_gpus=0.5))
    assert options["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 8}
    assert options["ray_actor_options"] == {"num_cpus": 0.5, "num_gpus": 0.5}
    assert deployment_options(TeacherAppArgs(checkpoint="x", num_replicas="2"))["num_replicas"] == 2
    assert options["request_router_config"].request_router_class.endswith("KeptGraphRouter")
    default = deployment_options(TeacherAppArgs(checkpoint="x", kept_graph_routing=False))["request_router_config"]
    assert default.request_router_class == RequestRouterConfig().request_router_class  # Serve's own
    with pytest.raises(ValueError):
        deployment_options(TeacherAppArgs(checkpoint="x", num_replicas=2, max_replicas=3))
    with pytest.raises(ValueError):
        TeacherAppArgs.model_validate({"checkpoint": "x", "no_such_option": 1})

    local_config = yaml.safe_load((REPO / "deploy" / "serve_movielens.yaml").read_text())
    manifests = list(yaml.safe_load_all((REPO / "deploy" / "kuberay-rayservice.yaml").read_text()))
    (rayservice,) = [m for m in manifests if m["kind"] == "RayService"]
    cluster_config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    for config in (local_config, cluster_config):
        schema = ServeDeploySchema.model_validate(config)
        assert schema.grpc_options.grpc_servicer_functions == [SERVICER_FUNCTION]
        assert [a.name for a in schema.applications] == ["mlp-m", "mlp-l", "lm"]
        for app in schema.applications:
            assert app.route_prefix == f"/{app.name}"
            assert app.import_path == "services.teacher_server.ray_app:build_app"
            assert app.args["name"] == app.name
            build_app(app.args)  # binds only: the checkpoint is read by the replicas
            assert [d.name for d in app.deployments] == ["Teacher"]
    assert cluster_config["grpc_options"]["port"] == local_config["grpc_options"]["port"] == 9000
