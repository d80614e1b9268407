"""What the training loop needs to know about a dataset and its student: a Domain.

The loop (``trainer.train``) and the methods (``trainer.methods``) are the same for
every domain; a domain supplies the splits, the student, batches of student inputs
and targets, each teacher's raw inputs for a set of rows (by the input names in the
teacher's spec), and the metric a run is scored by. ``trainer.domains.DOMAINS`` maps
``--domain`` names to classes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from services.teacher_server.spec import TeacherSpec


@dataclass
class Batch:
    rows: np.ndarray  # indices into the training split
    inputs: tuple[torch.Tensor, ...]  # the student's inputs: student(*inputs)
    target: torch.Tensor


class Domain(ABC):
    """One dataset and its student family. ``fit``/``valid``/``test`` are the domain's own
    split objects (anything with ``len``); the loop only passes them back."""

    name: ClassVar[str]
    task: ClassVar[str]  # "regression" or "classification": the task loss
    metric: ClassVar[str]  # what runs are scored by: result keys test_<metric>, valid_<metric>
    lower_is_better: ClassVar[bool]
    optimizer: ClassVar[str]  # the student's optimizer in the paper's recipe ("adagrad", "sgd-cosine")
    lr: ClassVar[float]  # and its learning rate

    fit: Any
    valid: Any
    test: Any
    source: str  # where the data came from, for the result

    @abstractmethod
    def build_student(self, config: dict) -> nn.Module:
        """The student, from the domain's student config (``TrainConfig.student`` overrides)."""

    @abstractmethod
    def batch(self, rows: np.ndarray, device: torch.device) -> Batch:
        """Training rows ``rows`` of ``fit`` as student inputs and targets on ``device``."""

    eval_chunk_rows: ClassVar[int] = 8192  # rows per student forward pass when scoring a split

    @abstractmethod
    def student_inputs(self, split: Any) -> tuple[torch.Tensor, ...]:
        """The student's inputs for every row of ``split``, as CPU tensors: student(*inputs)."""

    @abstractmethod
    def targets(self, split: Any) -> torch.Tensor:
        """The task targets of every row of ``split`` (ratings, class labels), a CPU tensor."""

    def predictions(self, student: nn.Module, split: Any, device: torch.device) -> torch.Tensor:
        """The student's predictions for every row of ``split`` (eval mode, no gradient), on the CPU."""
        return predict_in_chunks(student, self.student_inputs(split), device, self.eval_chunk_rows)

    @abstractmethod
    def score(self, prediction: torch.Tensor, split: Any) -> float:
        """The metric of predictions (student's or teacher's) for every row of ``split``."""

    @abstractmethod
    def teacher_inputs(self, spec: TeacherSpec, split: Any, rows, *, for_answer: bool) -> dict:
        """The raw inputs ``spec`` declares (Answer's only, with ``for_answer``) for ``rows`` of ``split``."""

    @abstractmethod
    def fingerprint(self, split: Any) -> str:
        """A short hash of a split's rows, naming cached teacher outputs."""


def predict_in_chunks(student: nn.Module, inputs: tuple[torch.Tensor, ...], device, chunk_rows: int) -> torch.Tensor:
    """``student.predict`` over row chunks of CPU tensors, in eval mode; the result on the CPU."""
    was_training = student.training
    student.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(inputs[0]), chunk_rows):
            out.append(student.predict(*(t[start:start + chunk_rows].to(device) for t in inputs)).cpu())
    student.train(was_training)
    return torch.cat(out)
