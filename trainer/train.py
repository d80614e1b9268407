"""``ddistill train``: one distillation run, from config to a finished run folder.

The loop is the same for every method (see ``methods``). Batches are a pure
function of (seed, step): the row stream is a sequence of seeded per-epoch
permutations, so a resumed run sees exactly the batches an uninterrupted one
would, and with the optimizer and RNG states restored from the checkpoint it ends
with the same metrics.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from services.teacher_server.client import TeacherUnavailable
from services.teacher_server.zoo import resolve_device

from .answer_probe import answer_probe
from .budget import check_share
from .committee import Committee, FaultPolicy
from .distill_module import DMConfig
from .domains import DOMAINS, Domain
from .export import save_student
from .methods import METHODS, DistillConfig, DiverseDistill, MethodContext, TrainingDiverged
from .run_dir import RunDir
from .teacher_cache import teacher_outputs
from .teachers import check_teacher_url, identity, open_teacher, url_budget
from .zeroth_order import SPSAEndpoint

log = logging.getLogger(__name__)
OPTIMIZERS = ("adagrad", "sgd-cosine")
GATE_SHUT_LOGS = 10  # logged batches in a row with no pair gated in before the run warns
GRAPH_MISS_WARN = 0.1  # share of a served teacher's AnswerVJPs (of 20 or more) resent in full before the run warns
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # stop after the step, with a checkpoint
# Raised whenever a change makes the same config give other numbers (result.json records it; the
# table scripts' ledger reuses only runs of the same version). 2: the student is initialised from
# the seed alone, whatever the teachers' kind (in-process teachers used to draw from the RNG first).
RESULTS_VERSION = 2


class TrainingStopped(Exception):
    """A stop signal (SIGTERM from a scheduler, a deadline or Ctrl-C) ended the run early; its
    state at ``step`` is checkpointed, so ``ddistill train --resume`` continues it exactly."""

    def __init__(self, step: int, signum: int, run_dir: Path) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}, checkpointed; "
                         f"continue with: ddistill train --resume {run_dir}")
        self.step, self.signum = step, signum


@contextmanager
def stop_signals_checkpoint(trainer: Trainer):
    """While training, SIGTERM and SIGINT ask ``trainer`` to stop after the current step and
    checkpoint it (a preempted job or a deadline loses no steps); a second signal stops at once.
    Outside the main thread (where Python delivers signals) nothing is installed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def request_stop(signum, frame):
        trainer.stop_signal = signum
        for s in STOP_SIGNALS:  # the next one acts as it normally would
            signal.signal(s, previous[s])
        log.warning("%s: stopping after this step with a checkpoint (send it again to stop now)",
                    signal.Signals(signum).name)

    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    for s in STOP_SIGNALS:
        signal.signal(s, request_stop)
    try:
        yield
    finally:
        for s in STOP_SIGNALS:
            signal.signal(s, previous[s])


