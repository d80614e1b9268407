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
