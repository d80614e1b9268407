"""Students: small models exposing what DiverseDistill reads from them.

* ``x``: the Question Augmenter's input (recsys: the concatenated input embeddings;
  ViT: the class token entering the middle layer).
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

from services.teacher_server.images import CIFAR10_MEAN, CIFAR10_STD, to_pixels
from services.teacher_server.zoo.recsys_mlp import RecsysMLP, RecsysMLPConfig


@dataclass
class StudentOutput:
    x: torch.Tensor  # [B, d_in]
    h: torch.Tensor  # [B, d_out]
    prediction: torch.Tensor  # [B] ratings or [B, classes] logits


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


class ViTStudent(Student):
    """A small ViT classifier on uint8 CIFAR images (transformers' ViTModel, as the ViT teachers).

    x is the class token's state entering layer ``question_layer`` (the middle one by default,
    where the ViT teachers take their question), h the last class token after the final
    layernorm, the prediction a linear head on h (class logits). Preprocessing (scale,
    normalise with CIFAR's statistics) happens inside, so the student takes the same uint8
    images the teachers receive.
    """

    kind = "vit"
    task = "classification"

    def __init__(self, vit, n_classes: int = 10, question_layer: int | None = None) -> None:
        super().__init__()
        n_layers = vit.config.num_hidden_layers
        self.question_layer = n_layers // 2 if question_layer is None else question_layer
        if not 0 <= self.question_layer < n_layers:
            raise ValueError(f"question_layer must be in [0, {n_layers - 1}], got {question_layer}")
        self.vit = vit
        self.head = nn.Linear(vit.config.hidden_size, n_classes)

    @classmethod
    def build(cls, preset: str = "vit-cifar-tiny", n_classes: int = 10, question_layer: int | None = None,
              **vit_overrides) -> ViTStudent:
        from transformers import ViTModel

        from services.teacher_server.zoo.vit import vit_config

        return cls(ViTModel(vit_config(preset, **vit_overrides), add_pooling_layer=False), n_classes, question_layer)

    @property
    def d_in(self) -> int:
        return self.vit.config.hidden_size

    @property
    def d_out(self) -> int:
        return self.vit.config.hidden_size

    def forward(self, images: torch.Tensor) -> StudentOutput:
        from transformers.masking_utils import create_bidirectional_mask

        from services.teacher_server.zoo.vit import encoder_layers

        dtype = self.head.weight.dtype
        pixels = to_pixels(images, size=self.vit.config.image_size, mean=CIFAR10_MEAN, std=CIFAR10_STD,
                           dtype=dtype, device=self.head.weight.device)
        states = self.vit.embeddings(pixels)
        mask = create_bidirectional_mask(config=self.vit.config, inputs_embeds=states, attention_mask=None)
        layers = encoder_layers(self.vit)
        for layer in layers[: self.question_layer]:
            states = layer(states, mask)
        x = states[:, 0]
        for layer in layers[self.question_layer:]:
            states = layer(states, mask)
        h = self.vit.layernorm(states[:, 0])
        return StudentOutput(x, h, self.head(h))

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self(images).prediction

    def head_frozen(self, a: torch.Tensor) -> torch.Tensor:
        return F.linear(a, self.head.weight.detach(), self.head.bias.detach())

    def config(self) -> dict:
        return {"vit": self.vit.config.to_diff_dict(), "n_classes": self.head.out_features,
                "question_layer": self.question_layer}

    @classmethod
    def from_config(cls, config: dict) -> ViTStudent:
        from transformers import ViTConfig, ViTModel

        vit = ViTModel(ViTConfig(**config["vit"]), add_pooling_layer=False)
        return cls(vit, config["n_classes"], config["question_layer"])


STUDENTS: dict[str, type[Student]] = {cls.kind: cls for cls in (RecsysStudent, ViTStudent)}
