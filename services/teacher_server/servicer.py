"""The TeacherService RPCs: decode, validate against the spec, compute, encode.

Malformed or inconsistent requests get INVALID_ARGUMENT (too many rows:
RESOURCE_EXHAUSTED) with a message saying what was wrong, request bytes that do not
parse included (``add_teacher_service``); an AnswerVJP naming a graph the server no
longer keeps gets NOT_FOUND; a failure inside the model gets INTERNAL. Either way the
server keeps serving.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager

import grpc
import torch
from google.protobuf.message import DecodeError

from ddistill.teacher.v1 import teacher_pb2 as pb
from ddistill.teacher.v1 import teacher_pb2_grpc as pb_grpc

from .batcher import ANSWER, PREDICT, VJP, CallerGone, Job, MicroBatcher
from .codec import WireError, decode, decode_inputs, encode, is_set
from .kept_graphs import GraphNotFound, KeptGraphs
from .metrics import TeacherMetrics
from .spec import TeacherSpec
from .validation import (
    InvalidRequest,
    TooManyRows,
    check_cotangents,
    check_inputs,
    check_output_dtype,
    check_question,
)

log = logging.getLogger(__name__)
# Error messages echo caller strings. gRPC sends them percent-encoded in the grpc-message header
# (3 bytes per byte of a non-ASCII character) and may drop a reply whose headers pass 8 KiB.
MAX_DETAILS_HEADER_BYTES = 4096


class Unparsable:
    """Request bytes that are not a message of the RPC's request type."""

    def __init__(self, type_name: str, error: DecodeError) -> None:
        self.type_name, self.error = type_name, error


def _lenient_parser(message_cls):
    def parse(data: bytes):
        try:
            return message_cls.FromString(data)
        except DecodeError as err:
            return Unparsable(message_cls.DESCRIPTOR.full_name, err)

    return parse


def add_teacher_service(servicer: TeacherServicer, server: grpc.Server) -> None:
    """Registers the TeacherService like the generated ``add_TeacherServiceServicer_to_server``,
    except that request bytes that do not parse reach the servicer (as ``Unparsable``) and get
    INVALID_ARGUMENT, instead of grpcio's INTERNAL "Exception deserializing request!"."""
    service = pb.DESCRIPTOR.services_by_name["TeacherService"]
    handlers = {
        method.name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, method.name),
            request_deserializer=_lenient_parser(getattr(pb, method.input_type.name)),
            response_serializer=getattr(pb, method.output_type.name).SerializeToString,
        )
        for method in service.methods
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


def _header_bytes(char: str) -> int:
    """Bytes ``char`` takes in the percent-encoded grpc-message header."""
    return 1 if " " <= char <= "~" and char != "%" else 3 * len(char.encode("utf-8", "surrogatepass"))


def _details(err: Exception | str) -> str:
    """The error message, cut to fit gRPC's status header."""
    text, used = str(err), 0
    for end, char in enumerate(text):
        used += _header_bytes(char)
        if used > MAX_DETAILS_HEADER_BYTES:
            return text[:end] + "... (truncated)"
    return text


def grpc_status(err: BaseException, method: str) -> tuple[grpc.StatusCode, str]:
    """The gRPC status and details for an error raised while handling ``method``
    (shared by the plain server and the Ray Serve deployment)."""
    if isinstance(err, TooManyRows):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, _details(err)
    if isinstance(err, WireError):  # InvalidRequest and malformed tensors
        return grpc.StatusCode.INVALID_ARGUMENT, _details(err)
    if isinstance(err, GraphNotFound):
        return grpc.StatusCode.NOT_FOUND, _details(err)
    if isinstance(err, CallerGone):
        return grpc.StatusCode.CANCELLED, str(err)
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"teacher ran out of device memory; send fewer rows per request ({err})"
    return grpc.StatusCode.INTERNAL, _details(f"{method} failed inside the teacher: {type(err).__name__}: {err}")


# The request -> job -> reply steps of each RPC, shared with the Ray Serve deployment (ray_app).


def answer_job(spec: TeacherSpec, request: pb.AnswerRequest) -> tuple[Job, str]:
    """A checked Answer request as a batcher job, and the dtype its reply travels in."""
    question = decode(request.question, "question")
    n_rows = check_question(spec, question)
    inputs, _ = check_inputs(spec, decode_inputs(request.inputs), n_rows, for_answer=True)
    out_dtype = check_output_dtype(request.output_dtype, request.question.dtype)
    return Job(ANSWER, n_rows, inputs, question, keep_graph=request.keep_graph and spec.supports_vjp), out_dtype


def vjp_job(spec: TeacherSpec, request: pb.AnswerVJPRequest, graphs: KeptGraphs | None) -> tuple[Job, str]:
    """A checked AnswerVJP request as a batcher job; one naming a kept graph takes it (uses it up)."""
    if not spec.supports_vjp:
        raise InvalidRequest(f"teacher {spec.name} does not offer AnswerVJP")
    if request.graph_id:
        return _kept_vjp_job(spec, request, graphs)
    question = decode(request.question, "question")
    n_rows = check_question(spec, question)
    inputs, _ = check_inputs(spec, decode_inputs(request.inputs), n_rows, for_answer=True)
    hidden_cot, pred_cot = _cotangents(request)
    check_cotangents(spec, n_rows, hidden_cot, pred_cot)
    out_dtype = check_output_dtype(request.output_dtype, request.question.dtype)
    return Job(VJP, n_rows, inputs, question, hidden_cot, pred_cot), out_dtype


