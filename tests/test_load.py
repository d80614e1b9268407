"""Bounded load on loopback: 8 client threads for ~3 s, no errors, every answer as in-process.

The load driver is bench/load_bench.py's: each thread has its own RemoteTeacher (its own
channel object; gRPC core carries them all on one TCP connection) and cycles through a
pool of questions of random sizes whose in-process answers are computed before the clock
starts, so checking a reply costs only a comparison. Every fifth call is an AnswerVJP.
Client threads and server share this process and its GIL.

Latency percentiles and throughput are printed, never asserted: they depend on the
machine and on whatever else runs on it. bench/load_bench.py measures the same load
against a separate server process.
"""

from __future__ import annotations

import sys

import pytest
import torch

from conftest import REPO
from services.teacher_server.client import LocalTeacher
from services.teacher_server.server import ServerConfig, TeacherServer

sys.path.insert(0, str(REPO / "bench"))
from load_bench import make_pool, run_point  # noqa: E402  (the benchmark's own load driver)

N_CLIENTS = 8
SECONDS = 3.0
VJP_EVERY = 5
POOL_SIZE = 24
MAX_BATCH = 256


@pytest.fixture(scope="module")
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # clients and server share two cores
    yield
    torch.set_num_threads(before)


def test_concurrent_clients_under_load_get_exact_answers_and_no_errors(mlp_teacher, one_torch_thread, capsys):
    sizes = torch.randint(1, MAX_BATCH + 1, (POOL_SIZE,), generator=torch.Generator().manual_seed(0)).tolist()
    pool = make_pool(LocalTeacher(mlp_teacher), sizes, seed=0)
    config = ServerConfig(host="127.0.0.1", port=0, http_port=None, grpc_threads=2 * N_CLIENTS)
    with TeacherServer(mlp_teacher, config) as server:
        r = run_point(f"127.0.0.1:{server.port}", pool, N_CLIENTS, SECONDS, VJP_EVERY)
        counted = {m: server.metrics.requests.labels(m, "OK")._value.get() for m in ("Answer", "AnswerVJP")}
        merged = sum(server.metrics.merged.labels(kind)._value.get() for kind in ("answer", "vjp"))
    with capsys.disabled():
        print(
            f"\nload: {N_CLIENTS} clients (one RemoteTeacher each) x {r['seconds']:.1f} s, in-process server: "
            f"{r['calls']} calls ({r['answer_calls']} Answer, {r['vjp_calls']} AnswerVJP), {r['rows']:,} rows; "
            f"{r['calls_per_s']:,.0f} calls/s, {r['rows_per_s']:,.0f} rows/s; latency p50 {r['p50_ms']:.2f} ms, "
            f"p99 {r['p99_ms']:.2f} ms; requests merged into shared batches: {merged:.0f}; "
            f"errors {r['errors']}, mismatches {r['mismatches']}"
        )
    assert r["hung_clients"] == 0
    assert r["errors"] == 0, r["first_error"]
    assert r["mismatches"] == 0
    assert r["answer_calls"] >= N_CLIENTS and r["vjp_calls"] > 0
    warm_up = N_CLIENTS  # each client makes one untimed call of each method first
    assert counted == {"Answer": r["answer_calls"] + warm_up, "AnswerVJP": r["vjp_calls"] + warm_up}
