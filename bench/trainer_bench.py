"""DiverseDistill training steps per second, as ratios measured in one run.

    python bench/trainer_bench.py --teachers checkpoints/mlp-m,checkpoints/mlp-l --steps 200

Configurations, each a fresh Trainer on ml-100k with the same seed:

* in-process: the teachers as ``local:`` endpoints, concurrent fan-out, gate open;
* in-process, VJP recomputed: the same, with each AnswerVJP running its forward again instead of
  using the answer's graph (what ``LocalTeacher`` did before 2026-12-04);
* remote: the same checkpoints behind ``teacher-server`` processes on loopback, each keeping the
  answer's graph for the AnswerVJP that follows (``--keep-graphs``);
* remote, VJP recomputed: the same servers, asked to keep no graph (what they did before 2026-12-05);
* remote, sequential fan-out (teachers called one after another);
* remote, gated: the gate closes after a short warm-up (threshold 0.6), so only the
  pairs whose importance passes are sent; the share of rows saved is reported beside.

Reported: milliseconds per step (median over ``--steps`` after ``--warmup`` steps)
and each configuration's ratio to in-process. The configurations take turns, ``--rounds``
times (a fresh Trainer each time): this VM's speed drifts by up to a third between minutes,
so each ratio is taken within a round, against that round's in-process time, and the
median over rounds is reported with its range.
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

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from services.teacher_server.client import TeacherEndpoint  # noqa: E402
from services.teacher_server.tuning import tune_allocator  # noqa: E402
from trainer.methods import DistillConfig  # noqa: E402
from trainer.train import TrainConfig, Trainer  # noqa: E402

from local_servers import start_teacher_server, stop  # noqa: E402  (bench/, beside this script)


def recomputing(endpoint: TeacherEndpoint) -> None:
    """Make ``endpoint`` keep no answer's graph, so that its VJP runs the forward again."""
    answer = endpoint.answer
    endpoint.answer = lambda question, inputs=None, keep_graph=False: answer(question, inputs)


def time_steps(config: TrainConfig, steps: int, warmup: int, recompute: bool = False) -> dict:
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(config, run_dir)
        try:
            if recompute:
                for endpoint in trainer.committee.endpoints:
                    recomputing(endpoint)
            for _ in range(warmup):
                trainer.train_step()
            sent_before = trainer.committee.rows_sent.sum()
            possible_before = trainer.committee.rows_possible.sum()
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                trainer.train_step()
                times.append(time.perf_counter() - start)
            sent = trainer.committee.rows_sent.sum() - sent_before  # the timed steps only
            possible = trainer.committee.rows_possible.sum() - possible_before
            return {"ms_per_step": statistics.median(times) * 1e3, "rows_sent_share": float(sent / possible)}
        finally:
            trainer.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teachers", default="checkpoints/mlp-m,checkpoints/mlp-l", help="teacher checkpoint folders")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "ml-100k"))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=100, help="untimed steps first (the gated run's gate closes after)")
    p.add_argument("--threads", type=int, default=1, help="torch threads in the trainer and in each server")
    p.add_argument("--rounds", type=int, default=3, help="times each configuration is timed, taking turns")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tune_allocator()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    checkpoints = args.teachers.split(",")
    servers, addresses = zip(*(start_teacher_server(c, args.threads) for c in checkpoints))
    urls = [f"grpc://{address}" for address in addresses]
    base = dict(data=args.data, steps=10**9, device="cpu", cache_dir=None)
    open_gate = DistillConfig(gate_warmup=10**9)
    gated = DistillConfig(gate_warmup=args.warmup)
    configs = {
        "in-process": TrainConfig(teachers=[f"local:{c}" for c in checkpoints], distill=open_gate, **base),
        "in-process, VJP recomputed": TrainConfig(teachers=[f"local:{c}" for c in checkpoints], distill=open_gate,
                                                  **base),
        "remote": TrainConfig(teachers=urls, distill=open_gate, **base),
        "remote, VJP recomputed": TrainConfig(teachers=urls, distill=open_gate, **base),
        "remote, sequential": TrainConfig(teachers=urls, distill=open_gate, concurrent=False, **base),
        "remote, gated": TrainConfig(teachers=urls, distill=gated, **base),
    }
    rounds: list[dict[str, dict]] = []
    try:
        for _ in range(args.rounds):
            rounds.append({name: time_steps(config, args.steps, args.warmup, recompute="recomputed" in name)
                           for name, config in configs.items()})
    finally:
        for server in servers:
            stop(server)
    results = {}
    for name in configs:
        ms = [r[name]["ms_per_step"] for r in rounds]
        ratios = [r[name]["ms_per_step"] / r["in-process"]["ms_per_step"] for r in rounds]
        results[name] = {"ms_per_step": statistics.median(ms), "ms_per_step_rounds": ms,
                         "vs_in_process": statistics.median(ratios), "vs_in_process_rounds": ratios,
                         "rows_sent_share": statistics.mean(r[name]["rows_sent_share"] for r in rounds)}
    print(f"teachers {', '.join(Path(c).name for c in checkpoints)}; {args.steps} steps after {args.warmup}; "
          f"{args.threads} torch thread(s) per process; {args.rounds} rounds\n")
    print("| configuration | ms / step (median of rounds) | vs in-process (median, range) | teacher rows sent |\n"
          "|---|---|---|---|")
    for name, r in results.items():
        ratios = r["vs_in_process_rounds"]
        print(f"| {name} | {r['ms_per_step']:.1f} | {r['vs_in_process']:.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) | "
              f"{r['rows_sent_share']:.0%} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
