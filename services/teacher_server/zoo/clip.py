"""open_clip CLIP models as zero-shot classifiers, with the question at the image tower's class token.

The image tower (an open_clip ``VisionTransformer``) embeds the server-side
preprocessed image and runs blocks ``[0, inject_layer)`` of
``model.visual.transformer.resblocks``; the question then replaces the class
token's state entering block ``inject_layer`` (the middle block by default) and the
remaining blocks, ``_pool`` (ln_post + class token) and the projection run as in
``visual(x)``. The answer is that image embedding; the prediction is CLIP's
zero-shot classifier, ``exp(logit_scale) * normalize(image_emb) @ class_text.T``,
where ``class_text`` holds the normalised text embeddings of the class prompts
(``templates`` filled with ``class_names``, averaged over templates when there are
several, CLIP's prompt ensembling). The text tower never depends on the image, so
``class_text`` is computed once, when the weights are loaded, and kept as a
non-persistent buffer (checkpoints carry the text tower, not a copy of its output).
With q equal to the class-token state the model computes itself, the answer equals
``model.encode_image`` exactly (tests check this).

Any open_clip ViT-tower config works: a built-in name (``model_name="ViT-B-32"``,
optionally with ``force_image_size``) or an explicit ``model_cfg`` (embed_dim,
vision_cfg, text_cfg) such as ``CLIP_PRESETS``. Real weights load from a local file
through open_clip's own loader (``ClipTeacher.pretrained``); nothing is downloaded.
Only open_clip's bundled BPE tokenizer is used, which works offline; configs with a
Hugging Face tokenizer or text tower, timm or ResNet image towers, attentional
pooling (CoCa) are refused with a clear error.

open_clip needs torchvision, which is an optional extra here (``pip install
.[vision]`` with ``constraints/vision.txt``): open_clip is imported only when a CLIP
teacher is built, so the rest of the zoo works without it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..images import CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_SIZE, CIFAR10_STD, IMAGE_INPUT, image_input_spec, to_pixels
from ..spec import CLASSIFICATION, TeacherSpec
from .base import RawInputs, Teacher

DEFAULT_TEMPLATES = ("a photo of a {}.",)
MAX_LOGIT_SCALE = 100.0  # CLIP clamps exp(logit_scale) to 100 in training

# Explicit open_clip configs by preset name. "clip-cifar" is the CPU default (32 px, patch 4, short text
# context: CIFAR prompts are ~8 BPE tokens); "clip-b32"/"clip-b16" are CLIP ViT-B at 224 px (the paper's
# CLIP teacher; CIFAR images upsampled in the teacher) for GPUs: open_clip's ViT-B-32 / ViT-B-16 configs,
# so OpenAI/LAION weights saved to a file load into them.
CLIP_PRESETS: dict[str, dict[str, Any]] = {
    "clip-cifar-tiny": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32, "mlp_ratio": 2.0},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1, "mlp_ratio": 2.0},
    },
    "clip-cifar": {
        "embed_dim": 96,
        "vision_cfg": {"image_size": 32, "patch_size": 4, "width": 96, "layers": 4, "head_width": 32,
                       "mlp_ratio": 2.0},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2,
                     "mlp_ratio": 2.0},
    },
    "clip-b32": {"model_name": "ViT-B-32"},
    "clip-b16": {"model_name": "ViT-B-16"},
}


def _open_clip():
    try:
        import open_clip
    except ImportError as err:
        raise RuntimeError(
            "the CLIP teacher needs open_clip_torch (and torchvision): "
            'pip install -c constraints/vision.txt -e ".[vision]"'
        ) from err
    return open_clip


def resolve_model_cfg(
    model_name: str | None = None, model_cfg: dict | None = None, force_image_size: int | None = None
) -> dict:
    """The full open_clip model config: a built-in name's config or an explicit one, with overrides applied."""
    if (model_name is None) == (model_cfg is None):
        raise ValueError("give either model_name (an open_clip config name) or model_cfg, not both")
    if model_name is not None:
        cfg = _open_clip().get_model_config(model_name)
        if cfg is None:
            raise ValueError(f"open_clip has no model config {model_name!r} (open_clip.list_models() lists them)")
    else:
        cfg = copy.deepcopy(model_cfg)
    if force_image_size is not None:
        cfg["vision_cfg"]["image_size"] = force_image_size
    return cfg


def check_supported(cfg: dict) -> None:
    """Refuse configs the teacher cannot serve offline or inject into (clear errors, before building)."""
    text_cfg, vision_cfg = cfg["text_cfg"], cfg["vision_cfg"]
    if "multimodal_cfg" in cfg or vision_cfg.get("attentional_pool"):
        raise ValueError("CoCa / attentional-pool configs are not supported: the question needs a class token")
    if vision_cfg.get("timm_model_name") or isinstance(vision_cfg.get("layers"), (list, tuple)):
        raise ValueError("only open_clip VisionTransformer image towers are supported (not timm or ResNet towers)")
    if text_cfg.get("hf_model_name") or text_cfg.get("hf_tokenizer_name"):
        raise ValueError("configs with a Hugging Face text tower or tokenizer need hub access; not supported offline")


