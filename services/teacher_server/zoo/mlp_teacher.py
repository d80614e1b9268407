"""MLP recommender teachers (MLP-M, MLP-L): the question replaces the post-embedding vector.

Answering needs no raw input: the question *is* the tower's whole input. Predict
takes int64 (user, item) id pairs; the side information and training history the
model was fitted with travel inside the checkpoint.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..spec import REGRESSION, TENSOR, InputSpec, TeacherSpec
from .base import RawInputs, Teacher
from .recsys_mlp import RecsysMLP, RecsysMLPConfig

IDS = "ids"


class MLPTeacher(Teacher):
    family = "recsys-mlp"

    def __init__(self, name: str, model: RecsysMLP) -> None:
        super().__init__(name)
        self.model = model

    def describe(self) -> TeacherSpec:
        c = self.model.config
        return TeacherSpec(
            name=self.name,
            family=self.family,
            description=f"embedding tables + MLP tower {list(c.hidden)} rating regressor",
            injection_point=f"post-embedding vector: input of the MLP tower ({c.n_fields} fields x {c.embed_dim})",
            question_shape=(c.question_dim,),
            hidden_size=c.hidden[-1],
            prediction_shape=(),
            task=REGRESSION,
            prediction_meaning="predicted rating (1-5 scale, unclipped)",
            inputs=(
                InputSpec(IDS, TENSOR, "int64", (2,), needed_for_answer=False,
                          description="(user id, item id) per row, MovieLens numbering"),
            ),
        )

    def prepare(self, inputs: RawInputs, rows: slice):
        if IDS not in inputs:
            return None
        ids = torch.as_tensor(inputs[IDS])[rows].to(self.device)
        c = self.model.config
        # Unknown ids fall back to row 0, the "unknown" embedding, instead of failing.
        user = torch.where((ids[:, 0] >= 0) & (ids[:, 0] < c.n_users), ids[:, 0], 0)
        item = torch.where((ids[:, 1] >= 0) & (ids[:, 1] < c.n_items), ids[:, 1], 0)
        return user, item

    def answer(self, question, prepared):
        return self.model.from_question(question)

    def predict(self, prepared):
        question = self.model.embed(*prepared)
        return (question, *self.model.from_question(question))

    def config(self) -> dict:
        return dataclasses.asdict(self.model.config)

    @classmethod
    def from_config(cls, name: str, config: dict, directory: Path | None = None) -> MLPTeacher:
        return cls(name, RecsysMLP(RecsysMLPConfig(**config)))
