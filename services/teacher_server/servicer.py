"""The TeacherService RPCs: decode, validate against the spec, compute, encode.

Malformed or inconsistent requests get INVALID_ARGUMENT (too many rows:
RESOURCE_EXHAUSTED) with a message saying what was wrong; a failure inside the
model gets INTERNAL. Either way the server keeps serving.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager

import grpc
import torch

from ddistill.teacher.v1 import teacher_pb2 as pb
from ddistill.teacher.v1 import teacher_pb2_grpc as pb_grpc

from .batcher import ANSWER, PREDICT, VJP, CallerGone, Job, MicroBatcher
from .codec import WireError, decode, decode_inputs, encode, is_set
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


class TeacherServicer(pb_grpc.TeacherServiceServicer):
    def __init__(self, spec: TeacherSpec, batcher: MicroBatcher, metrics: TeacherMetrics) -> None:
        self.spec = spec
        self._spec_proto = self.spec.to_proto()
        self.batcher = batcher
        self.metrics = metrics

    @contextmanager
    def _handling(self, method: str, context: grpc.ServicerContext):
        """Times the call, counts it by status code, and maps errors to gRPC statuses."""
        start = time.perf_counter()
        self.metrics.in_flight.inc()
        code = grpc.StatusCode.OK
        try:
            yield
        except TooManyRows as err:
            code = grpc.StatusCode.RESOURCE_EXHAUSTED
            context.abort(code, str(err))
        except WireError as err:  # InvalidRequest and malformed tensors
            code = grpc.StatusCode.INVALID_ARGUMENT
            context.abort(code, str(err))
        except CallerGone as err:
            code = grpc.StatusCode.CANCELLED
            context.abort(code, str(err))
        except torch.cuda.OutOfMemoryError as err:
            code = grpc.StatusCode.RESOURCE_EXHAUSTED
            context.abort(code, f"teacher ran out of device memory; send fewer rows per request ({err})")
        except Exception as err:
            code = grpc.StatusCode.INTERNAL
            log.exception("%s failed", method)
            context.abort(code, f"{method} failed inside the teacher: {type(err).__name__}: {err}")
        finally:
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(method, code.name).inc()
            self.metrics.latency.labels(method).observe(time.perf_counter() - start)

    def _submit(self, job: Job, context: grpc.ServicerContext):
        job.is_active = context.is_active
        return self.batcher.run(job)

    def Describe(self, request, context):
        with self._handling("Describe", context):
            return self._spec_proto

    def Answer(self, request: pb.AnswerRequest, context):
        with self._handling("Answer", context):
            question = decode(request.question, "question")
            n_rows = check_question(self.spec, question)
            inputs, _ = check_inputs(self.spec, decode_inputs(request.inputs), n_rows, for_answer=True)
            out_dtype = check_output_dtype(request.output_dtype, request.question.dtype)
            hidden, prediction = self._submit(Job(ANSWER, n_rows, inputs, question), context)
            self.metrics.rows.labels("Answer").inc(n_rows)
            reply = pb.AnswerResponse()
            encode(hidden, out_dtype, out=reply.hidden)
            encode(prediction, out_dtype, out=reply.prediction)
            return reply

    def AnswerVJP(self, request: pb.AnswerVJPRequest, context):
        with self._handling("AnswerVJP", context):
            if not self.spec.supports_vjp:
                raise InvalidRequest(f"teacher {self.spec.name} does not offer AnswerVJP")
            question = decode(request.question, "question")
            n_rows = check_question(self.spec, question)
            inputs, _ = check_inputs(self.spec, decode_inputs(request.inputs), n_rows, for_answer=True)
            hidden_cot = decode(request.hidden_cotangent, "hidden_cotangent") if is_set(request.hidden_cotangent) else None
            pred_cot = (
                decode(request.prediction_cotangent, "prediction_cotangent")
                if is_set(request.prediction_cotangent)
                else None
            )
            check_cotangents(self.spec, n_rows, hidden_cot, pred_cot)
            out_dtype = check_output_dtype(request.output_dtype, request.question.dtype)
            (grad,) = self._submit(Job(VJP, n_rows, inputs, question, hidden_cot, pred_cot), context)
            self.metrics.rows.labels("AnswerVJP").inc(n_rows)
            reply = pb.AnswerVJPResponse()
            encode(grad, out_dtype, out=reply.question_grad)
            return reply

    def Predict(self, request: pb.PredictRequest, context):
        with self._handling("Predict", context):
            inputs, n_rows = check_inputs(self.spec, decode_inputs(request.inputs), None, for_answer=False)
            out_dtype = check_output_dtype(request.output_dtype, "float32")
            question, hidden, prediction = self._submit(Job(PREDICT, n_rows, inputs), context)
            self.metrics.rows.labels("Predict").inc(n_rows)
            reply = pb.PredictResponse()
            for field, tensor in (("question", question), ("hidden", hidden), ("prediction", prediction)):
                encode(tensor, out_dtype, out=getattr(reply, field))
            return reply
