"""Ray Serve vs the plain grpcio server, one teacher's throughput as replicas go 1 -> 2, and
where two replicas send a trainer's AnswerVJP.

    python bench/serve_bench.py                                   # the numbers in docs/deploy.md
    python bench/serve_bench.py --overhead-teacher mlp-m --reps 100 --seconds 10 --out bench/results/serve.json
    python bench/serve_bench.py --parts routing --out bench/results/serve_routing.json

Three measurements (``--parts``) in one run, on real weights (checkpoints/<teacher> when it exists, else
the same architecture untrained, as teacher_bench.py does):

1. **Overhead.** Sequential Answer calls of ``--batches`` rows (64 and 1024): in process
   (LocalTeacher, no network), through a plain ``teacher-server`` process, through
   Ray Serve's gRPC proxy to one replica, and to the same replica's own port (direct ingress, which
   this script's Serve instance has on: no proxy, no router). Median ms per call; a path's overhead is its
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
   then says so rather than showing scaling (docs/deploy.md, Ray Serve).

3. **Routing.** One trainer-like client on two replicas, ``--routing-reps`` steps of Answer with
   ``keep_graph`` then AnswerVJP naming the graph (what ``ddistill train`` sends), once with Serve's
   default router (``kept_graph_routing=false``) and once with ``KeptGraphRouter``. Reported: the
   share of VJPs that missed their graph (NOT_FOUND: sent again in full) and the median step.

4. **Concurrency.** ``--callers`` (1, 8, 64) threads, each one Answer of ``--batches``' first size at a
   time, for ``--seconds`` against the plain server, Serve's proxy and the replica's own port: calls/s and
   p50 per path, and
   at one caller where Serve's time goes: the in-replica time (the replica's own
   ``teacher_request_seconds``: decode, validation, batching, compute, encode), the same call through a
   ``DeploymentHandle`` from the driver (router + actor call + replica, no proxy), and the rest
   (Serve's gRPC proxy), for each ``--batch-waits`` window of ``@serve.batch``. Every reply is checked against the in-process answer.

Every reply in the scaling and routing runs is checked against the in-process answer; the script
exits 1 on any error or mismatch.
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

APP = "teacher"


# -- Ray Serve ------------------------------------------------------------------------------


def start_serve() -> tuple[str, str]:
    """A local Ray + Serve with the TeacherService on a free gRPC port, and direct ingress on: every
    ingress replica also serves the TeacherService on a port of its own, with no proxy or router in
    between. Returns (the proxy's target, the first replica's own target)."""
    from services.teacher_server.ray_app import LOCAL_RAY_ENV, SERVICER_FUNCTION, direct_ingress_env

    direct_grpc, direct_http = free_port(), free_port()
    os.environ.update(LOCAL_RAY_ENV)
    os.environ.update(direct_ingress_env(direct_grpc, direct_http, draining_s=0))  # no load balancer in front
    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(
        http_options={"host": "127.0.0.1", "port": free_port()},
        grpc_options=gRPCOptions(port=port, grpc_servicer_functions=[SERVICER_FUNCTION]),
    )
    return f"127.0.0.1:{port}", f"127.0.0.1:{direct_grpc}"


def deploy(checkpoint: Path, replicas: int, threads: int, kept_graph_routing: bool = True, app: str = APP) -> None:
    """(Re)deploy the teacher as ``app`` with ``replicas`` replicas and wait until all of them run."""
    from ray import serve

    from services.teacher_server.ray_app import build_app

    application = build_app({"checkpoint": str(checkpoint), "num_replicas": replicas, "num_cpus": 0.1,
                     "torch_threads": threads, "device": "cpu", "kept_graph_routing": kept_graph_routing})
    serve.run(application, name=app, route_prefix=f"/{app}")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        deployments = serve.status().applications[app].deployments
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


def serve_client(target: str, timeout_s: float = 120, app: str = APP) -> RemoteTeacher:
    return RemoteTeacher(target, timeout_s=timeout_s, auth=ClientAuth(application=app))


# -- 1. overhead ----------------------------------------------------------------------------


def overhead(local: LocalTeacher, plain: RemoteTeacher, served: RemoteTeacher, direct: RemoteTeacher,
             batches: list[int], reps: int) -> list[dict]:
    rows = []
    for batch in batches:
        question = torch.randn(batch, *local.spec.question_shape, generator=torch.Generator().manual_seed(batch))
        row = {"batch": batch, "reps": reps}
        for where, endpoint in (("in_process", local), ("plain_grpc", plain), ("ray_serve", served),
                                ("serve_direct", direct)):
            row[f"{where}_ms"] = statistics.median(time_calls(lambda: endpoint.answer(question), reps, warmup=5)) * 1e3
        for where in ("plain_grpc", "ray_serve", "serve_direct"):
            row[f"{where}_overhead_ms"] = row[f"{where}_ms"] - row["in_process_ms"]
        row["serve_vs_plain"] = row["ray_serve_ms"] / row["plain_grpc_ms"]
        row["serve_direct_vs_plain"] = row["serve_direct_ms"] / row["plain_grpc_ms"]
        rows.append(row)
        print(f"batch {batch:5d}: in-process {row['in_process_ms']:.2f} ms, plain gRPC {row['plain_grpc_ms']:.2f} ms "
              f"(+{row['plain_grpc_overhead_ms']:.2f}), Ray Serve {row['ray_serve_ms']:.2f} ms "
              f"(+{row['ray_serve_overhead_ms']:.2f}), Serve direct {row['serve_direct_ms']:.2f} ms; Serve / plain "
              f"{row['serve_vs_plain']:.2f}x, direct / plain {row['serve_direct_vs_plain']:.2f}x", flush=True)
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


# -- 3. routing -----------------------------------------------------------------------------


def routing_point(target: str, app: str, case: dict, reps: int) -> dict:
    """``reps`` trainer steps (Answer keeping its graph, then its AnswerVJP) after 5 untimed ones."""
    client = serve_client(target, app=app)
    times, mismatches = [], 0
    for step in range(reps + 5):
        if step == 5:
            client.graphs_missed = 0
        t0 = time.perf_counter()
        client.answer(case["question"], case["inputs"], keep_graph=True)
        grad = client.answer_vjp(case["question"], case["inputs"], hidden_cotangent=case["d_hidden"])
        times.append(time.perf_counter() - t0)
        mismatches += not torch.allclose(grad, case["grad"], rtol=1e-4, atol=1e-4)
    client.close()
    return {"steps": reps, "vjps_missed": client.graphs_missed / reps,
            "step_ms": statistics.median(times[5:]) * 1e3, "mismatches": mismatches}


# -- 4. concurrency ---------------------------------------------------------------------------


def concurrent_calls(endpoint: RemoteTeacher, question: torch.Tensor, want: torch.Tensor, callers: int,
                     seconds: float) -> dict:
    """``callers`` threads sharing one channel, each one Answer at a time for ``seconds``."""
    import threading

    start, stop_at, lock = threading.Barrier(callers + 1), [0.0], threading.Lock()
    latencies, errors = [], [0]

    def caller() -> None:
        mine = []
        start.wait()
        while time.perf_counter() < stop_at[0]:
            t0 = time.perf_counter()
            try:
                ok = torch.allclose(endpoint.answer(question).hidden, want, rtol=1e-4, atol=1e-4)
            except Exception:  # noqa: BLE001 - counted, reported, and the run fails
                ok = False
            mine.append(time.perf_counter() - t0)
            errors[0] += not ok
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=caller) for _ in range(callers)]
    for t in threads:
        t.start()
    stop_at[0] = time.perf_counter() + seconds
    start.wait()
    for t in threads:
        t.join()
    return {"calls_per_s": len(latencies) / seconds, "p50_ms": statistics.median(latencies) * 1e3,
            "errors_or_mismatches": errors[0]}


def replica_answer_seconds(handle) -> tuple[float, float]:
    """(sum, count) of the replica's Answer latency histogram, read through its /metrics handler."""
    import re

    text = handle.get_metrics.remote().result().body.decode()
    found = [re.search(rf'teacher_request_seconds_{part}{{[^}}]*method="Answer"[^}}]*}} (\S+)', text)
             for part in ("sum", "count")]
    return tuple(float(m.group(1)) if m else 0.0 for m in found)  # (0, 0) before the first Answer


