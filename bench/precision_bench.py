"""A teacher computing in bfloat16 vs float32: speed and fidelity, in one run.

    python bench/precision_bench.py                                  # lm, mlp-l (ml-100k)
    python bench/precision_bench.py --teachers vit,clip              # CIFAR-10
    python bench/precision_bench.py --out bench/results/precision.json

Each teacher is loaded twice from checkpoints/<name> (``load_teacher(..., dtype=...)``, what
``teacher-server --dtype`` and ``--teacher local:DIR?dtype=`` do; the LM, when it has no
checkpoint, is the pretrained MiniLM with an untrained head) and called in-process with the
trainer's batch (64 rows of real test inputs):

* speed: median latency of Answer and AnswerVJP over ``--reps`` calls, and the ratio
  float32 / bfloat16;
* fidelity: on ``--rows`` test rows, the teacher's own test metric (MSE or accuracy) in each
  dtype; and for questions near the teacher's own (its state at the injection point plus 10%
  noise), the worst-row cosine of bfloat16's answer (hidden state) and of its question gradient
  to float32's, and the largest prediction difference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from services.teacher_server.checkpoint import load_teacher, save_teacher  # noqa: E402
from services.teacher_server.client import LocalTeacher  # noqa: E402
from trainer.domains import CIFAR10Domain, MovieLensDomain  # noqa: E402

from teacher_bench import time_calls  # noqa: E402  (bench/, beside this script)

DATA = REPO.parent / "shared" / "data"


def checkpoint(name: str, scratch: Path) -> tuple[Path, str]:
    folder = REPO / "checkpoints" / name
    if (folder / "teacher.yaml").is_file():
        return folder, f"checkpoints/{name}"
    if name != "lm":
        raise SystemExit(f"no checkpoints/{name}: fit it first (ddistill fit-teacher --kind {name})")
    from services.teacher_server.zoo import MiniLMTeacher

    torch.manual_seed(0)
    return save_teacher(MiniLMTeacher.pretrained("lm").freeze(), scratch / "lm"), "pretrained MiniLM, untrained head"


def median_ms(call, reps: int) -> float:
    return statistics.median(time_calls(call, reps, warmup=1)) * 1e3


def worst_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(1).double(), b.flatten(1).double()).min())


def bench(name: str, domain, rows: int, batch: int, reps: int, scratch: Path) -> dict:
    folder, source = checkpoint(name, scratch)
    endpoints = {dtype: LocalTeacher(load_teacher(folder, dtype=dtype)) for dtype in ("float32", "bfloat16")}
    spec = endpoints["float32"].spec
    test = domain.test.take(np.sort(np.random.default_rng(0).choice(len(domain.test), rows, replace=False)))
    predict_inputs = domain.teacher_inputs(spec, test, slice(None), for_answer=False)
    own = {dtype: e.predict(predict_inputs) for dtype, e in endpoints.items()}
    metric = {dtype: domain.score(own[dtype].prediction, test) for dtype in own}
    torch.manual_seed(0)
    q = own["float32"].question[:batch]
    q = q + 0.1 * q.std() * torch.randn_like(q)
    inputs = domain.teacher_inputs(spec, test, slice(0, batch), for_answer=True)
    d_hidden, d_pred = torch.randn(batch, spec.hidden_size), torch.randn(batch, *spec.prediction_shape)
    answers = {dtype: e.answer(q, inputs) for dtype, e in endpoints.items()}
    grads = {dtype: e.answer_vjp(q, inputs, d_hidden, d_pred) for dtype, e in endpoints.items()}
    result = {
        "teacher": name, "source": source, "batch": batch, "rows": rows, "reps": reps,
        f"test_{domain.metric}": metric,
        "hidden_cosine_min": worst_cosine(answers["float32"].hidden, answers["bfloat16"].hidden),
        "prediction_max_abs_diff": float((answers["float32"].prediction - answers["bfloat16"].prediction).abs().max()),
        "vjp_cosine_min": worst_cosine(grads["float32"], grads["bfloat16"]),
    }
    for op, call in (("answer", lambda e: e.answer(q, inputs)),
                     ("vjp", lambda e: e.answer_vjp(q, inputs, d_hidden, d_pred))):
        for dtype, endpoint in endpoints.items():
            result[f"{op}_ms_{dtype}"] = median_ms(lambda: call(endpoint), reps)
        result[f"{op}_speedup"] = result[f"{op}_ms_float32"] / result[f"{op}_ms_bfloat16"]
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teachers", default="lm,mlp-l")
    p.add_argument("--rows", type=int, default=1024, help="test rows for the metric in each dtype")
    p.add_argument("--batch", type=int, default=64, help="rows per timed call (the trainer's batch)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    domains = {}
    rows = []
    print("| teacher | test metric fp32 | bf16 | worst hidden cosine | max pred diff | worst VJP cosine | "
          "Answer ms fp32 / bf16 | speed-up | AnswerVJP ms fp32 / bf16 | speed-up |\n" + "|---" * 10 + "|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.teachers.split(","):
            kind = "cifar10" if name in ("vit", "clip") else "movielens"
            if kind not in domains:
                domains[kind] = (CIFAR10Domain(str(DATA / "cifar-10-jpg.tar.gz")) if kind == "cifar10"
                                 else MovieLensDomain(str(DATA / "ml-100k")))
            r = bench(name, domains[kind], args.rows, args.batch, args.reps, Path(tmp))
            rows.append(r)
            m = r[f"test_{domains[kind].metric}"]
            print(f"| {name} | {m['float32']:.4f} | {m['bfloat16']:.4f} | {r['hidden_cosine_min']:.5f} | "
                  f"{r['prediction_max_abs_diff']:.4f} | {r['vjp_cosine_min']:.4f} | "
                  f"{r['answer_ms_float32']:.0f} / {r['answer_ms_bfloat16']:.0f} | {r['answer_speedup']:.2f}x | "
                  f"{r['vjp_ms_float32']:.0f} / {r['vjp_ms_bfloat16']:.0f} | {r['vjp_speedup']:.2f}x |", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
