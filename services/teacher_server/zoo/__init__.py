"""The teacher zoo: one module per model family, looked up by family name.

Every family is registered whatever is installed: the CLIP family imports open_clip
(an optional extra, it needs torchvision) only when a CLIP teacher is built, and
says how to install it if it is missing.
"""

from __future__ import annotations

from .base import COMPUTE_DTYPES, DTYPE_CHOICES, RawInputs, Teacher, resolve_device, resolve_dtype
from .clip import ClipTeacher
from .minilm import MiniLMTeacher
from .mlp_teacher import MLPTeacher
from .vit import ViTTeacher

FAMILIES: dict[str, type[Teacher]] = {
    cls.family: cls for cls in (MLPTeacher, MiniLMTeacher, ViTTeacher, ClipTeacher)
}

__all__ = [
    "COMPUTE_DTYPES", "DTYPE_CHOICES", "FAMILIES",
    "ClipTeacher", "MLPTeacher", "MiniLMTeacher", "RawInputs", "Teacher", "ViTTeacher", "resolve_device",
]
