"""``ddistill fit-teacher``: train a teacher and save it as a servable checkpoint.

MovieLens kinds and recipes (numbers in docs/results.md, "Teachers"):

* ``mlp-m`` / ``mlp-l``: embedding tables + MLP tower [512, 256] / [1024, 512] on
  user, item and side features; AdamW with dropout and weight decay, early stopping
  on a validation split carved out of train (``MovieLens.split_validation``).
* ``lm``: the pretrained all-MiniLM-L6-v2 fine-tuned end to end on the rows'
  text prompts (``trainer.data.prompts``), bounded by a step and a time budget
  (CPU fine-tuning runs at tens of rows per second), keeping the best validation
  state seen.

The test split is touched once, at the end, to report the teacher's test MSE.

CIFAR-10 kinds ``vit`` and ``clip`` (``data`` is a ``CIFAR10``; the test metric is
accuracy) have their recipes in ``fit_vision``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from services.teacher_server.client import LocalTeacher
from services.teacher_server.zoo import MiniLMTeacher, MLPTeacher, Teacher

from .data.inputs import TEXT, MovieLensInputs
from .data.movielens import VALID_FRACTION, MovieLens, Ratings
from .evaluation import endpoint_mse, rating_mse
from .fit_vision import VISION_KINDS, default_vision_config, fit_vision_teacher
from .models import TOWERS, build_recsys_mlp

log = logging.getLogger(__name__)

MOVIELENS_KINDS = ("mlp-m", "mlp-l", "lm")
KINDS = (*MOVIELENS_KINDS, *VISION_KINDS)


@dataclass
class MLPFitConfig:
    embed_dim: int = 64
    dropout: float = 0.5
    weight_decay: float = 0.05
    lr: float = 1e-3
    batch_size: int = 256
    max_epochs: int = 40
    patience: int = 3  # epochs without validation improvement before stopping
    history: bool = False  # add training-history fields (GC-MC-like); see recsys_mlp


@dataclass
class LMFitConfig:
    batch_size: int = 32
    lr: float = 5e-5  # encoder
    head_lr: float = 1e-3
    warmup_steps: int = 100
    max_steps: int = 2500
    time_budget_s: float = 1800.0
    eval_every: int = 250
    eval_rows: int | None = None  # validation rows per evaluation; None: all (a 1,000-row subset was off by 0.09)
    n_history: int = 3  # the user's other ratings in each prompt
    inject_layer: int = 1
    max_length: int = 128
    bf16: bool = False  # forward under bfloat16 autocast; weights, gradients, optimizer stay float32 (~1.8x on a bf16 CPU)


@dataclass
class FitResult:
    teacher: Teacher
    report: dict


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def fit_mlp(kind: str, data: MovieLens, train: Ratings, valid: Ratings, seed: int, config: MLPFitConfig, device) -> FitResult:
    _seed_everything(seed)
    model = build_recsys_mlp(
        data, train, TOWERS[kind], embed_dim=config.embed_dim, dropout=config.dropout, history=config.history
    ).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    t = {name: torch.as_tensor(getattr(train, name)).to(device) for name in ("user", "item", "rating")}

    def valid_mse() -> float:
        model.eval()
        with torch.no_grad():
            _, pred = model(torch.as_tensor(valid.user, device=device), torch.as_tensor(valid.item, device=device))
        model.train()
        return rating_mse(pred.cpu(), valid.rating)

    best, best_state, best_epoch, start = float("inf"), None, 0, time.time()
    rng = np.random.default_rng(seed)
    bar = tqdm(range(config.max_epochs), desc=f"fit {kind}", unit="epoch")
    for epoch in bar:
        for batch in torch.as_tensor(rng.permutation(len(train)), device=device).split(config.batch_size):
            exclude = t["rating"][batch] if config.history else None
            _, pred = model(t["user"][batch], t["item"][batch], exclude)
            loss = torch.nn.functional.mse_loss(pred, t["rating"][batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        mse = valid_mse()
        bar.set_postfix(valid_mse=f"{mse:.4f}", best=f"{min(best, mse):.4f}")
        if mse < best - 1e-4:
            best, best_state, best_epoch = mse, copy.deepcopy(model.state_dict()), epoch + 1
        elif epoch + 1 - best_epoch >= config.patience:
            break
    model.load_state_dict(best_state)
    teacher = MLPTeacher(kind, model.cpu()).freeze()
    report = {"valid_mse": best, "epochs": best_epoch, "train_seconds": round(time.time() - start, 1)}
    return FitResult(teacher, report)


def fit_lm(
    inputs: MovieLensInputs, train: Ratings, valid: Ratings, seed: int, config: LMFitConfig, device
) -> FitResult:
    _seed_everything(seed)
    teacher = MiniLMTeacher.pretrained(
        "lm", inject_layer=config.inject_layer, max_length=config.max_length, global_mean=float(train.rating.mean())
    ).to(device)
    teacher.train()
    optimizer = torch.optim.AdamW([
        {"params": teacher.bert.parameters(), "lr": config.lr},
        {"params": teacher.head.parameters(), "lr": config.head_lr},
    ], weight_decay=0.01)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / config.warmup_steps))
    rng = np.random.default_rng(seed)
    n_eval = len(valid) if config.eval_rows is None else min(config.eval_rows, len(valid))
    eval_set = valid.take(np.sort(rng.choice(len(valid), n_eval, replace=False)))

    def valid_mse() -> float:
        teacher.eval()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
            mse = endpoint_mse(LocalTeacher(teacher), inputs, eval_set, batch_rows=256)
        teacher.train()
        return mse

    order = np.concatenate([rng.permutation(len(train)) for _ in range(1 + config.max_steps * config.batch_size // len(train))])
    best, best_state, best_step = valid_mse(), copy.deepcopy(teacher.state_dict()), 0
    start, step = time.time(), 0
    bar = tqdm(total=config.max_steps, desc="fit lm", unit="step")
    losses = []
    while step < config.max_steps and time.time() - start < config.time_budget_s:
        rows = order[step * config.batch_size : (step + 1) * config.batch_size]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
            prepared = teacher.prepare({TEXT: inputs.get(TEXT, train, rows)}, slice(None))
            _, _, pred = teacher.predict(prepared)
        loss = torch.nn.functional.mse_loss(pred.float(), torch.as_tensor(train.rating[rows], device=device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(teacher.parameters(), 1.0)
        optimizer.step()
        warmup.step()
        step += 1
        losses.append(loss.item())
        bar.update(1)
        if step % config.eval_every == 0:
            mse = valid_mse()
            if mse < best:
                best, best_state, best_step = mse, copy.deepcopy(teacher.state_dict()), step
            bar.set_postfix(train_mse=f"{np.mean(losses[-config.eval_every:]):.3f}", valid_mse=f"{mse:.4f}")
    bar.close()
    seconds = time.time() - start
    if step % config.eval_every:
        mse = valid_mse()
        if mse < best:
            best, best_state, best_step = mse, copy.deepcopy(teacher.state_dict()), step
    teacher.load_state_dict(best_state)
    report = {
        "valid_mse": best,
        "valid_rows": len(eval_set),
        "steps": step,
        "best_step": best_step,
        "epochs": round(step * config.batch_size / len(train), 3),
        "train_seconds": round(seconds, 1),
        "rows_per_second": round(step * config.batch_size / seconds, 1),
    }
    return FitResult(teacher.cpu().freeze(), report)


def fit_teacher(
    kind: str, data, *, seed: int = 0, split_seed: int = 0, device: str | torch.device = "cpu", config=None
) -> FitResult:
    """Train a teacher of ``kind`` on ``data.train`` minus the validation rows (carved by ``split_seed``, as
    the trainer carves them, so teacher and student fit the same rows); the report includes its test MSE
    (MovieLens kinds; ``data`` a MovieLens) or test accuracy (vision kinds; ``data`` a CIFAR10)."""
    if kind not in KINDS:
        raise ValueError(f"unknown teacher kind {kind!r}; expected one of {KINDS}")
    device = torch.device(device)
    if kind in VISION_KINDS:
        config = config or default_vision_config(kind)
        teacher, report = fit_vision_teacher(kind, data, seed=seed, split_seed=split_seed, device=device, config=config)
        report.update(kind=kind, seed=seed, split_seed=split_seed, data=data.source, recipe=dataclasses.asdict(config))
        return FitResult(teacher, report)
    train, valid = data.split_validation(VALID_FRACTION, split_seed)
    if kind == "lm":
        config = config or LMFitConfig()
        inputs = MovieLensInputs(data, history=train, n_history=config.n_history)
        result = fit_lm(inputs, train, valid, seed, config, device)
    else:
        config = config or MLPFitConfig()
        inputs = MovieLensInputs(data, history=train)
        result = fit_mlp(kind, data, train, valid, seed, config, device)
    result.report["test_mse"] = endpoint_mse(LocalTeacher(result.teacher), inputs, data.test, batch_rows=512)
    result.report.update(kind=kind, seed=seed, split_seed=split_seed, data=data.source, recipe=dataclasses.asdict(config))
    return result
