"""Students: small models exposing what DiverseDistill reads from them.

* ``x``: the Question Augmenter's input (recsys: the concatenated input embeddings).
* ``h``: the last-layer hidden state, the input of the prediction head (d_out).
* ``prediction``: head(h).
* ``head_frozen(a)``: the head applied to an augmented answer with *detached*
  weights, so the regularisation loss trains the Distillation Module and never the
  student (Algorithm 1).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from services.teacher_server.zoo.recsys_mlp import RecsysMLP, RecsysMLPConfig


@dataclass
class StudentOutput:
    x: torch.Tensor  # [B, d_in]
    h: torch.Tensor  # [B, d_out]
    prediction: torch.Tensor  # [B] ratings


class Student(nn.Module, ABC):
    """The interface every student offers the methods and the export (``STUDENTS`` by kind)."""

    kind: ClassVar[str]
    task: ClassVar[str]  # "regression" or "classification"

    @property
    @abstractmethod
    def d_in(self) -> int:
        """Size of x, the Question Augmenter's input."""

    @property
    @abstractmethod
    def d_out(self) -> int:
        """Size of h, the last hidden state (the answers' target space)."""

    @abstractmethod
    def forward(self, *inputs: torch.Tensor) -> StudentOutput: ...

    @abstractmethod
    def predict(self, *inputs: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def head_frozen(self, a: torch.Tensor) -> torch.Tensor:
        """The prediction head on answers ``a`` [N, d_out], its weights detached."""

    @abstractmethod
    def config(self) -> dict: ...

    @classmethod
    @abstractmethod
    def from_config(cls, config: dict) -> Student: ...


class RecsysStudent(Student):
    """MLP-S (paper Table 1): embedding tables + MLP tower [128, 64]."""

    kind = "recsys-mlp"
    task = "regression"

    def __init__(self, model: RecsysMLP) -> None:
        super().__init__()
        self.model = model

    @property
    def d_in(self) -> int:
        return self.model.config.question_dim

    @property
    def d_out(self) -> int:
        return self.model.config.hidden[-1]

    def forward(self, user: torch.Tensor, item: torch.Tensor) -> StudentOutput:
        x = self.model.embed(user, item)
        h, prediction = self.model.from_question(x)
        return StudentOutput(x, h, prediction)

    def predict(self, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        return self.model(user, item)[1]

    def head_frozen(self, a: torch.Tensor) -> torch.Tensor:
        head = self.model.head
        return F.linear(a, head.weight.detach(), head.bias.detach()).squeeze(-1) + self.model.config.global_mean

    def config(self) -> dict:
        return dataclasses.asdict(self.model.config)

    @classmethod
    def from_config(cls, config: dict) -> RecsysStudent:
        return cls(RecsysMLP(RecsysMLPConfig(**config)))


STUDENTS: dict[str, type[Student]] = {cls.kind: cls for cls in (RecsysStudent,)}