@dataclass
class TrainConfig:
    method: str = "diversedistill"
    teachers: list[str] = field(default_factory=list)
    domain: str = "movielens"  # the dataset and student family (trainer.domains)
    # data: a folder or archive (MovieLens: ml-100k, seeded split; or train/test files)
    data: str | None = None
    train_file: str | None = None
    test_file: str | None = None
    split_seed: int = 0  # train/test and validation split; must match the teachers' (fit-teacher --split-seed)
    seed: int = 0  # training: initialisation, batches, exploration
    # student (overrides of the domain's student config; MovieLens: MLP-S, tower (128, 64)) and
    # optimisation (paper: Adagrad lr 0.06, batch 64, 8,000 steps)
    student: dict = field(default_factory=dict)
    steps: int = 8000
    batch_size: int = 64
    # the student's optimizer and learning rate; "auto"/None: the domain's (paper) recipe:
    # MovieLens Adagrad 0.06, CIFAR-10 SGD (momentum 0.9) 0.1 with a cosine schedule over ``steps``
    optimizer: str = "auto"
    lr: float | None = None
    # Adagrad learning rate and weight decay of the method's own modules (Distillation Module, FD
    # projector); None: the method's own (Method.module_lr: FD 0.001, DiverseDistill 0.01 with
    # weight decay 0.01). Lower than the student's 0.06, at which Adagrad's per-coordinate steps
    # blow the answers a_i up in directions the student's head never reads (docs/method.md).
    module_lr: float | None = None
    module_weight_decay: float | None = None
    distill: DistillConfig = field(default_factory=DistillConfig)
    calibration_rows: int = 1024  # rows whose native questions calibrate the question MLPs
    # running
    device: str = "auto"
    concurrent: bool = True  # fan out to teachers concurrently
    wire_dtype: str = "float32"
    teacher_timeout_s: float = 120.0  # deadline of one teacher request (a slower teacher counts as down)
    faults: FaultPolicy = field(default_factory=FaultPolicy)  # what a down teacher does to the run
    log_every: int = 50
    eval_every: int = 500
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    cache_dir: str | None = "runs/.cache"  # teachers' outputs for the baselines, decoded images

    def __post_init__(self) -> None:
        if self.domain not in DOMAINS:
            raise ValueError(f"unknown domain {self.domain!r}; expected one of {sorted(DOMAINS)}")
        if self.optimizer not in ("auto", *OPTIMIZERS):
            raise ValueError(f"unknown optimizer {self.optimizer!r}; expected auto or one of {OPTIMIZERS}")
        if isinstance(self.distill, dict):
            distill = dict(self.distill)
            distill["dm"] = DMConfig(**distill["dm"]) if distill.get("dm") else None
            self.distill = DistillConfig(**distill)
        if isinstance(self.faults, dict):
            self.faults = FaultPolicy(**self.faults)
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; expected one of {sorted(METHODS)}")
        low, high = METHODS[self.method].teacher_count
        if len(self.teachers) < low or (high is not None and len(self.teachers) > high):
            wanted = f"exactly {low}" if low == high else f"at least {low}" if high is None else f"{low}-{high}"
            raise ValueError(f"method {self.method} takes {wanted} teacher(s), got {len(self.teachers)}")
        for url in self.teachers:  # every teacher URL and budget checked before any teacher is loaded
            check_teacher_url(url)
        if self.distill.budget is not None:
            check_share(self.distill.budget, "distill.budget (--budget)")
        if self.distill.dm is None:  # written out, so that config.yaml says what the module was
            self.distill.dm = DMConfig()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_domain(self) -> Domain:
        domain = DOMAINS[self.domain]
        if self.train_file or self.test_file:
            return domain(train_file=self.train_file, test_file=self.test_file, split_seed=self.split_seed)
        return domain(data=self.data, split_seed=self.split_seed, cache_dir=self.cache_dir)


class BatchStream:
    """Batch t = rows [t*B, (t+1)*B) of the concatenation of per-epoch permutations seeded by (seed, epoch)."""

    def __init__(self, n_rows: int, batch_size: int, seed: int) -> None:
        self.n_rows, self.batch_size, self.seed = n_rows, batch_size, seed
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n_rows)
        return self._perm

    def rows(self, step: int) -> np.ndarray:
        start = step * self.batch_size
        out = []
        while len(out) < self.batch_size:
            epoch, offset = divmod(start + len(out), self.n_rows)
            take = min(self.batch_size - len(out), self.n_rows - offset)
            out.extend(self._permutation(epoch)[offset : offset + take])
        return np.asarray(out)


