"""Vision Transformer classifiers (transformers' ViTModel) with the question at the class token.

The image is preprocessed server-side (``services.teacher_server.images``: uint8
pixels -> scaled, resized to the model's resolution, normalised), embedded, and run
through layers ``[0, inject_layer)``; the question then replaces the class token's
state entering layer ``inject_layer`` (the middle layer by default, as the paper
injects into ViTs) and the remaining layers run with the image's patch tokens. The
answer is the last layer's class token after the final layernorm (what the head
reads); the prediction is the head's class logits. With q equal to the class-token
state the model computes itself (what ``predict`` returns as the question), the
answer equals the ordinary forward exactly (tests check this).

The network is transformers' own ViTModel, so real pretrained weights load from a
local Hugging Face folder (``ViTTeacher.pretrained``; nothing is downloaded) and a
fitted checkpoint is served like any other. ``VIT_PRESETS`` names the sizes we use:
a small CIFAR-resolution ViT fits on a CPU; the paper-scale ones are for GPUs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import ViTConfig, ViTModel
from transformers.masking_utils import create_bidirectional_mask
from transformers.utils import logging as transformers_logging

from ..images import CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_SIZE, CIFAR10_STD, IMAGE_INPUT, image_input_spec, to_pixels
from ..spec import CLASSIFICATION, TeacherSpec
from .base import RawInputs, Teacher

# ViTConfig arguments by preset name. "vit-cifar" is the CPU default (patch 4 at 32 px: 64 patch tokens);
# the others are the paper-scale teachers (ViT-B/16, ViT-L/16 at 224 px, CIFAR images upsampled in the
# teacher): meant for a GPU, and shaped like google/vit-*-patch16-224 so such weights load into them.
VIT_PRESETS: dict[str, dict] = {
    "vit-cifar-tiny": dict(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                           intermediate_size=128),
    "vit-cifar": dict(image_size=32, patch_size=4, hidden_size=96, num_hidden_layers=4, num_attention_heads=3,
                      intermediate_size=192),
    "vit-b16-224": dict(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072),
    "vit-l16-224": dict(image_size=224, patch_size=16, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                        intermediate_size=4096),
}


def vit_config(preset: str, **overrides) -> ViTConfig:
    if preset not in VIT_PRESETS:
        raise ValueError(f"unknown ViT preset {preset!r}; known: {sorted(VIT_PRESETS)}")
    return ViTConfig(**{**VIT_PRESETS[preset], **overrides})


def encoder_layers(vit: ViTModel) -> nn.ModuleList:
    """The transformer layers (``vit.layers`` in transformers 5, ``vit.encoder.layer`` before)."""
    return vit.layers if hasattr(vit, "layers") else vit.encoder.layer


class ViTTeacher(Teacher):
    family = "vit"
    chunk_rows = 1024

    def __init__(
        self,
        name: str,
        vit: ViTModel,
        *,
        inject_layer: int | None = None,
        class_names: Sequence[str] = CIFAR10_CLASSES,
        input_size: int = CIFAR10_SIZE,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
    ) -> None:
        """``inject_layer``: the question enters this layer (None: the middle, ``num_hidden_layers // 2``);
        ``input_size``: the side of the uint8 images requests carry; ``mean``/``std``: the normalisation the
        network was trained with (CIFAR's own for our fitted teachers, 0.5/0.5 for google/vit-* weights)."""
        super().__init__(name)
        n_layers = vit.config.num_hidden_layers
        inject_layer = n_layers // 2 if inject_layer is None else inject_layer
        if not 0 <= inject_layer < n_layers:
            raise ValueError(f"inject_layer must be in [0, {n_layers - 1}], got {inject_layer}")
        if vit.config.num_channels != 3:
            raise ValueError(f"the ViT must take RGB images (num_channels 3), got {vit.config.num_channels}")
        self.vit = vit
        self.head = nn.Linear(vit.config.hidden_size, len(class_names))
        self.inject_layer = inject_layer
        self.class_names = tuple(class_names)
        self.input_size = input_size
        self.mean, self.std = tuple(mean), tuple(std)

    @classmethod
    def build(cls, name: str, preset: str = "vit-cifar", **kwargs) -> ViTTeacher:
        """A randomly initialised teacher of a preset size (the starting point for fitting)."""
        overrides = kwargs.pop("vit_overrides", {})
        return cls(name, ViTModel(vit_config(preset, **overrides), add_pooling_layer=False), **kwargs)

    @classmethod
    def pretrained(cls, name: str, path: str | Path, **kwargs) -> ViTTeacher:
        """Real weights from a local Hugging Face folder (config.json + weights), with a fresh head.

        Works with ViTModel and ViTForImageClassification folders (the ``vit.`` prefix is
        stripped by transformers); nothing is fetched from the hub.
        """
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a Hugging Face model folder (no config.json)")
        verbosity = transformers_logging.get_verbosity()
        transformers_logging.set_verbosity_error()  # an unused pooler / classifier is expected
        try:
            vit = ViTModel.from_pretrained(path, local_files_only=True, add_pooling_layer=False)
        finally:
            transformers_logging.set_verbosity(verbosity)
        return cls(name, vit, **kwargs)

    @property
    def layers(self) -> nn.ModuleList:
        return encoder_layers(self.vit)

    def describe(self) -> TeacherSpec:
        c = self.vit.config
        h = c.hidden_size
        return TeacherSpec(
            name=self.name,
            family=self.family,
            description=f"ViT ({c.num_hidden_layers} layers, hidden {h}, patch {c.patch_size}, "
            f"{c.image_size} px) with a linear head on the class token",
            injection_point=f"class token state entering transformer layer {self.inject_layer} "
            f"(of {c.num_hidden_layers})",
            question_shape=(h,),
            hidden_size=h,
            prediction_shape=(len(self.class_names),),
            task=CLASSIFICATION,
            prediction_meaning="class logits (softmax for probabilities), in class_names order",
            inputs=(image_input_spec(self.input_size),),
            class_names=self.class_names,
        )

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, H, W, 3] -> the network's normalised float input."""
        return to_pixels(images, size=self.vit.config.image_size, mean=self.mean, std=self.std,
                         dtype=self.compute_dtype, device=self.device)

    def prepare(self, inputs: RawInputs, rows: slice):
        images = torch.as_tensor(inputs[IMAGE_INPUT][rows])
        states = self.vit.embeddings(self.pixels(images))
        mask = create_bidirectional_mask(config=self.vit.config, inputs_embeds=states, attention_mask=None)
        # Layers before the injection point do not depend on the question: run them here.
        for layer in self.layers[: self.inject_layer]:
            states = layer(states, mask)
        return states, mask

    def answer(self, question, prepared):
        states, mask = prepared
        states = torch.cat([question.unsqueeze(1).to(states.dtype), states[:, 1:]], dim=1)
        for layer in self.layers[self.inject_layer :]:
            states = layer(states, mask)
        hidden = self.vit.layernorm(states[:, 0])  # per-token layernorm: the same as normalising all tokens
        return hidden, self.head(hidden)

    def predict(self, prepared):
        question = prepared[0][:, 0]
        return (question, *self.answer(question, prepared))

    def config(self) -> dict:
        return {
            "inject_layer": self.inject_layer,
            "class_names": list(self.class_names),
            "input_size": self.input_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "vit": self.vit.config.to_diff_dict(),
        }

    @classmethod
    def from_config(cls, name: str, config: dict, directory: Path | None = None) -> ViTTeacher:
        config = dict(config)
        vit = ViTModel(ViTConfig(**config.pop("vit")), add_pooling_layer=False)
        return cls(name, vit, **config)
