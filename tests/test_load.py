"""Bounded load on loopback: 8 client threads for ~3 s, no errors, every answer as in-process.

Each thread has its own RemoteTeacher (its own channel object; gRPC core carries them all
on one TCP connection, since channels with identical arguments share subchannels)
and cycles through its own pool of questions of random sizes, whose in-process answers
are computed before the clock starts, so checking a reply costs only a comparison. Every
fifth call is an AnswerVJP. Client threads and server share this process and its GIL.

Latency percentiles and throughput are printed, never asserted: they depend on the
machine and on whatever else runs on it. bench/load_bench.py measures the same load
against a separate server process.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from services.teacher_server.client import LocalTeacher, RemoteTeacher
from services.teacher_server.server import ServerConfig, TeacherServer

N_CLIENTS = 8
SECONDS = 3.0
VJP_EVERY = 5
POOL_SIZE = 12  # questions per client
MAX_BATCH = 256


@dataclass
class Case:
    """One question with its cotangents and the in-process results to compare against."""

    question: torch.Tensor
    d_hidden: torch.Tensor
    d_prediction: torch.Tensor
    hidden: torch.Tensor
    prediction: torch.Tensor
    grad: torch.Tensor


@dataclass
class Tally:
    latencies: dict[str, list[float]] = field(default_factory=lambda: {"Answer": [], "AnswerVJP": []})
    rows: int = 0
    errors: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)


def make_pool(local: LocalTeacher, seed: int) -> list[Case]:
    gen = torch.Generator().manual_seed(seed)
    pool = []
    for _ in range(POOL_SIZE):
        rows = int(torch.randint(1, MAX_BATCH + 1, (), generator=gen))
        question = torch.randn(rows, *local.spec.question_shape, generator=gen)
        d_hidden = torch.randn(rows, local.spec.hidden_size, generator=gen)
        d_prediction = torch.randn(rows, *local.spec.prediction_shape, generator=gen)
        answer = local.answer(question)
        grad = local.answer_vjp(question, None, d_hidden, d_prediction)
        pool.append(Case(question, d_hidden, d_prediction, answer.hidden, answer.prediction, grad))
    return pool


def close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return got.shape == want.shape and torch.allclose(got, want, rtol=1e-5, atol=1e-5)


def client(address: str, pool: list[Case], start: threading.Barrier, stop_at: list[float], tally: Tally) -> None:
    remote = RemoteTeacher(address, timeout_s=30)
    start.wait()
    i = 0
    while i == 0 or time.perf_counter() < stop_at[0]:
        case, method = pool[i % len(pool)], "AnswerVJP" if i % VJP_EVERY == VJP_EVERY - 1 else "Answer"
        i += 1
        began = time.perf_counter()
        try:
            if method == "Answer":
                answer = remote.answer(case.question)
                ok = close(answer.hidden, case.hidden) and close(answer.prediction, case.prediction)
            else:
                ok = close(remote.answer_vjp(case.question, None, case.d_hidden, case.d_prediction), case.grad)
        except Exception as err:  # noqa: BLE001 - every failure is counted, and the test fails on any
            tally.errors.append(f"{method}: {type(err).__name__}: {err}")
            continue
        tally.latencies[method].append(time.perf_counter() - began)
        tally.rows += len(case.question)
        if not ok:
            tally.mismatches.append(f"{method} call {i}, {len(case.question)} rows")
    remote.close()


@pytest.fixture(scope="module")
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # clients and server share two cores
    yield
    torch.set_num_threads(before)


def percentile_ms(latencies: list[float], q: float) -> float:
    return float(np.percentile(latencies, q) * 1e3) if latencies else float("nan")


def test_concurrent_clients_under_load_get_exact_answers_and_no_errors(mlp_teacher, one_torch_thread, capsys):
    local = LocalTeacher(mlp_teacher)
    pools = [make_pool(local, seed) for seed in range(N_CLIENTS)]
    tallies = [Tally() for _ in range(N_CLIENTS)]
    config = ServerConfig(host="127.0.0.1", port=0, http_port=None, grpc_threads=2 * N_CLIENTS)
    with TeacherServer(mlp_teacher, config) as server:
        start, stop_at = threading.Barrier(N_CLIENTS + 1), [float("inf")]
        threads = [
            threading.Thread(target=client, args=(f"127.0.0.1:{server.port}", pool, start, stop_at, tally))
            for pool, tally in zip(pools, tallies)
        ]
        for thread in threads:
            thread.start()
        start.wait()  # every client connected
        began = time.perf_counter()
        stop_at[0] = began + SECONDS
        for thread in threads:
            thread.join(timeout=SECONDS + 60)
        wall = time.perf_counter() - began
        assert not any(thread.is_alive() for thread in threads), "a client hung"
        counted = {m: server.metrics.requests.labels(m, "OK")._value.get() for m in ("Answer", "AnswerVJP")}
        merged = sum(server.metrics.merged.labels(kind)._value.get() for kind in ("answer", "vjp"))

    errors = [e for t in tallies for e in t.errors]
    mismatches = [m for t in tallies for m in t.mismatches]
    by_method = {m: [x for t in tallies for x in t.latencies[m]] for m in ("Answer", "AnswerVJP")}
    everything = by_method["Answer"] + by_method["AnswerVJP"]
    rows = sum(t.rows for t in tallies)
    with capsys.disabled():
        print(
            f"\nload: {N_CLIENTS} clients (one RemoteTeacher each) x {wall:.1f} s, in-process server: "
            f"{len(everything)} calls ({len(by_method['Answer'])} Answer, {len(by_method['AnswerVJP'])} AnswerVJP), "
            f"{rows:,} rows; {len(everything) / wall:,.0f} calls/s, {rows / wall:,.0f} rows/s; latency p50 "
            f"{percentile_ms(everything, 50):.2f} ms, p99 {percentile_ms(everything, 99):.2f} ms (Answer p50/p99 "
            f"{percentile_ms(by_method['Answer'], 50):.2f}/{percentile_ms(by_method['Answer'], 99):.2f} ms, "
            f"AnswerVJP {percentile_ms(by_method['AnswerVJP'], 50):.2f}/"
            f"{percentile_ms(by_method['AnswerVJP'], 99):.2f} ms); requests merged into shared batches: "
            f"{merged:.0f}; errors {len(errors)}, mismatches {len(mismatches)}"
        )
    assert not errors, errors[:5]
    assert not mismatches, mismatches[:5]
    assert all(t.latencies["Answer"] for t in tallies), "every client got answers"
    assert counted == {m: len(x) for m, x in by_method.items()}  # the server counted exactly these calls
