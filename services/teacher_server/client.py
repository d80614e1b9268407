"""One interface to a teacher, wherever it runs.

``connect(url)`` gives a ``TeacherEndpoint``:

* ``grpc://HOST:PORT``: ``RemoteTeacher``, a TeacherService client over gRPC
  (``grpcs://`` for TLS; a bearer token and client certificates via ``ClientAuth``).
* ``local:CHECKPOINT_DIR``: ``LocalTeacher``, the same teacher object in this
  process, no server (the embedded default).

Both validate requests the same way (``validation``) and run the same computation
(``Teacher.compute_*``), so a trainer cannot tell them apart except by speed; a
test checks they agree to float tolerance. Errors come back as the same types:
``InvalidRequest`` / ``TooManyRows`` for bad requests, ``TeacherUnavailable`` when
a remote teacher cannot be reached in time, ``Unauthenticated`` when it refuses the
caller's token.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Generic, Protocol, TypeVar

import grpc
import torch

from ddistill.teacher.v1 import teacher_pb2 as pb
from ddistill.teacher.v1 import teacher_pb2_grpc as pb_grpc

from .auth import ClientAuth
from .codec import decode, encode, encode_inputs
from .spec import TeacherSpec
from .validation import (
    InvalidRequest,
    TooManyRows,
    check_cotangents,
    check_inputs,
    check_output_dtype,
    check_question,
)
from .zoo import RawInputs, Teacher

MiB = 1 << 20
T = TypeVar("T")


class TeacherUnavailable(ConnectionError):
    """A remote teacher did not answer (down, unreachable, or past the deadline)."""


class Unauthenticated(PermissionError):
    """A remote teacher refused the call: no token, a wrong token, or a TLS handshake it rejected."""


@dataclass(frozen=True)
class Answer:
    hidden: torch.Tensor  # [N, hidden_size]
    prediction: torch.Tensor  # [N, *prediction_shape]


@dataclass(frozen=True)
class Prediction:
    question: torch.Tensor  # the teacher's own state at the injection point
    hidden: torch.Tensor
    prediction: torch.Tensor


class TeacherEndpoint(Protocol):
    url: str
    spec: TeacherSpec

    def answer(self, question: torch.Tensor, inputs: RawInputs | None = None, keep_graph: bool = False) -> Answer:
        """``keep_graph``: the caller's next ``answer_vjp`` is about this question and these inputs
        (the same inputs object), so the teacher may keep the forward's graph for it: one forward per
        trainer step instead of two. The VJP is the same either way."""

    def answer_vjp(
        self,
        question: torch.Tensor,
        inputs: RawInputs | None = None,
        hidden_cotangent: torch.Tensor | None = None,
        prediction_cotangent: torch.Tensor | None = None,
    ) -> torch.Tensor: ...

    def predict(self, inputs: RawInputs) -> Prediction: ...

    def close(self) -> None: ...


class PendingVJP(Generic[T]):
    """What an endpoint kept from its last answer for the VJP that follows (the answer's graph in this
    process, or its graph id on a server), used only by a VJP about the same question and inputs."""

    def __init__(self) -> None:
        self._kept: tuple[torch.Tensor, object, T] | None = None

    def set(self, question: torch.Tensor, inputs: object, value: T) -> None:
        self._kept = (question.detach().clone(), inputs, value)

    def clear(self) -> None:
        self._kept = None

    def take(self, question: torch.Tensor, inputs: object) -> T | None:
        """The kept value if ``question`` equals the answer's and ``inputs`` is its inputs object; cleared."""
        kept, self._kept = self._kept, None
        if kept is not None and kept[1] is inputs and _same(kept[0], question):
            return kept[2]
        return None


