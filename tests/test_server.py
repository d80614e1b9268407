"""A real teacher server on a loopback port: correct answers, clear errors, standard tooling."""

import json
import threading
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from conftest import TEXTS
from ddistill.teacher.v1 import teacher_pb2 as pb
from ddistill.teacher.v1 import teacher_pb2_grpc as pb_grpc
from services.teacher_server.client import LocalTeacher, RemoteTeacher
from services.teacher_server.codec import decode, encode, encode_inputs
from services.teacher_server.validation import InvalidRequest, TooManyRows


def ids_of(data, n):
    return torch.from_numpy(np.stack([data.test.user[:n], data.test.item[:n]], 1))


# -- remote equals in-process -------------------------------------------------------------


def test_describe_gives_the_teachers_spec(remote_mlp, mlp_teacher):
    assert remote_mlp.spec == mlp_teacher.spec.replace(max_rows=4096)
    assert remote_mlp.spec.weights_sha256 == mlp_teacher.spec.weights_sha256
    assert remote_mlp.spec.protocol == "ddistill.teacher.v1"


def test_mlp_remote_equals_local(remote_mlp, mlp_teacher, synthetic_data):
    local = LocalTeacher(mlp_teacher)
    torch.manual_seed(0)
    question = torch.randn(33, *local.spec.question_shape)
    d_hidden, d_pred = torch.randn(33, local.spec.hidden_size), torch.randn(33)
    remote_answer, local_answer = remote_mlp.answer(question), local.answer(question)
    assert torch.allclose(remote_answer.hidden, local_answer.hidden, atol=1e-6)
    assert torch.allclose(remote_answer.prediction, local_answer.prediction, atol=1e-6)
    assert torch.allclose(
        remote_mlp.answer_vjp(question, None, d_hidden, d_pred), local.answer_vjp(question, None, d_hidden, d_pred),
        atol=1e-6,
    )
    ids = {"ids": ids_of(synthetic_data, 9)}
    for r, l in zip(vars(remote_mlp.predict(ids)).values(), vars(local.predict(ids)).values()):
        assert torch.allclose(r, l, atol=1e-6)


def test_lm_remote_equals_local(remote_lm, lm_teacher):
    local = LocalTeacher(lm_teacher)
    torch.manual_seed(0)
    question = torch.randn(len(TEXTS), 384)
    inputs = {"text": TEXTS}
    remote_answer, local_answer = remote_lm.answer(question, inputs), local.answer(question, inputs)
    assert torch.allclose(remote_answer.hidden, local_answer.hidden, atol=1e-5)
    assert torch.allclose(remote_answer.prediction, local_answer.prediction, atol=1e-5)
    d_hidden, d_pred = torch.randn(len(TEXTS), 384), torch.randn(len(TEXTS))
    assert torch.allclose(
        remote_lm.answer_vjp(question, inputs, d_hidden, d_pred), local.answer_vjp(question, inputs, d_hidden, d_pred),
        atol=1e-5,
    )
    own = remote_lm.predict(inputs)
    assert torch.allclose(remote_lm.answer(own.question, inputs).hidden, own.hidden, atol=1e-5)


def test_remote_vjp_is_the_gradient_of_remote_answers(mlp_teacher):
    """Finite differences through the wire, float64 end to end (a float64 teacher)."""
    import copy

    from services.teacher_server.server import ServerConfig, TeacherServer

    teacher = copy.deepcopy(mlp_teacher).double()
    with TeacherServer(teacher, ServerConfig(host="127.0.0.1", port=0, http_port=None)) as server:
        remote = RemoteTeacher(f"127.0.0.1:{server.port}", wire_dtype="float64")
        torch.manual_seed(3)
        q = torch.randn(3, *teacher.spec.question_shape, dtype=torch.float64)
        d_hidden = torch.randn(3, teacher.spec.hidden_size, dtype=torch.float64)
        d_pred = torch.randn(3, dtype=torch.float64)
        grad = remote.answer_vjp(q, None, d_hidden, d_pred).double()

        def objective(question):
            answer = remote.answer(question)
            return float((answer.hidden.double() * d_hidden).sum() + (answer.prediction.double() * d_pred).sum())

        for _ in range(3):
            v = torch.randn_like(q)
            numeric = (objective(q + 1e-6 * v) - objective(q - 1e-6 * v)) / 2e-6
            assert numeric == pytest.approx(float((grad * v).sum()), rel=1e-6, abs=1e-8)
        remote.close()


