"""The trained student alone: no Distillation Module, no teachers.

    DIR/student.safetensors   the student's weights (with its lookup tables)
    DIR/student.yaml          its config and the run's metadata

The exported student has the same architecture as an undistilled one, so its size
and inference cost are the same: distillation costs nothing at serving time.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from safetensors.torch import load_file, save_file

from services.teacher_server.atomic_files import save_atomically

from .student import STUDENTS, Student

WEIGHTS, DESCRIPTION = "student.safetensors", "student.yaml"


def save_student(student: Student, directory: str | Path, metadata: dict | None = None) -> Path:
    description = {"format": "ddistill-student/1", "kind": student.kind, "config": student.config(),
                   "metadata": metadata or {}}

    def write(staging: Path) -> None:
        save_file({k: v.detach().cpu().contiguous() for k, v in student.state_dict().items()}, staging / WEIGHTS)
        (staging / DESCRIPTION).write_text(yaml.safe_dump(description, sort_keys=False))

    return save_atomically(directory, write)


def load_student(directory: str | Path) -> Student:
    directory = Path(directory)
    if not (directory / DESCRIPTION).is_file():
        raise FileNotFoundError(f"{directory} holds no exported student ({DESCRIPTION} missing)")
    description = yaml.safe_load((directory / DESCRIPTION).read_text())
    student = STUDENTS[description["kind"]].from_config(description["config"])
    student.load_state_dict(load_file(directory / WEIGHTS))
    return student.eval()
