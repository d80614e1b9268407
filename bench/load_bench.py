"""Load on one served teacher: N concurrent clients for a fixed time; latency and throughput.

    python bench/load_bench.py                                  # MLP-L; 1, 2, 4, 8 clients; 5 s each; batch 64
    python bench/load_bench.py --clients 1 8 --seconds 10 --batch 256 --out bench/results/load.json

The teacher is loaded from checkpoints/<teacher> when it exists (else built untrained with
the same architecture, as teacher_bench.py does: the cost is the same) and served by a
real ``teacher-server`` process on a loopback port. Each client is a thread of this
process with its own RemoteTeacher (gRPC core carries them all on one TCP connection,
since channels with identical arguments share it). Clients cycle through a pool of
``--batch``-row questions whose in-process answers (LocalTeacher on the same weights) are
computed before the clock starts, so every reply is checked (``mismatches``) at the cost
of a comparison; every exception is counted (``errors``). Every ``--vjp-every``-th call
is an AnswerVJP, the rest are Answer.

Reported per client count: calls/s and rows/s over the timed window, and p50/p99 of one
call's latency as its client sees it (all calls, and per method). The process exits 1 if
any call failed or mismatched.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from services.teacher_server.checkpoint import save_teacher  # noqa: E402
from services.teacher_server.client import LocalTeacher, RemoteTeacher  # noqa: E402
from services.teacher_server.tuning import tune_allocator  # noqa: E402

from local_servers import start_teacher_server, stop  # noqa: E402  (bench/, beside this script)
from teacher_bench import build_teacher  # noqa: E402

METHODS = ("Answer", "AnswerVJP")
RTOL, ATOL = 1e-4, 1e-5  # merged batches may round differently from the in-process single batch


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
    latencies: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in METHODS})
    rows: int = 0
    errors: list[str] = field(default_factory=list)
    mismatches: int = 0


def make_pool(local: LocalTeacher, sizes: list[int], seed: int) -> list[Case]:
    """One case per entry of ``sizes`` (its row count), with the in-process results to compare against."""
    gen = torch.Generator().manual_seed(seed)
    spec, pool = local.spec, []
    for batch in sizes:
        question = torch.randn(batch, *spec.question_shape, generator=gen)
        d_hidden = torch.randn(batch, spec.hidden_size, generator=gen)
        d_prediction = torch.randn(batch, *spec.prediction_shape, generator=gen)
        answer = local.answer(question)
        grad = local.answer_vjp(question, None, d_hidden, d_prediction)
        pool.append(Case(question, d_hidden, d_prediction, answer.hidden, answer.prediction, grad))
    return pool


def close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return got.shape == want.shape and torch.allclose(got, want, rtol=RTOL, atol=ATOL)


def call(remote: RemoteTeacher, case: Case, method: str) -> bool:
    """One call; True when the reply equals the in-process results."""
    if method == "Answer":
        answer = remote.answer(case.question)
        return close(answer.hidden, case.hidden) and close(answer.prediction, case.prediction)
    return close(remote.answer_vjp(case.question, None, case.d_hidden, case.d_prediction), case.grad)


def client(address: str, pool: list[Case], offset: int, vjp_every: int, start: threading.Barrier,
           stop_at: list[float], tally: Tally) -> None:
    remote = RemoteTeacher(address, timeout_s=120)
    for method in METHODS:  # warm-up, untimed
        call(remote, pool[offset % len(pool)], method)
    start.wait()
    i = 0
    while i == 0 or time.perf_counter() < stop_at[0]:
        case = pool[(offset + i) % len(pool)]
        method = "AnswerVJP" if vjp_every and i % vjp_every == vjp_every - 1 else "Answer"
        i += 1
        began = time.perf_counter()
        try:
            ok = call(remote, case, method)
        except Exception as err:  # noqa: BLE001 - counted and reported
            tally.errors.append(f"{method}: {type(err).__name__}: {err}")
            continue
        tally.latencies[method].append(time.perf_counter() - began)
        tally.rows += len(case.question)
        tally.mismatches += not ok
    remote.close()


def ms(latencies: list[float], q: float) -> float | None:
    return float(np.percentile(latencies, q) * 1e3) if latencies else None


def run_point(address: str, pool: list[Case], n_clients: int, seconds: float, vjp_every: int) -> dict:
    """``n_clients`` threads calling for ``seconds``; returns the point's numbers."""
    tallies = [Tally() for _ in range(n_clients)]
    start, stop_at = threading.Barrier(n_clients + 1), [float("inf")]
    threads = [
        threading.Thread(target=client, args=(address, pool, k * 3, vjp_every, start, stop_at, tally), daemon=True)
        for k, tally in enumerate(tallies)
    ]
    for thread in threads:
        thread.start()
    start.wait()  # every client connected and warm
    began = time.perf_counter()
    stop_at[0] = began + seconds
    for thread in threads:
        thread.join(timeout=seconds + 120)
    wall = time.perf_counter() - began
    by_method = {m: [x for t in tallies for x in t.latencies[m]] for m in METHODS}
    everything = [x for m in METHODS for x in by_method[m]]
    rows = sum(t.rows for t in tallies)
    errors = [e for t in tallies for e in t.errors]
    return {
        "clients": n_clients,
        "seconds": wall,
        "calls": len(everything),
        "answer_calls": len(by_method["Answer"]),
        "vjp_calls": len(by_method["AnswerVJP"]),
        "rows": rows,
        "calls_per_s": len(everything) / wall,
        "rows_per_s": rows / wall,
        "p50_ms": ms(everything, 50),
        "p99_ms": ms(everything, 99),
        "answer_p50_ms": ms(by_method["Answer"], 50),
        "answer_p99_ms": ms(by_method["Answer"], 99),
        "vjp_p50_ms": ms(by_method["AnswerVJP"], 50),
        "vjp_p99_ms": ms(by_method["AnswerVJP"], 99),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "mismatches": sum(t.mismatches for t in tallies),
        "hung_clients": sum(thread.is_alive() for thread in threads),
    }


