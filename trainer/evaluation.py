"""Metrics: rating MSE (predictions clipped to the rating scale), classification accuracy, Gap Recovery Rate."""

from __future__ import annotations

import numpy as np
import torch

from services.teacher_server.client import TeacherEndpoint

from .data.inputs import MovieLensInputs
from .data.movielens import Ratings

RATING_RANGE = (1.0, 5.0)


def rating_mse(prediction, target) -> float:
    """MSE with predictions clipped to [1, 5], as every rating model here is scored."""
    prediction = torch.as_tensor(prediction, dtype=torch.float64).clamp(*RATING_RANGE)
    target = torch.as_tensor(np.asarray(target), dtype=torch.float64)
    return float(((prediction - target) ** 2).mean())


def gap_recovery_rate(student_base: float, student_distilled: float, teacher_best: float,
                      lower_is_better: bool = True) -> float | None:
    """GRR = (S_base - S_distill) / (S_base - T_best): the share of the gap between the undistilled
    student and the best teacher that distillation closed. The same formula serves a lower-is-better
    metric (MSE) and a higher-is-better one (accuracy): numerator and denominator flip sign together.
    None when the best teacher is no better than S_base: there is no gap to close, and the ratio's
    sign would read a student made better as a negative recovery."""
    gap = student_base - teacher_best
    if (gap <= 0) if lower_is_better else (gap >= 0):
        return None
    return (student_base - student_distilled) / gap


def endpoint_predictions(
    endpoint: TeacherEndpoint, inputs: MovieLensInputs, ratings: Ratings, batch_rows: int = 2048
) -> torch.Tensor:
    """A teacher's own rating predictions (its Predict RPC) for every row of ``ratings``."""
    batch_rows = min(batch_rows, endpoint.spec.max_rows)
    out = []
    for start in range(0, len(ratings), batch_rows):
        rows = slice(start, min(start + batch_rows, len(ratings)))
        out.append(endpoint.predict(inputs.for_spec(endpoint.spec, ratings, rows, for_answer=False)).prediction)
    return torch.cat(out)


def endpoint_mse(endpoint: TeacherEndpoint, inputs: MovieLensInputs, ratings: Ratings, batch_rows: int = 2048) -> float:
    return rating_mse(endpoint_predictions(endpoint, inputs, ratings, batch_rows), ratings.rating)


def endpoint_logits(endpoint: TeacherEndpoint, images, batch_rows: int = 1024) -> torch.Tensor:
    """A vision teacher's class logits (its Predict RPC) for every row of ``images`` (``data.cifar10.Images``),
    sent as uint8 pixels, the wire format of the IMAGE input."""
    from services.teacher_server.images import IMAGE_INPUT

    batch_rows = min(batch_rows, endpoint.spec.max_rows)
    out = []
    for start in range(0, len(images), batch_rows):
        pixels = torch.from_numpy(images.images[start : start + batch_rows])
        out.append(endpoint.predict({IMAGE_INPUT: pixels}).prediction)
    return torch.cat(out)


def accuracy(logits, labels) -> float:
    """Share of rows whose arg-max class is the label."""
    return float((torch.as_tensor(logits).argmax(-1) == torch.as_tensor(np.asarray(labels))).double().mean())


def endpoint_accuracy(endpoint: TeacherEndpoint, images, batch_rows: int = 1024) -> float:
    return accuracy(endpoint_logits(endpoint, images, batch_rows), images.labels)