@pytest.mark.parametrize("wire", ["bfloat16", "float16"])
def test_half_precision_wire_is_close_to_float32(served_mlp, mlp_teacher, wire):
    remote = RemoteTeacher(f"127.0.0.1:{served_mlp.port}", wire_dtype=wire)
    question = torch.randn(16, *remote.spec.question_shape)
    exact = LocalTeacher(mlp_teacher).answer(question)
    answer = remote.answer(question)
    assert answer.hidden.dtype == torch.float32
    tolerance = 0.05 if wire == "bfloat16" else 0.01
    assert torch.allclose(answer.hidden, exact.hidden, atol=tolerance, rtol=tolerance)
    assert not torch.equal(answer.hidden, exact.hidden)  # it really travelled in half precision
    remote.close()


def test_lm_in_bfloat16_answers_as_in_float32(lm_teacher):
    """The LM served in bfloat16 (``teacher-server --dtype bfloat16``, faster on a bf16 CPU or a GPU)
    gives the float32 answers to ~2 significant digits and a question gradient in the same direction."""
    import copy

    from services.teacher_server.server import ServerConfig, TeacherServer

    half = copy.deepcopy(lm_teacher).to(torch.bfloat16)
    with TeacherServer(half, ServerConfig(host="127.0.0.1", port=0, http_port=None)) as server:
        remote = RemoteTeacher(f"127.0.0.1:{server.port}", timeout_s=60)
        assert remote.spec.compute_dtype == "bfloat16"
        inputs = {"text": TEXTS}
        torch.manual_seed(0)
        own = LocalTeacher(lm_teacher).predict(inputs)
        question = own.question + 0.1 * torch.randn_like(own.question)
        d_hidden, d_pred = torch.randn_like(own.hidden), torch.randn(len(TEXTS))
        exact, answer = LocalTeacher(lm_teacher).answer(question, inputs), remote.answer(question, inputs)
        assert answer.hidden.dtype == torch.float32
        assert torch.allclose(answer.prediction, exact.prediction, atol=0.05)
        assert torch.nn.functional.cosine_similarity(answer.hidden, exact.hidden).min() > 0.99
        grad = remote.answer_vjp(question, inputs, d_hidden, d_pred)
        expected = LocalTeacher(lm_teacher).answer_vjp(question, inputs, d_hidden, d_pred)
        assert torch.nn.functional.cosine_similarity(grad, expected).min() > 0.95
        remote.close()


