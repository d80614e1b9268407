"""Run configs in files: ``ddistill train --config run.yaml``, flags on top.

A run config is ``TrainConfig`` written as YAML, every field optional (the dataclasses' defaults
fill the rest), nested as the dataclasses are::

    method: diversedistill
    teachers: [local:checkpoints/mlp-l, "local:checkpoints/lm?budget=0.1&dtype=auto"]
    data: ../shared/data/ml-100k
    steps: 8000
    distill: {alpha: 1.0, beta: 0.5, threshold: 0.6, dm: {d_emb: 128, d_m: 64}}

The ``config.yaml`` a run writes (``{config: ..., committee: ...}``) is itself a valid config: its
``config`` part is read. Flags given on the command line override the file, field by field
(``FLAG_FIELDS``). The whole config is checked, types and allowed values, before any teacher is
loaded, and a bad one is refused with one line per problem naming the field (``ConfigError``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ConfigDict, TypeAdapter, ValidationError

from .committee import FaultPolicy
from .distill_module import DMConfig
from .methods import DistillConfig
from .train import TrainConfig

# a command-line flag's dest -> the config field it sets (dotted for nested dataclasses)
FLAG_FIELDS = {
    "method": "method", "teacher": "teachers", "domain": "domain", "data": "data", "train": "train_file",
    "test": "test_file", "seed": "seed", "split_seed": "split_seed", "steps": "steps", "batch_size": "batch_size",
    "optimizer": "optimizer", "lr": "lr", "module_lr": "module_lr", "module_weight_decay": "module_weight_decay",
    "alpha": "distill.alpha", "beta": "distill.beta", "gamma": "distill.gamma", "threshold": "distill.threshold",
    "budget": "distill.budget", "gate_warmup": "distill.gate_warmup", "explore": "distill.explore",
    "importance": "distill.importance", "importance_share": "distill.importance_share", "gate": "distill.gate",
    "row_weight": "distill.row_weight", "anchor": "distill.anchor", "tolerance": "distill.tolerance",
    "temperature": "distill.temperature",
    "d_emb": "distill.dm.d_emb", "d_m": "distill.dm.d_m", "answer_hidden": "distill.dm.answer_hidden",
    "answer_norm": "distill.dm.answer_norm", "device": "device", "concurrent": "concurrent",
    "wire_dtype": "wire_dtype", "teacher_timeout": "teacher_timeout_s", "on_teacher_failure": "faults.on_failure",
    "teacher_wait": "faults.wait_s", "teacher_retry_after": "faults.retry_after_s", "eval_every": "eval_every",
    "checkpoint_every": "checkpoint_every", "cache_dir": "cache_dir",
}

# unknown keys are errors, at every level (a typo must not silently train with the default)
for _cls in (TrainConfig, DistillConfig, DMConfig, FaultPolicy):
    _cls.__pydantic_config__ = ConfigDict(extra="forbid")
_ADAPTER = TypeAdapter(TrainConfig)


class ConfigError(ValueError):
    """A run config that cannot be run: every problem found, one per line, each naming its field."""


def read_config_file(path: str | Path) -> dict:
    """The run config in ``path`` as a (nested) dict: a config file, or a run's own config.yaml."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a run config is a mapping of settings (method: ..., teachers: [...]), "
                          f"not a {type(data).__name__}")
    if "committee" in data and isinstance(data.get("config"), dict):  # a run folder's config.yaml
        return data["config"]
    return data


def with_overrides(config: dict, overrides: dict[str, Any]) -> dict:
    """``config`` with each dotted field of ``overrides`` set (nested mappings made as needed)."""
    merged = _copy(config)
    for dotted, value in overrides.items():
        node = merged
        *parents, last = dotted.split(".")
        for key in parents:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[last] = value
    return merged


def build_config(config: dict, source: str = "config") -> TrainConfig:
    """A checked ``TrainConfig`` from a nested dict; ``ConfigError`` naming each bad field otherwise."""
    try:
        return _ADAPTER.validate_python(config)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            field = ".".join(str(part) for part in e["loc"])
            message = e["msg"].removeprefix("Value error, ")
            if e["type"] == "unexpected_keyword_argument":
                message = f"unknown setting; known here: {', '.join(_known(e['loc']))}"
            elif "input" in e and e["type"] != "value_error":
                message += f" (got {e['input']!r})"
            problems.append(f"{source}: {field}: {message}" if field else f"{source}: {message}")
        raise ConfigError("\n".join(problems)) from None


def _known(loc: tuple) -> list[str]:
    """The settings allowed where ``loc`` (a path ending in the unknown key) points."""
    import dataclasses

    cls: Any = TrainConfig
    nested = {"distill": DistillConfig, "dm": DMConfig, "faults": FaultPolicy}
    for part in loc[:-1]:
        cls = nested.get(str(part), cls)
    return [f.name for f in dataclasses.fields(cls)]


def _copy(value):
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    return value