def build_clip(cfg: dict) -> nn.Module:
    """A randomly initialised open_clip model for ``cfg`` (what ``open_clip.create_model`` builds)."""
    open_clip = _open_clip()
    check_supported(cfg)
    cfg = copy.deepcopy(cfg)
    model_class = open_clip.CustomTextCLIP if cfg.pop("custom_text", False) else open_clip.CLIP
    return model_class(**cfg)


class ClipTeacher(Teacher):
    family = "open-clip"
    chunk_rows = 1024

    def __init__(
        self,
        name: str,
        model: nn.Module,
        model_cfg: dict,
        *,
        model_name: str | None = None,
        inject_layer: int | None = None,
        class_names: Sequence[str] = CIFAR10_CLASSES,
        templates: Sequence[str] = DEFAULT_TEMPLATES,
        input_size: int = CIFAR10_SIZE,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
    ) -> None:
        """``model_cfg``: the open_clip config ``model`` was built from (saved in checkpoints);
        ``inject_layer``: the question enters this resblock (None: the middle one); ``templates``: prompt
        templates with one ``{}`` for the class name; ``mean``/``std``: the image normalisation the model
        was trained with (CIFAR's for our fitted teachers, open_clip.OPENAI_DATASET_MEAN/STD for OpenAI/LAION
        weights)."""
        super().__init__(name)
        visual = getattr(model, "visual", None)
        if visual is None or not hasattr(visual, "transformer") or getattr(visual, "attn_pool", None) is not None:
            raise ValueError("the CLIP teacher needs an open_clip VisionTransformer image tower with a class token")
        n_blocks = len(visual.transformer.resblocks)
        inject_layer = n_blocks // 2 if inject_layer is None else inject_layer
        if not 0 <= inject_layer < n_blocks:
            raise ValueError(f"inject_layer must be in [0, {n_blocks - 1}], got {inject_layer}")
        if not templates or any(t.count("{}") != 1 for t in templates):
            raise ValueError(f"each template needs exactly one '{{}}' for the class name, got {list(templates)}")
        self.model = model
        self.model_cfg = copy.deepcopy(model_cfg)
        self.model_name = model_name
        self.inject_layer = inject_layer
        self.class_names = tuple(class_names)
        self.templates = tuple(templates)
        self.input_size = input_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.tokenizer = _open_clip().SimpleTokenizer(
            context_length=model_cfg["text_cfg"].get("context_length", 77),
            **(model_cfg["text_cfg"].get("tokenizer_kwargs") or {}),
        )
        self.register_buffer("class_text", torch.zeros(len(self.class_names), self.embed_dim), persistent=False)
        self.refresh_class_text()
        # Loading weights changes the text tower: recompute the class prompts' embeddings after every load.
        self.register_load_state_dict_post_hook(lambda module, incompatible: module.refresh_class_text())

    # -- building -----------------------------------------------------------------

    @classmethod
    def build(
        cls, name: str, preset: str | None = "clip-cifar", *, model_name: str | None = None,
        model_cfg: dict | None = None, force_image_size: int | None = None, **kwargs,
    ) -> ClipTeacher:
        """A randomly initialised teacher: a preset, a built-in open_clip name, or an explicit config."""
        if model_name is None and model_cfg is None:
            if preset not in CLIP_PRESETS:
                raise ValueError(f"unknown CLIP preset {preset!r}; known: {sorted(CLIP_PRESETS)}")
            spec = CLIP_PRESETS[preset]
            model_name, model_cfg = spec.get("model_name"), (None if "model_name" in spec else spec)
        cfg = resolve_model_cfg(model_name, model_cfg, force_image_size)
        return cls(name, build_clip(cfg), cfg, model_name=model_name, **kwargs)

    @classmethod
    def pretrained(
        cls, name: str, path: str | Path, *, model_name: str | None = None, model_cfg: dict | None = None,
        force_image_size: int | None = None, **kwargs,
    ) -> ClipTeacher:
        """Real weights from a local file (.safetensors, .bin, .pt: an open_clip or OpenAI state dict).

        A built-in ``model_name`` goes through ``open_clip.create_model(model_name, pretrained=path, ...)``;
        an explicit ``model_cfg`` through ``open_clip.load_checkpoint`` (what create_model calls). Both
        convert third-party layouts and resize position embeddings for ``force_image_size``.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"CLIP weights file not found: {path}")
        open_clip = _open_clip()
        cfg = resolve_model_cfg(model_name, model_cfg, force_image_size)
        if model_name is not None:
            check_supported(cfg)
            model = open_clip.create_model(model_name, pretrained=str(path), force_image_size=force_image_size)
        else:
            model = build_clip(cfg)
            open_clip.load_checkpoint(model, str(path))
        return cls(name, model, cfg, model_name=model_name, **kwargs)

    # -- the zoo interface ----------------------------------------------------------

    @property
    def visual(self) -> nn.Module:
        return self.model.visual

    @property
    def embed_dim(self) -> int:
        return int(self.model_cfg["embed_dim"])

    @property
    def image_size(self) -> int:
        size = self.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    def describe(self) -> TeacherSpec:
        v = self.model_cfg["vision_cfg"]
        width = self.visual.transformer.width
        arch = self.model_name or f"ViT width {v['width']}, {v['layers']} blocks, patch {v['patch_size']}"
        return TeacherSpec(
            name=self.name,
            family=self.family,
            description=f"open_clip CLIP ({arch}, {self.image_size} px, embed {self.embed_dim}) as a zero-shot "
            f"classifier over {len(self.class_names)} class prompts ({self.templates[0]!r}"
            f"{f' +{len(self.templates) - 1} templates' if len(self.templates) > 1 else ''})",
            injection_point=f"class token state entering image-tower resblock {self.inject_layer} "
            f"(of {len(self.visual.transformer.resblocks)})",
            question_shape=(width,),
            hidden_size=self.embed_dim,
            prediction_shape=(len(self.class_names),),
            task=CLASSIFICATION,
            prediction_meaning="zero-shot logits: logit_scale * cosine(image embedding, class prompt embedding), "
            "in class_names order",
            inputs=(image_input_spec(self.input_size),),
            class_names=self.class_names,
        )

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        return to_pixels(images, size=self.image_size, mean=self.mean, std=self.std,
                         dtype=self.compute_dtype, device=self.device)

    def _blocks(self, states: torch.Tensor, blocks) -> torch.Tensor:
        batch_first = getattr(self.visual.transformer, "batch_first", True)
        if not batch_first:
            states = states.transpose(0, 1)
        for block in blocks:
            states = block(states, attn_mask=None)
        return states if batch_first else states.transpose(0, 1)

    def prepare(self, inputs: RawInputs, rows: slice):
        images = torch.as_tensor(inputs[IMAGE_INPUT][rows])
        states = self.visual._embeds(self.pixels(images))  # patches + class token + positions, ln_pre
        # Blocks before the injection point do not depend on the question: run them here.
        return self._blocks(states, self.visual.transformer.resblocks[: self.inject_layer])

    def image_embedding(self, question: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        states = torch.cat([question.unsqueeze(1).to(states.dtype), states[:, 1:]], dim=1)
        states = self._blocks(states, self.visual.transformer.resblocks[self.inject_layer :])
        pooled, _ = self.visual._pool(states)
        return pooled @ self.visual.proj if self.visual.proj is not None else pooled

    def logits(self, image_emb: torch.Tensor, class_text: torch.Tensor | None = None) -> torch.Tensor:
        """Zero-shot logits against ``class_text`` (normalised [C, E]; default: the loaded prompts')."""
        class_text = self.class_text if class_text is None else class_text
        scale = self.model.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)
        logits = scale * F.normalize(image_emb, dim=-1) @ class_text.to(image_emb.dtype).T
        bias = getattr(self.model, "logit_bias", None)
        return logits if bias is None else logits + bias

    def answer(self, question, prepared):
        image_emb = self.image_embedding(question, prepared)
        return image_emb, self.logits(image_emb)

    def predict(self, prepared):
        question = prepared[:, 0]
        return (question, *self.answer(question, prepared))

    # -- the class prompts ------------------------------------------------------------

    def prompts(self) -> list[str]:
        """Every (class, template) prompt, class-major: prompt ``c * n_templates + t``."""
        return [template.format(name) for name in self.class_names for template in self.templates]

    def encode_class_text(self) -> torch.Tensor:
        """Normalised class embeddings [C, E] from the text tower as it is now (differentiable: fitting
        trains the text tower through them)."""
        tokens = self.tokenizer(self.prompts()).to(self.device)
        emb = F.normalize(self.model.encode_text(tokens), dim=-1)
        emb = emb.view(len(self.class_names), len(self.templates), -1).mean(1)
        return F.normalize(emb, dim=-1)

    def refresh_class_text(self) -> None:
        """Recompute the ``class_text`` buffer (after loading or changing the text tower)."""
        was_training = self.training
        self.eval()
        with torch.no_grad():
            self.class_text = self.encode_class_text().to(self.class_text.dtype)
        self.train(was_training)

    # -- checkpoints ------------------------------------------------------------------

    def config(self) -> dict:
        return {
            "model_name": self.model_name,
            "inject_layer": self.inject_layer,
            "class_names": list(self.class_names),
            "templates": list(self.templates),
            "input_size": self.input_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "model_cfg": _jsonable(self.model_cfg),
        }

    @classmethod
    def from_config(cls, name: str, config: dict, directory: Path | None = None) -> ClipTeacher:
        config = dict(config)
        cfg = config.pop("model_cfg")
        return cls(name, build_clip(cfg), cfg, **config)


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
