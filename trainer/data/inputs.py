"""What a MovieLens row gives a teacher, looked up by the input names in its spec.

A teacher declares the raw inputs it needs (``TeacherSpec.inputs``); the trainer
asks this class for them by name, so adding a teacher never means editing the
training loop. Known names: ``ids`` (int64 [N, 2] user and item ids) and ``text``
(the row's prompt, see ``prompts``). Prompts are rendered once per split and cached.
"""

from __future__ import annotations

import numpy as np
import torch

from services.teacher_server.spec import TeacherSpec

from .movielens import MovieLens, Ratings
from .prompts import PromptRenderer

IDS, TEXT = "ids", "text"


class MovieLensInputs:
    """``history``: the ratings prompts may draw on (see ``prompts``); the rows the models fit on."""

    def __init__(self, data: MovieLens, history: Ratings, n_history: int = 3) -> None:
        self.data = data
        self.renderer = PromptRenderer(history, data.side, data.n_users, data.n_items, n_history)
        self._texts: dict[int, tuple[Ratings, list[str]]] = {}  # keeps the split alive: ids stay unique

    def texts(self, ratings: Ratings) -> list[str]:
        """All prompts of a split, rendered on first use."""
        key = id(ratings)
        if key not in self._texts:
            self._texts[key] = (ratings, self.renderer.render_rows(ratings))
        return self._texts[key][1]

    def get(self, name: str, ratings: Ratings, rows: np.ndarray | slice = slice(None)):
        if name == IDS:
            return torch.from_numpy(np.stack([ratings.user[rows], ratings.item[rows]], axis=1))
        if name == TEXT:
            texts = self.texts(ratings)
            return texts[rows] if isinstance(rows, slice) else [texts[i] for i in rows]
        raise KeyError(f"MovieLens rows cannot provide a teacher input named {name!r} (known: {IDS}, {TEXT})")

    def for_spec(self, spec: TeacherSpec, ratings: Ratings, rows=slice(None), *, for_answer: bool) -> dict:
        needed = spec.answer_inputs if for_answer else spec.inputs
        return {i.name: self.get(i.name, ratings, rows) for i in needed}