class Trainer:
    """Everything one run needs, built from a TrainConfig; ``run()`` trains to the end."""

    def __init__(self, config: TrainConfig, run_dir: str | Path) -> None:
        self.config = c = config
        self.run = RunDir(run_dir)
        self.device = resolve_device(c.device)
        self.domain = c.load_domain()
        self.endpoints = [
            open_teacher(url, seed=c.seed + i, timeout_s=c.teacher_timeout_s, wire_dtype=c.wire_dtype, device=self.device)
            for i, url in enumerate(c.teachers)
        ]
        self.committee = Committee(self.endpoints, concurrent=c.concurrent, faults=c.faults,
                                   budgets=[url_budget(url) for url in c.teachers]) if self.endpoints else None
        # Seeded here, after the teachers are built (in-process ones draw from the RNG as they are made,
        # served ones do not), so that a seed gives the same run whatever kind of endpoint each teacher is.
        torch.manual_seed(c.seed)
        self.student = self.domain.build_student(c.student).to(self.device)
        self.generator = torch.Generator().manual_seed(c.seed)
        method_cls = METHODS[c.method]
        outputs = None
        if method_cls.wants_teacher_outputs(c.distill):
            cache = Path(c.cache_dir) if c.cache_dir else None
            outputs = [teacher_outputs(e, self.domain, self.domain.fit, cache) for e in self.endpoints]
        self.ctx = MethodContext(
            self.student, c.distill, self.committee,
            inputs_for=lambda spec, rows: self.domain.teacher_inputs(spec, self.domain.fit, rows, for_answer=True),
            teacher_outputs=outputs, generator=self.generator,
        )
        self.method = method_cls(self.ctx).to(self.device)
        if hasattr(self.method, "dm"):
            self._calibrate(outputs)
        self.optimizer_name = self.domain.optimizer if c.optimizer == "auto" else c.optimizer
        self.base_lr = self.domain.lr if c.lr is None else c.lr
        if self.optimizer_name == "adagrad":
            student_optimizer = torch.optim.Adagrad(self.student.parameters(), lr=self.base_lr)
        else:
            student_optimizer = torch.optim.SGD(self.student.parameters(), lr=self.base_lr, momentum=0.9,
                                                weight_decay=5e-4)
        self.optimizers = [student_optimizer]
        if any(True for _ in self.method.parameters()):
            lr = method_cls.module_lr if c.module_lr is None else c.module_lr
            decay = method_cls.module_weight_decay if c.module_weight_decay is None else c.module_weight_decay
            self.optimizers.append(torch.optim.Adagrad(self.method.parameters(), lr=lr, weight_decay=decay))
        self.stream = BatchStream(len(self.domain.fit), c.batch_size, c.seed)
        self.step = 0
        self._shut_logs = 0  # consecutive logged batches with the gate shut (``watch_gate``)
        self._warned_graphs: set[str] = set()  # teachers warned about missing kept graphs (``watch_graphs``)
        self.diverged_at: int | None = None  # steps taken when training diverged (None: it did not)
        self.stop_signal: int | None = None  # a stop signal received: stop after the step (``stop_signals_checkpoint``)

    def _calibrate(self, outputs: list | None) -> None:
        """The Distillation Module's statistics of each teacher's native questions and hidden states,
        on ``calibration_rows`` training rows: read from the teachers' Predict outputs over the
        training rows when the method already has them (anchored questions), else asked for."""
        fit = self.domain.fit
        n = min(self.config.calibration_rows, len(fit))
        rows = np.sort(np.random.default_rng(self.config.seed).choice(len(fit), n, replace=False))
        for i, endpoint in enumerate(self.endpoints):
            if outputs is not None:
                question, hidden = outputs[i].question[rows], outputs[i].hidden[rows]
            else:
                native = endpoint.predict(self.domain.teacher_inputs(endpoint.spec, fit, rows, for_answer=False))
                question, hidden = native.question, native.hidden
            self.method.dm.question.calibrate(i, question.to(self.device))
            self.method.dm.answer.calibrate(i, hidden.to(self.device))

    # -- state ----------------------------------------------------------------------------

    def identities(self) -> list[dict]:
        return [identity(e) for e in self.endpoints]

    def _generators(self) -> list[torch.Generator]:
        return [self.generator] + [e.generator for e in self.endpoints if isinstance(e, SPSAEndpoint)]

    def save_checkpoint(self) -> None:
        trainer_state = {
            "optimizers": [o.state_dict() for o in self.optimizers],
            "torch_rng": torch.get_rng_state(),
            "generators": [g.get_state() for g in self._generators()],
        }
        state = {} if self.committee is None else self.committee.counters()
        weights = {"student": self.student.state_dict(), "method": self.method.state_dict()}
        self.run.save_checkpoint(self.step, weights, trainer_state, state, keep=self.config.keep_checkpoints)

    def restore(self) -> None:
        self.run.remove_partial_checkpoints()
        folder = self.run.latest_checkpoint()
        if folder is None:
            log.info("no checkpoint in %s yet: starting from step 0", self.run.path)
            return
        weights, trainer_state, state = RunDir.load_checkpoint(folder)
        self.student.load_state_dict(weights["student"])
        self.method.load_state_dict(weights["method"])
        for optimizer, saved in zip(self.optimizers, trainer_state["optimizers"]):
            optimizer.load_state_dict(saved)
        torch.set_rng_state(trainer_state["torch_rng"])
        for generator, saved in zip(self._generators(), trainer_state["generators"]):
            generator.set_state(saved)
        if self.committee is not None:
            self.committee.restore_counters({k: v for k, v in state.items() if k != "step"})
        self.step = state["step"]
        log.info("resumed %s from %s", self.run.path, folder.name)

    # -- training -------------------------------------------------------------------------

    def student_lr(self, step: int) -> float:
        """The student's learning rate at ``step``: constant, or cosine-annealed to 0 over the run
        (a function of the step alone, so a resumed run follows the same schedule)."""
        if self.optimizer_name == "sgd-cosine":
            return self.base_lr * 0.5 * (1 + math.cos(math.pi * step / self.config.steps))
        return self.base_lr

    def train_step(self) -> dict:
        for group in self.optimizers[0].param_groups:
            group["lr"] = self.student_lr(self.step)
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss, logs = self.method.loss(self.domain.batch(self.stream.rows(self.step), self.device), self.step)
        loss.backward()
        self.method.after_backward()
        self.check_finite(loss)
        for optimizer in self.optimizers:
            optimizer.step()
        self.step += 1
        return logs

    def check_finite(self, loss: torch.Tensor) -> None:
        """Raise ``TrainingDiverged`` before an update with a non-finite loss or gradient, so the
        student stays as it was after the last good step (one fused norm over all gradients)."""
        grads = [p.grad for o in self.optimizers for g in o.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else loss.new_zeros(())
        if not bool(torch.isfinite(loss) & torch.isfinite(norm)):
            raise TrainingDiverged(self.step, f"loss {float(loss.detach()):.4g}, gradient norm {float(norm):.4g}")

    def evaluate(self, split) -> float:
        """The student's metric on ``split`` (MovieLens: rating MSE)."""
        return self.domain.score(self.domain.predictions(self.student, split, self.device), split)

    def saving_logs(self) -> dict:
        """Teacher rows the gate saved, and which teachers are up; nothing for methods that never
        ask questions (baselines)."""
        committee = self.committee
        if committee is None or not committee.rows_possible.any():
            return {}
        logs = {f"rows_saved/{n}": float(s) for n, s in zip(committee.names, committee.saving())}
        logs["rows_saved/all"] = committee.total_saving()
        for name, sent, possible in zip(committee.names, committee.rows_sent, committee.rows_possible):
            logs[f"rows_sent/{name}"], logs[f"rows_possible/{name}"] = int(sent), int(possible)
        if committee.failures.any():
            logs.update({f"teacher_up/{n}": float(up) for n, up in zip(committee.names, committee.up)})
            logs.update({f"rows_missed/{n}": int(m) for n, m in zip(committee.names, committee.rows_missed)})
        return logs

    def graph_logs(self) -> dict:
        """For each served teacher that has lost kept graphs: the share of its AnswerVJPs that found
        their graph gone and were sent again in full (the same gradient, one more round trip and forward)."""
        if self.committee is None:
            return {}
        misses = zip(self.committee.names, self.committee.graph_misses())
        return {f"graphs_missed/{name}": missed / sent for name, (sent, missed) in misses if missed}

    def run_to_end(self, writer: SummaryWriter) -> None:
        c = self.config
        bar = tqdm(total=c.steps, initial=self.step, desc=f"train {c.method}", unit="step", dynamic_ncols=True)
        while self.step < c.steps:
            try:
                logs = self.train_step()
            except TrainingDiverged as err:
                log.error("%s; stopping here and evaluating the student as it is after step %d", err, self.step)
                self.diverged_at = self.step
                self.run.log({"step": self.step, "diverged": 1.0})
                break
            bar.update(1)
            if self.step % c.log_every == 0 or self.step == c.steps:
                record = {"step": self.step, **logs, **self.saving_logs(), **self.graph_logs()}
                self.run.log(record)
                for key, value in record.items():
                    if key != "step":
                        writer.add_scalar(key, value, self.step)
                self.watch_gate(record)
                self.watch_graphs()
                postfix = {"loss": f"{logs['loss/task']:.3f}"}
                if "rows_saved/all" in record:
                    postfix["saved"] = f"{record['rows_saved/all']:.0%}"
                bar.set_postfix(postfix)
            if self.step % c.eval_every == 0 or self.step == c.steps:
                key = f"valid_{self.domain.metric}"
                value = self.evaluate(self.domain.valid)
                self.run.log({"step": self.step, key: value})
                writer.add_scalar(key, value, self.step)
            if self.step % c.checkpoint_every == 0 and self.step < c.steps:
                self.save_checkpoint()
            if self.stop_signal is not None and self.step < c.steps:
                if self.step % c.checkpoint_every:
                    self.save_checkpoint()
                bar.close()
                raise TrainingStopped(self.step, self.stop_signal, self.run.path)
        bar.close()

    def watch_gate(self, record: dict) -> None:
        """Warn once when the gate has let no pair through for ``GATE_SHUT_LOGS`` logged batches in a
        row: the student is then training on its task alone (plus explored pairs), which a
        "rows saved" near 100% does not say by itself."""
        if record.get("gate/threshold", 0.0) == 0.0 or "gate/gated_in" not in record:
            return
        self._shut_logs = self._shut_logs + 1 if record["gate/gated_in"] == 0.0 else 0
        if self._shut_logs == GATE_SHUT_LOGS:
            log.warning(
                "the gate is shut: in the last %d logged batches (to step %d) no (row, teacher) pair had importance "
                ">= --threshold %g, so the student trains on its task alone (and the explored pairs). The importance "
                "cannot tell rows apart here; lower --threshold (0 sends every pair) or, with --importance "
                "disagreement, raise --importance-share. See docs/method.md, Gating.",
                GATE_SHUT_LOGS, self.step, record["gate/threshold"],
            )

    def watch_graphs(self) -> None:
        """Warn once per teacher when more than ``GRAPH_MISS_WARN`` of its AnswerVJPs had to be sent
        again in full: results are unchanged, but each such step pays the teacher's forward twice."""
        if self.committee is None:
            return
        for name, (sent, missed) in zip(self.committee.names, self.committee.graph_misses()):
            if name not in self._warned_graphs and sent >= 20 and missed > GRAPH_MISS_WARN * sent:
                self._warned_graphs.add(name)
                log.warning(
                    "teacher %s: %d of %d AnswerVJPs found the graph their Answer left on the server gone and were "
                    "sent again in full (the same gradient, one more round trip and forward each). Likely a Ray "
                    "Serve application with several replicas on Serve's default router (kept_graph_routing; "
                    "`serve delete` it and deploy again), or a teacher-server whose --keep-graphs is below the "
                    "trainers it serves or whose --graph-ttl is shorter than a step. See docs/deploy.md, 'Serving a teacher'.",
                    name, missed, sent,
                )

    def finish(self, seconds: float) -> dict:
        c, domain = self.config, self.domain
        metric = domain.metric
        result = {
            "method": c.method, "seed": c.seed, "steps": self.step, "domain": domain.name,
            "metric": metric, "lower_is_better": domain.lower_is_better,
            f"test_{metric}": self.evaluate(domain.test), f"valid_{metric}": self.evaluate(domain.valid),
            "train_seconds": round(seconds, 1), "data": domain.source, "results_version": RESULTS_VERSION,
        }
        if self.diverged_at is not None:
            result["diverged_at_step"] = self.diverged_at
        if self.committee is not None:
            result["teachers"] = {e.spec.name: self.teacher_score(e) for e in self.endpoints}
            result["rows_sent"] = dict(zip(self.committee.names, self.committee.rows_sent.tolist()))
            result["rows_possible"] = dict(zip(self.committee.names, self.committee.rows_possible.tolist()))
            result["rows_missed"] = dict(zip(self.committee.names, self.committee.rows_missed.tolist()))
            result["budgets"] = dict(zip(self.committee.names, self.method.budgets))
            result["teacher_failures"] = dict(zip(self.committee.names, self.committee.failures.tolist()))
            result.update(self.saving_logs())
        if isinstance(self.method, DiverseDistill) and self.diverged_at is None:  # a diverged student asks NaN
            try:
                result["answers"] = self.probe_answers(domain.valid)
            except TeacherUnavailable as err:
                log.warning("the answer probe needs every teacher, and one cannot be reached (%s): left out", err)
        save_student(self.student, self.run.student_dir, {"result": result})
        self.run.write_result(result)
        return result

    def teacher_score(self, endpoint) -> float | None:
        """The teacher's own test metric; None (with a warning) for a teacher that cannot be reached at the
        end of a run (lost under ``--on-teacher-failure skip``): the student's result is kept either way."""
        cache = Path(self.config.cache_dir) if self.config.cache_dir else None
        try:
            outputs = teacher_outputs(endpoint, self.domain, self.domain.test, cache)
        except TeacherUnavailable as err:
            log.warning("teacher %s cannot be reached to score it on the test rows (%s): its score is left out",
                        endpoint.spec.name, err)
            return None
        return self.domain.score(outputs.prediction, self.domain.test)

    def probe_answers(self, split) -> dict:
        """What the answers are worth on ``split``, per teacher (``answer_probe``)."""
        native = None
        if self.method.wants_teacher_outputs(self.config.distill):  # anchored questions: the split's own states
            cache = Path(self.config.cache_dir) if self.config.cache_dir else None
            native = [teacher_outputs(e, self.domain, split, cache) for e in self.endpoints]
        return answer_probe(self.method, self.domain, split, native, self.device)

    def close(self) -> None:
        if self.committee is not None:
            self.committee.close()


def train(config: TrainConfig, run_dir: str | Path) -> dict:
    """A new run in ``run_dir``; returns its result."""
    trainer = Trainer(config, run_dir)
    try:
        trainer.run.create({"config": config.to_dict(), "committee": trainer.identities()})
        return _run(trainer)
    finally:
        trainer.close()


def resume(run_dir: str | Path) -> dict:
    """Continue the run in ``run_dir`` from its last checkpoint, with its own config."""
    run = RunDir(run_dir)
    saved = run.read_config()
    config = _saved_config(run, saved["config"])
    trainer = Trainer(config, run_dir)
    try:
        committee = [{"compute_dtype": "float32", **member} for member in saved["committee"]]  # runs before the key
        if trainer.identities() != committee:
            raise ValueError(
                f"refusing to resume {run.path}: the committee differs from the one it was trained with\n"
                f"  saved:   {committee}\n  current: {trainer.identities()}"
            )
        trainer.restore()
        run.truncate_metrics(trainer.step)
        return _run(trainer)
    finally:
        trainer.close()


def _saved_config(run: RunDir, saved: dict) -> TrainConfig:
    """The run's TrainConfig, exactly as it was saved. A run folder written by another version of
    ddistill (a setting it lacks, which would silently take today's default, or one this version
    does not know) is refused with the settings that differ: resuming it would not continue the
    same run."""
    try:
        config = TrainConfig(**saved)
    except TypeError as error:
        raise ValueError(f"refusing to resume {run.path}: its config.yaml is not one this version of ddistill "
                         f"writes ({error}); resume it with the version that made it") from None
    now = _flatten(json.loads(json.dumps(config.to_dict())))  # tuples as YAML gives them back: lists
    before = _flatten(saved)
    differ = sorted(k for k in now.keys() | before.keys() if now.get(k, "<missing>") != before.get(k, "<missing>"))
    if differ:
        listed = ", ".join(f"{k} (saved {before.get(k, '<missing>')!r}, now {now.get(k, '<missing>')!r})"
                           for k in differ)
        raise ValueError(f"refusing to resume {run.path}: it was made by another version of ddistill whose "
                         f"settings differ from this one's: {listed}; resume it with the version that made it")
    return config


def _flatten(config: dict, prefix: str = "") -> dict:
    """{"distill": {"dm": {"d_m": 64}}} -> {"distill.dm.d_m": 64}; lists as lists."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _run(trainer: Trainer) -> dict:
    start = time.time()
    writer = SummaryWriter(str(trainer.run.tensorboard), purge_step=trainer.step + 1 if trainer.step else None)
    try:
        with trainer.run.training(), stop_signals_checkpoint(trainer):
            trainer.run_to_end(writer)
    finally:
        writer.close()
    return trainer.finish(time.time() - start)
