"""What a DiverseDistill step costs when the language model answers a budgeted share of the rows.

    python bench/budget_step_bench.py --budgets 0.025 0.05 0.1 0.2 --out bench/results/budget_step.json

The committee is MLP-L (the plain gate) + the LM (``?budget=B``, computing in ``--lm-dtype``, by default
``auto``: bfloat16 where the CPU computes it natively), in-process, one torch thread: what one run of the
tables costs on one core. For each budget, a fresh Trainer on ml-100k (the LM's Predict outputs come from
the cache the runs share, ``runs/.cache``; the first time they take ~25 min) runs ``--warmup`` untimed
steps and then ``--steps`` timed ones, and we report the median ms per step, the LM's share of it
(its Answer and AnswerVJP calls, timed where the committee makes them), the LM's ms per row answered
(Answer + AnswerVJP), and what 8,000 steps would take. Pick the largest budget whose 8,000 steps fit
the time you have.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainer.train import TrainConfig, Trainer  # noqa: E402

PAPER_STEPS = 8000


def timed(endpoint, seconds: list[float]) -> None:
    """Add the wall time of each of ``endpoint``'s Answer and AnswerVJP calls to ``seconds[-1]``."""
    for name in ("answer", "answer_vjp"):
        call = getattr(endpoint, name)

        def wrapper(*args, call=call, **kwargs):
            start = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                seconds[-1] += time.perf_counter() - start

        setattr(endpoint, name, wrapper)


def measure(args: argparse.Namespace, budget: float) -> dict:
    lm = f"local:{args.lm}?budget={budget:g}&dtype={args.lm_dtype}"
    config = TrainConfig(teachers=[f"local:{args.mlp}", lm], data=args.data, seed=0, steps=args.warmup + args.steps,
                         device="cpu", cache_dir=str(REPO / "runs" / ".cache"))
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(config, run_dir)
        try:
            lm_seconds: list[float] = []
            timed(trainer.committee.endpoints[1], lm_seconds)
            steps, lm_steps = [], []
            for step in range(args.warmup + args.steps):
                lm_seconds.append(0.0)
                start = time.perf_counter()
                trainer.train_step()
                if step >= args.warmup:
                    steps.append(time.perf_counter() - start)
                    lm_steps.append(lm_seconds[-1])
            sent = int(trainer.committee.rows_sent[1])
            possible = int(trainer.committee.rows_possible[1])
            dtype = trainer.committee.specs[1].compute_dtype
        finally:
            trainer.close()
    timed_rows = sent * args.steps / (args.warmup + args.steps)  # rows are spread evenly over the steps
    ms = 1000 * statistics.median(steps)
    return {
        "budget": budget, "lm_dtype": dtype, "ms_per_step": round(ms, 1),
        "lm_ms_per_step": round(1000 * statistics.median(lm_steps), 1),
        "lm_ms_per_row": round(1000 * sum(lm_steps) / max(timed_rows, 1), 1),
        "lm_rows_answered": round(sent / possible, 4),
        "minutes_for_8000_steps": round(ms * PAPER_STEPS / 60_000, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lm", default="checkpoints/lm")
    p.add_argument("--mlp", default="checkpoints/mlp-l")
    p.add_argument("--lm-dtype", default="auto", help="auto (bfloat16 where native), float32, bfloat16")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "ml-100k"))
    p.add_argument("--budgets", type=float, nargs="+", default=[0.025, 0.05, 0.1, 0.2])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    for budget in args.budgets:
        rows.append(measure(args, budget))
        print(json.dumps(rows[-1]), flush=True)
    print("\n| LM budget | LM dtype | ms / step | of which the LM | LM ms / row | 8,000 steps |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['budget']:.1%} | {r['lm_dtype']} | {r['ms_per_step']:.0f} | {r['lm_ms_per_step']:.0f} | "
              f"{r['lm_ms_per_row']:.1f} | {r['minutes_for_8000_steps']:.0f} min |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"threads": 1, "steps": args.steps, "warmup": args.warmup, "results": rows},
                                       indent=1))


if __name__ == "__main__":
    main()
