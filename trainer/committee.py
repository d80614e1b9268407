"""The committee: every teacher's endpoint, concurrent fan-out, gating and its bookkeeping.

Crossing a teacher takes two round trips per step, each fanned out to all teachers
at once:

1. ``ask``: each teacher gets one batched Answer request holding only the rows the
   gate selected for it. Its answers come back as leaf tensors that require grad,
   so the trainer's losses can be differentiated with respect to them. The teacher
   keeps the forward's graph for step 2 (``keep_graph``).
2. ``backward``: after the trainer's backward pass has left cotangents on those
   leaves, each teacher gets one AnswerVJP request, run on the kept graph, and the
   returned question gradients are pushed on into whatever produced the questions
   (the Question Augmenter), with ``torch.autograd.backward``.

The teachers therefore sit in the middle of an ordinary autograd graph, local or
remote alike. ``rows_sent`` / ``rows_possible`` count the (sample, teacher) pairs
actually sent against all pairs, per teacher: the saving the paper reports.

A teacher that cannot be reached (down, or past its deadline) is handled by a
``FaultPolicy``, a documented choice:

* ``wait`` (default): retry the same request with backoff until the teacher is back
  (up to ``wait_s``, then the run stops with an error and can be resumed from its last
  checkpoint). Nothing about the method changes, so the run ends exactly as an
  uninterrupted one would.
* ``skip``: go on with the rest of the committee. The missing teacher's pairs count
  with weight 0 (no answer, no loss term, no question gradient) and as *missed*,
  not sent; it is left alone for ``retry_after_s`` and then asked again, so a
  restarted teacher is used again. The log says when a teacher goes and comes back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from services.teacher_server.client import TeacherEndpoint, TeacherUnavailable
from services.teacher_server.spec import TeacherSpec
from services.teacher_server.tuning import torch_thread_pool

log = logging.getLogger(__name__)

InputsFor = Callable[[TeacherSpec, np.ndarray], dict]  # (spec, batch rows) -> the teacher's raw inputs


@dataclass
class TeacherAnswers:
    rows: torch.Tensor  # [k] rows of the batch this teacher answered
    question: torch.Tensor  # [k, *Q] the questions sent, still attached to their graph
    inputs: dict  # the raw inputs sent with them (needed again for the VJP)
    hidden: torch.Tensor  # [k, H] leaf, requires grad
    prediction: torch.Tensor  # [k, *P] leaf, requires grad


def select_pairs(
    importance: torch.Tensor, threshold: float, explore: float, generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's gate on (sample, teacher) pairs: returns (sent [B, n], gated_in [B, n]) boolean masks.

    ``gated_in``: w >= threshold; these count in the distillation loss. ``sent`` adds a random
    ``explore`` fraction of the other pairs, which are asked too (and count as sent) so the
    importance weights keep learning where the gate is shut. (Teachers with a call budget are
    gated by ``trainer.budget`` instead.)
    """
    gated_in = importance >= threshold
    if explore <= 0:
        return gated_in, gated_in
    coin = torch.rand(importance.shape, generator=generator) < explore
    return gated_in | coin.to(importance.device), gated_in


@dataclass
class FaultPolicy:
    on_failure: str = "wait"  # "wait": retry until the teacher is back; "skip": go on without it
    wait_s: float = 600.0  # wait: give up (the run stops, resumable) after this long
    retry_after_s: float = 5.0  # skip: leave a failed teacher alone this long, then ask again
    max_backoff_s: float = 5.0  # wait: longest pause between retries

    def __post_init__(self) -> None:
        if self.on_failure not in ("wait", "skip"):
            raise ValueError(f"on_failure must be wait or skip, not {self.on_failure!r}")


