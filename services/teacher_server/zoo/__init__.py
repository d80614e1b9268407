"""The teacher zoo: one module per model family, looked up by family name.

Every family is registered whatever is installed, and each family's module is imported only
when that family is used: an MLP teacher's server or a trainer distilling MLPs never imports
transformers (~2-5 s of start-up per process) or open_clip (an optional extra that needs
torchvision; a CLIP teacher without it says how to install it).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping

from .base import COMPUTE_DTYPES, DTYPE_CHOICES, RawInputs, Teacher, resolve_device, resolve_dtype

# class name -> the module (in this package) that defines it
_MODULES = {"MLPTeacher": "mlp_teacher", "MiniLMTeacher": "minilm", "ViTTeacher": "vit", "ClipTeacher": "clip"}
# family name (a checkpoint's teacher.yaml) -> class name; each class's ``family`` says the same (tested)
_FAMILY_CLASSES = {"recsys-mlp": "MLPTeacher", "minilm": "MiniLMTeacher", "vit": "ViTTeacher",
                   "open-clip": "ClipTeacher"}


def __getattr__(name: str) -> type[Teacher]:
    """``from services.teacher_server.zoo import MiniLMTeacher`` imports the family's module then."""
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_MODULES[name]}", __name__), name)


class _Families(Mapping[str, type[Teacher]]):
    """Family name -> Teacher class, importing the class's module on first lookup."""

    def __getitem__(self, family: str) -> type[Teacher]:
        return __getattr__(_FAMILY_CLASSES[family])

    def __iter__(self) -> Iterator[str]:
        return iter(_FAMILY_CLASSES)

    def __len__(self) -> int:
        return len(_FAMILY_CLASSES)


FAMILIES: Mapping[str, type[Teacher]] = _Families()

__all__ = [
    "COMPUTE_DTYPES", "DTYPE_CHOICES", "FAMILIES",
    "ClipTeacher", "MLPTeacher", "MiniLMTeacher", "RawInputs", "Teacher", "ViTTeacher", "resolve_device",
    "resolve_dtype",
]