def serve_breakdown(served: RemoteTeacher, question: torch.Tensor, reps: int) -> dict:
    """At one caller: Serve's gRPC path, the handle path, and the in-replica time of each."""
    from ray import serve

    from services.teacher_server.codec import encode

    from ddistill.teacher.v1 import teacher_pb2 as pb

    handle = serve.get_app_handle(APP)
    request = pb.AnswerRequest(question=encode(question))
    s0, c0 = replica_answer_seconds(handle)
    grpc_ms = statistics.median(time_calls(lambda: served.answer(question), reps, warmup=5)) * 1e3
    s1, c1 = replica_answer_seconds(handle)
    handle_ms = statistics.median(time_calls(lambda: handle.Answer.remote(request).result(), reps, warmup=5)) * 1e3
    s2, c2 = replica_answer_seconds(handle)
    in_replica_ms = (s1 - s0) / (c1 - c0) * 1e3
    return {"serve_grpc_ms": grpc_ms, "handle_ms": handle_ms, "in_replica_ms": in_replica_ms,
            "in_replica_via_handle_ms": (s2 - s1) / (c2 - c1) * 1e3,
            "router_and_actor_call_ms": handle_ms - in_replica_ms, "grpc_proxy_ms": grpc_ms - handle_ms}


def concurrency(local: LocalTeacher, plain: RemoteTeacher, served: RemoteTeacher, direct: RemoteTeacher, batch: int,
                callers: list[int], seconds: float, reps: int, batch_waits: list[float]) -> dict:
    question = torch.randn(batch, *local.spec.question_shape, generator=torch.Generator().manual_seed(batch))
    want = local.answer(question).hidden
    rows = []
    for n in callers:
        row = {"callers": n, "batch": batch}
        for where, endpoint in (("plain_grpc", plain), ("ray_serve", served), ("serve_direct", direct)):
            row[where] = concurrent_calls(endpoint, question, want, n, seconds)
        for where in ("ray_serve", "serve_direct"):
            row[f"{where}_vs_plain_p50"] = row[where]["p50_ms"] / row["plain_grpc"]["p50_ms"]
            row[f"{where}_vs_plain_calls"] = row[where]["calls_per_s"] / row["plain_grpc"]["calls_per_s"]
        rows.append(row)
        print(f"{n:3d} callers, batch {batch}: " + "; ".join(
            f"{where} {row[where]['calls_per_s']:.0f} calls/s p50 {row[where]['p50_ms']:.2f} ms"
            for where in ("plain_grpc", "ray_serve", "serve_direct"))
            + f" (Serve {row['ray_serve_vs_plain_p50']:.2f}x, direct {row['serve_direct_vs_plain_p50']:.2f}x)", flush=True)
    from ray import serve

    from services.teacher_server.ray_app import DEFAULT_BATCH_WAIT_S

    breakdowns = []
    for wait in batch_waits:  # the deployment's batching window, changed live as a user_config would
        serve.get_app_handle(APP).reconfigure.remote({"batch_wait_timeout_s": wait}).result()
        breakdowns.append({"batch_wait_timeout_s": wait, **serve_breakdown(served, question, reps)})
        print(f"one caller, Serve, batch wait {wait * 1e3:g} ms: "
              + ", ".join(f"{k} {v:.2f}" for k, v in breakdowns[-1].items() if k.endswith("_ms")), flush=True)
    serve.get_app_handle(APP).reconfigure.remote({"batch_wait_timeout_s": DEFAULT_BATCH_WAIT_S}).result()
    return {"points": rows, "breakdown_one_caller": breakdowns}


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
    parser.add_argument("--routing-teacher", default="mlp-l", help="the teacher of the routing part")
    parser.add_argument("--routing-batch", type=int, default=64, help="rows per call, routing part")
    parser.add_argument("--routing-reps", type=int, default=200, help="steps per router, routing part")
    parser.add_argument("--callers", type=int, nargs="+", default=[1, 8, 64], help="concurrency part")
    parser.add_argument("--batch-waits", type=float, nargs="+", default=[0.0, 0.002],
                        help="@serve.batch windows (s) of the concurrency part's one-caller breakdown")
    parser.add_argument("--parts", nargs="+", choices=["overhead", "scaling", "routing", "concurrency"],
                        default=["overhead", "scaling", "routing", "concurrency"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per server process / replica")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    teachers = {"overhead": args.overhead_teacher, "scaling": args.scaling_teacher, "routing": args.routing_teacher,
                "concurrency": args.overhead_teacher}
    sources, report = {}, {"threads": args.threads, "cpus": os.cpu_count(),
                           "machine": platform.processor() or platform.machine(), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        folders = {}
        for name in {teachers[part] for part in args.parts}:
            teacher, sources[name] = build_teacher(name)
            folders[name] = save_teacher(teacher, Path(tmp) / name)
            del teacher
        process = None
        target, direct_target = start_serve()
        try:
            if {"overhead", "concurrency"} & set(args.parts):
                local = LocalTeacher(load_teacher(folders[args.overhead_teacher]))
                process, address = start_teacher_server(folders[args.overhead_teacher], args.threads)
                deploy(folders[args.overhead_teacher], 1, args.threads)
                plain, served = RemoteTeacher(address, timeout_s=120), serve_client(target)
                direct = RemoteTeacher(direct_target, timeout_s=120)  # the replica itself: no application metadata
                report["overhead_teacher"] = args.overhead_teacher
                if "overhead" in args.parts:
                    report["overhead"] = overhead(local, plain, served, direct, args.batches, args.reps)
                if "concurrency" in args.parts:
                    report["concurrency"] = concurrency(local, plain, served, direct, args.batches[0], args.callers,
                                                        args.seconds, args.reps, args.batch_waits)
                for endpoint in (plain, served, direct):
                    endpoint.close()
                stop(process)
                process = None

            if "scaling" in args.parts:
                local = LocalTeacher(load_teacher(folders[args.scaling_teacher]))
                cases = [make_case(local, args.scaling_batch, seed) for seed in range(args.trainers)]
                scaling = []
                for replicas in args.replicas:
                    deploy(folders[args.scaling_teacher], replicas, args.threads)
                    point = {"replicas": replicas, "trainers": args.trainers, "batch": args.scaling_batch,
                             **scaling_point(target, cases, args.seconds)}
                    scaling.append(point)
                    print(f"{args.scaling_teacher}, {replicas} replica(s), {args.trainers} trainers, "
                          f"batch {args.scaling_batch}: {point['calls_per_s']:.1f} calls/s, "
                          f"p50 {[round(x, 1) for x in point['p50_ms']]} ms, {point['errors']} errors, "
                          f"{point['mismatches']} mismatches", flush=True)
                for point in scaling:
                    point["speedup_vs_1"] = point["calls_per_s"] / scaling[0]["calls_per_s"]
                report["scaling_teacher"], report["scaling"] = args.scaling_teacher, scaling

            if "routing" in args.parts:
                from ray import serve

                case = make_case(LocalTeacher(load_teacher(folders[args.routing_teacher])), args.routing_batch, 0)
                routing = []
                for kept_graph_routing in (False, True):  # an application each: a proxy keeps an app's router
                    app = f"routing-{'kept' if kept_graph_routing else 'default'}"
                    deploy(folders[args.routing_teacher], 2, args.threads, kept_graph_routing, app=app)
                    point = {"router": "KeptGraphRouter" if kept_graph_routing else "Serve's default",
                             "replicas": 2, "batch": args.routing_batch,
                             **routing_point(target, app, case, args.routing_reps)}
                    serve.delete(app)
                    routing.append(point)
                    print(f"{args.routing_teacher}, 2 replicas, router {point['router']}: "
                          f"{point['vjps_missed']:.0%} of VJPs missed their graph, step {point['step_ms']:.2f} ms, "
                          f"{point['mismatches']} mismatches", flush=True)
                routing[1]["step_vs_default"] = routing[1]["step_ms"] / routing[0]["step_ms"]
                report["routing_teacher"], report["routing"] = args.routing_teacher, routing
        finally:
            if process is not None:
                stop(process)
            stop_serve()

    report["sources"] = sources
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    failed = any(p["errors"] or p["mismatches"] for p in report.get("scaling", []))
    failed |= any(p["mismatches"] for p in report.get("routing", []))
    failed |= any(p[where]["errors_or_mismatches"] for p in report.get("concurrency", {}).get("points", [])
                  for where in ("plain_grpc", "ray_serve", "serve_direct"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
