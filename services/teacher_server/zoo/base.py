"""What every teacher in the zoo offers, and the three computations built on it.

A family implements ``describe`` (its spec), ``prepare`` (raw per-row inputs ->
what the network consumes: token ids, pixels, ids), ``answer`` (run forward from
an injected question; differentiable in the question), ``predict`` (the ordinary
forward, also returning the teacher's own state at the injection point) and its
checkpoint config (``config``/``from_config``, plus ``save_assets`` for files
beside the weights, such as a tokenizer). ``compute_answer``, ``compute_answer_vjp`` and
``compute_predict`` wrap those in the right autograd mode and in row chunks, and
are the only entry points the server and the in-process adapter use, so both
compute exactly the same thing.
"""

from __future__ import annotations

import logging

from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..codec import dtype_name
from ..spec import TeacherSpec

# What a teacher may compute in. Reduced precision roughly halves the cost of a large
# teacher (the LM: Answer 1.9x, AnswerVJP 1.3x on this CPU's bf16 units; more on a GPU) and its
# memory; questions and answers still travel and come back in the caller's dtype.
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
# "auto": bfloat16 where the device computes it natively, else float32 (``resolve_dtype``)
DTYPE_CHOICES = ("auto", *COMPUTE_DTYPES)
_warned_emulated_bf16 = False


def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 in hardware: a CUDA GPU that supports it, or a CPU with
    AVX512-BF16 or AMX. Elsewhere (an AVX2-only CPU, say) bfloat16 is emulated and slower than
    float32: the LM's Predict took ~258 ms a row in bfloat16 against ~45 ms in float32 on one such CPU."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return False


def resolve_dtype(name: str, device: torch.device) -> str:
    """A compute dtype of ``COMPUTE_DTYPES`` for ``name``: "auto" is bfloat16 where ``device`` computes it
    natively and float32 elsewhere (said once per process); the others are themselves."""
    global _warned_emulated_bf16
    if name not in DTYPE_CHOICES:
        raise ValueError(f"compute dtype must be one of {DTYPE_CHOICES}, not {name!r}")
    if name != "auto":
        return name
    if native_bfloat16(device):
        return "bfloat16"
    if not _warned_emulated_bf16:
        _warned_emulated_bf16 = True
        logging.getLogger(__name__).warning(
            "dtype auto: this %s does not compute bfloat16 natively, so teachers compute in float32", device.type)
    return "float32"

