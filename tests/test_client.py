"""The endpoint interface: URLs, unreachable teachers, and one error vocabulary for local and remote."""

import socket
import time

import pytest
import torch

from services.teacher_server.checkpoint import save_teacher
from services.teacher_server.client import LocalTeacher, RemoteTeacher, TeacherUnavailable, connect
from services.teacher_server.validation import InvalidRequest, TooManyRows


def test_connect_local_checkpoint(tmp_path, mlp_teacher):
    folder = save_teacher(mlp_teacher, tmp_path / "t")
    endpoint = connect(f"local:{folder}")
    assert isinstance(endpoint, LocalTeacher) and endpoint.url == f"local:{folder}"
    question = torch.randn(3, *endpoint.spec.question_shape)
    assert torch.equal(endpoint.answer(question).hidden, mlp_teacher.compute_answer(question, {})[0])


def test_local_vjp_after_answer_reuses_its_forward_with_the_same_result(lm_teacher):
    """An in-process teacher keeps the answer's graph for the VJP that follows: the gradient is the one a
    fresh forward gives, and a VJP about another question (or other inputs) is computed afresh."""
    from tests.conftest import TEXTS

    endpoint, inputs = LocalTeacher(lm_teacher), {"text": TEXTS}
    torch.manual_seed(0)
    question = torch.randn(len(TEXTS), *endpoint.spec.question_shape)
    d_hidden, d_pred = torch.randn(len(TEXTS), endpoint.spec.hidden_size), torch.randn(len(TEXTS))
    expected = lm_teacher.compute_answer_vjp(question, inputs, d_hidden, d_pred)
    answer = endpoint.answer(question, inputs, keep_graph=True)
    assert torch.allclose(answer.hidden, lm_teacher.compute_answer(question, inputs)[0], atol=1e-5)
    assert endpoint._pending.take(question, inputs) is not None
    endpoint.answer(question, inputs, keep_graph=True)
    assert torch.allclose(endpoint.answer_vjp(question, inputs, d_hidden, d_pred), expected, atol=1e-6)
    assert endpoint._pending.take(question, inputs) is None  # used once
    endpoint.answer(question, inputs)
    assert endpoint._pending.take(question, inputs) is None  # kept only when asked to
    other = question + 1.0
    endpoint.answer(question, inputs, keep_graph=True)
    assert torch.allclose(endpoint.answer_vjp(other, inputs, d_hidden, d_pred),
                          lm_teacher.compute_answer_vjp(other, inputs, d_hidden, d_pred), atol=1e-6)
    endpoint.answer(question, inputs, keep_graph=True)
    assert not torch.allclose(endpoint.answer_vjp(question, {"text": list(reversed(TEXTS))}, d_hidden, d_pred), expected)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def test_reduced_precision_teacher_computes_in_it_and_answers_in_float32(tmp_path, mlp_teacher):
    from trainer.teachers import identity, open_teacher

    folder = save_teacher(mlp_teacher, tmp_path / "t")
    exact, half = open_teacher(f"local:{folder}"), open_teacher(f"local:{folder}?dtype=bfloat16")
    assert (exact.spec.compute_dtype, half.spec.compute_dtype) == ("float32", "bfloat16")
    assert half.spec.weights_sha256 == exact.spec.weights_sha256  # the same saved weights, cast after the check
    assert identity(half) != identity(exact)  # a run cannot resume on a teacher of another precision
    torch.manual_seed(0)
    question = torch.randn(64, *exact.spec.question_shape)
    d_hidden, d_pred = torch.randn(64, exact.spec.hidden_size), torch.randn(64)
    a, b = exact.answer(question), half.answer(question)
    assert b.hidden.dtype == b.prediction.dtype == torch.float32
    assert not torch.equal(a.prediction, b.prediction)  # it really computed in bfloat16
    assert torch.allclose(b.prediction, a.prediction, atol=0.05) and _cosine(a.hidden, b.hidden) > 0.999
    grad_a = exact.answer_vjp(question, None, d_hidden, d_pred)
    grad_b = half.answer_vjp(question, None, d_hidden, d_pred)
    assert grad_b.dtype == torch.float32 and _cosine(grad_a, grad_b) > 0.99


@pytest.mark.parametrize("url, message", [
    ("local:{folder}?dtype=int8", "compute dtype must be one of"),
    ("grpc://127.0.0.1:1?dtype=bfloat16", "a server takes --dtype"),
    ("grpc://127.0.0.1:1?device=cuda", "a server takes --device"),
    ("local:{folder}?device=tpu9", "device 'tpu9'"),
    ("local:{folder}?device=cuda:7", "CUDA GPU"),
])
def test_teacher_dtype_and_device_options_are_checked(tmp_path, mlp_teacher, url, message):
    from trainer.teachers import open_teacher

    folder = save_teacher(mlp_teacher, tmp_path / "t")
    with pytest.raises(ValueError, match=message):
        open_teacher(url.format(folder=folder))


def test_connect_grpc_url(served_mlp):
    endpoint = connect(f"grpc://127.0.0.1:{served_mlp.port}")
    assert isinstance(endpoint, RemoteTeacher) and endpoint.spec.name == "mlp-tiny"
    endpoint.close()


@pytest.mark.parametrize("url", ["http://x:1", "127.0.0.1:50051", "local-checkpoint"])
def test_connect_refuses_unknown_schemes(url):
    with pytest.raises(ValueError, match="grpc://HOST:PORT, grpcs://HOST:PORT or local:CHECKPOINT_DIR"):
        connect(url)


def test_unreachable_teacher_fails_fast_and_clearly():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    start = time.monotonic()
    with pytest.raises(TeacherUnavailable, match=f"127.0.0.1:{port}"):
        RemoteTeacher(f"127.0.0.1:{port}", connect_timeout_s=1.0)
    assert time.monotonic() - start < 10


@pytest.mark.parametrize("where", ["local", "remote"])
def test_local_and_remote_raise_the_same_errors(where, mlp_teacher, remote_mlp):
    endpoint = LocalTeacher(mlp_teacher, max_rows=4096) if where == "local" else remote_mlp
    width = endpoint.spec.question_shape[0]
    with pytest.raises(InvalidRequest, match="shape"):
        endpoint.answer(torch.randn(2, width + 1))
    with pytest.raises(InvalidRequest, match="NaN"):
        endpoint.answer_vjp(torch.randn(2, width), None, torch.full((2, endpoint.spec.hidden_size), float("nan")))
    with pytest.raises(TooManyRows):
        endpoint.answer(torch.randn(4097, width))
    with pytest.raises(InvalidRequest, match="missing input 'ids'"):
        endpoint.predict({})
