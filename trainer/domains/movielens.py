"""MovieLens rating prediction: the MLP-S student, rating MSE, ids and text prompts for teachers."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from services.teacher_server.spec import TeacherSpec

from ..data.inputs import MovieLensInputs
from ..data.movielens import VALID_FRACTION, Ratings, load_movielens
from ..evaluation import rating_mse
from ..models import build_recsys_mlp
from ..student import RecsysStudent
from .base import Batch, Domain


@dataclass
class MovieLensStudentConfig:
    tower: tuple[int, ...] = (128, 64)  # MLP-S (paper Table 1)
    embed_dim: int = 32


class MovieLensDomain(Domain):
    """``data``: an ml-100k folder (seeded 80/20 split) or ``train_file``/``test_file`` in
    u.data format; validation rows are carved out of train by ``split_seed``, as for the
    teachers, and prompts draw on the fit rows only, as the teachers were fitted."""

    name = "movielens"
    task = "regression"
    metric = "mse"
    lower_is_better = True
    optimizer = "adagrad"  # the paper's recsys recipe: Adagrad lr 0.06
    lr = 0.06

    def __init__(self, data: str | None = None, train_file: str | None = None, test_file: str | None = None,
                 split_seed: int = 0, valid_fraction: float = VALID_FRACTION, cache_dir: str | None = None) -> None:
        if data:
            self.data = load_movielens(data, seed=split_seed)
        else:
            self.data = load_movielens(train_file=train_file, test_file=test_file)
        self.source = self.data.source
        self.fit, self.valid = self.data.split_validation(valid_fraction, split_seed)
        self.test = self.data.test
        self.inputs = MovieLensInputs(self.data, history=self.fit)
        self._tensors: dict[torch.device, dict[str, torch.Tensor]] = {}

    def build_student(self, config: dict) -> RecsysStudent:
        c = MovieLensStudentConfig(**config)
        return RecsysStudent(build_recsys_mlp(self.data, self.fit, tuple(c.tower), embed_dim=c.embed_dim))

    def batch(self, rows: np.ndarray, device: torch.device) -> Batch:
        if device not in self._tensors:  # the whole fit split on the device once
            self._tensors[device] = {k: torch.as_tensor(getattr(self.fit, k), device=device)
                                     for k in ("user", "item", "rating")}
        t = self._tensors[device]
        index = torch.as_tensor(rows, device=device)
        return Batch(rows, (t["user"][index], t["item"][index]), t["rating"][index])

    def student_inputs(self, split: Ratings) -> tuple[torch.Tensor, ...]:
        return torch.as_tensor(split.user), torch.as_tensor(split.item)

    def targets(self, split: Ratings) -> torch.Tensor:
        return torch.as_tensor(split.rating)

    def score(self, prediction: torch.Tensor, split: Ratings) -> float:
        return rating_mse(prediction, split.rating)

    def teacher_inputs(self, spec: TeacherSpec, split: Ratings, rows, *, for_answer: bool) -> dict:
        return self.inputs.for_spec(spec, split, rows, for_answer=for_answer)

    def fingerprint(self, split: Ratings) -> str:
        digest = hashlib.sha256()
        for array in (split.user, split.item):
            digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()[:16]



