"""The teacher zoo: one module per model family, looked up by family name."""

from __future__ import annotations

from .base import RawInputs, Teacher, resolve_device
from .minilm import MiniLMTeacher
from .mlp_teacher import MLPTeacher

FAMILIES: dict[str, type[Teacher]] = {cls.family: cls for cls in (MLPTeacher, MiniLMTeacher)}

__all__ = ["FAMILIES", "MLPTeacher", "MiniLMTeacher", "RawInputs", "Teacher", "resolve_device"]