class Committee:
    def __init__(
        self, endpoints: list[TeacherEndpoint], concurrent: bool = True, faults: FaultPolicy | None = None,
        budgets: list[float | None] | None = None,
    ) -> None:
        self.endpoints = endpoints
        # per teacher, its call budget (trainer.budget: the most of each batch's rows it may answer) or None
        self.budgets = list(budgets) if budgets is not None else [None] * len(endpoints)
        if len(self.budgets) != len(endpoints):
            raise ValueError(f"{len(self.budgets)} budgets for {len(endpoints)} teachers")
        self.specs = [e.spec for e in endpoints]
        self.names = [s.name for s in self.specs]
        self.concurrent = concurrent and len(endpoints) > 1
        self.faults = faults or FaultPolicy()
        self._pool = torch_thread_pool(len(endpoints), "committee")
        self.rows_sent = np.zeros(len(endpoints), dtype=np.int64)
        self.rows_possible = np.zeros(len(endpoints), dtype=np.int64)
        self.rows_missed = np.zeros(len(endpoints), dtype=np.int64)  # selected, but the teacher was down
        self.failures = np.zeros(len(endpoints), dtype=np.int64)  # requests that found a teacher down
        self.up = np.ones(len(endpoints), dtype=bool)
        self._retry_at = np.zeros(len(endpoints))
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.endpoints)

    def _fan_out(self, calls: dict[int, Callable[[], object]]) -> dict[int, object]:
        """Runs each teacher's call under the fault policy; a skipped teacher's result is None."""
        calls = {i: (lambda i=i, call=call: self._guarded(i, call)) for i, call in calls.items()}
        if self.concurrent:
            futures = {i: self._pool.submit(call) for i, call in calls.items()}
            return {i: f.result() for i, f in futures.items()}
        return {i: call() for i, call in calls.items()}

    def _guarded(self, i: int, call: Callable[[], object]):
        started, pause = time.monotonic(), 0.2
        while True:
            try:
                result = call()
            except TeacherUnavailable as err:
                self._went_down(i, err)
                if self.faults.on_failure == "skip":
                    self._retry_at[i] = time.monotonic() + self.faults.retry_after_s
                    return None
                if time.monotonic() - started + pause > self.faults.wait_s:
                    raise TeacherUnavailable(
                        f"teacher {self.names[i]} has not come back within {self.faults.wait_s:g} s: {err}; "
                        "resume the run (--resume) once it is back, or train with --on-teacher-failure skip"
                    ) from err
                time.sleep(pause)
                pause = min(2 * pause, self.faults.max_backoff_s)
                continue
            if not self.up[i]:
                with self._lock:
                    self.up[i] = True
                log.warning("teacher %s is back: using it again", self.names[i])
            return result

    def _went_down(self, i: int, err: Exception) -> None:
        with self._lock:
            self.failures[i] += 1
            was_up, self.up[i] = self.up[i], False
        if was_up:
            what = "waiting for it" if self.faults.on_failure == "wait" else "continuing without it (weight 0)"
            log.warning("teacher %s unavailable (%s): %s", self.names[i], err, what)

    def _skipping(self, i: int) -> bool:
        """skip policy: a failed teacher is not asked again until its retry time."""
        return self.faults.on_failure == "skip" and not self.up[i] and time.monotonic() < self._retry_at[i]

    def ask(self, questions: list[torch.Tensor], sent: torch.Tensor, inputs_for: InputsFor) -> list[TeacherAnswers | None]:
        """One Answer request per teacher with its selected rows; None where a teacher got no rows."""
        batch = sent.shape[0]
        self.rows_possible += batch
        plan = {}
        for i, spec in enumerate(self.specs):
            rows = sent[:, i].nonzero().squeeze(1)
            if not len(rows):
                continue
            if self._skipping(i):
                self.rows_missed[i] += len(rows)
                continue
            plan[i] = (rows, questions[i][rows], inputs_for(spec, rows.cpu().numpy()))
        replies = self._fan_out({
            i: (lambda e=self.endpoints[i], q=q, x=x: e.answer(q.detach().cpu(), x, keep_graph=True))
            for i, (_, q, x) in plan.items()
        })
        answers: list[TeacherAnswers | None] = [None] * len(self)
        for i, (rows, question, inputs) in plan.items():
            if replies[i] is None:
                self.rows_missed[i] += len(rows)
                continue
            self.rows_sent[i] += len(rows)
            device = question.device
            answers[i] = TeacherAnswers(
                rows, question, inputs,
                replies[i].hidden.to(device).requires_grad_(True),
                replies[i].prediction.to(device).requires_grad_(True),
            )
        return answers

    def count_used(self, used: list[torch.Tensor | None], batch: int) -> None:
        """For methods that read teachers' Predict outputs instead of asking questions (the baselines):
        count, per teacher, the batch's rows whose output was used (``used[i]``, a boolean mask; None:
        every row), so their spend is reported as DiverseDistill's is."""
        self.rows_possible += batch
        self.rows_sent += np.array([batch if u is None else int(u.sum()) for u in used], dtype=np.int64)

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
        todo = {i: a for i, a in todo.items() if grads[i] is not None}  # skip: a teacher lost after answering
        if todo:
            questions = [todo[i].question for i in todo]
            torch.autograd.backward(questions, [grads[i].to(q.device, q.dtype) for i, q in zip(todo, questions)])

    def graph_misses(self) -> list[tuple[int, int]]:
        """Per teacher, (AnswerVJPs sent as a kept graph's id, those whose graph was gone and that were
        sent again in full); (0, 0) for endpoints that keep no graphs on a server."""
        return [(getattr(e, "graph_vjps", 0), getattr(e, "graphs_missed", 0)) for e in self.endpoints]

    def counters(self) -> dict[str, list]:
        """What a checkpoint keeps, so a resumed run reports the same totals."""
        return {k: getattr(self, k).tolist() for k in ("rows_sent", "rows_possible", "rows_missed", "failures")}

    def restore_counters(self, saved: dict[str, list]) -> None:
        for key, values in saved.items():
            getattr(self, key)[:] = values

    def saving(self) -> np.ndarray:
        """Per teacher, the fraction of possible (sample, teacher) pairs the gate did not select
        (pairs selected but lost to a down teacher are not a saving)."""
        return 1.0 - (self.rows_sent + self.rows_missed) / np.maximum(self.rows_possible, 1)

    def total_saving(self) -> float:
        """Over the whole committee, the fraction of possible pairs the gate did not select."""
        return float(1.0 - (self.rows_sent + self.rows_missed).sum() / max(self.rows_possible.sum(), 1))

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        for endpoint in self.endpoints:
            endpoint.close()