def _kept_vjp_job(spec: TeacherSpec, request: pb.AnswerVJPRequest, graphs: KeptGraphs | None) -> tuple[Job, str]:
    if is_set(request.question) or request.HasField("inputs"):
        raise InvalidRequest("AnswerVJP with a graph_id takes cotangents only, not a question or inputs")
    hidden_cot, pred_cot = _cotangents(request)
    present = [c for c in (hidden_cot, pred_cot) if c is not None]
    n_rows = present[0].shape[0] if present and present[0].dim() else 0  # the answer's rows are checked on take
    check_cotangents(spec, n_rows, hidden_cot, pred_cot)
    out_dtype = check_output_dtype(request.output_dtype, "float32")
    if graphs is None:
        raise GraphNotFound("this server keeps no graphs; send the question and inputs")
    kept = graphs.take(request.graph_id, n_rows)  # checked first: a bad request does not use up the graph
    return Job(VJP, n_rows, {}, None, hidden_cot, pred_cot, kept=kept), out_dtype


def _cotangents(request: pb.AnswerVJPRequest) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    hidden_cot = decode(request.hidden_cotangent, "hidden_cotangent") if is_set(request.hidden_cotangent) else None
    pred_cot = (
        decode(request.prediction_cotangent, "prediction_cotangent") if is_set(request.prediction_cotangent) else None
    )
    return hidden_cot, pred_cot


def predict_job(spec: TeacherSpec, request: pb.PredictRequest) -> tuple[Job, str]:
    inputs, n_rows = check_inputs(spec, decode_inputs(request.inputs), None, for_answer=False)
    out_dtype = check_output_dtype(request.output_dtype, "float32")
    return Job(PREDICT, n_rows, inputs), out_dtype


def answer_reply(result: tuple, out_dtype: str) -> pb.AnswerResponse:
    hidden, prediction, *graph_id = result
    reply = pb.AnswerResponse(graph_id=graph_id[0] if graph_id else "")
    encode(hidden, out_dtype, out=reply.hidden)
    encode(prediction, out_dtype, out=reply.prediction)
    return reply


def vjp_reply(result: tuple, out_dtype: str) -> pb.AnswerVJPResponse:
    (grad,) = result
    reply = pb.AnswerVJPResponse()
    encode(grad, out_dtype, out=reply.question_grad)
    return reply


def predict_reply(result: tuple, out_dtype: str) -> pb.PredictResponse:
    reply = pb.PredictResponse()
    for field, tensor in zip(("question", "hidden", "prediction"), result):
        encode(tensor, out_dtype, out=getattr(reply, field))
    return reply


class TeacherServicer(pb_grpc.TeacherServiceServicer):
    def __init__(self, spec: TeacherSpec, batcher: MicroBatcher, metrics: TeacherMetrics) -> None:
        self.spec = spec
        self._spec_proto = self.spec.to_proto()
        self.batcher = batcher
        self.metrics = metrics

    @contextmanager
    def _handling(self, method: str, context: grpc.ServicerContext, request):
        """Times the call, counts it by status code, and maps errors to gRPC statuses."""
        start = time.perf_counter()
        self.metrics.in_flight.inc()
        code = grpc.StatusCode.OK
        try:
            if isinstance(request, Unparsable):
                raise WireError(f"request is not a valid {request.type_name} message: {request.error}")
            yield
        except Exception as err:
            code, details = grpc_status(err, method)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("%s failed", method)
            context.abort(code, details)
        finally:
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(method, code.name).inc()
            self.metrics.latency.labels(method).observe(time.perf_counter() - start)

    def _submit(self, job: Job, context: grpc.ServicerContext):
        job.is_active = context.is_active
        return self.batcher.run(job)

    def Describe(self, request, context):
        with self._handling("Describe", context, request):
            return self._spec_proto

    def Answer(self, request: pb.AnswerRequest, context):
        with self._handling("Answer", context, request):
            job, out_dtype = answer_job(self.spec, request)
            result = self._submit(job, context)
            self.metrics.rows.labels("Answer").inc(job.n_rows)
            return answer_reply(result, out_dtype)

    def AnswerVJP(self, request: pb.AnswerVJPRequest, context):
        with self._handling("AnswerVJP", context, request):
            job, out_dtype = vjp_job(self.spec, request, self.batcher.graphs)
            result = self._submit(job, context)
            self.metrics.rows.labels("AnswerVJP").inc(job.n_rows)
            return vjp_reply(result, out_dtype)

    def Predict(self, request: pb.PredictRequest, context):
        with self._handling("Predict", context, request):
            job, out_dtype = predict_job(self.spec, request)
            result = self._submit(job, context)
            self.metrics.rows.labels("Predict").inc(job.n_rows)
            return predict_reply(result, out_dtype)
