"""Zeroth-order VJPs for teachers that only answer forward calls (black-box APIs).

``SPSAEndpoint`` wraps any endpoint and replaces its AnswerVJP by an estimate
from Answer calls alone: for k Gaussian directions v_j per row,

    g ~= 1/k * sum_j  [f(q + eps v_j) - f(q - eps v_j)] / (2 eps) * v_j,
    f(q) = <hidden(q), hidden_cotangent> + <prediction(q), prediction_cotangent>,

which is unbiased for smooth f up to O(eps^2) (antithetic pairs cancel the even
terms). All 2k perturbed copies of the batch travel in one Answer request. Its
noise shrinks as 1/sqrt(k) and grows with the question size: a fallback for
teachers that cannot do better, chosen per teacher (``?grad=spsa&directions=k``
on a teacher URL, or automatically when a teacher's spec says supports_vjp=false).
"""

from __future__ import annotations

import torch

from services.teacher_server.client import Answer, Prediction, TeacherEndpoint


def repeat_inputs(inputs: dict, times: int) -> dict:
    return {
        name: value.repeat(times, *([1] * (value.dim() - 1))) if isinstance(value, torch.Tensor) else list(value) * times
        for name, value in inputs.items()
    }


class SPSAEndpoint:
    def __init__(self, endpoint: TeacherEndpoint, directions: int = 8, eps: float = 1e-3, seed: int = 0) -> None:
        self.endpoint = endpoint
        self.directions = directions
        self.eps = eps
        self.generator = torch.Generator().manual_seed(seed)
        self.spec = endpoint.spec
        self.url = endpoint.url

    def answer(self, question, inputs=None, keep_graph=False) -> Answer:
        return self.endpoint.answer(question, inputs)  # the VJP is estimated from answers: no graph to keep

    def predict(self, inputs) -> Prediction:
        return self.endpoint.predict(inputs)

    def answer_vjp(self, question, inputs=None, hidden_cotangent=None, prediction_cotangent=None) -> torch.Tensor:
        n, k = question.shape[0], self.directions
        directions = torch.randn((k, *question.shape), generator=self.generator, dtype=question.dtype)
        shifted = self.eps * directions
        batch = torch.cat([question + shifted, question - shifted]).reshape(2 * k * n, *question.shape[1:])
        answer = self.endpoint.answer(batch, repeat_inputs(inputs or {}, 2 * k))
        value = torch.zeros(2 * k * n, dtype=torch.float64)
        if hidden_cotangent is not None:
            value += (answer.hidden.double() * hidden_cotangent.double().repeat(2 * k, 1)).sum(1)
        if prediction_cotangent is not None:
            cot = prediction_cotangent.double().repeat(2 * k, *([1] * (prediction_cotangent.dim() - 1)))
            value += (answer.prediction.double() * cot).reshape(2 * k * n, -1).sum(1)
        plus, minus = value.reshape(2, k, n)
        slope = (plus - minus) / (2 * self.eps)  # [k, n] directional derivatives
        grad = (slope.reshape(k, n, *([1] * (question.dim() - 1))) * directions.double()).mean(0)
        return grad.to(question.dtype)

    def close(self) -> None:
        self.endpoint.close()
