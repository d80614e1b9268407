"""The teacher's spec as a typed dataclass, and its mapping to the wire message.

One object describes a teacher to every party: the server validates requests
against it, the trainer sizes its question and answer MLPs from it, and the HTTP
side port shows it as JSON.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ddistill.teacher.v1 import teacher_pb2 as pb

from .codec import FLOAT_DTYPES

PROTOCOL = "ddistill.teacher.v1"
TEXT, IMAGE, TENSOR = "text", "image", "tensor"
REGRESSION, CLASSIFICATION = "regression", "classification"

_KIND_TO_PB = {TEXT: pb.INPUT_KIND_TEXT, IMAGE: pb.INPUT_KIND_IMAGE, TENSOR: pb.INPUT_KIND_TENSOR}
_KIND_FROM_PB = {v: k for k, v in _KIND_TO_PB.items()}
_TASK_TO_PB = {REGRESSION: pb.TASK_REGRESSION, CLASSIFICATION: pb.TASK_CLASSIFICATION}
_TASK_FROM_PB = {v: k for k, v in _TASK_TO_PB.items()}


@dataclass(frozen=True)
class InputSpec:
    """One raw input a teacher needs per row (text, an image, or a tensor such as ids)."""

    name: str
    kind: str  # TEXT | IMAGE | TENSOR
    dtype: str = ""  # tensor kinds
    shape: tuple[int, ...] = ()  # per row; -1 = any size
    needed_for_answer: bool = True  # False: only Predict needs it
    description: str = ""


@dataclass(frozen=True)
class TeacherSpec:
    name: str
    family: str
    injection_point: str
    question_shape: tuple[int, ...]
    hidden_size: int
    prediction_shape: tuple[int, ...]
    task: str  # REGRESSION | CLASSIFICATION
    prediction_meaning: str
    inputs: tuple[InputSpec, ...] = ()
    class_names: tuple[str, ...] = ()
    description: str = ""
    question_dtypes: tuple[str, ...] = FLOAT_DTYPES
    supports_vjp: bool = True
    max_rows: int = 65536
    weights_sha256: str = ""
    compute_dtype: str = "float32"  # reduced precision (bfloat16, float16) answers differ in the last digits
    protocol: str = PROTOCOL

    @property
    def answer_inputs(self) -> tuple[InputSpec, ...]:
        return tuple(i for i in self.inputs if i.needed_for_answer)

    def replace(self, **changes) -> TeacherSpec:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_proto(self) -> pb.TeacherSpec:
        return pb.TeacherSpec(
            protocol=self.protocol,
            name=self.name,
            family=self.family,
            description=self.description,
            injection_point=self.injection_point,
            question_shape=self.question_shape,
            question_dtypes=self.question_dtypes,
            hidden_size=self.hidden_size,
            prediction_shape=self.prediction_shape,
            task=_TASK_TO_PB[self.task],
            prediction_meaning=self.prediction_meaning,
            class_names=self.class_names,
            inputs=[
                pb.InputSpec(
                    name=i.name,
                    kind=_KIND_TO_PB[i.kind],
                    dtype=i.dtype,
                    shape=i.shape,
                    needed_for_answer=i.needed_for_answer,
                    description=i.description,
                )
                for i in self.inputs
            ],
            supports_vjp=self.supports_vjp,
            max_rows=self.max_rows,
            weights_sha256=self.weights_sha256,
            compute_dtype=self.compute_dtype,
        )

    @classmethod
    def from_proto(cls, msg: pb.TeacherSpec) -> TeacherSpec:
        return cls(
            protocol=msg.protocol,
            name=msg.name,
            family=msg.family,
            description=msg.description,
            injection_point=msg.injection_point,
            question_shape=tuple(msg.question_shape),
            question_dtypes=tuple(msg.question_dtypes),
            hidden_size=msg.hidden_size,
            prediction_shape=tuple(msg.prediction_shape),
            task=_TASK_FROM_PB.get(msg.task, "unspecified"),
            prediction_meaning=msg.prediction_meaning,
            class_names=tuple(msg.class_names),
            inputs=tuple(
                InputSpec(
                    name=i.name,
                    kind=_KIND_FROM_PB.get(i.kind, "unspecified"),
                    dtype=i.dtype,
                    shape=tuple(i.shape),
                    needed_for_answer=i.needed_for_answer,
                    description=i.description,
                )
                for i in msg.inputs
            ),
            supports_vjp=msg.supports_vjp,
            max_rows=msg.max_rows,
            weights_sha256=msg.weights_sha256,
            compute_dtype=msg.compute_dtype or "float32",
        )

