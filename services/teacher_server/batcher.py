"""Merging concurrent requests into one forward pass, without a thread hop when idle.

Leader/follower: the RPC thread that finds the model free computes right away, in
its own thread, so an idle server pays no hand-off between threads (we measured
the hand-off to a dedicated worker thread at several hundred microseconds per call
on a 2-core machine). Requests that arrive while the model is busy queue up; when
the computing thread finishes, one of the waiting threads takes the oldest request
and every queued request of the same kind behind it, up to ``max_rows`` rows, and
runs them as one batch. There is no waiting window: a busy server merges, which is
where merging pays (several trainers, or a trainer's concurrent fan-out, sharing a
teacher).

Rows are independent in every teacher of the zoo, so a merged batch gives each
request the same answer (and the same VJP) it would get alone, up to float
rounding from padding texts to a common length. A request whose caller has gone
(deadline passed, cancelled) is dropped before it is computed.

Answers that keep their graph (``kept_graphs``) merge only with each other, and VJPs
from kept graphs only with each other: the ones run with autograd on, the others without.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .kept_graphs import KeptGraph, KeptGraphs, KeptRows, backward_through_kept
from .zoo import Teacher

log = logging.getLogger(__name__)

ANSWER, VJP, PREDICT = "answer", "vjp", "predict"


class CallerGone(RuntimeError):
    """The caller of a queued request went away before it was computed."""


@dataclass
class Job:
    kind: str  # ANSWER | VJP | PREDICT
    n_rows: int
    inputs: dict
    question: torch.Tensor | None = None
    hidden_cotangent: torch.Tensor | None = None
    prediction_cotangent: torch.Tensor | None = None
    keep_graph: bool = False  # ANSWER: keep the graph for a VJP (when the server keeps graphs)
    kept: KeptRows | None = None  # VJP: from this kept graph (question and inputs unused)
    is_active: Callable[[], bool] = lambda: True
    done: bool = False
    result: tuple | None = None
    error: BaseException | None = None

    @property
    def batch_key(self) -> tuple:
        """Jobs merge into one batch only when their keys are equal."""
        return self.kind, self.keep_graph, self.kept is not None

    @property
    def metric_kind(self) -> str:
        """The batch's kind in metrics: answer, vjp, vjp_kept (the backward of a kept graph) or predict."""
        return f"{self.kind}_kept" if self.kept is not None else self.kind

    def finish(self, result: tuple | None = None, error: BaseException | None = None) -> None:
        self.result, self.error, self.done = result, error, True


class MicroBatcher:
    def __init__(self, teacher: Teacher, max_rows: int, on_batch: Callable[[str, int, int], None] | None = None,
                 graphs: KeptGraphs | None = None):
        self.teacher = teacher
        self.max_rows = max_rows
        self.graphs = graphs  # where answers asked to keep their graph keep it (None: nowhere)
        self.on_batch = on_batch  # (kind, requests merged, rows), for metrics
        self._queue: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._computing = False
        self._closed = False

    def run(self, job: Job) -> tuple:
        """Queue ``job`` and return its outputs (CPU tensors), computing them here if the model is free."""
        with self._cv:
            if self._closed:
                raise RuntimeError("the teacher is shutting down")
            self._queue.append(job)
            while not job.done:
                if self._computing or not self._queue:
                    self._cv.wait()
                    continue
                self._computing = True
                batch = self._take_batch()
                self._cv.release()
                try:
                    self._compute(batch)
                finally:
                    self._cv.acquire()
                    self._computing = False
                    self._cv.notify_all()
        if job.error is not None:
            raise job.error
        return job.result

    def close(self) -> None:
        with self._cv:
            self._closed = True

    def _take_batch(self) -> list[Job]:
        first = self._queue.popleft()
        batch, rows, keep = [first], first.n_rows, collections.deque()
        while self._queue:
            job = self._queue.popleft()
            if job.batch_key == first.batch_key and rows + job.n_rows <= self.max_rows:
                batch.append(job)
                rows += job.n_rows
            else:
                keep.append(job)
        self._queue.extendleft(reversed(keep))
        return batch

    def _compute(self, batch: list[Job]) -> None:
        live = []
        for job in batch:
            if job.is_active():
                live.append(job)
            else:
                job.finish(error=CallerGone("the caller went away before its request was computed"))
        if not live:
            return
        try:
            results = execute(self.teacher, live, self.graphs)
        except Exception as err:  # the server maps it to a status; the batcher lives on
            log.exception("teacher computation failed for a batch of %d request(s)", len(live))
            for job in live:
                job.finish(error=err)
            return
        if self.on_batch is not None:
            self.on_batch(live[0].metric_kind, len(live), sum(j.n_rows for j in live))
        for job, result in zip(live, results):
            job.finish(result)


def execute(teacher: Teacher, batch: list[Job], graphs: KeptGraphs | None = None) -> list[tuple]:
    """Run one merged batch (jobs of one ``batch_key``); returns each job's outputs (CPU tensors), in
    order. An answer that keeps its graph gets its graph id as a third output ("" when not kept)."""
    kind, sizes = batch[0].kind, [job.n_rows for job in batch]
    if kind == VJP and batch[0].kept is not None:
        grads = backward_through_kept([job.kept for job in batch], [job.hidden_cotangent for job in batch],
                                      [job.prediction_cotangent for job in batch])
        return [(grad.detach().cpu(),) for grad in grads]
    inputs = _merge_inputs([job.inputs for job in batch])
    graph_ids: list[str] | None = None
    if kind == PREDICT:
        outputs = teacher.compute_predict(inputs, sum(sizes))
    else:
        question = _cat([job.question for job in batch])
        if kind == ANSWER and batch[0].keep_graph:
            outputs, graph_ids = _answer_keeping_graph(teacher, question, inputs, sizes, graphs)
        elif kind == ANSWER:
            outputs = teacher.compute_answer(question, inputs)
        else:
            outputs = (
                teacher.compute_answer_vjp(
                    question,
                    inputs,
                    _cat_cotangents([job.hidden_cotangent for job in batch], sizes),
                    _cat_cotangents([job.prediction_cotangent for job in batch], sizes),
                ),
            )
    outputs = [t.detach().cpu() for t in outputs]
    split = [(t,) for t in outputs] if len(batch) == 1 else [t.split(sizes) for t in outputs]
    results = [tuple(parts[i] for parts in split) for i in range(len(batch))]
    if graph_ids is not None:
        results = [(*result, graph_id) for result, graph_id in zip(results, graph_ids)]
    return results


def _answer_keeping_graph(teacher: Teacher, question: torch.Tensor, inputs: dict, sizes: list[int],
                          graphs: KeptGraphs | None) -> tuple[tuple[torch.Tensor, ...], list[str]]:
    """The answers, and an id per job for their kept graph ("" where none is kept: the server keeps no
    graphs, or the batch is more than one chunk of rows)."""
    n_rows = sum(sizes)
    if graphs is None or graphs.capacity == 0 or n_rows > teacher.chunk_rows:
        return teacher.compute_answer(question, inputs), [""] * len(sizes)
    hidden, prediction, vjp = teacher.compute_answer_for_vjp(question, inputs)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    ids = graphs.keep(KeptGraph(vjp, n_rows), [slice(s, s + n) for s, n in zip(starts, sizes)])
    return (hidden, prediction), ids


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
