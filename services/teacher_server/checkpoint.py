"""Teacher checkpoints: a folder with safetensors weights and a YAML description.

    DIR/teacher.yaml       format, name, family, the family's config, fit metadata
    DIR/model.safetensors  every parameter and buffer (no pickle anywhere)
    DIR/...                family assets, e.g. the LM's tokenizer/

Any trained model of a zoo family can be served this way. The folder is written
under a temporary name and renamed into place, so a crash mid-save never leaves a
half-written checkpoint behind. Loading checks every file and key and says what is
wrong instead of failing deep inside torch.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .atomic_files import save_atomically
from .codec import torch_dtype
from .zoo import FAMILIES, Teacher, resolve_device, resolve_dtype

FORMAT = "ddistill-teacher/1"
SPEC_FILE = "teacher.yaml"
WEIGHTS_FILE = "model.safetensors"


class CheckpointError(RuntimeError):
    """A teacher checkpoint folder is missing, incomplete or inconsistent."""


def save_teacher(teacher: Teacher, directory: str | Path, metadata: dict | None = None) -> Path:
    """Write ``teacher`` to ``directory`` (replacing it atomically); returns the folder."""

    def write(staging: Path) -> None:
        save_file({k: v.detach().cpu().contiguous() for k, v in teacher.state_dict().items()}, staging / WEIGHTS_FILE)
        teacher.save_assets(staging)
        description = {
            "format": FORMAT,
            "name": teacher.name,
            "family": teacher.family,
            "weights_sha256": file_sha256(staging / WEIGHTS_FILE),
            "config": teacher.config(),
            "metadata": metadata or {},
        }
        (staging / SPEC_FILE).write_text(yaml.safe_dump(description, sort_keys=False))

    return save_atomically(directory, write)


def read_description(directory: str | Path) -> dict:
    """The parsed teacher.yaml of a checkpoint folder, checked for the required keys."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"teacher checkpoint folder not found: {directory}")
    spec_file = directory / SPEC_FILE
    if not spec_file.is_file():
        raise CheckpointError(f"{directory} is not a teacher checkpoint: it has no {SPEC_FILE}")
    try:
        description = yaml.safe_load(spec_file.read_text())
    except yaml.YAMLError as err:
        raise CheckpointError(f"{spec_file} is not valid YAML: {err}") from None
    if not isinstance(description, dict):
        raise CheckpointError(f"{spec_file} must be a mapping")
    missing = [k for k in ("format", "name", "family", "config") if k not in description]
    if missing:
        raise CheckpointError(f"{spec_file} lacks {', '.join(missing)}")
    if description["format"] != FORMAT:
        raise CheckpointError(f"{spec_file} has format {description['format']!r}; this server reads {FORMAT!r}")
    if description["family"] not in FAMILIES:
        raise CheckpointError(
            f"{spec_file}: unknown teacher family {description['family']!r}; known: {sorted(FAMILIES)}"
        )
    return description


def load_teacher(
    directory: str | Path, *, name: str | None = None, device: str | torch.device = "cpu", dtype: str = "float32"
) -> Teacher:
    """Load a frozen teacher from a checkpoint folder; ``name`` overrides the saved name.

    ``device`` may be "auto" (the GPU when there is one); ``dtype`` is the compute dtype
    (``DTYPE_CHOICES``; "auto": bfloat16 where the device computes it natively, else float32. The
    weights are cast after the hash check, so the spec's ``weights_sha256`` still names the saved file)."""
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    directory = Path(directory)
    description = read_description(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{directory} has no {WEIGHTS_FILE}")
    family = FAMILIES[description["family"]]
    try:
        teacher = family.from_config(name or description["name"], description["config"], directory)
    except (TypeError, ValueError, KeyError) as err:
        raise CheckpointError(f"{directory / SPEC_FILE}: config does not fit family {family.family}: {err}") from None
    try:
        state = load_file(weights)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{weights} is not a readable safetensors file: {err}") from None
    _load_state(teacher, state, weights)
    teacher.weights_sha256 = file_sha256(weights)
    saved_hash = description.get("weights_sha256")
    if saved_hash and saved_hash != teacher.weights_sha256:
        raise CheckpointError(f"{weights} does not match the hash in {SPEC_FILE}: the weights were changed or damaged")
    return teacher.to(device, torch_dtype(dtype)).freeze()


def _load_state(teacher: Teacher, state: dict[str, torch.Tensor], source: Path) -> None:
    expected = teacher.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not match the {teacher.family} config: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise CheckpointError(
                f"{source}: {key} has shape {list(value.shape)}, the config needs {list(expected[key].shape)}"
            )
    teacher.load_state_dict(state, strict=True)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
