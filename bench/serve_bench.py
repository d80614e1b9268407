"""Ray Serve vs the plain grpcio server, and one teacher's throughput as replicas go 1 -> 2.

    python bench/serve_bench.py                                   # the README numbers
    python bench/serve_bench.py --overhead-teacher mlp-m --reps 100 --seconds 10 --out bench/results/serve.json

Two measurements in one run, on real weights (checkpoints/<teacher> when it exists, else
the same architecture untrained, as teacher_bench.py does):

1. **Overhead.** Sequential Answer calls of ``--batches`` rows (64 and 1024): in process
   (LocalTeacher, no network), through a plain ``teacher-server`` process, and through
   Ray Serve's gRPC proxy to one replica. Median ms per call; a path's overhead is its
   median minus the in-process one (serialization, the network hop(s), scheduling). Both
   servers run the teacher with ``--threads`` torch threads.
2. **Scaling.** Two "trainers" (separate processes, each looping Answer + AnswerVJP on
   ``--scaling-batch`` rows, one call at a time, as a trainer's step does) share one Serve
   application for ``--seconds``; once with ``num_replicas=1``, once with 2 (each replica
   ``--threads`` torch threads). Reported: calls/s of both together and each trainer's p50.
   The default teacher is the LM, whose calls are compute-bound (small messages, ~1 s of
   forward + VJP per 64 rows on one core), so replicas have work to share; for MLP-L at batch
   1024 the proxy's message handling, not the teacher, is the bottleneck on a small machine.
   With fewer free cores than replicas, the second replica has nothing to run on: the ratio
   then says so rather than showing scaling (README, "Run a fleet").

Every reply in the scaling run is checked against the in-process answer; the script exits
1 on any error or mismatch.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from services.teacher_server.auth import ClientAuth  # noqa: E402
from services.teacher_server.checkpoint import load_teacher, save_teacher  # noqa: E402
from services.teacher_server.client import LocalTeacher, RemoteTeacher  # noqa: E402

from local_servers import free_port, start_teacher_server, stop  # noqa: E402  (bench/, beside this script)
from teacher_bench import answer_inputs, build_teacher, time_calls  # noqa: E402

SERVICER_FUNCTION = "ddistill.teacher.v1.teacher_pb2_grpc.add_TeacherServiceServicer_to_server"
APP = "teacher"
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


# -- Ray Serve ------------------------------------------------------------------------------


def start_serve() -> str:
    """A local Ray + Serve with the TeacherService on a free gRPC port; returns the target."""
    os.environ.update(RAY_ENV)
    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(
        http_options={"host": "127.0.0.1", "port": free_port()},
        grpc_options=gRPCOptions(port=port, grpc_servicer_functions=[SERVICER_FUNCTION]),
    )
    return f"127.0.0.1:{port}"


def deploy(checkpoint: Path, replicas: int, threads: int) -> None:
    """(Re)deploy the teacher with ``replicas`` replicas and wait until all of them run."""
    from ray import serve

    from services.teacher_server.ray_app import build_app

    app = build_app({"checkpoint": str(checkpoint), "num_replicas": replicas, "num_cpus": 0.1,
                     "torch_threads": threads, "device": "cpu"})
    serve.run(app, name=APP, route_prefix=f"/{APP}")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        deployments = serve.status().applications[APP].deployments
        running = sum(d.replica_states.get("RUNNING", 0) for d in deployments.values())
        if running == replicas and all(d.status == "HEALTHY" for d in deployments.values()):
            return
        time.sleep(0.5)
    raise TimeoutError(f"{replicas} replica(s) did not come up in 120 s")


def stop_serve() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def serve_client(target: str, timeout_s: float = 120) -> RemoteTeacher:
    return RemoteTeacher(target, timeout_s=timeout_s, auth=ClientAuth(application=APP))


# -- 1. overhead ----------------------------------------------------------------------------


def overhead(local: LocalTeacher, plain: RemoteTeacher, served: RemoteTeacher, batches: list[int], reps: int) -> list[dict]:
    rows = []
    for batch in batches:
        question = torch.randn(batch, *local.spec.question_shape, generator=torch.Generator().manual_seed(batch))
        row = {"batch": batch, "reps": reps}
        for where, endpoint in (("in_process", local), ("plain_grpc", plain), ("ray_serve", served)):
            row[f"{where}_ms"] = statistics.median(time_calls(lambda: endpoint.answer(question), reps, warmup=5)) * 1e3
        for where in ("plain_grpc", "ray_serve"):
            row[f"{where}_overhead_ms"] = row[f"{where}_ms"] - row["in_process_ms"]
        row["serve_vs_plain"] = row["ray_serve_ms"] / row["plain_grpc_ms"]
        rows.append(row)
        print(f"batch {batch:5d}: in-process {row['in_process_ms']:.2f} ms, plain gRPC {row['plain_grpc_ms']:.2f} ms "
              f"(+{row['plain_grpc_overhead_ms']:.2f}), Ray Serve {row['ray_serve_ms']:.2f} ms "
              f"(+{row['ray_serve_overhead_ms']:.2f}); Serve / plain {row['serve_vs_plain']:.2f}x", flush=True)
    return rows


# -- 2. scaling -----------------------------------------------------------------------------


def trainer_loop(target: str, case: dict, seconds: float, ready, start, results) -> None:
    """One trainer-like client: Answer then AnswerVJP on the same rows, one call at a time."""
    torch.set_num_threads(1)
    client = serve_client(target)
    client.answer(case["question"], case["inputs"])  # connected and warm before the clock
    ready.set()
    start.wait()
    latencies, errors, mismatches = [], 0, 0
    end = time.perf_counter() + seconds
    calls = 0
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        try:
            if calls % 2 == 0:
                got = client.answer(case["question"], case["inputs"])
                ok = torch.allclose(got.hidden, case["hidden"], rtol=1e-4, atol=1e-4)
            else:
                got = client.answer_vjp(case["question"], case["inputs"], hidden_cotangent=case["d_hidden"])
                ok = torch.allclose(got, case["grad"], rtol=1e-4, atol=1e-4)
            mismatches += not ok
        except Exception:  # noqa: BLE001 - counted, reported, and the run fails
            errors += 1
        latencies.append(time.perf_counter() - t0)
        calls += 1
    client.close()
    results.put({"calls": calls, "latencies": latencies, "errors": errors, "mismatches": mismatches})


def scaling_point(target: str, cases: list[dict], seconds: float) -> dict:
    ctx = mp.get_context("spawn")
    start, results = ctx.Event(), ctx.Queue()
    readies = [ctx.Event() for _ in cases]
    procs = [ctx.Process(target=trainer_loop, args=(target, case, seconds, ready, start, results))
             for case, ready in zip(cases, readies)]
    for p in procs:
        p.start()
    for ready in readies:
        ready.wait(timeout=120)
    start.set()
    outs = [results.get(timeout=seconds + 120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    calls = sum(o["calls"] for o in outs)
    return {
        "calls_per_s": calls / seconds,
        "per_trainer_calls_per_s": [o["calls"] / seconds for o in outs],
        "p50_ms": [statistics.median(o["latencies"]) * 1e3 for o in outs],
        "errors": sum(o["errors"] for o in outs),
        "mismatches": sum(o["mismatches"] for o in outs),
    }


def make_case(local: LocalTeacher, batch: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    question = torch.randn(batch, *local.spec.question_shape, generator=g)
    d_hidden = torch.randn(batch, local.spec.hidden_size, generator=g)
    inputs = answer_inputs(local.spec, batch)
    return {"question": question, "inputs": inputs, "d_hidden": d_hidden, "hidden": local.answer(question, inputs).hidden,
            "grad": local.answer_vjp(question, inputs, hidden_cotangent=d_hidden)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--overhead-teacher", default="mlp-l", help="checkpoints/<name> (or that architecture untrained)")
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 1024], help="rows per call, overhead part")
    parser.add_argument("--reps", type=int, default=200, help="calls per path and batch, overhead part")
    parser.add_argument("--scaling-teacher", default="lm", help="the teacher of the scaling part")
    parser.add_argument("--scaling-batch", type=int, default=64, help="rows per call, scaling part")
    parser.add_argument("--trainers", type=int, default=2, help="concurrent trainer processes, scaling part")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seconds", type=float, default=30.0, help="timed window per replica count")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per server process / replica")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    sources = {}
    with tempfile.TemporaryDirectory() as tmp:
        folders = {}
        for name in {args.overhead_teacher, args.scaling_teacher}:
            teacher, sources[name] = build_teacher(name)
            folders[name] = save_teacher(teacher, Path(tmp) / name)
            del teacher
        local = LocalTeacher(load_teacher(folders[args.overhead_teacher]))
        process, address = start_teacher_server(folders[args.overhead_teacher], args.threads)
        target = start_serve()
        try:
            deploy(folders[args.overhead_teacher], 1, args.threads)
            plain, served = RemoteTeacher(address, timeout_s=120), serve_client(target)
            overhead_rows = overhead(local, plain, served, args.batches, args.reps)
            plain.close()
            served.close()
            stop(process)
            process = None

            local = LocalTeacher(load_teacher(folders[args.scaling_teacher]))
            cases = [make_case(local, args.scaling_batch, seed) for seed in range(args.trainers)]
            scaling = []
            for replicas in args.replicas:
                deploy(folders[args.scaling_teacher], replicas, args.threads)
                point = {"replicas": replicas, "trainers": args.trainers, "batch": args.scaling_batch,
                         **scaling_point(target, cases, args.seconds)}
                scaling.append(point)
                print(f"{args.scaling_teacher}, {replicas} replica(s), {args.trainers} trainers, batch {args.scaling_batch}: "
                      f"{point['calls_per_s']:.1f} calls/s, p50 {[round(x, 1) for x in point['p50_ms']]} ms, "
                      f"{point['errors']} errors, {point['mismatches']} mismatches", flush=True)
            for point in scaling:
                point["speedup_vs_1"] = point["calls_per_s"] / scaling[0]["calls_per_s"]
        finally:
            if process is not None:
                stop(process)
            stop_serve()

    report = {
        "overhead_teacher": args.overhead_teacher, "scaling_teacher": args.scaling_teacher, "sources": sources,
        "threads": args.threads, "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "overhead": overhead_rows, "scaling": scaling,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    failed = any(p["errors"] or p["mismatches"] for p in scaling)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