HEADER = (
    "| clients | calls | calls/s | rows/s | p50 ms | p99 ms | Answer p50 / p99 ms | AnswerVJP p50 / p99 ms | errors "
    "| mismatches |\n|---|---|---|---|---|---|---|---|---|---|"
)


def format_row(r: dict) -> str:
    def pair(a, b):
        return "-" if a is None else f"{a:.2f} / {b:.2f}"

    return (
        f"| {r['clients']} | {r['calls']:,} | {r['calls_per_s']:,.0f} | {r['rows_per_s']:,.0f} | "
        f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {pair(r['answer_p50_ms'], r['answer_p99_ms'])} | "
        f"{pair(r['vjp_p50_ms'], r['vjp_p99_ms'])} | {r['errors']} | {r['mismatches']} |"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="mlp-l", help="checkpoints/<teacher>, or an untrained one of that kind")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8], help="client counts, one point each")
    p.add_argument("--seconds", type=float, default=5.0, help="timed window per point")
    p.add_argument("--batch", type=int, default=64, help="rows per call")
    p.add_argument("--vjp-every", type=int, default=5, help="every N-th call is AnswerVJP (0: none)")
    p.add_argument("--pool", type=int, default=16, help="distinct questions the clients cycle through")
    p.add_argument("--server-threads", type=int, default=1, help="torch threads of the server process")
    p.add_argument("--threads", type=int, default=1, help="torch threads of this (client) process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "load.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tune_allocator()  # as teacher-server and ddistill do
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    teacher, source = build_teacher(args.teacher)
    local = LocalTeacher(teacher)
    pool = make_pool(local, [args.batch] * args.pool, args.seed)
    checkpoint = REPO / "checkpoints" / args.teacher
    points = []
    with tempfile.TemporaryDirectory() as tmp:
        if not (checkpoint / "teacher.yaml").is_file():
            checkpoint = save_teacher(teacher, Path(tmp) / args.teacher)
        server, address = start_teacher_server(checkpoint, args.server_threads)
        try:
            print(
                f"teacher {args.teacher} ({source}); batch {args.batch}; every {args.vjp_every}th call AnswerVJP; "
                f"{args.seconds:g} s per point; torch {torch.__version__}, {os.cpu_count()} CPUs, server "
                f"{args.server_threads} torch thread(s), clients one RemoteTeacher per thread\n{HEADER}", flush=True,
            )
            for n_clients in args.clients:
                points.append(run_point(address, pool, n_clients, args.seconds, args.vjp_every))
                print(format_row(points[-1]), flush=True)
        finally:
            stop(server)

    meta = {
        "teacher": args.teacher, "source": source, "batch": args.batch, "seconds_per_point": args.seconds,
        "vjp_every": args.vjp_every, "server_threads": args.server_threads, "client_threads": args.threads,
        "torch": torch.__version__, "cpus": os.cpu_count(), "rtol": RTOL, "atol": ATOL,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "points": points}, indent=2) + "\n")
    print(f"wrote {args.out}")
    failed = [pt for pt in points if pt["errors"] or pt["mismatches"]]
    for pt in failed:
        print(f"{pt['clients']} clients: {pt['errors']} errors ({pt['first_error']}), {pt['mismatches']} mismatches")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