class LocalTeacher:
    """A teacher object in this process behind the endpoint interface (no server).

    The teacher is served as it is (``load_teacher`` returns it frozen), on its own device.
    Results come back as a server's do: on the CPU, half precision widened to float32, and
    copied out of inference mode (the trainer feeds answers into its own autograd graph,
    which cannot save inference tensors for backward); the caller moves them where it works.
    """

    def __init__(self, teacher: Teacher, url: str | None = None, max_rows: int | None = None) -> None:
        self.teacher = teacher
        self.spec = teacher.spec if max_rows is None else teacher.spec.replace(max_rows=max_rows)
        self.url = url or f"local:{teacher.name}"
        # The last answer's graph (keep_graph), for the VJP the trainer asks next about the same question
        # and inputs.
        self._pending = PendingVJP[Callable]()

    def answer(self, question, inputs=None, keep_graph=False) -> Answer:
        n_rows = check_question(self.spec, question)
        checked, _ = check_inputs(self.spec, inputs or {}, n_rows, for_answer=True)
        self._pending.clear()
        if not keep_graph or n_rows > self.teacher.chunk_rows:
            return Answer(*(_returned(t) for t in self.teacher.compute_answer(question, checked)))
        hidden, prediction, vjp = self.teacher.compute_answer_for_vjp(question, checked)
        self._pending.set(question, inputs, vjp)
        return Answer(_returned(hidden), _returned(prediction))

    def answer_vjp(self, question, inputs=None, hidden_cotangent=None, prediction_cotangent=None) -> torch.Tensor:
        n_rows = check_question(self.spec, question)
        checked, _ = check_inputs(self.spec, inputs or {}, n_rows, for_answer=True)
        check_cotangents(self.spec, n_rows, hidden_cotangent, prediction_cotangent)
        vjp = self._pending.take(question, inputs)
        if vjp is not None:
            return _returned(vjp(hidden_cotangent, prediction_cotangent))
        grad = self.teacher.compute_answer_vjp(question, checked, hidden_cotangent, prediction_cotangent)
        return _returned(grad)

    def predict(self, inputs) -> Prediction:
        inputs, n_rows = check_inputs(self.spec, inputs, None, for_answer=False)
        return Prediction(*(_returned(t) for t in self.teacher.compute_predict(inputs, n_rows)))

    def close(self) -> None:
        pass


def service_config(attempts: int) -> str:
    """gRPC's own retry policy: retry UNAVAILABLE with exponential backoff (attempts=1: no retries).

    The deadline is passed per call, not as the service config's ``timeout``: grpcio 1.85
    fails every call at once with DEADLINE_EXCEEDED when that timeout is under ~1.5 s.
    """
    method: dict = {"name": [{"service": "ddistill.teacher.v1.TeacherService"}]}
    if attempts > 1:
        method["retryPolicy"] = {
            "maxAttempts": attempts,
            "initialBackoff": "0.1s",
            "maxBackoff": "2s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        }
    return json.dumps({"methodConfig": [method]})


class RemoteTeacher:
    """A TeacherService client for one endpoint.

    ``wire_dtype`` is the dtype questions, cotangents and answers travel in
    ("float32"; "bfloat16" or "float16" halve the bytes, and their results come back as
    float32; "float64" for gradient checks against a float64 teacher).
    """

    def __init__(
        self,
        target: str,
        *,
        timeout_s: float = 60.0,
        attempts: int = 4,
        wire_dtype: str = "float32",
        max_message_mb: int = 256,
        connect_timeout_s: float | None = 30.0,
        auth: ClientAuth | None = None,
    ) -> None:
        self.target = target
        self.auth = auth = auth or ClientAuth()
        self.url = f"{'grpcs' if auth.tls else 'grpc'}://{target}"
        self.timeout_s = timeout_s
        self._metadata = auth.metadata()
        self.wire_dtype = check_output_dtype(wire_dtype, "float32")
        size = max_message_mb * MiB
        self.channel = auth.channel(
            target,
            [
                ("grpc.max_receive_message_length", size),
                ("grpc.max_send_message_length", size),
                ("grpc.service_config", service_config(attempts)),
                ("grpc.enable_retries", 1),
            ],
        )
        self.stub = pb_grpc.TeacherServiceStub(self.channel)
        self._pending = PendingVJP[str]()  # the graph id the server kept for the last answer (keep_graph)
        self.graph_vjps = 0  # AnswerVJPs sent as a kept graph's id and cotangents
        self.graphs_missed = 0  # of those, the ones whose graph was gone (NOT_FOUND), sent again in full
        if connect_timeout_s is not None:
            try:
                grpc.channel_ready_future(self.channel).result(timeout=connect_timeout_s)
            except grpc.FutureTimeoutError:
                self.channel.close()
                raise TeacherUnavailable(f"teacher at {target} not reachable within {connect_timeout_s:g}s") from None
        self.spec = TeacherSpec.from_proto(self._call(self.stub.Describe, pb.DescribeRequest()))

    def _call(self, method, request):
        try:
            return method(request, timeout=self.timeout_s, metadata=self._metadata)
        except grpc.RpcError as err:
            raise _translate(err, self.target) from None

    def _request(self, message, question, inputs):
        """Fill a request in place (building sub-messages and assigning them would copy the bytes again)."""
        encode(question, self.wire_dtype, out=message.question)
        encode_inputs(inputs or {}, out=message.inputs)
        message.output_dtype = self.wire_dtype
        return message

    def answer(self, question, inputs=None, keep_graph=False) -> Answer:
        request = self._request(pb.AnswerRequest(), question, inputs)
        request.keep_graph = keep_graph and self.spec.supports_vjp
        self._pending.clear()
        reply = self._call(self.stub.Answer, request)
        if reply.graph_id:
            self._pending.set(question, inputs, reply.graph_id)
        return Answer(_to_float(decode(reply.hidden, "hidden")), _to_float(decode(reply.prediction, "prediction")))

    def answer_vjp(self, question, inputs=None, hidden_cotangent=None, prediction_cotangent=None) -> torch.Tensor:
        """From the server's kept graph when the last answer left one for this question and inputs;
        otherwise, or when the server no longer has it (NOT_FOUND), with the question and inputs.
        The graph id also travels as the ``session_id`` metadata, which routers in front of several
        replicas read to reach the one that kept it (``ray_routing``); a single server ignores it."""
        graph_id = self._pending.take(question, inputs)
        if graph_id is not None:
            self.graph_vjps += 1
            request = self._cotangents(pb.AnswerVJPRequest(graph_id=graph_id, output_dtype=self.wire_dtype),
                                       hidden_cotangent, prediction_cotangent)
            try:
                reply = self.stub.AnswerVJP(request, timeout=self.timeout_s,
                                            metadata=(*(self._metadata or ()), ("session_id", graph_id)))
                return _to_float(decode(reply.question_grad, "question_grad"))
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.NOT_FOUND:
                    raise _translate(err, self.target) from None
                self.graphs_missed += 1
        request = self._cotangents(self._request(pb.AnswerVJPRequest(), question, inputs),
                                   hidden_cotangent, prediction_cotangent)
        reply = self._call(self.stub.AnswerVJP, request)
        return _to_float(decode(reply.question_grad, "question_grad"))

    def _cotangents(self, request: pb.AnswerVJPRequest, hidden_cotangent, prediction_cotangent):
        if hidden_cotangent is not None:
            encode(hidden_cotangent, self.wire_dtype, out=request.hidden_cotangent)
        if prediction_cotangent is not None:
            encode(prediction_cotangent, self.wire_dtype, out=request.prediction_cotangent)
        return request

    def predict(self, inputs) -> Prediction:
        request = pb.PredictRequest(output_dtype="float32")
        encode_inputs(inputs, out=request.inputs)
        reply = self._call(self.stub.Predict, request)
        return Prediction(
            decode(reply.question, "question"), decode(reply.hidden, "hidden"), decode(reply.prediction, "prediction")
        )

    def close(self) -> None:
        self.channel.close()


HALF_DTYPES = (torch.float16, torch.bfloat16)


def _to_float(t: torch.Tensor) -> torch.Tensor:
    """Half-precision results come back as float32; float32 and float64 stay as they are."""
    return t.float() if t.dtype in HALF_DTYPES else t


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)


