"""Where a DiverseDistill step's time goes, part by part, against the student alone, in one run.

    python bench/step_breakdown.py --out bench/results/step_breakdown.json

A trainer on ml-100k with MLP-M + MLP-L in-process (gate open: every pair sent, the step's largest
form), one torch thread. Each part is timed where the step calls it, by wrapping that call; times are
CPU seconds of the process (``time.process_time``: the teachers run on the committee's threads, and
CPU time, unlike wall time, does not grow when other processes share the cores). Parts:

* student: its forward (``Student.forward``) and the loss's backward (``loss.backward``, which also
  runs the Distillation Module's own backward but not the question's, which goes through the teachers);
* Question Augmenter forward (``QuestionAugmenter.forward``: the cubic x W_M product, paper-sized);
* teachers: their Answer and AnswerVJP (``Committee._fan_out``), and the questions' backward into
  F_Q (``torch.autograd.backward`` in ``Committee.backward``);
* optimizers (Adagrad over the student and the module, ``Optimizer.step``) and the finiteness check;
* rest: everything else in the step (losses, gating, bookkeeping).

Beside it, the S_base step (``--method none``) and the compute floor of the module's two einsums.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from services.teacher_server.tuning import tune_allocator  # noqa: E402
from trainer.methods import DistillConfig  # noqa: E402
from trainer.train import TrainConfig, Trainer  # noqa: E402


def wrap(owner, name: str, bucket: str, spent: dict) -> None:
    call = getattr(owner, name)

    def timed(*args, **kwargs):
        start = time.process_time()
        try:
            return call(*args, **kwargs)
        finally:
            spent[bucket] += time.process_time() - start

    setattr(owner, name, timed)


def cpu_ms_per_step(trainer: Trainer, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        trainer.train_step()
    start = time.process_time()
    for _ in range(steps):
        trainer.train_step()
    return (time.process_time() - start) / steps * 1e3


def breakdown(args) -> dict:
    config = TrainConfig(teachers=[f"local:{c}" for c in args.teachers.split(",")], data=args.data, steps=10**9,
                         device="cpu", cache_dir=str(REPO / "runs" / ".cache"),
                         distill=DistillConfig(gate_warmup=10**9))
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(config, run_dir)
        try:
            spent: dict[str, float] = defaultdict(float)
            wrap(trainer.student, "forward", "student forward", spent)
            wrap(trainer.method.dm.question, "forward", "Question Augmenter forward", spent)
            wrap(trainer.committee, "_fan_out", "teachers: Answer + AnswerVJP", spent)
            for optimizer in trainer.optimizers:
                wrap(optimizer, "step", "optimizers (Adagrad)", spent)
            wrap(trainer, "check_finite", "finiteness check", spent)
            backward = torch.Tensor.backward
            autograd_backward = torch.autograd.backward

            inside_loss_backward = [False]  # Tensor.backward calls torch.autograd.backward: count it once

            def loss_backward(self, *a, **k):
                start, inside_loss_backward[0] = time.process_time(), True
                try:
                    return backward(self, *a, **k)
                finally:
                    inside_loss_backward[0] = False
                    spent["loss backward (student + module)"] += time.process_time() - start

            def question_backward(*a, **k):
                if inside_loss_backward[0]:
                    return autograd_backward(*a, **k)
                start = time.process_time()
                try:
                    return autograd_backward(*a, **k)
                finally:
                    spent["question backward into F_Q"] += time.process_time() - start

            torch.Tensor.backward = loss_backward
            torch.autograd.backward = question_backward
            try:
                total = cpu_ms_per_step(trainer, args.warmup, 0)  # warm-up, untimed parts discarded below
                spent.clear()
                total = cpu_ms_per_step(trainer, args.steps, 0)
            finally:
                torch.Tensor.backward = backward
                torch.autograd.backward = autograd_backward
            parts = {k: v / args.steps * 1e3 for k, v in spent.items()}
            parts["rest"] = total - sum(parts.values())
            dm = trainer.method.dm.question
            x = torch.randn(config.batch_size, dm.W_M.shape[0], requires_grad=False)
        finally:
            trainer.close()
    floor = einsum_floor(x, dm, args.steps)
    base = TrainConfig(method="none", data=args.data, steps=10**9, device="cpu", cache_dir=None)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(base, run_dir)
        try:
            s_base = cpu_ms_per_step(trainer, args.steps, args.warmup)
        finally:
            trainer.close()
    return {"diversedistill_ms": total, "parts_ms": parts, "s_base_ms": s_base, "module_einsums_ms": floor}


def einsum_floor(x: torch.Tensor, dm, steps: int) -> float:
    """CPU ms of x W_M forward and its weight gradient alone, the Question Augmenter's unavoidable work."""
    W = dm.W_M.detach().clone().requires_grad_(True)
    times = []
    for _ in range(steps):
        start = time.process_time()
        m = torch.einsum("bi,imd->bmd", x, W)
        m.backward(torch.ones_like(m))
        times.append(time.process_time() - start)
        W.grad = None
    return statistics.median(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teachers", default="checkpoints/mlp-m,checkpoints/mlp-l")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "ml-100k"))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    torch.set_num_threads(1)
    tune_allocator()
    r = breakdown(args)
    print(f"DiverseDistill step (MLP-M + MLP-L, gate open): {r['diversedistill_ms']:.1f} CPU ms; "
          f"S_base step {r['s_base_ms']:.2f} ms ({r['diversedistill_ms'] / r['s_base_ms']:.1f}x)\n")
    print("| part | CPU ms / step | share |\n|---|---|---|")
    for name, ms in sorted(r["parts_ms"].items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {ms:.2f} | {ms / r['diversedistill_ms']:.0%} |")
    print(f"\nthe module's x W_M forward + weight gradient alone: {r['module_einsums_ms']:.2f} ms")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
