"""``ddistill fit-teacher --kind vit|clip``: train a CIFAR-10 teacher (no weights can be downloaded here).

Both recipes train on CIFAR-10's train split minus the seeded validation rows
(``CIFAR10.split_validation``: 5,000 rows, 500 per class, by ``split_seed``), with
the standard augmentation (4-pixel padded random crop + horizontal flip, seeded per
step), AdamW with linear warm-up and cosine decay over ``max_steps``, an evaluation
on the validation rows every ``eval_every`` steps that keeps the best state seen
and stops after ``patience`` evaluations without improvement (early stopping), and
``time_budget_s`` as a hard stop. The images go through the teacher's own
server-side preprocessing (uint8 in), so training and serving see the same pixels.
The test split is touched once, at the end, to report the teacher's test accuracy.

* ``vit``: a ViT (``VIT_PRESETS``, default ``vit-cifar``: 32 px, patch 4) trained
  from scratch with cross-entropy on the head's logits, or fine-tuned from a local
  Hugging Face folder (``pretrained``).
* ``clip``: an open_clip CLIP (``CLIP_PRESETS``, default ``clip-cifar``) trained
  with cross-entropy over its zero-shot logits against the class prompts
  ("a photo of a {class}."), the text embeddings recomputed from the text tower at
  every step so both towers learn. This is CLIP's image->text contrastive loss with
  the batch's texts deduplicated: CIFAR has only ten distinct captions, so in-batch
  InfoNCE over (image, caption) pairs would treat the ~13 other images of a class in
  a batch of 128 as negatives of each other (false negatives), while the loss over
  the ten unique prompts has none. It also trains exactly the classifier the
  teacher serves. The logit scale is learned (clamped at 100, as CLIP does).

Defaults fit in about ten minutes on a 2-core CPU (each checkpoint's teacher.yaml
records its fit: steps, seconds, images/s, validation and test accuracy); the
paper-scale presets (``vit-b16-224``, ``vit-l16-224``, ``clip-b32``, ``clip-b16``)
are for GPUs.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from services.teacher_server.client import LocalTeacher
from services.teacher_server.images import CIFAR10_MEAN, CIFAR10_STD, IMAGE_INPUT
from services.teacher_server.zoo import ClipTeacher, Teacher, ViTTeacher
from services.teacher_server.zoo.clip import CLIP_PRESETS

from .data.cifar10 import VALID_ROWS, CIFAR10, Images, augment, augment_generator
from .evaluation import endpoint_accuracy

log = logging.getLogger(__name__)

VISION_KINDS = ("vit", "clip")


@dataclass
class VisionFitConfig:
    preset: str = ""  # a VIT_PRESETS / CLIP_PRESETS name; "" = the kind's CPU default
    pretrained: str | None = None  # vit: a local Hugging Face folder; clip: a weights file (open_clip's loader)
    inject_layer: int | None = None  # None: the middle layer
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    max_steps: int = 1500
    time_budget_s: float = 900.0  # hard stop; the cosine schedule runs over max_steps
    eval_every: int = 250
    eval_rows: int | None = None  # validation rows per evaluation; None: all
    patience: int = 4  # evaluations without improvement before stopping
    augment: bool = True
    label_smoothing: float = 0.0
    n_valid: int = VALID_ROWS
    mean: tuple[float, float, float] = CIFAR10_MEAN  # the pixels' normalisation (set the weights' own when
    std: tuple[float, float, float] = CIFAR10_STD  # starting from pretrained ones)


@dataclass
class ViTFitConfig(VisionFitConfig):
    preset: str = "vit-cifar"


@dataclass
class ClipFitConfig(VisionFitConfig):
    preset: str = "clip-cifar"


def default_vision_config(kind: str) -> VisionFitConfig:
    if kind not in VISION_KINDS:
        raise ValueError(f"unknown vision teacher kind {kind!r}; expected one of {VISION_KINDS}")
    return ViTFitConfig() if kind == "vit" else ClipFitConfig()


def build_vision_teacher(kind: str, config: VisionFitConfig) -> Teacher:
    """The starting point: a preset size with random weights, or local pretrained weights."""
    common = dict(inject_layer=config.inject_layer, mean=config.mean, std=config.std)
    if kind == "vit":
        if config.pretrained:
            return ViTTeacher.pretrained(kind, config.pretrained, **common)
        return ViTTeacher.build(kind, config.preset, **common)
    if config.pretrained:
        if config.preset not in CLIP_PRESETS:
            raise ValueError(f"unknown CLIP preset {config.preset!r}; known: {sorted(CLIP_PRESETS)}")
        preset = CLIP_PRESETS[config.preset]
        model_cfg = None if "model_name" in preset else preset
        return ClipTeacher.pretrained(kind, config.pretrained, model_name=preset.get("model_name"),
                                      model_cfg=model_cfg, **common)
    return ClipTeacher.build(kind, config.preset, **common)


def training_logits(teacher: Teacher, images: torch.Tensor) -> torch.Tensor:
    """The logits the loss is taken on (with gradients to every weight that should learn)."""
    prepared = teacher.prepare({IMAGE_INPUT: images}, slice(None))
    _, hidden, logits = teacher.predict(prepared)
    if isinstance(teacher, ClipTeacher):
        return teacher.logits(hidden, teacher.encode_class_text())  # the live text tower, not the loaded buffer
    return logits


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not on biases, norms, class/position embeddings, the logit scale)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        plain = p.ndim < 2 or "embedding" in name.split(".")[-1] or name.endswith(("cls_token", "logit_scale"))
        (no_decay if plain else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def fit_vision(
    kind: str, train: Images, valid: Images, seed: int, config: VisionFitConfig, device: torch.device
) -> tuple[Teacher, dict]:
    torch.manual_seed(seed)
    np.random.seed(seed)
    teacher = build_vision_teacher(kind, config).to(device)
    optimizer = torch.optim.AdamW(_param_groups(teacher, config.weight_decay), lr=config.lr)

    def schedule(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
        return 0.5 * (1.0 + np.cos(np.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    rng = np.random.default_rng(seed)
    eval_set = valid
    if config.eval_rows is not None and config.eval_rows < len(valid):
        eval_set = valid.take(np.sort(rng.choice(len(valid), config.eval_rows, replace=False)))

    def valid_accuracy() -> float:
        teacher.eval()
        if isinstance(teacher, ClipTeacher):
            teacher.refresh_class_text()
        acc = endpoint_accuracy(LocalTeacher(teacher), eval_set, batch_rows=512)
        teacher.train()
        return acc

    epochs_needed = 1 + config.max_steps * config.batch_size // len(train)
    order = np.concatenate([rng.permutation(len(train)) for _ in range(epochs_needed)])
    labels = torch.from_numpy(train.labels)
    teacher.train()
    best, best_state, best_step, stale = -1.0, copy.deepcopy(teacher.state_dict()), 0, 0
    start, step, losses, stopped_by = time.time(), 0, [], "max_steps"
    bar = tqdm(total=config.max_steps, desc=f"fit {kind}", unit="step")
    while step < config.max_steps:
        if time.time() - start > config.time_budget_s:
            stopped_by = "time_budget"
            break
        rows = order[step * config.batch_size : (step + 1) * config.batch_size]
        images = torch.from_numpy(train.images[rows])
        if config.augment:
            images = augment(images, augment_generator(seed, step))
        logits = training_logits(teacher, images)
        loss = F.cross_entropy(logits, labels[rows].to(logits.device), label_smoothing=config.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(teacher.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        step += 1
        losses.append(loss.item())
        bar.update(1)
        if step % config.eval_every == 0 or step == config.max_steps:
            acc = valid_accuracy()
            if acc > best:
                best, best_state, best_step, stale = acc, copy.deepcopy(teacher.state_dict()), step, 0
            else:
                stale += 1
            bar.set_postfix(loss=f"{np.mean(losses[-config.eval_every:]):.3f}", valid_acc=f"{acc:.4f}")
            if stale >= config.patience:
                stopped_by = "early_stopping"
                break
    bar.close()
    seconds = time.time() - start
    if step % config.eval_every and step != config.max_steps:  # stopped by time: score the last state too
        acc = valid_accuracy()
        if acc > best:
            best, best_state, best_step = acc, copy.deepcopy(teacher.state_dict()), step
    teacher.load_state_dict(best_state)  # (a CLIP teacher recomputes its class prompts' embeddings here)
    report = {
        "valid_accuracy": best,
        "valid_rows": len(eval_set),
        "steps": step,
        "best_step": best_step,
        "stopped_by": stopped_by,
        "epochs": round(step * config.batch_size / len(train), 3),
        "train_seconds": round(seconds, 1),
        "images_per_second": round(step * config.batch_size / max(seconds, 1e-9), 1),
        "final_train_loss": round(float(np.mean(losses[-50:])), 4) if losses else None,
        "parameters": sum(p.numel() for p in teacher.parameters()),
        "threads": torch.get_num_threads(),
    }
    return teacher.cpu().freeze(), report


def fit_vision_teacher(
    kind: str, data: CIFAR10, *, seed: int = 0, split_seed: int = 0, device: str | torch.device = "cpu",
    config: VisionFitConfig | None = None,
) -> tuple[Teacher, dict]:
    """Train a ``vit`` or ``clip`` teacher on ``data.train`` minus the validation rows (carved by ``split_seed``);
    the report includes its test accuracy."""
    config = config or default_vision_config(kind)
    train, valid = data.split_validation(config.n_valid, split_seed)
    teacher, report = fit_vision(kind, train, valid, seed, config, torch.device(device))
    report["test_accuracy"] = endpoint_accuracy(LocalTeacher(teacher), data.test, batch_rows=512)
    report["test_rows"] = len(data.test)
    return teacher, report
