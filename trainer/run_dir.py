"""A training run's folder: config, metrics, TensorBoard logs, checkpoints, the student.

    RUN/config.yaml            the TrainConfig and the committee's identities
    RUN/metrics.jsonl          one JSON object per logged step / evaluation
    RUN/tb/                    TensorBoard event files
    RUN/checkpoints/step-N/    student.safetensors, method.safetensors, trainer_state.pt, state.json
    RUN/checkpoints/latest     name of the newest complete checkpoint
    RUN/student/               the final student alone (``ddistill export`` writes the same)
    RUN/result.json            final metrics
    RUN/trainer.pid            the training process's id, while one trains into the folder

A checkpoint is written into a temporary folder, fsynced, and renamed into place;
only then is ``latest`` replaced (itself via a temporary file and rename). A crash
at any moment leaves the previous checkpoint intact and pointed to. A failed write
(e.g. a full disk) is reported and training goes on; the previous checkpoint stays.
Optimizer and RNG state is saved with ``torch.save`` and read back with
``weights_only=True`` (no arbitrary unpickling); model weights are safetensors.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from services.teacher_server.atomic_files import save_atomically, write_text_atomically

log = logging.getLogger(__name__)

LATEST = "latest"


class RunDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.config_file = self.path / "config.yaml"
        self.metrics_file = self.path / "metrics.jsonl"
        self.checkpoints = self.path / "checkpoints"
        self.tensorboard = self.path / "tb"
        self.student_dir = self.path / "student"
        self.result_file = self.path / "result.json"
        self.pid_file = self.path / "trainer.pid"

    @contextmanager
    def training(self) -> Iterator[None]:
        """``RUN/trainer.pid`` holds this process's id while it trains: how a watchdog finds the process
        to stop (experiments/deadline_shed.py) whatever started it. A process killed outright leaves
        the file behind with the id of a process that is gone."""
        write_text_atomically(self.pid_file, f"{os.getpid()}\n")
        try:
            yield
        finally:
            self.pid_file.unlink(missing_ok=True)

    # -- config and metrics ------------------------------------------------------------

    def create(self, config: dict) -> None:
        if self.config_file.exists():
            raise FileExistsError(f"{self.path} already holds a run; use --resume {self.path} or another --run-dir")
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        write_text_atomically(self.config_file, yaml.safe_dump(config, sort_keys=False))

    def read_config(self) -> dict:
        if not self.config_file.is_file():
            raise FileNotFoundError(f"{self.path} is not a run folder: no config.yaml")
        return yaml.safe_load(self.config_file.read_text())

    def log(self, record: dict) -> None:
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps(record) + "\n")

    def read_metrics(self) -> list[dict]:
        """The logged records; a last line torn by a crash mid-append is dropped, not an error."""
        if not self.metrics_file.is_file():
            return []
        lines = [line for line in self.metrics_file.read_text().splitlines() if line.strip()]
        records = [json.loads(line) for line in lines[:-1]]
        if lines:
            try:
                records.append(json.loads(lines[-1]))
            except json.JSONDecodeError:
                log.warning("%s: dropping a torn last record (a crash mid-write)", self.metrics_file)
        return records

    def truncate_metrics(self, last_step: int) -> None:
        """Drop records after ``last_step`` (logged after the checkpoint a resume starts from)."""
        kept = [r for r in self.read_metrics() if r.get("step", 0) <= last_step]
        write_text_atomically(self.metrics_file, "".join(json.dumps(r) + "\n" for r in kept))

    def write_result(self, result: dict) -> None:
        write_text_atomically(self.result_file, json.dumps(result, indent=2) + "\n")

    def read_result(self) -> dict:
        if not self.result_file.is_file():
            raise FileNotFoundError(f"{self.path} has no result.json: the run has not finished")
        return json.loads(self.result_file.read_text())

    # -- checkpoints ---------------------------------------------------------------------

    def save_checkpoint(
        self, step: int, weights: dict[str, dict[str, torch.Tensor]], trainer_state: dict, state: dict, keep: int = 2
    ) -> Path | None:
        """Write checkpoint ``step`` atomically; returns its folder, or None if writing failed."""
        name = f"step-{step:08d}"

        def write(staging: Path) -> None:
            for part, tensors in weights.items():
                save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, staging / f"{part}.safetensors")
            torch.save(trainer_state, staging / "trainer_state.pt")
            (staging / "state.json").write_text(json.dumps({"step": step, **state}))

        try:
            final = save_atomically(self.checkpoints / name, write)
            write_text_atomically(self.checkpoints / LATEST, name)
        except (OSError, SafetensorError) as err:  # safetensors reports a full disk as its own error
            log.error("checkpoint at step %d not written (%s); the previous one is kept", step, err)
            return None
        self._prune(keep)
        return final

    def _prune(self, keep: int) -> None:
        done = sorted(p for p in self.checkpoints.glob("step-*") if p.is_dir())
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    def remove_partial_checkpoints(self) -> None:
        """Staging folders left by a crash mid-write (never pointed to by ``latest``)."""
        for partial in self.checkpoints.glob(".step-*"):
            shutil.rmtree(partial, ignore_errors=True)

    def latest_checkpoint(self) -> Path | None:
        pointer = self.checkpoints / LATEST
        if not pointer.is_file():
            return None
        folder = self.checkpoints / pointer.read_text().strip()
        return folder if (folder / "state.json").is_file() else None

    @staticmethod
    def load_checkpoint(folder: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict, dict]:
        weights = {p.stem: load_file(p) for p in folder.glob("*.safetensors")}
        trainer_state = torch.load(folder / "trainer_state.pt", weights_only=True)
        return weights, trainer_state, json.loads((folder / "state.json").read_text())
