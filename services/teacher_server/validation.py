"""Request checks against a teacher's spec, shared by the server and the in-process adapter.

Every check raises ``InvalidRequest`` (INVALID_ARGUMENT on the wire) or
``TooManyRows`` (RESOURCE_EXHAUSTED) with a message that names the field and says
what was expected, so a caller can fix its request without reading server logs.
Nothing reaches the model before its request has passed here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from .codec import DTYPES, FLOAT_DTYPES, WireError, all_finite, dtype_name
from .spec import TEXT, InputSpec, TeacherSpec


class InvalidRequest(WireError):
    """The request does not fit the teacher's spec."""


class TooManyRows(InvalidRequest):
    """More rows than the teacher's max_rows."""


def check_rows(spec: TeacherSpec, n_rows: int, what: str) -> None:
    if n_rows < 1:
        raise InvalidRequest(f"{what} has no rows; send at least one")
    if n_rows > spec.max_rows:
        raise TooManyRows(f"{what} has {n_rows} rows; this teacher takes at most {spec.max_rows} per request")


def check_float(tensor: torch.Tensor, what: str, shape: Sequence[int], allowed: Sequence[str]) -> None:
    """A float tensor of exactly ``shape`` and an allowed dtype, with finite values."""
    name = dtype_name(tensor.dtype) if tensor.dtype in _TORCH_DTYPES else str(tensor.dtype)
    if name not in allowed:
        raise InvalidRequest(f"{what}: dtype {name} not accepted; use one of {list(allowed)}")
    if tuple(tensor.shape) != tuple(shape):
        raise InvalidRequest(f"{what}: shape {list(tensor.shape)}, expected {list(shape)}")
    if not all_finite(tensor.detach()):
        raise InvalidRequest(f"{what}: contains NaN or Inf")


def check_question(spec: TeacherSpec, question: torch.Tensor) -> int:
    """Checks a question batch; returns its row count."""
    if question.dim() != 1 + len(spec.question_shape):
        raise InvalidRequest(
            f"question: shape {list(question.shape)}, expected [rows, {', '.join(map(str, spec.question_shape))}]"
        )
    n_rows = question.shape[0]
    check_rows(spec, n_rows, "question")
    check_float(question, "question", (n_rows, *spec.question_shape), spec.question_dtypes)
    return n_rows


def check_cotangents(
    spec: TeacherSpec, n_rows: int, hidden: torch.Tensor | None, prediction: torch.Tensor | None
) -> None:
    if hidden is None and prediction is None:
        raise InvalidRequest("AnswerVJP needs hidden_cotangent, prediction_cotangent, or both")
    if hidden is not None:
        check_float(hidden, "hidden_cotangent", (n_rows, spec.hidden_size), spec.question_dtypes)
    if prediction is not None:
        check_float(prediction, "prediction_cotangent", (n_rows, *spec.prediction_shape), spec.question_dtypes)


def check_inputs(
    spec: TeacherSpec, inputs: Mapping[str, object], n_rows: int | None, *, for_answer: bool
) -> tuple[dict, int]:
    """Checks raw inputs; returns (only the inputs this call needs, row count).

    ``n_rows`` is the question's row count (Answer) or None (Predict: taken from the inputs).
    """
    needed = spec.answer_inputs if for_answer else spec.inputs
    known = {i.name for i in spec.inputs}
    unknown = sorted(set(inputs) - known)
    if unknown:
        raise InvalidRequest(f"unknown input(s) {unknown}; this teacher takes {sorted(known) or 'none'}")
    kept = {}
    for input_spec in needed:
        if input_spec.name not in inputs:
            raise InvalidRequest(f"missing input {input_spec.name!r} ({input_spec.kind}), needed per row")
        value, rows = _check_input(input_spec, inputs[input_spec.name])
        if n_rows is None:
            check_rows(spec, rows, f"input {input_spec.name!r}")
            n_rows = rows
        elif rows != n_rows:
            raise InvalidRequest(f"input {input_spec.name!r} has {rows} rows, the question has {n_rows}")
        kept[input_spec.name] = value
    if n_rows is None:
        raise InvalidRequest("Predict needs the teacher's inputs to know the rows; none were given")
    return kept, n_rows


def _check_input(input_spec: InputSpec, value: object) -> tuple[list[str] | torch.Tensor, int]:
    """Checks one raw input; returns it as a list of strings or a torch tensor, and its rows."""
    name = input_spec.name
    if input_spec.kind == TEXT:
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise InvalidRequest(f"input {name!r} must be a list of strings, one per row")
        if not all(isinstance(v, str) for v in value):
            raise InvalidRequest(f"input {name!r} must hold strings only")
        return list(value), len(value)
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        raise InvalidRequest(f"input {name!r} must be a tensor")
    got = dtype_name(value.dtype) if value.dtype in _TORCH_DTYPES else str(value.dtype)
    if got != input_spec.dtype:
        raise InvalidRequest(f"input {name!r}: dtype {got}, expected {input_spec.dtype}")
    row_shape = tuple(value.shape[1:])
    expected = input_spec.shape
    if value.dim() != 1 + len(expected) or any(e not in (-1, g) for e, g in zip(expected, row_shape)):
        raise InvalidRequest(f"input {name!r}: per-row shape {list(row_shape)}, expected {list(expected)}")
    if value.is_floating_point() and not all_finite(value):
        raise InvalidRequest(f"input {name!r}: contains NaN or Inf")
    return value, value.shape[0]


def check_output_dtype(name: str, default: str) -> str:
    if not name:
        return default
    if name not in FLOAT_DTYPES:
        raise InvalidRequest(f"output_dtype {name!r} not supported; use one of {list(FLOAT_DTYPES)}")
    return name


_TORCH_DTYPES = {t for _, t in DTYPES.values()}
