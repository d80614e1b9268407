"""Teachers' ordinary outputs on a split, computed once and cached on disk.

Logit/feature distillation and soft-label averaging read each teacher's Predict
output for every training row, and DiverseDistill reads its native questions there
(questions anchored at the row's own state, ``DistillConfig.anchor``). Those never change (teachers are frozen), and for
the language model they cost minutes on a CPU, so they are computed once per
(teacher weights, split) and kept as safetensors under the cache folder. A teacher
served without a weights hash is never cached.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from services.teacher_server.client import TeacherEndpoint

from .domains import Domain

log = logging.getLogger(__name__)


@dataclass
class TeacherOutputs:
    prediction: torch.Tensor  # [N, *P]
    hidden: torch.Tensor  # [N, H]
    question: torch.Tensor  # [N, *Q] the teacher's own state at its injection point


def teacher_outputs(
    endpoint: TeacherEndpoint,
    domain: Domain,
    split,
    cache_dir: Path | None,
    batch_rows: int = 1024,
) -> TeacherOutputs:
    spec = endpoint.spec
    path = None
    if cache_dir is not None and spec.weights_sha256:
        precision = "" if spec.compute_dtype == "float32" else f"-{spec.compute_dtype}"
        name = f"{spec.name}-{spec.weights_sha256[:16]}{precision}-{domain.fingerprint(split)}.safetensors"
        path = Path(cache_dir) / name
        if path.is_file():
            tensors = load_file(path)
            if "question" in tensors:  # files from before questions were cached are computed again
                return TeacherOutputs(tensors["prediction"], tensors["hidden"], tensors["question"])
    batch_rows = min(batch_rows, spec.max_rows)
    predictions, hiddens, questions = [], [], []
    for start in tqdm(range(0, len(split), batch_rows), desc=f"{spec.name} outputs", unit="batch", leave=False):
        rows = slice(start, min(start + batch_rows, len(split)))
        out = endpoint.predict(domain.teacher_inputs(spec, split, rows, for_answer=False))
        predictions.append(out.prediction)
        hiddens.append(out.hidden)
        questions.append(out.question)
    result = TeacherOutputs(*(torch.cat(parts).float() for parts in (predictions, hiddens, questions)))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # A temporary file of this process's own, renamed into place: the table scripts start several runs
        # at once on a cold cache, and with one shared name a run could rename another's half-written file.
        tmp = path.with_suffix(f".{os.getpid()}-{threading.get_ident()}.tmp")
        save_file(
            {"prediction": result.prediction.contiguous(), "hidden": result.hidden.contiguous(),
             "question": result.question.contiguous()}, tmp,
        )
        tmp.replace(path)
    return result
