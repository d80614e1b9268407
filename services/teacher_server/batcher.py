"""Merging concurrent requests into one forward pass.

One worker thread owns the model. Requests queue up while it computes; when it is
free it takes the oldest request and every queued request of the same kind behind
it, up to ``max_rows`` rows, and runs them as one batch. There is no waiting
window: an idle server answers at once, a busy one merges, which is where merging
pays (several trainers, or a trainer's concurrent fan-out, sharing one teacher).
Rows are independent in every teacher of the zoo, so a merged batch gives each
request the same answer (and the same VJP) it would get alone, up to float
rounding from padding text to a common length.

A request whose caller has gone (deadline passed, cancelled) is dropped before it
is computed.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from .zoo import Teacher

log = logging.getLogger(__name__)

ANSWER, VJP, PREDICT = "answer", "vjp", "predict"


@dataclass
class Job:
    kind: str  # ANSWER | VJP | PREDICT
    n_rows: int
    inputs: dict
    question: torch.Tensor | None = None
    hidden_cotangent: torch.Tensor | None = None
    prediction_cotangent: torch.Tensor | None = None
    is_active: Callable[[], bool] = lambda: True
    future: Future = field(default_factory=Future)


class MicroBatcher:
    def __init__(self, teacher: Teacher, max_rows: int, on_batch: Callable[[str, int, int], None] | None = None):
        self.teacher = teacher
        self.max_rows = max_rows
        self.on_batch = on_batch  # (kind, requests merged, rows) for metrics
        self._queue: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._run, name=f"teacher-{teacher.name}", daemon=True)
        self._worker.start()

    def submit(self, job: Job) -> Future:
        with self._cv:
            if self._closed:
                raise RuntimeError("the teacher is shutting down")
            self._queue.append(job)
            self._cv.notify()
        return job.future

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._worker.join(timeout=30)

    def _take_batch(self) -> list[Job]:
        first = self._queue.popleft()
        batch, rows, keep = [first], first.n_rows, collections.deque()
        while self._queue:
            job = self._queue.popleft()
            if job.kind == first.kind and rows + job.n_rows <= self.max_rows:
                batch.append(job)
                rows += job.n_rows
            else:
                keep.append(job)
        self._queue.extendleft(reversed(keep))
        return batch

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if self._closed and not self._queue:
                    return
                batch = self._take_batch()
            batch = [job for job in batch if job.is_active() and job.future.set_running_or_notify_cancel()]
            if not batch:
                continue
            try:
                results = _execute(self.teacher, batch)
            except Exception as err:  # the server maps it to a status; the worker lives on
                log.exception("teacher computation failed for a batch of %d request(s)", len(batch))
                for job in batch:
                    job.future.set_exception(err)
                continue
            if self.on_batch is not None:
                self.on_batch(batch[0].kind, len(batch), sum(j.n_rows for j in batch))
            for job, result in zip(batch, results):
                job.future.set_result(result)


def _execute(teacher: Teacher, batch: list[Job]) -> list[tuple[torch.Tensor, ...]]:
    """Run one merged batch; returns each job's outputs (CPU tensors), in order."""
    kind = batch[0].kind
    inputs = _merge_inputs([job.inputs for job in batch])
    if kind == PREDICT:
        outputs = teacher.compute_predict(inputs, sum(job.n_rows for job in batch))
    else:
        question = _cat([job.question for job in batch])
        if kind == ANSWER:
            outputs = teacher.compute_answer(question, inputs)
        else:
            outputs = (
                teacher.compute_answer_vjp(
                    question,
                    inputs,
                    _cat_cotangents([job.hidden_cotangent for job in batch], [job.n_rows for job in batch]),
                    _cat_cotangents([job.prediction_cotangent for job in batch], [job.n_rows for job in batch]),
                ),
            )
    sizes = [job.n_rows for job in batch]
    split = [t.detach().cpu().split(sizes) for t in outputs]
    return [tuple(parts[i] for parts in split) for i in range(len(batch))]


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat([t.float() for t in tensors])


def _cat_cotangents(cotangents: list[torch.Tensor | None], sizes: list[int]) -> torch.Tensor | None:
    """Merge per-request cotangents; a request that sent none contributes zeros."""
    present = [c for c in cotangents if c is not None]
    if not present:
        return None
    if len(present) == len(cotangents):
        return _cat(present)
    template = present[0]
    return torch.cat([
        (c.float() if c is not None else torch.zeros((n, *template.shape[1:])))
        for c, n in zip(cotangents, sizes)
    ])


def _merge_inputs(inputs: list[dict]) -> dict:
    if len(inputs) == 1:
        return inputs[0]
    merged = {}
    for name in inputs[0]:
        values = [x[name] for x in inputs]
        if isinstance(values[0], torch.Tensor):
            merged[name] = torch.cat(values)
        else:
            merged[name] = [v for value in values for v in value]
    return merged