def resolve_device(name: str | torch.device) -> torch.device:
    """"auto" -> the first GPU when there is one, else the CPU; anything else as torch reads it,
    refused with a clear message when it names a GPU this machine does not have."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"device {str(name)!r}: {err}") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {str(name)!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return device


# Per-row raw inputs by name: tensors (or numpy arrays) with rows on dim 0, or one string per row.
RawInputs = Mapping[str, "torch.Tensor | list[str]"]


class Teacher(nn.Module, ABC):
    family: ClassVar[str]
    # Rows per forward pass inside one request: bounds activation memory for big requests.
    chunk_rows: ClassVar[int] = 8192

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.weights_sha256 = ""  # set by the checkpoint loader

    @property
    def spec(self) -> TeacherSpec:
        return self.describe().replace(
            name=self.name, weights_sha256=self.weights_sha256, compute_dtype=dtype_name(self.compute_dtype)
        )

    # -- what a family implements -------------------------------------------------

    @abstractmethod
    def describe(self) -> TeacherSpec:
        """The family's spec for this instance (name and weights hash are filled in by ``spec``)."""

    @abstractmethod
    def prepare(self, inputs: RawInputs, rows: slice) -> Any:
        """Model-ready inputs for ``rows`` of the raw inputs (tokenize, preprocess)."""

    @abstractmethod
    def answer(self, question: torch.Tensor, prepared: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward from the injection point: (hidden [N, H], prediction [N, *P])."""

    @abstractmethod
    def predict(self, prepared: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The ordinary forward: (own question [N, *Q], hidden, prediction)."""

    @abstractmethod
    def config(self) -> dict:
        """JSON-able arguments that rebuild this teacher with ``from_config``."""

    @classmethod
    @abstractmethod
    def from_config(cls, name: str, config: dict, directory: Path | None = None) -> Teacher:
        """Rebuild (with untrained weights) from ``config``; ``directory`` holds saved assets."""

    def save_assets(self, directory: Path) -> None:
        """Write files besides the weights that ``from_config`` needs (none by default)."""

    # -- the computations the server and the in-process adapter run ----------------

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def compute_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def freeze(self) -> Teacher:
        """Teachers never change: eval mode (no dropout), no parameter gradients."""
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    def _chunks(self, n: int):
        for start in range(0, n, self.chunk_rows):
            yield slice(start, min(start + self.chunk_rows, n))

    def compute_answer(self, question: torch.Tensor, inputs: RawInputs) -> tuple[torch.Tensor, torch.Tensor]:
        question = question.to(self.device, self.compute_dtype)
        hidden, prediction = [], []
        with torch.inference_mode():
            for rows in self._chunks(len(question)):
                h, p = self.answer(question[rows], self.prepare(inputs, rows))
                hidden.append(h)
                prediction.append(p)
        return _cat(hidden, len(question)), _cat(prediction, len(question))

    def compute_answer_vjp(
        self,
        question: torch.Tensor,
        inputs: RawInputs,
        hidden_cotangent: torch.Tensor | None,
        prediction_cotangent: torch.Tensor | None,
    ) -> torch.Tensor:
        """d/dq of <hidden, hidden_cotangent> + <prediction, prediction_cotangent>."""
        question = question.to(self.device, self.compute_dtype)
        grads = []
        for rows in self._chunks(len(question)):
            _, _, vjp = self._answer_with_graph(question[rows], inputs, rows)
            grads.append(vjp(*(None if c is None else c[rows] for c in (hidden_cotangent, prediction_cotangent))))
        return _cat(grads, len(question))

    def compute_answer_for_vjp(self, question: torch.Tensor, inputs: RawInputs):
        """``compute_answer``'s (hidden, prediction) and a function ``vjp(hidden_cotangent,
        prediction_cotangent)`` that gives ``compute_answer_vjp``'s result from the same forward pass.

        A caller in this process that answers and then back-propagates (the trainer's step) pays one
        forward, not two, and so does a server asked to keep the graph (``kept_graphs``). One chunk of
        rows at most: the graph is held until ``vjp`` is dropped (it may be called more than once).
        """
        if len(question) > self.chunk_rows:
            raise ValueError(f"at most {self.chunk_rows} rows keep their graph, got {len(question)}")
        hidden, prediction, vjp = self._answer_with_graph(question.to(self.device, self.compute_dtype), inputs,
                                                          slice(0, len(question)))
        return hidden.detach(), prediction.detach(), vjp

    def _answer_with_graph(self, question: torch.Tensor, inputs: RawInputs, rows: slice):
        q = question.clone().requires_grad_(True)  # clone: may be an inference tensor
        with torch.no_grad():
            prepared = self.prepare(inputs, rows)
        with torch.enable_grad():
            hidden, prediction = self.answer(q, prepared)

        def vjp(hidden_cotangent: torch.Tensor | None, prediction_cotangent: torch.Tensor | None) -> torch.Tensor:
            outputs, cotangents = [], []
            for out, cot in ((hidden, hidden_cotangent), (prediction, prediction_cotangent)):
                if cot is not None:
                    outputs.append(out)
                    cotangents.append(cot.to(out.device, out.dtype))
            # retain_graph: a merged graph kept by a server serves a VJP per caller; the graph is freed
            # with this function either way.
            g = None
            if outputs:
                g = torch.autograd.grad(outputs, q, cotangents, retain_graph=True, allow_unused=True)[0]
            return torch.zeros_like(q) if g is None else g.detach()

        return hidden, prediction, vjp

    def compute_predict(self, inputs: RawInputs, n_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out: list[list[torch.Tensor]] = [[], [], []]
        with torch.inference_mode():
            for rows in self._chunks(n_rows):
                for acc, t in zip(out, self.predict(self.prepare(inputs, rows))):
                    acc.append(t)
        return tuple(_cat(acc, n_rows) for acc in out)  # type: ignore[return-value]


def _cat(chunks: list[torch.Tensor], n_rows: int) -> torch.Tensor:
    if chunks:
        return torch.cat(chunks) if len(chunks) > 1 else chunks[0]
    raise ValueError(f"no rows to compute (got {n_rows})")
