"""A trainer step's two teacher calls, Answer then AnswerVJP on the same rows: the answer's graph
kept for the VJP against the VJP running the forward again, in-process and over loopback gRPC.

    python bench/vjp_bench.py                                  # MLP-M, MLP-L and the LM, 64 rows
    python bench/vjp_bench.py --teachers lm --dtype bfloat16 --reps 5 --out bench/results/vjp_lm.json

Each teacher comes from checkpoints/<name> when it exists (else it is built untrained with the same
architecture, as in teacher_bench.py: the cost is the same); the remote side is a real ``teacher-server`` process on
a loopback port (``--keep-graphs`` at its default), the in-process side the ``LocalTeacher`` the
trainer uses by default. The LM's rows are ml-100k training prompts (``--data``). Reported per
(teacher, where): the median time of one pair over ``--reps`` pairs, kept and recomputed taking turns
``--rounds`` times, and the median over rounds of their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from services.teacher_server.checkpoint import load_teacher, save_teacher  # noqa: E402
from services.teacher_server.client import LocalTeacher, RemoteTeacher, TeacherEndpoint  # noqa: E402
from services.teacher_server.tuning import tune_allocator  # noqa: E402
from trainer.data.inputs import MovieLensInputs  # noqa: E402
from trainer.data.movielens import load_movielens  # noqa: E402

from local_servers import start_teacher_server, stop  # noqa: E402  (bench/, beside this script)
from teacher_bench import build_teacher  # noqa: E402


def time_pairs(endpoint: TeacherEndpoint, question, inputs, d_hidden, d_pred, keep: bool, reps: int) -> float:
    """Median seconds of Answer + AnswerVJP (after one untimed pair)."""
    times = []
    for _ in range(reps + 1):
        start = time.perf_counter()
        endpoint.answer(question, inputs, keep_graph=keep)
        endpoint.answer_vjp(question, inputs, d_hidden, d_pred)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def bench_teacher(name: str, tmp: Path, data, args) -> list[dict]:
    teacher, source = build_teacher(name)
    folder = save_teacher(teacher, tmp / name)
    local = LocalTeacher(load_teacher(folder, dtype=args.dtype))
    server, address = start_teacher_server(folder, args.threads, "--dtype", args.dtype)
    try:
        remote = RemoteTeacher(address, timeout_s=600)
        spec = local.spec
        inputs = MovieLensInputs(data, data.train).for_spec(spec, data.train, np.arange(args.rows), for_answer=True)
        torch.manual_seed(0)
        question = torch.randn(args.rows, *spec.question_shape) * 0.1
        d_hidden, d_pred = torch.randn(args.rows, spec.hidden_size), torch.randn(args.rows)
        reps = max(3, args.reps // 10) if spec.family == "minilm" else args.reps
        rows = []
        for where, endpoint in (("in-process", local), ("remote", remote)):
            rounds = [{keep: time_pairs(endpoint, question, inputs, d_hidden, d_pred, keep, reps) * 1e3
                       for keep in (True, False)} for _ in range(args.rounds)]
            ratios = [r[True] / r[False] for r in rounds]
            row = {"teacher": name, "source": source, "where": where, "rows": args.rows, "dtype": args.dtype,
                   "reps": reps, "kept_ms": statistics.median(r[True] for r in rounds),
                   "recomputed_ms": statistics.median(r[False] for r in rounds),
                   "kept_over_recomputed": statistics.median(ratios), "ratio_rounds": ratios}
            rows.append(row)
            print(f"| {name} | {where} | {row['kept_ms']:.2f} | {row['recomputed_ms']:.2f} | "
                  f"{row['kept_over_recomputed']:.2f} ({min(ratios):.2f}-{max(ratios):.2f}) |", flush=True)
        remote.close()
        return rows
    finally:
        stop(server)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teachers", default="mlp-m,mlp-l,lm", help="names: checkpoints/<name> if it exists")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "ml-100k"))
    p.add_argument("--rows", type=int, default=64, help="rows per call (the trainer's batch)")
    p.add_argument("--reps", type=int, default=100, help="timed pairs per measurement (the LM: a tenth)")
    p.add_argument("--rounds", type=int, default=3, help="kept and recomputed take turns this many times")
    p.add_argument("--threads", type=int, default=1, help="torch threads here and in the server")
    p.add_argument("--dtype", default="float32", help="the teachers' compute dtype (in-process and served)")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tune_allocator()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    data = load_movielens(args.data)
    results = []
    print("| teacher | where | kept ms | recomputed ms | kept / recomputed (median, range) |\n|---|---|---|---|---|")
    for name in args.teachers.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            results += bench_teacher(name, Path(tmp), data, args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
