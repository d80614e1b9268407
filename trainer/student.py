"""The student: a small model exposing what DiverseDistill reads from it.

* ``x``: the Question Augmenter's input (recsys: the concatenated input embeddings).
* ``h``: the last-layer hidden state, the input of the prediction head (d_out).
* ``prediction``: head(h).
* ``head_frozen(a)``: the head applied to an augmented answer with *detached*
  weights, so the regularisation loss trains the Distillation Module and never the
  student (Algorithm 1).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from services.teacher_server.zoo.recsys_mlp import RecsysMLP, RecsysMLPConfig


@dataclass
class StudentOutput:
    x: torch.Tensor  # [B, d_in]
    h: torch.Tensor  # [B, d_out]
    prediction: torch.Tensor  # [B] ratings


class RecsysStudent(nn.Module):
    """MLP-S (paper Table 1): embedding tables + MLP tower [128, 64]."""

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