def test_server_cli_serves_in_the_dtype_it_is_given(teacher_dirs):
    from conftest import free_port, start_teacher_server

    port = free_port()
    server = start_teacher_server(teacher_dirs["mlp-m"], port, "--dtype", "bfloat16")
    try:
        remote = RemoteTeacher(f"127.0.0.1:{port}")
        assert remote.spec.compute_dtype == "bfloat16"
        answer = remote.answer(torch.randn(4, *remote.spec.question_shape))
        assert answer.prediction.dtype == torch.float32 and bool(torch.isfinite(answer.prediction).all())
        remote.close()
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_concurrent_requests_are_merged_and_each_gets_its_own_answer(served_mlp, mlp_teacher):
    local = LocalTeacher(mlp_teacher)
    questions = [torch.randn(5 + i, *local.spec.question_shape) for i in range(24)]
    results = [None] * len(questions)
    merged_before = served_mlp.metrics.merged.labels("answer")._value.get()

    def call(i):
        client = RemoteTeacher(f"127.0.0.1:{served_mlp.port}")
        for _ in range(5):
            results[i] = client.answer(questions[i])
        client.close()

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(questions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for question, answer in zip(questions, results):
        expected = local.answer(question)
        assert torch.allclose(answer.hidden, expected.hidden, atol=1e-5)
        assert torch.allclose(answer.prediction, expected.prediction, atol=1e-5)
    assert served_mlp.metrics.merged.labels("answer")._value.get() > merged_before


# -- bad requests: clear status, server keeps serving -----------------------------------------


def raw_stub(server):
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    return channel, pb_grpc.TeacherServiceStub(channel)


def bad_requests(question_dim, hidden_size):
    q = torch.randn(4, question_dim)
    good_q = encode(q)
    return {
        "wrong question width": (
            "Answer", pb.AnswerRequest(question=encode(torch.randn(4, question_dim + 1))), "expected [4, "),
        "question without row axis": ("Answer", pb.AnswerRequest(question=encode(torch.randn(question_dim))), "rows"),
        "bytes do not match shape": (
            "Answer", pb.AnswerRequest(question=pb.Tensor(dtype="float32", shape=[4, question_dim], data=b"\0" * 12)),
            "needs"),
        "unknown dtype": ("Answer", pb.AnswerRequest(question=pb.Tensor(dtype="f32", shape=[1], data=b"")), "dtype"),
        "integer question": ("Answer", pb.AnswerRequest(question=encode(q.long())), "not accepted"),
        "NaN question": ("Answer", pb.AnswerRequest(question=encode(torch.full_like(q, float("nan")))), "NaN"),
        "Inf question": ("Answer", pb.AnswerRequest(question=encode(q / 0)), "Inf"),
        "zero rows": ("Answer", pb.AnswerRequest(question=encode(torch.zeros(0, question_dim))), "no rows"),
        "no question": ("Answer", pb.AnswerRequest(), "question"),
        "unknown input": (
            "Answer", pb.AnswerRequest(question=good_q, inputs=encode_inputs({"pixels": torch.zeros(4, 3)})),
            "unknown input"),
        "bad output dtype": ("Answer", pb.AnswerRequest(question=good_q, output_dtype="int8"), "output_dtype"),
        "no cotangents": ("AnswerVJP", pb.AnswerVJPRequest(question=good_q), "cotangent"),
        "cotangent rows differ": (
            "AnswerVJP",
            pb.AnswerVJPRequest(question=good_q, hidden_cotangent=encode(torch.randn(3, hidden_size))),
            "hidden_cotangent: shape [3"),
        "prediction cotangent shape": (
            "AnswerVJP", pb.AnswerVJPRequest(question=good_q, prediction_cotangent=encode(torch.randn(4, 2))),
            "prediction_cotangent"),
        "predict without ids": ("Predict", pb.PredictRequest(), "missing input 'ids'"),
        "ids of the wrong dtype": (
            "Predict", pb.PredictRequest(inputs=encode_inputs({"ids": torch.zeros(3, 2)})), "dtype float32"),
        "ids of the wrong width": (
            "Predict", pb.PredictRequest(inputs=encode_inputs({"ids": torch.zeros(3, 5, dtype=torch.long)})),
            "per-row shape [5]"),
    }


def test_bad_requests_get_invalid_argument_and_the_server_keeps_serving(served_mlp, remote_mlp, mlp_teacher):
    spec = remote_mlp.spec
    channel, stub = raw_stub(served_mlp)
    cases = bad_requests(spec.question_shape[0], spec.hidden_size)
    for name, (method, request, fragment) in cases.items():
        with pytest.raises(grpc.RpcError) as info:
            getattr(stub, method)(request, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        assert fragment in info.value.details(), f"{name}: {info.value.details()}"
    # Still serving correct answers.
    question = torch.randn(2, *spec.question_shape)
    assert torch.allclose(remote_mlp.answer(question).hidden, LocalTeacher(mlp_teacher).answer(question).hidden, atol=1e-6)
    invalid = served_mlp.metrics.requests.labels("Answer", "INVALID_ARGUMENT")._value.get()
    assert invalid >= sum(1 for m, _, _ in cases.values() if m == "Answer")
    channel.close()


def test_lm_needs_its_text_and_one_per_row(remote_lm):
    question = torch.randn(2, 384)
    with pytest.raises(InvalidRequest, match="missing input 'text'"):
        remote_lm.answer(question)
    with pytest.raises(InvalidRequest, match="has 3 rows, the question has 2"):
        remote_lm.answer(question, {"text": TEXTS})


def test_too_many_rows_is_resource_exhausted(remote_mlp):
    with pytest.raises(TooManyRows, match="at most 4096"):
        remote_mlp.answer(torch.randn(4097, *remote_mlp.spec.question_shape))


def test_oversized_message_is_resource_exhausted(mlp_teacher):
    from services.teacher_server.server import ServerConfig, TeacherServer

    with TeacherServer(mlp_teacher, ServerConfig(host="127.0.0.1", port=0, http_port=None, max_message_mb=1)) as server:
        channel, stub = raw_stub(server)
        big = encode(torch.randn(5000, mlp_teacher.spec.question_shape[0]))  # > 1 MiB
        with pytest.raises(grpc.RpcError) as info:
            stub.Answer(pb.AnswerRequest(question=big), timeout=10)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        small = encode(torch.randn(2, mlp_teacher.spec.question_shape[0]))
        assert len(stub.Answer(pb.AnswerRequest(question=small), timeout=10).hidden.data) > 0
        channel.close()


def test_unknown_proto_fields_are_ignored(served_mlp, remote_mlp):
    channel, stub = raw_stub(served_mlp)
    request = pb.AnswerRequest(question=encode(torch.randn(2, *remote_mlp.spec.question_shape)))
    payload = request.SerializeToString() + b"\xf8\x07\x01"  # field 127, varint 1: not in the schema
    call = channel.unary_unary(
        "/ddistill.teacher.v1.TeacherService/Answer", request_serializer=None,
        response_deserializer=pb.AnswerResponse.FromString,
    )
    assert list(call(payload, timeout=10).hidden.shape) == [2, remote_mlp.spec.hidden_size]
    channel.close()


# -- standard tooling ---------------------------------------------------------------------------


def test_grpc_health_v1(served_mlp):
    channel = grpc.insecure_channel(f"127.0.0.1:{served_mlp.port}")
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "ddistill.teacher.v1.TeacherService"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    channel.close()


def test_server_reflection_lists_the_services(served_mlp):
    channel = grpc.insecure_channel(f"127.0.0.1:{served_mlp.port}")
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    names = {s.name for reply in replies for s in reply.list_services_response.service}
    assert {"ddistill.teacher.v1.TeacherService", "grpc.health.v1.Health"} <= names
    channel.close()


def test_http_side_port(served_mlp, remote_mlp):
    remote_mlp.answer(torch.randn(3, *remote_mlp.spec.question_shape))
    base = f"http://127.0.0.1:{served_mlp.http_port}"
    health = json.loads(urllib.request.urlopen(f"{base}/healthz", timeout=5).read())
    assert health == {"status": "SERVING", "teacher": "mlp-tiny"}
    spec = json.loads(urllib.request.urlopen(f"{base}/spec", timeout=5).read())
    assert spec["question_shape"] == list(remote_mlp.spec.question_shape) and spec["name"] == "mlp-tiny"
    metrics = urllib.request.urlopen(f"{base}/metrics", timeout=5).read().decode()
    for name in ("teacher_requests_total", "teacher_rows_total", "teacher_request_seconds_bucket",
                 "teacher_batch_rows_bucket", "teacher_requests_in_flight"):
        assert name in metrics
    answered = [line for line in metrics.splitlines() if line.startswith('teacher_rows_total{method="Answer"}')]
    assert answered and float(answered[0].split()[-1]) >= 3


def test_stopping_turns_health_not_serving(mlp_teacher):
    from services.teacher_server.server import ServerConfig, TeacherServer

    server = TeacherServer(mlp_teacher, ServerConfig(host="127.0.0.1", port=0, http_port=0)).start()
    url = f"http://127.0.0.1:{server.http_port}/healthz"
    assert urllib.request.urlopen(url, timeout=5).status == 200
    server._set_serving(False)  # the first step of stop(): drain
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(url, timeout=5)
    assert info.value.code == 503
    server.stop(grace=0)


def test_the_server_answers_bit_for_bit_as_the_process_computes(teacher_dirs):
    """Its handler threads compute with the process's torch thread count (``torch_thread_pool``): a
    thread torch has not seen splits a matmul over every core and rounds differently in the last
    bit, and a trainer riding out a teacher restart would then not end as an uninterrupted run."""
    from services.teacher_server.checkpoint import load_teacher
    from services.teacher_server.server import ServerConfig, TeacherServer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    teacher = load_teacher(teacher_dirs["mlp-l"])  # [1024, 512] tower: big enough to be split
    server = TeacherServer(teacher, ServerConfig(host="127.0.0.1", port=0, http_port=None)).start()
    client = RemoteTeacher(f"127.0.0.1:{server.port}", timeout_s=30)
    try:
        torch.manual_seed(0)
        question = torch.randn(16, *teacher.spec.question_shape) * 0.1
        d_hidden = torch.randn(16, teacher.spec.hidden_size)
        local = LocalTeacher(teacher)
        assert torch.equal(client.answer(question).hidden, local.answer(question).hidden)
        assert torch.equal(client.answer_vjp(question, None, d_hidden), local.answer_vjp(question, None, d_hidden))
    finally:
        client.close()
        server.stop(grace=0)
        torch.set_num_threads(threads)


# -- kept graphs: AnswerVJP runs only the backward of the Answer before it ------------------------


def served(teacher, **config):
    from services.teacher_server.server import ServerConfig, TeacherServer

    return TeacherServer(teacher, ServerConfig(host="127.0.0.1", port=0, http_port=None, **config)).start()


def kept_vjp_batches(server) -> float:
    return server.metrics.batches.labels("vjp_kept")._value.get()


def vjp_status(server, code: str) -> float:
    return server.metrics.requests.labels("AnswerVJP", code)._value.get()


@pytest.mark.parametrize("which", ["mlp", "lm"])
def test_a_kept_graph_gives_the_vjp_a_fresh_forward_gives(which, request):
    server, teacher = request.getfixturevalue(f"served_{which}"), request.getfixturevalue(f"{which}_teacher")
    client = RemoteTeacher(f"127.0.0.1:{server.port}", timeout_s=60)
    torch.manual_seed(0)
    n = len(TEXTS)
    inputs = {"text": TEXTS} if which == "lm" else None
    question = torch.randn(n, *teacher.spec.question_shape)
    d_hidden, d_pred = torch.randn(n, teacher.spec.hidden_size), torch.randn(n)
    before = kept_vjp_batches(server)
    answer = client.answer(question, inputs, keep_graph=True)
    expected = LocalTeacher(teacher).answer(question, inputs)
    assert torch.allclose(answer.hidden, expected.hidden, atol=1e-5)
    for cotangents in ((d_hidden, d_pred), (d_hidden, None), (None, d_pred)):
        client.answer(question, inputs, keep_graph=True)
        got = client.answer_vjp(question, inputs, *cotangents)
        assert torch.allclose(got, teacher.compute_answer_vjp(question, inputs or {}, *cotangents), atol=1e-5)
    assert kept_vjp_batches(server) == before + 3  # each VJP ran on its answer's graph
    client.answer(question, inputs)  # not asked to keep: the VJP recomputes, with the same result
    assert torch.allclose(client.answer_vjp(question, inputs, d_hidden, d_pred),
                          teacher.compute_answer_vjp(question, inputs or {}, d_hidden, d_pred), atol=1e-5)
    assert kept_vjp_batches(server) == before + 3
    client.close()


def test_kept_graph_ids_are_used_once_and_checked(mlp_teacher):
    server = served(mlp_teacher)
    channel, stub = raw_stub(server)
    spec = mlp_teacher.spec
    question = torch.randn(4, *spec.question_shape)
    d_hidden = torch.randn(4, spec.hidden_size)
    try:
        reply = stub.Answer(pb.AnswerRequest(question=encode(question), keep_graph=True))
        assert len(reply.graph_id) == 32 and len(server.graphs) == 1
        assert not stub.Answer(pb.AnswerRequest(question=encode(question))).graph_id  # only when asked
        bad = {
            "cotangent rows": (pb.AnswerVJPRequest(graph_id=reply.graph_id, hidden_cotangent=encode(d_hidden[:3])),
                               "cotangents have 3 rows; the answer"),
            "question too": (pb.AnswerVJPRequest(graph_id=reply.graph_id, question=encode(question),
                                                 hidden_cotangent=encode(d_hidden)), "cotangents only"),
            "no cotangents": (pb.AnswerVJPRequest(graph_id=reply.graph_id), "cotangent"),
        }
        for name, (request, message) in bad.items():
            with pytest.raises(grpc.RpcError) as err:
                stub.AnswerVJP(request)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.value.details(), name
        assert len(server.graphs) == 1  # a bad request does not use the graph up
        grad = stub.AnswerVJP(pb.AnswerVJPRequest(graph_id=reply.graph_id, hidden_cotangent=encode(d_hidden)))
        assert torch.allclose(decode(grad.question_grad), mlp_teacher.compute_answer_vjp(question, {}, d_hidden, None),
                              atol=1e-6)
        for graph_id in (reply.graph_id, "f" * 32):  # used up; never kept
            with pytest.raises(grpc.RpcError) as err:
                stub.AnswerVJP(pb.AnswerVJPRequest(graph_id=graph_id, hidden_cotangent=encode(d_hidden)))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND and "send the question and inputs" in err.value.details()
        assert len(server.graphs) == 0
    finally:
        channel.close()
        server.stop(grace=0)


@pytest.mark.parametrize("config", [{"keep_graphs": 2}, {"keep_graphs": 0}, {"graph_ttl_s": 0.05}])
def test_a_graph_the_server_no_longer_keeps_costs_a_resend_not_a_wrong_gradient(config, mlp_teacher):
    """Pushed out by newer answers (capacity 2), never kept (0), or expired: the client gets NOT_FOUND
    (or no graph id) and sends the question again; the gradient is the same."""
    import time

    server = served(mlp_teacher, **config)
    client = RemoteTeacher(f"127.0.0.1:{server.port}", timeout_s=30)
    channel, stub = raw_stub(server)
    torch.manual_seed(1)
    question, d_hidden = torch.randn(5, *mlp_teacher.spec.question_shape), torch.randn(5, mlp_teacher.spec.hidden_size)
    try:
        client.answer(question, keep_graph=True)
        if config.get("keep_graphs") == 2:
            for _ in range(2):
                stub.Answer(pb.AnswerRequest(question=encode(question), keep_graph=True))
        time.sleep(0.1)
        assert len(server.graphs) == {2: 2, 0: 0}.get(config.get("keep_graphs"), 0)
        grad = client.answer_vjp(question, None, d_hidden)
        assert torch.allclose(grad, mlp_teacher.compute_answer_vjp(question, {}, d_hidden, None), atol=1e-6)
        assert kept_vjp_batches(server) == 0
        assert vjp_status(server, "NOT_FOUND") == (0 if config.get("keep_graphs") == 0 else 1)
        assert vjp_status(server, "OK") == 1
    finally:
        channel.close()
        client.close()
        server.stop(grace=0)


def test_merged_answers_share_a_graph_and_each_gets_its_own_vjp(mlp_teacher):
    """Answers merged into one forward keep one graph; each answer's VJP is its rows' gradient, in
    any order, in one backward pass with others or alone; the graph is gone once every answer used it."""
    import gc
    import weakref

    from services.teacher_server.batcher import ANSWER, VJP, Job, execute
    from services.teacher_server.kept_graphs import KeptGraphs

    graphs = KeptGraphs()
    torch.manual_seed(2)
    questions = [torch.randn(n, *mlp_teacher.spec.question_shape) for n in (3, 5, 2)]
    cotangents = [torch.randn(len(q), mlp_teacher.spec.hidden_size) for q in questions]
    results = execute(mlp_teacher, [Job(ANSWER, len(q), {}, q, keep_graph=True) for q in questions], graphs)
    ids = [result[2] for result in results]
    assert len(set(ids)) == 3 and len(graphs) == 3
    parts = [graphs.take(ids[i], len(questions[i])) for i in (2, 0)]
    graph = weakref.ref(parts[0].graph)
    assert parts[1].graph is graph()  # one graph, shared

    def vjps(kept: dict):  # answer index -> its kept rows, in one batch
        jobs = [Job(VJP, len(questions[i]), {}, None, cotangents[i], kept=rows) for i, rows in kept.items()]
        return {i: grad for i, (grad,) in zip(kept, execute(mlp_teacher, jobs))}

    grads = vjps({2: parts[0], 0: parts[1]})
    del parts
    grads |= vjps({1: graphs.take(ids[1], len(questions[1]))})
    for i, (q, d) in enumerate(zip(questions, cotangents)):
        assert torch.allclose(grads[i], mlp_teacher.compute_answer_vjp(q, {}, d, None), atol=1e-6)
    gc.collect()
    assert graph() is None and len(graphs) == 0


def test_graph_ids_name_their_owner():
    """A replica's graph ids start with its name, which a router reads (``ray_routing``); a plain
    server's ids name none."""
    from services.teacher_server.kept_graphs import KeptGraph, KeptGraphs, graph_owner

    graph = KeptGraph(vjp=lambda hidden, prediction: None, n_rows=4)
    (plain,) = KeptGraphs().keep(graph, [slice(0, 4)])
    owned = KeptGraphs(owner="r1a2")
    ids = owned.keep(graph, [slice(0, 2), slice(2, 4)])
    assert graph_owner(plain) is None
    assert [graph_owner(i) for i in ids] == ["r1a2", "r1a2"] and len(set(ids)) == 2
    assert owned.take(ids[1], 2).rows == slice(2, 4)
    with pytest.raises(ValueError, match="must not contain"):
        KeptGraphs(owner="a:b")


def test_two_teachers_on_one_host_just_work_and_a_taken_port_says_which_flag(teacher_dirs):
    """Two teacher-servers side by side with default flags: each gets its own HTTP side port (any free one,
    logged). A gRPC or HTTP port another server holds is refused in one line naming the flag, not a
    traceback; without SO_REUSEPORT off, the second server would silently share the first's gRPC port."""
    import re
    import subprocess
    import time

    from conftest import console_script, free_port

    def serve(checkpoint, *flags):
        return subprocess.Popen([console_script("teacher-server"), "--checkpoint", str(checkpoint), "--host", "127.0.0.1",
                                 "--threads", "1", *flags], stderr=subprocess.PIPE, text=True)

    def http_port(process) -> int:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = process.stderr.readline()
            found = re.search(r"on gRPC port \d+, HTTP port (\d+)", line)
            if found:
                return int(found.group(1))
        raise AssertionError("the server never said which HTTP port it serves on")

    first_port, second_port = free_port(), free_port()
    first = serve(teacher_dirs["mlp-l"], "--port", str(first_port))
    second = None
    try:
        first_http = http_port(first)
        for flags, says in ((["--port", str(first_port)], f"gRPC port {first_port} on 127.0.0.1 is taken"),
                            (["--port", str(second_port), "--http-port", str(first_http)],
                             f"HTTP side port {first_http} on 127.0.0.1 is taken")):
            refused = subprocess.run([console_script("teacher-server"), "--checkpoint", str(teacher_dirs["mlp-m"]),
                                      "--host", "127.0.0.1", *flags], capture_output=True, text=True, timeout=120)
            assert refused.returncode == 2 and says in refused.stderr and "Traceback" not in refused.stderr
            assert ("--port" if "gRPC" in says else "--http-port") in refused.stderr
        second = serve(teacher_dirs["mlp-m"], "--port", str(second_port))
        assert http_port(second) != first_http
        names = []
        for port in (first_port, second_port):
            endpoint = RemoteTeacher(f"127.0.0.1:{port}", connect_timeout_s=60)
            names.append(endpoint.spec.name)
            endpoint.close()
        assert names == ["mlp-l", "mlp-m"]  # each port answers for its own teacher
        with urllib.request.urlopen(f"http://127.0.0.1:{first_http}/healthz", timeout=10) as reply:
            assert reply.status == 200
    finally:
        for process in (first, second):
            if process is not None:
                process.terminate()
                process.wait(timeout=30)
