"""CIFAR-10 classification: a small ViT student, accuracy, uint8 images for the teachers.

The student trains on the fit split as it is (no augmentation): the baselines read
teachers' outputs cached once per image, which augmented views would not match, and
at the step counts a CPU allows (a few epochs) augmentation barely matters. The
teachers were fitted with augmentation (``ddistill fit-teacher``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch

from services.teacher_server.images import IMAGE_INPUT
from services.teacher_server.spec import TeacherSpec

from ..data.cifar10 import VALID_ROWS, Images, load_cifar10
from ..evaluation import accuracy
from ..student import ViTStudent
from .base import Batch, Domain


@dataclass
class CIFAR10StudentConfig:
    preset: str = "vit-cifar-tiny"  # services.teacher_server.zoo.vit.VIT_PRESETS; paper: ViT-B/16 (a GPU config)
    question_layer: int | None = None  # x = the class token entering this layer; None: the middle one
    vit_overrides: dict = field(default_factory=dict)  # ViTConfig fields over the preset's


class CIFAR10Domain(Domain):
    """``data``: ../shared/data/cifar-10-jpg.tar.gz or its extracted folder (decoded once, cached);
    the validation rows (5,000, class-stratified) are carved out of train by ``split_seed``, as
    for the teachers."""

    name = "cifar10"
    task = "classification"
    metric = "accuracy"
    lower_is_better = False
    # The paper's vision recipe: SGD lr 0.1 with a cosine schedule.
    optimizer = "sgd-cosine"
    lr = 0.1
    eval_chunk_rows = 1000

    def __init__(self, data: str | None = None, train_file: str | None = None, test_file: str | None = None,
                 split_seed: int = 0, cache_dir: str | None = None) -> None:
        if train_file or test_file or not data:
            raise ValueError("CIFAR-10 takes --data ARCHIVE_OR_FOLDER (train/ and test/ folders of JPEGs per class)")
        self.data = load_cifar10(data, cache_dir=cache_dir)  # decoded arrays cached beside teacher outputs
        self.source = self.data.source
        # 5,000 rows as for the teachers; a tenth of train for the small sets tests use
        self.fit, self.valid = self.data.split_validation(min(VALID_ROWS, len(self.data.train) // 10), split_seed)
        self.test = self.data.test
        self._fit_images: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def build_student(self, config: dict) -> ViTStudent:
        c = CIFAR10StudentConfig(**config)
        return ViTStudent.build(c.preset, len(self.data.classes), c.question_layer, **c.vit_overrides)

    def batch(self, rows: np.ndarray, device: torch.device) -> Batch:
        if device not in self._fit_images:
            self._fit_images[device] = (torch.as_tensor(self.fit.images, device=device),
                                        torch.as_tensor(self.fit.labels, device=device))
        images, labels = self._fit_images[device]
        index = torch.as_tensor(rows, device=device)
        return Batch(rows, (images[index],), labels[index])

    def student_inputs(self, split: Images) -> tuple[torch.Tensor, ...]:
        return (torch.as_tensor(split.images),)

    def targets(self, split: Images) -> torch.Tensor:
        return torch.as_tensor(split.labels)

    def score(self, prediction: torch.Tensor, split: Images) -> float:
        return accuracy(prediction, split.labels)

    def teacher_inputs(self, spec: TeacherSpec, split: Images, rows, *, for_answer: bool) -> dict:
        out = {}
        for needed in spec.answer_inputs if for_answer else spec.inputs:
            if needed.name != IMAGE_INPUT:
                raise KeyError(f"CIFAR-10 rows cannot provide a teacher input named {needed.name!r} "
                               f"(known: {IMAGE_INPUT})")
            out[IMAGE_INPUT] = torch.as_tensor(split.images[rows])
        return out

    def fingerprint(self, split: Images) -> str:
        digest = hashlib.sha256(np.ascontiguousarray(split.labels).tobytes())
        digest.update(np.ascontiguousarray(split.images).tobytes())
        return digest.hexdigest()[:16]
