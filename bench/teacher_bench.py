"""Teacher Answer / AnswerVJP: remote over loopback gRPC vs in-process, in one run.

    python bench/teacher_bench.py                       # MLP-L and LM, batch 64 and 1024
    python bench/teacher_bench.py --teachers vit,clip --out bench/results/teacher_vision.json   # CIFAR-10
    python bench/teacher_bench.py --teachers mlp-l --batches 64,1024 --out bench/results/teacher.json

Each teacher is loaded from checkpoints/<name> when it exists (else built untrained
with the same architecture: the cost is the same). The remote side is a real
``teacher-server`` process on a loopback port; the in-process side is the
``LocalTeacher`` adapter the trainer uses by default. Both run the same code path,
so the ratio isolates what the wire costs: serialisation, gRPC, the server's
validation and batching. Reported per (teacher, op, batch): median latency of one
call at a time over ``--reps`` calls after warm-up, the per-call overhead (remote
median - in-process median), and throughput in rows/s with ``--streams`` callers
at once (in-process: as many threads on the same teacher object), whose ratio is
remote/in-process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from services.teacher_server.checkpoint import load_teacher, save_teacher  # noqa: E402
from services.teacher_server.client import LocalTeacher, RemoteTeacher  # noqa: E402
from services.teacher_server.tuning import tune_allocator  # noqa: E402

from local_servers import start_teacher_server, stop  # noqa: E402  (bench/, beside this script)

TEXT = (
    "User: 24 year old male technician. Average rating 3.55 over 222 movies. Recently rated: Faster Pussycat! "
    "Kill! Kill!: 1; Aristocats, The: 2; When the Cats Away: 4. Movie: Toy Story (1995); Animation, Children's, "
    "Comedy. Average rating 3.91 from 360 users."
)  # a typical 63-token prompt


def build_teacher(name: str):
    folder = REPO / "checkpoints" / name
    if (folder / "teacher.yaml").is_file():
        return load_teacher(folder), f"checkpoints/{name}"
    if name == "lm":
        from services.teacher_server.zoo import MiniLMTeacher

        return MiniLMTeacher.pretrained("lm").freeze(), "pretrained MiniLM, untrained head"
    from services.teacher_server.zoo import MLPTeacher
    from services.teacher_server.zoo.recsys_mlp import RecsysMLP, RecsysMLPConfig
    from trainer.models import TOWERS

    config = RecsysMLPConfig(944, 1683, hidden=TOWERS[name], embed_dim=64, side_features=False)
    return MLPTeacher(name, RecsysMLP(config)).freeze(), "untrained, same architecture"


def answer_inputs(spec, batch: int) -> dict:
    """The raw inputs Answer needs for ``batch`` rows: a typical prompt, or random uint8 images."""
    inputs = {}
    for needed in spec.answer_inputs:
        if needed.name == "text":
            inputs["text"] = [TEXT] * batch
        elif needed.name == "image":
            inputs["image"] = torch.randint(0, 256, (batch, *needed.shape), dtype=torch.uint8)
        else:
            raise ValueError(f"no benchmark input for {needed.name!r}")
    return inputs


def time_calls(fn, reps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def throughput(call, rows_per_call: int, streams: int, calls_per_stream: int) -> float:
    """Rows per second with ``streams`` threads each making ``calls_per_stream`` calls."""
    call()
    barrier = threading.Barrier(streams + 1)

    def worker():
        barrier.wait()
        for _ in range(calls_per_stream):
            call()

    workers = [threading.Thread(target=worker) for _ in range(streams)]
    for w in workers:
        w.start()
    barrier.wait()
    start = time.perf_counter()
    for w in workers:
        w.join()
    return streams * calls_per_stream * rows_per_call / (time.perf_counter() - start)


def bench_teacher(name: str, batches: list[int], reps: int, threads: int, streams: int) -> list[dict]:
    teacher, source = build_teacher(name)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_teacher(teacher, Path(tmp) / name)
        server, address = start_teacher_server(folder, threads)
        try:
            remote = RemoteTeacher(address, timeout_s=600)
            local = LocalTeacher(load_teacher(folder))
            rows = []
            for batch in batches:
                question = torch.randn(batch, *local.spec.question_shape)
                inputs = answer_inputs(local.spec, batch)
                d_hidden = torch.randn(batch, local.spec.hidden_size)
                d_pred = torch.randn(batch, *local.spec.prediction_shape)
                n = max(2, reps // 10) if name == "lm" and batch > 64 else reps
                ops = {
                    "Answer": lambda e: e.answer(question, inputs),
                    "AnswerVJP": lambda e: e.answer_vjp(question, inputs, d_hidden, d_pred),
                }
                for op, call in ops.items():
                    result = {"teacher": name, "source": source, "op": op, "batch": batch, "reps": n, "streams": streams}
                    for where, endpoint in (("local", local), ("remote", remote)):
                        times = time_calls(lambda: call(endpoint), n, warmup=1 if n < reps else 3)
                        result[f"{where}_ms"] = statistics.median(times) * 1e3
                        result[f"{where}_rows_per_s"] = throughput(
                            lambda: call(endpoint), batch, streams, max(1, n // streams)
                        )
                    result["throughput_ratio"] = result["remote_rows_per_s"] / result["local_rows_per_s"]
                    result["overhead_ms"] = result["remote_ms"] - result["local_ms"]
                    rows.append(result)
                    print(format_row(result), flush=True)
            remote.close()
        finally:
            stop(server)
    return rows


def format_row(r: dict) -> str:
    return (
        f"| {r['teacher']} | {r['op']} | {r['batch']} | {r['local_ms']:.2f} | {r['remote_ms']:.2f} | "
        f"{r['local_rows_per_s']:,.0f} | {r['remote_rows_per_s']:,.0f} | {r['throughput_ratio']:.3f} | "
        f"{r['overhead_ms']:+.2f} |"
    )


HEADER = (
    "| teacher | op | batch | in-process ms | remote ms | in-process rows/s | remote rows/s | remote/in-process "
    "throughput | overhead ms per call |\n|---|---|---|---|---|---|---|---|---|"
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teachers", default="mlp-l,lm")
    p.add_argument("--batches", default="64,1024")
    p.add_argument("--reps", type=int, default=50, help="timed calls per cell (LM at batch > 64: a tenth)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads on both sides")
    p.add_argument("--streams", type=int, default=2, help="concurrent callers in the throughput measurement")
    p.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tune_allocator()  # as teacher-server and ddistill do
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs, {args.streams} streams for "
          f"throughput\n{HEADER}", flush=True)
    rows = []
    for name in args.teachers.split(","):
        rows += bench_teacher(name, [int(b) for b in args.batches.split(",")], args.reps, args.threads, args.streams)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
