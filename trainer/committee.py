"""The committee: every teacher's endpoint, concurrent fan-out, gating and its bookkeeping.

Crossing a teacher takes two round trips per step, each fanned out to all teachers
at once:

1. ``ask``: each teacher gets one batched Answer request holding only the rows the
   gate selected for it. Its answers come back as leaf tensors that require grad,
   so the trainer's losses can be differentiated with respect to them.
2. ``backward``: after the trainer's backward pass has left cotangents on those
   leaves, each teacher gets one AnswerVJP request, and the returned question
   gradients are pushed on into whatever produced the questions (the Question
   Augmenter), with ``torch.autograd.backward``.

The teachers therefore sit in the middle of an ordinary autograd graph, local or
remote alike. ``rows_sent`` / ``rows_possible`` count the (sample, teacher) pairs
actually sent against all pairs, per teacher: the saving the paper reports.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from services.teacher_server.client import TeacherEndpoint
from services.teacher_server.spec import TeacherSpec

InputsFor = Callable[[TeacherSpec, np.ndarray], dict]  # (spec, batch rows) -> the teacher's raw inputs


@dataclass
class TeacherAnswers:
    rows: torch.Tensor  # [k] rows of the batch this teacher answered
    question: torch.Tensor  # [k, *Q] the questions sent, still attached to their graph
    inputs: dict  # the raw inputs sent with them (needed again for the VJP)
    hidden: torch.Tensor  # [k, H] leaf, requires grad
    prediction: torch.Tensor  # [k, *P] leaf, requires grad


def select_pairs(
    importance: torch.Tensor, threshold: float, explore: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate (sample, teacher) pairs: returns (sent [B, n], gated_in [B, n]) boolean masks.

    ``gated_in``: w >= threshold; these count in the distillation loss. ``sent`` adds a
    random ``explore`` fraction of the pairs below the threshold, which are asked too
    (and count as sent) so the importance weights keep learning where the gate is shut.
    """
    gated_in = importance >= threshold
    if explore <= 0:
        return gated_in, gated_in
    coin = torch.rand(importance.shape, generator=generator) < explore
    return gated_in | coin.to(importance.device), gated_in


class Committee:
    def __init__(self, endpoints: list[TeacherEndpoint], concurrent: bool = True) -> None:
        self.endpoints = endpoints
        self.specs = [e.spec for e in endpoints]
        self.names = [s.name for s in self.specs]
        self.concurrent = concurrent and len(endpoints) > 1
        self._pool = ThreadPoolExecutor(max_workers=len(endpoints), thread_name_prefix="committee")
        self.rows_sent = np.zeros(len(endpoints), dtype=np.int64)
        self.rows_possible = np.zeros(len(endpoints), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.endpoints)

    def _fan_out(self, calls: dict[int, Callable[[], object]]) -> dict[int, object]:
        if self.concurrent:
            futures = {i: self._pool.submit(call) for i, call in calls.items()}
            return {i: f.result() for i, f in futures.items()}
        return {i: call() for i, call in calls.items()}

    def ask(self, questions: list[torch.Tensor], sent: torch.Tensor, inputs_for: InputsFor) -> list[TeacherAnswers | None]:
        """One Answer request per teacher with its selected rows; None where a teacher got no rows."""
        batch = sent.shape[0]
        self.rows_possible += batch
        plan = {}
        for i, spec in enumerate(self.specs):
            rows = sent[:, i].nonzero().squeeze(1)
            self.rows_sent[i] += len(rows)
            if len(rows):
                plan[i] = (rows, questions[i][rows], inputs_for(spec, rows.cpu().numpy()))
        replies = self._fan_out({
            i: (lambda e=self.endpoints[i], q=q, x=x: e.answer(q.detach().cpu(), x)) for i, (_, q, x) in plan.items()
        })
        answers: list[TeacherAnswers | None] = [None] * len(self)
        for i, (rows, question, inputs) in plan.items():
            device = question.device
            answers[i] = TeacherAnswers(
                rows, question, inputs,
                replies[i].hidden.to(device).requires_grad_(True),
                replies[i].prediction.to(device).requires_grad_(True),
            )
        return answers

    def backward(self, answers: list[TeacherAnswers | None]) -> None:
        """Send the cotangents on the answers back through the teachers into the questions."""
        todo = {
            i: a for i, a in enumerate(answers)
            if a is not None and (a.hidden.grad is not None or a.prediction.grad is not None)
        }
        grads = self._fan_out({
            i: (lambda e=self.endpoints[i], a=a: e.answer_vjp(
                a.question.detach().cpu(), a.inputs,
                None if a.hidden.grad is None else a.hidden.grad.cpu(),
                None if a.prediction.grad is None else a.prediction.grad.cpu(),
            ))
            for i, a in todo.items()
        })
        if todo:
            questions = [todo[i].question for i in todo]
            torch.autograd.backward(questions, [grads[i].to(q.device, q.dtype) for i, q in zip(todo, questions)])

    def saving(self) -> np.ndarray:
        """Per teacher, the fraction of possible (sample, teacher) pairs not sent."""
        return 1.0 - self.rows_sent / np.maximum(self.rows_possible, 1)

    def total_saving(self) -> float:
        """Over the whole committee, the fraction of possible pairs not sent."""
        return float(1.0 - self.rows_sent.sum() / max(self.rows_possible.sum(), 1))

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        for endpoint in self.endpoints:
            endpoint.close()