def _returned(t: torch.Tensor) -> torch.Tensor:
    """An in-process teacher's result as a server would return it: a new float32 (or float64)
    tensor on the CPU, outside inference mode."""
    return t.to("cpu", torch.float32 if t.dtype in HALF_DTYPES else t.dtype, copy=True)


def _translate(err: grpc.RpcError, target: str) -> Exception:
    code, details = err.code(), err.details()
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidRequest(f"{target}: {details}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return TooManyRows(f"{target}: {details}")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return TeacherUnavailable(f"{target}: {code.name}: {details}")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return Unauthenticated(f"{target}: {details}")
    return RuntimeError(f"{target}: {code.name}: {details}")


def connect(url: str, **options) -> TeacherEndpoint:
    """An endpoint from a URL: ``grpc://HOST:PORT``, ``grpcs://HOST:PORT`` (TLS) or ``local:CHECKPOINT_DIR``
    (options ``device`` and ``dtype``, the compute dtype)."""
    if url.startswith("grpc://"):
        return RemoteTeacher(url.removeprefix("grpc://"), **options)
    if url.startswith("grpcs://"):
        options["auth"] = replace(options.get("auth") or ClientAuth(), tls=True)
        return RemoteTeacher(url.removeprefix("grpcs://"), **options)
    if url.startswith("local:"):
        from .checkpoint import load_teacher

        device, dtype = options.pop("device", "cpu"), options.pop("dtype", "float32")
        return LocalTeacher(load_teacher(url.removeprefix("local:"), device=device, dtype=dtype), url=url)
    raise ValueError(f"teacher URL {url!r}: expected grpc://HOST:PORT, grpcs://HOST:PORT or local:CHECKPOINT_DIR")
