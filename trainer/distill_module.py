"""The Distillation Module (training only; discarded after training).

Question Augmenter F_Q, for a student representation x in R^{d_in}:

    E    in R^{n x d_emb}            one learnable embedding per teacher
    W_M  in R^{d_in x d_m x d_emb}   M = x W_M in R^{d_m x d_emb}
    rows = (E M^T) M in R^{n x d_emb}           the sequential dot product
    q_i  = mu_i + sigma_i * MLP_i(rows_i)       in teacher i's native question space
    w    = sigmoid(x W_F E^T + b) in (0, 1)^n,  W_F in R^{d_in x d_emb}, b in R^n (ours)

Answer Augmenter F_A: a_i = MLP_i(p_i) in R^{d_out}, per teacher (ours: linear, see below).

Choices here that are ours, not the paper's (docs/method.md):

* Each question MLP starts with a LayerNorm (the cubic (E M^T) M has no fixed
  scale) and ends in the teacher's own question statistics: mu_i and sigma_i are
  the mean and spread of the teacher's native state at the injection point, read
  once from its Predict RPC (``calibrate``). A fresh question is therefore in
  distribution for the teacher from the first step, for any teacher, black-box
  included.
* Anchored questions (``anchor="row"``): instead of the mean mu_i, the question
  starts at the teacher's own state for *this row*, q_i = q_i^native(d) + sigma_i *
  MLP_i(.), and the last layer of MLP_i starts at zero, so the first answer is the
  teacher's ordinary one. For a teacher whose whole input is the question (an MLP
  recommender) a question made from the student's x alone cannot reach the
  knowledge in the teacher's embedding tables; anchored, it asks about the row the
  teacher itself sees, as the LM's question does beside the LM's own token states.
* The importance logit has a per-teacher bias b (zero at the start, so w starts at
  0.5 as in the paper). Without it w can only move through x W_F E^T, which averages
  ~0 over the student's (roughly centred) embeddings: w sits near 0.5 whatever its
  target's base rate, and a threshold of 0.6 then shuts the gate for almost every
  row. With b, w can learn that a teacher beats the student on, say, 70% of rows.
* The answer readout is linear on the teacher's hidden state standardised by that
  teacher's own statistics (``answer_hidden=0, answer_norm="teacher"``), not an MLP
  after a LayerNorm. Teachers' hidden states differ in scale by orders of magnitude
  (an MLP's ReLU features vs a transformer's pooled state), so p needs normalising;
  but a LayerNorm per row removes the very scale the teacher's own (linear) head
  reads, and on MovieLens an MLP over it fits the training rows' answers rather than
  the knowledge in them. ``answer_hidden=256, answer_norm="layer"`` is the earlier,
  paper-shaped readout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class DMConfig:
    d_emb: int = 128
    d_m: int = 64
    mlp_hidden: int = 256  # width of the per-teacher question and answer MLPs
    # the answer readout's hidden width: 0 (ours) a linear readout; the paper's MLP: mlp_hidden
    answer_hidden: int = 0
    # how the readout normalises the teacher's hidden state p: "teacher" (ours: per feature, by the
    # teacher's own hidden-state statistics from Predict; affine, so a linear readout can still
    # express the teacher's own head, which reads p's scale) or "layer" (a LayerNorm per row)
    answer_norm: str = "teacher"


def _mlp(d_in: int, hidden: int, d_out: int, layer_norm: bool = True) -> nn.Sequential:
    """(LayerNorm), then Linear-GELU-Linear; with ``hidden`` 0 one Linear."""
    norm = [nn.LayerNorm(d_in)] if layer_norm else [nn.Identity()]  # Identity keeps the layers' indices
    if hidden == 0:
        return nn.Sequential(*norm, nn.Linear(d_in, d_out))
    return nn.Sequential(*norm, nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))


class QuestionAugmenter(nn.Module):
    def __init__(self, d_in: int, question_dims: list[int], config: DMConfig, anchored: bool = False) -> None:
        super().__init__()
        self.anchored = anchored
        n, d_emb, d_m = len(question_dims), config.d_emb, config.d_m
        self.E = nn.Parameter(torch.randn(n, d_emb) / math.sqrt(d_emb))
        self.W_M = nn.Parameter(torch.randn(d_in, d_m, d_emb) / math.sqrt(d_in))
        self.W_F = nn.Parameter(torch.randn(d_in, d_emb) / math.sqrt(d_in * d_emb))
        self.importance_bias = nn.Parameter(torch.zeros(n))
        self.question_mlps = nn.ModuleList(_mlp(d_emb, config.mlp_hidden, d) for d in question_dims)
        if anchored:  # the first question is the row's own state: the teacher's ordinary answer
            for mlp in self.question_mlps:
                nn.init.zeros_(mlp[-1].weight)
                nn.init.zeros_(mlp[-1].bias)
        for i, d in enumerate(question_dims):
            self.register_buffer(f"question_mean_{i}", torch.zeros(d))
            self.register_buffer(f"question_std_{i}", torch.ones(d))

    def calibrate(self, i: int, native_questions: torch.Tensor) -> None:
        """Set teacher i's question statistics from its own states at the injection point."""
        getattr(self, f"question_mean_{i}").copy_(native_questions.mean(0))
        getattr(self, f"question_std_{i}").copy_(native_questions.std(0).clamp(min=1e-4))

    def forward(
        self, x: torch.Tensor, anchors: list[torch.Tensor] | None = None
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Questions (one [B, dq_i] tensor per teacher) and importance weights w [B, n].

        ``anchors`` (anchored module only): each teacher's native question for the batch's rows.
        """
        if self.anchored != (anchors is not None):
            raise ValueError("an anchored Question Augmenter takes the rows' native questions, and only it does")
        m = torch.einsum("bi,imd->bmd", x, self.W_M)  # M = x W_M          [B, d_m, d_emb]
        scores = torch.einsum("nd,bmd->bnm", self.E, m)  # E M^T             [B, n, d_m]
        rows = torch.einsum("bnm,bmd->bnd", scores, m)  # (E M^T) M         [B, n, d_emb]
        questions = [
            (anchors[i] if anchors is not None else getattr(self, f"question_mean_{i}"))
            + getattr(self, f"question_std_{i}") * mlp(rows[:, i])
            for i, mlp in enumerate(self.question_mlps)
        ]
        importance = torch.sigmoid(x @ self.W_F @ self.E.T + self.importance_bias)
        return questions, importance


class AnswerAugmenter(nn.Module):
    def __init__(self, hidden_sizes: list[int], d_out: int, config: DMConfig) -> None:
        super().__init__()
        if config.answer_norm not in ("layer", "teacher"):
            raise ValueError(f"answer_norm must be layer or teacher, not {config.answer_norm!r}")
        self.standardise = config.answer_norm == "teacher"
        self.answer_mlps = nn.ModuleList(_mlp(h, config.answer_hidden, d_out, not self.standardise) for h in hidden_sizes)
        for i, h in enumerate(hidden_sizes):
            self.register_buffer(f"hidden_mean_{i}", torch.zeros(h))
            self.register_buffer(f"hidden_std_{i}", torch.ones(h))

    def calibrate(self, i: int, native_hidden: torch.Tensor) -> None:
        """Set teacher i's hidden-state statistics (used with ``answer_norm="teacher"``). The spread
        has a floor at 1% of the mean spread: a ReLU feature that is dead on the calibration rows
        must not be divided by ~0 on a row where it fires."""
        std = native_hidden.std(0)
        getattr(self, f"hidden_mean_{i}").copy_(native_hidden.mean(0))
        getattr(self, f"hidden_std_{i}").copy_(std.clamp(min=max(1e-6, 0.01 * float(std.mean()))))

    def forward(self, i: int, hidden: torch.Tensor) -> torch.Tensor:
        if self.standardise:
            hidden = (hidden - getattr(self, f"hidden_mean_{i}")) / getattr(self, f"hidden_std_{i}")
        return self.answer_mlps[i](hidden)


class DistillationModule(nn.Module):
    def __init__(self, d_in: int, d_out: int, question_dims: list[int], hidden_sizes: list[int], config: DMConfig,
                 anchored: bool = False):
        super().__init__()
        self.config = config
        self.question = QuestionAugmenter(d_in, question_dims, config, anchored)
        self.answer = AnswerAugmenter(hidden_sizes, d_out, config)

    @property
    def n_teachers(self) -> int:
        return len(self.answer.answer_mlps)
