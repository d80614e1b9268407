"""Answers' autograd graphs, kept by a server for the AnswerVJP that follows them.

A DiverseDistill step asks each teacher twice about the same rows: Answer, then AnswerVJP
with the cotangents of the trainer's loss. A server that keeps nothing between calls runs
the forward again for the VJP: 3.7 of the 6.2 ms a remote MLP teacher added to a trainer's
step (bench/trainer_bench.py, 2026-12-04), and a third of an LM teacher's work. An Answer
request with ``keep_graph`` leaves its graph here under a ``graph_id``; an AnswerVJP naming
that id runs only the backward, and the id is used up.

What is kept is bounded: at most ``capacity`` answers (the oldest go first) for at most
``ttl_s`` seconds each. A graph that is gone (dropped, expired, used already, or kept by
another replica of a Ray Serve deployment) is NOT_FOUND, and the client sends the full
request instead: keeping graphs saves work and never changes a result.

A server with several replicas behind one address (Ray Serve) gives each replica an ``owner``
name, which starts each graph id it hands out (``OWNER:TOKEN``); the client sends the id with
its AnswerVJP as routing metadata, and the router reads the owner from it (``graph_owner``,
``ray_routing.KeptGraphRouter``) to send the call to the replica that holds the graph.

Answers merged into one forward pass share one graph; each keeps its rows of it, and the
graph is freed once the last of them is used or dropped.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .validation import InvalidRequest

DEFAULT_CAPACITY = 8  # answers kept; one per trainer step in flight, so several trainers fit
DEFAULT_TTL_S = 60.0  # a trainer asks for the VJP within its step, milliseconds to seconds later
OWNER_SEPARATOR = ":"


class GraphNotFound(LookupError):
    """An AnswerVJP named a graph this server does not keep (NOT_FOUND on the wire)."""


@dataclass(frozen=True)
class KeptGraph:
    """One forward pass's graph: ``vjp(hidden_cotangent, prediction_cotangent)`` (each [n_rows, ...]
    or None) gives the gradient with respect to its question, [n_rows, *Q]; it may be called again."""

    vjp: Callable[[torch.Tensor | None, torch.Tensor | None], torch.Tensor]
    n_rows: int


@dataclass(frozen=True)
class KeptRows:
    """One answer's rows of a (possibly merged) kept graph."""

    graph: KeptGraph
    rows: slice

    @property
    def n_rows(self) -> int:
        return self.rows.stop - self.rows.start


def graph_owner(graph_id: str) -> str | None:
    """The owner named at the start of ``graph_id`` (None for ids of a server without one)."""
    owner, sep, _ = graph_id.rpartition(OWNER_SEPARATOR)
    return owner if sep else None


class KeptGraphs:
    def __init__(self, capacity: int = DEFAULT_CAPACITY, ttl_s: float = DEFAULT_TTL_S, owner: str = "") -> None:
        if capacity < 0 or ttl_s <= 0:
            raise ValueError(f"capacity {capacity} must be >= 0 and ttl_s {ttl_s} > 0")
        if OWNER_SEPARATOR in owner:
            raise ValueError(f"owner {owner!r} must not contain {OWNER_SEPARATOR!r}")
        self.capacity = capacity
        self.ttl_s = ttl_s
        self._prefix = f"{owner}{OWNER_SEPARATOR}" if owner else ""
        self._kept: OrderedDict[str, tuple[float, KeptRows]] = OrderedDict()  # oldest first
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            self._expire(time.monotonic())
            return len(self._kept)

    def keep(self, graph: KeptGraph, parts: list[slice]) -> list[str]:
        """Keep each part (an answer's rows) of ``graph``; returns their ids, in order."""
        ids = [self._prefix + secrets.token_hex(16) for _ in parts]
        now = time.monotonic()
        with self._lock:
            self._expire(now)
            for graph_id, rows in zip(ids, parts):
                self._kept[graph_id] = (now, KeptRows(graph, rows))
            while len(self._kept) > self.capacity:
                self._kept.popitem(last=False)
        return ids

    def take(self, graph_id: str, n_rows: int) -> KeptRows:
        """The rows kept under ``graph_id``, which is used up, if the caller's cotangents have
        ``n_rows`` rows, as many as the answer had (otherwise it stays, and the request is invalid)."""
        with self._lock:
            self._expire(time.monotonic())
            kept = self._kept.get(graph_id)
            if kept is not None and kept[1].n_rows == n_rows:
                del self._kept[graph_id]
        if kept is None:
            raise GraphNotFound(
                f"no kept graph {graph_id[:64]!r}: used already, dropped (this server keeps {self.capacity} "
                f"for {self.ttl_s:g} s), or kept by another replica; send the question and inputs instead"
            )
        if kept[1].n_rows != n_rows:
            raise InvalidRequest(f"cotangents have {n_rows} rows; the answer of graph {graph_id[:64]!r} had "
                                 f"{kept[1].n_rows}")
        return kept[1]

    def _expire(self, now: float) -> None:
        while self._kept:
            graph_id, (kept_at, _) = next(iter(self._kept.items()))
            if now - kept_at <= self.ttl_s:
                break
            del self._kept[graph_id]


def backward_through_kept(parts: list[KeptRows], hidden_cotangents: list[torch.Tensor | None],
                          prediction_cotangents: list[torch.Tensor | None]) -> list[torch.Tensor]:
    """Each part's question gradient, one backward pass per graph: the parts of one graph get their
    cotangents in their rows and zeros elsewhere (rows never mix in a teacher, so the zeros add nothing)."""
    grads: list[torch.Tensor | None] = [None] * len(parts)
    by_graph: dict[int, list[int]] = {}
    for i, part in enumerate(parts):
        by_graph.setdefault(id(part.graph), []).append(i)
    for members in by_graph.values():
        graph = parts[members[0]].graph
        full = [_spread([parts[i].rows for i in members], [cots[i] for i in members], graph.n_rows)
                for cots in (hidden_cotangents, prediction_cotangents)]
        grad = graph.vjp(*full)
        for i in members:
            grads[i] = grad[parts[i].rows]
    return grads  # type: ignore[return-value]


def _spread(rows: list[slice], cotangents: list[torch.Tensor | None], n_rows: int) -> torch.Tensor | None:
    present = [c for c in cotangents if c is not None]
    if not present:
        return None
    full = present[0].new_zeros((n_rows, *present[0].shape[1:]))
    for r, c in zip(rows, cotangents):
        if c is not None:
            full[r] = c
    return full
