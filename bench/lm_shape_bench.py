"""The LM teacher's Answer + AnswerVJP as a gated trainer calls it: a new number of rows each call.

    python bench/lm_shape_bench.py --device cuda                          # on a GPU machine
    python bench/lm_shape_bench.py --device cuda --checkpoint .device/checkpoints/lm --data .device/data/ml-100k

A trainer's gate sends each teacher a different number of rows nearly every step, and texts differ
in length, so nearly every call has a shape the teacher has not computed before. On an H200,
DiverseDistill with the LM ran 12 steps/s while the gate was open (64 rows each step) and 3-5 once
it closed (2026-12-04). One run times, in the same process, the LM (checkpoints/lm, or the
pretrained MiniLM) called in-process (``LocalTeacher``: an answer, then the VJP about it) on
fresh training rows each call:

* "served": attention without cuDNN's kernel, texts padded to a multiple of 16 tokens and batches
  to a multiple of 16 rows on a GPU (``minilm.ATTENTION_BACKENDS``, ``GPU_TOKEN_MULTIPLE``,
  ``GPU_ROW_MULTIPLE``), what the teacher does now;
* "unpadded": attention without cuDNN's kernel, no padding (which of the two changes matters);
* "cudnn-unpadded": torch's own choice of attention kernel, texts padded to the longest only
  (the teacher before 2026-12-04);

each with 64 rows every call (an open gate) and with 16-64 rows drawn per call (a closed gate):
the median milliseconds per answer + VJP, and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.attention import SDPBackend

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from services.teacher_server.checkpoint import load_teacher  # noqa: E402
from services.teacher_server.client import LocalTeacher  # noqa: E402
from services.teacher_server.zoo import minilm  # noqa: E402
from trainer.domains import MovieLensDomain  # noqa: E402

from precision_bench import checkpoint  # noqa: E402  (bench/, beside this script)

SETTINGS = {
    "served": (minilm.ATTENTION_BACKENDS, True),
    "unpadded": (minilm.ATTENTION_BACKENDS, False),
    "cudnn-unpadded": ([*minilm.ATTENTION_BACKENDS, SDPBackend.CUDNN_ATTENTION], False),
}


def time_pairs(endpoint: LocalTeacher, domain, row_counts: list[int], seed: int) -> list[float]:
    """Seconds per answer + VJP, one pair per entry of ``row_counts``, on fresh random training rows."""
    rng, spec = np.random.default_rng(seed), endpoint.spec
    times = []
    for n in row_counts:
        rows = domain.fit.take(np.sort(rng.choice(len(domain.fit), n, replace=False)))
        inputs = domain.teacher_inputs(spec, rows, slice(None), for_answer=True)
        question = torch.randn(n, *spec.question_shape)
        start = time.perf_counter()
        answer = endpoint.answer(question, inputs)
        endpoint.answer_vjp(question, inputs, torch.ones_like(answer.hidden), torch.ones_like(answer.prediction))
        times.append(time.perf_counter() - start)  # results come back on the CPU: the GPU is done
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--checkpoint", type=Path, help="the LM's checkpoint folder (default checkpoints/lm, else the "
                   "pretrained MiniLM with an untrained head: the same cost)")
    p.add_argument("--calls", type=int, default=100, help="timed answer + VJP pairs per setting")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "ml-100k"))
    p.add_argument("--out", type=Path)
    args = p.parse_args()

    domain = MovieLensDomain(args.data)
    with tempfile.TemporaryDirectory() as scratch:
        folder, source = (args.checkpoint, str(args.checkpoint)) if args.checkpoint else checkpoint("lm", Path(scratch))
        teacher = load_teacher(folder, device=args.device, dtype=args.dtype)
    endpoint = LocalTeacher(teacher)
    draws = np.random.default_rng(0).integers(16, 65, args.warmup + args.calls).tolist()
    result = {"teacher": source, "device": str(teacher.device), "dtype": args.dtype, "calls": args.calls,
              "torch": torch.__version__, "ms_per_answer_and_vjp": {}}
    for name, (backends, padded) in SETTINGS.items():
        minilm.ATTENTION_BACKENDS = backends
        on_gpu = teacher.device.type == "cuda"
        teacher.token_multiple = lambda: minilm.GPU_TOKEN_MULTIPLE if padded and on_gpu else None
        teacher.row_multiple = lambda: minilm.GPU_ROW_MULTIPLE if padded and on_gpu else None
        for gate, counts in (("64 rows", [64] * len(draws)), ("16-64 rows", draws)):
            times = time_pairs(endpoint, domain, counts, seed=len(result["ms_per_answer_and_vjp"]))
            ms = 1e3 * statistics.median(times[args.warmup:])
            result["ms_per_answer_and_vjp"][f"{name}, {gate}"] = round(ms, 2)
            print(f"{name:15s} {gate:10s} {ms:8.2f} ms per answer + VJP", flush=True)
    ms = result["ms_per_answer_and_vjp"]
    for other in ("unpadded", "cudnn-unpadded"):
        result[f"{other} / served, 16-64 rows"] = round(ms[f"{other}, 16-64 rows"] / ms["served, 16-64 rows"], 2)
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
