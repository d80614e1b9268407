"""What the table scripts share: a table cell (method + committee + gate threshold or budget + alpha +
DiverseDistill's anchor, importance target and share, and gate),
running cells as `ddistill train` processes (several at once with ``jobs``), and the
statistics over seeds (mean ± sample std, a paired t-test)."""

from __future__ import annotations

import json
import shutil
import statistics
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlencode

from trainer.methods import DistillConfig

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Cell:
    method: str
    teachers: tuple[str, ...] = ()
    threshold: float | None = None  # None: the trainer's default
    alpha: float | None = None  # None: the trainer's default
    anchor: str | None = None  # DiverseDistill's question anchor; None: the trainer's default
    importance: str | None = None  # DiverseDistill's importance target; None: the trainer's default
    share: float | None = None  # DiverseDistill's --importance-share; None: the trainer's default
    gate: str | None = None  # DiverseDistill's gate (learned, or the shuffled control); None: the default
    budget: float | None = None  # --budget (every teacher's call budget); None: the default
    # per-teacher call budgets, ((name, share), ...), sent as ?budget= on those teachers' URLs
    teacher_budgets: tuple[tuple[str, float], ...] = ()
    # settings chosen by a validation sweep, ((flag, value), ...) sorted by flag, e.g. (("--lr", 0.02),):
    # given before the cell's own settings, which therefore win where both set one
    params: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        """A setting given at the trainer's default is the default: one run under one key, so a run that two
        tables share (the default DiverseDistill cell, say) is trained once."""
        d = DistillConfig()
        defaults = {"threshold": d.threshold, "alpha": d.alpha, "anchor": d.anchor, "importance": d.importance,
                    "share": d.importance_share, "gate": d.gate, "budget": d.budget}
        for name, default in defaults.items():
            if getattr(self, name) == default:
                object.__setattr__(self, name, None)  # frozen

    @property
    def key(self) -> str:
        parts = [self.method, *self.teachers] + [f"{flag.lstrip('-')}{value:g}" for flag, value in self.params]
        parts += [f"tau{self.threshold:g}"] if self.threshold is not None else []
        parts += [f"alpha{self.alpha:g}"] if self.alpha is not None else []
        parts += [f"anchor-{self.anchor}"] if self.anchor is not None else []
        parts += [f"importance-{self.importance}"] if self.importance is not None else []
        parts += [f"share{self.share:g}"] if self.share is not None else []
        parts += [f"budget{self.budget:g}"] if self.budget is not None else []
        parts += [f"{name}budget{share:g}" for name, share in self.teacher_budgets]
        return "-".join(parts + ([f"gate-{self.gate}"] if self.gate is not None else []))

    @property
    def label(self) -> str:
        who = " + ".join(t.upper() for t in self.teachers)
        label = f"{self.method} ({who})" if who else self.method
        label += "".join(f", {name.upper()} at {share:.1%}" for name, share in self.teacher_budgets)
        return label + (f" α={self.alpha:g}" if self.alpha is not None else "")

    def with_params(self, params: dict[str, float]) -> Cell:
        """This cell at the settings ``params`` ({flag: value}, a sweep's chosen ones)."""
        return replace(self, params=tuple(sorted(params.items())))

    def with_budgets(self, budgets: dict[str, float]) -> Cell:
        """This cell with the call budgets of those of its teachers that ``budgets`` names."""
        return replace(self, teacher_budgets=tuple((t, budgets[t]) for t in self.teachers if t in budgets))

    def flags(self, checkpoints: Path, options: dict[str, dict[str, str]] | None = None) -> list[str]:
        """This cell's `ddistill train` flags: method, teachers (checkpoint folders, with the URL options
        ``options[name]`` where given, e.g. {"dtype": "bfloat16", "device": "cuda"}), and the settings it sets."""
        flags = ["--method", self.method]
        budgets = dict(self.teacher_budgets)
        for teacher in self.teachers:
            query = urlencode({**(options or {}).get(teacher, {}),
                               **({"budget": f"{budgets[teacher]:g}"} if teacher in budgets else {})})
            flags += ["--teacher", f"local:{checkpoints / teacher}" + (f"?{query}" if query else "")]
        flags += [str(x) for flag, value in self.params for x in (flag, value)]
        if self.threshold is not None:
            flags += ["--threshold", str(self.threshold)]
        if self.alpha is not None:
            flags += ["--alpha", str(self.alpha)]
        if self.anchor is not None:
            flags += ["--anchor", self.anchor]
        if self.importance is not None:
            flags += ["--importance", self.importance]
        if self.share is not None:
            flags += ["--importance-share", str(self.share)]
        if self.gate is not None:
            flags += ["--gate", self.gate]
        if self.budget is not None:
            flags += ["--budget", str(self.budget)]
        return flags


def spread(values: list[float]) -> float:
    """Sample standard deviation over seeds; 0 for a single seed."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(values: list[float], scale: float = 1.0, digits: int = 4) -> str:
    """mean ± sample standard deviation over seeds."""
    values = [scale * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def summarise_grr(values: list[float | None]) -> str:
    """GRR over seeds in percent; "n/a" where the committee's best teacher is no better than S_base."""
    return "n/a" if None in values else f"{summarise(values, 100, 1)}%"


def plot_grr(results: dict[str, dict], keys: list[str], path: Path, title: str = "") -> None:
    """GRR bars (mean ± std over seeds) of ``results[key]`` for ``keys``, leaving out the cells whose
    GRR is n/a; written even when none has one (the figure says so)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if None not in results[k]["grr"]]
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(keys)), 4))
    ax.bar(range(len(keys)), [100 * statistics.mean(results[k]["grr"]) for k in keys],
           yerr=[100 * spread(results[k]["grr"]) for k in keys], capsize=3)
    ax.set_xticks(range(len(keys)), [results[k]["label"] for k in keys], rotation=45, ha="right", fontsize=8)
    if not keys:
        ax.text(0.5, 0.5, "no gap to recover: no committee's best teacher beats S_base", ha="center",
                transform=ax.transAxes)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_ylabel("gap recovery rate (%)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def paired_t(a: list[float], b: list[float]) -> tuple[float, float]:
    """Two-sided paired t-test of a vs b (same seeds); (t, p)."""
    from scipy import stats

    result = stats.ttest_rel(a, b)
    return float(result.statistic), float(result.pvalue)


def run_train(key: str, train_args: list[str], run_dir: Path, threads: int) -> dict:
    """``ddistill train TRAIN_ARGS --run-dir RUN_DIR`` in a process of its own (``trainer_process``),
    unless ``RUN_DIR/result.json`` already exists (so a table script can be stopped and started again);
    its result. A run that was stopped before its result (a deadline's SIGTERM checkpoints it) is continued
    with ``ddistill train --resume RUN_DIR``. The run's progress bar and warnings go to ``RUN_DIR.log``."""
    result_file = run_dir / "result.json"
    if not result_file.exists():
        started = (run_dir / "config.yaml").exists()
        what = ["--resume", str(run_dir)] if started else [*train_args, "--run-dir", str(run_dir)]
        argv = ["--threads", str(threads), "train", *what]
        print(f"[{key}] trainer.cli " + " ".join(argv), flush=True)
        log = run_dir.parent / f"{run_dir.name}.log"
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        process = trainer_process(argv, log, append=started)
        process.start()
        process.join()
        if process.exitcode and not result_file.exists():  # a diverged run still writes its result (exit 3)
            raise SystemExit(f"{key} failed (exit {process.exitcode}); see {log}")
    return json.loads(result_file.read_text())


_FORKSERVER = None  # the multiprocessing context whose server the trainer processes are forked from


def trainer_process(argv: list[str], log: Path, append: bool = False):
    """A process that runs ``python -m trainer.cli ARGV`` (the code a user runs, one process per run, so
    runs share no state), its stderr to ``log``, its stdout dropped. It is forked from a server process
    that has already imported torch, torch._dynamo (which torch imports when the first optimizer is
    built) and the trainer: a fresh interpreter pays ~3-5 s for those on this CPU, more than a short run's
    training, and a table script starts dozens of runs. The server imports only; it computes nothing,
    so no thread pool or device is live when it forks."""
    import multiprocessing

    global _FORKSERVER
    if _FORKSERVER is None:
        _FORKSERVER = multiprocessing.get_context("forkserver")
        _FORKSERVER.set_forkserver_preload(["torch", "torch._dynamo", "trainer.cli"])
    return _FORKSERVER.Process(target=_trainer_main, args=(argv, str(log), append))


def _trainer_main(argv: list[str], log: str, append: bool) -> None:
    """A trainer process's body (``trainer_process``): what ``python -m trainer.cli ARGV`` does, in REPO."""
    import os

    os.chdir(REPO)
    stderr = os.open(log, os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC), 0o644)
    os.dup2(stderr, 2)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    from trainer.cli import main

    sys.exit(main(argv))


RUN_RECORD = ("result.json", "config.yaml")  # what a ledger keeps of a finished run


def reuse_runs(source: Path, runs_dir: Path, keys: set[str], checkpoints: Path, steps: int,
               options: dict[str, dict[str, str]] | None = None) -> list[str]:
    """Copy into ``runs_dir`` the finished runs of ``source`` (a runs folder, or a ledger that
    ``record_runs`` wrote: ``RUN/result.json`` and ``RUN/config.yaml``) that are the runs ``runs_dir``
    would make: the run's cell key is in ``keys``, it trained for ``steps`` steps, and each of its
    teachers is the checkpoint of that name in ``checkpoints`` (the same weights' hash) computing in
    the same precision (``options[name]["dtype"]``, float32 by default), by a trainer whose
    ``RESULTS_VERSION`` is today's. A run already in ``runs_dir``
    is never overwritten. The names of the runs copied."""
    import yaml

    from services.teacher_server.zoo import resolve_device, resolve_dtype
    from trainer.train import RESULTS_VERSION

    hashes = {d.name: yaml.safe_load((d / "teacher.yaml").read_text()).get("weights_sha256")
              for d in checkpoints.iterdir() if (d / "teacher.yaml").is_file()} if checkpoints.is_dir() else {}
    def dtype(name: str) -> str:  # what the teacher would compute in ("auto" resolved as a run would)
        option = (options or {}).get(name, {})
        if option.get("dtype") != "auto":
            return option.get("dtype", "float32")
        return resolve_dtype("auto", resolve_device(option.get("device", "cpu")))

    dtypes = {name: dtype(name) for name in hashes}
    copied = []
    for result in sorted(source.glob("*/result.json")) if source.is_dir() else []:
        run = result.parent
        if run.name.rsplit("-s", 1)[0] not in keys or (runs_dir / run.name / "result.json").exists():
            continue
        config = yaml.safe_load((run / "config.yaml").read_text())
        if (config.get("config") or {}).get("steps") != steps:
            continue
        if json.loads(result.read_text()).get("results_version") != RESULTS_VERSION:  # other code, other numbers
            continue
        if not all(m["name"] in hashes and hashes[m["name"]] == m["weights_sha256"]
                   and m.get("compute_dtype", "float32") == dtypes[m["name"]] for m in config.get("committee") or []):
            continue
        copy_record(run, runs_dir / run.name)
        copied.append(run.name)
    return copied


def record_runs(runs_dir: Path, ledger: Path, names: list[str]) -> None:
    """Keep each named finished run's result and configuration (its teachers' hashes among it) in
    ``ledger``: a few KB a run, small enough to commit, so that a fresh checkout can render the tables
    and train only the runs missing (``reuse_runs``)."""
    for name in names:
        if (runs_dir / name / "result.json").exists():
            copy_record(runs_dir / name, ledger / name)


def copy_record(run: Path, to: Path) -> None:
    """Copy a finished run's ``RUN_RECORD`` files from folder ``run`` into folder ``to``."""
    to.mkdir(parents=True, exist_ok=True)
    for name in RUN_RECORD:
        shutil.copy(run / name, to / name)


def finished_runs(cells: list[Cell], seeds: list[int], runs_dir: Path) -> dict[tuple[str, int], dict]:
    """The results of the (cell, seed) runs that have finished in ``runs_dir``, by (cell key, seed):
    what a script's ``--report-only`` reports, training nothing."""
    return {(cell.key, seed): json.loads(result.read_text()) for cell in cells for seed in seeds
            if (result := runs_dir / f"{cell.key}-s{seed}" / "result.json").exists()}


def of_seeds(n: int, total: int) -> str:
    """The note "(N of TOTAL seeds)" for a result over fewer seeds than asked for; empty otherwise."""
    return f" ({n} of {total} seeds)" if n < total else ""


def run_cells(cells: list[Cell], seeds: list[int], train_args: Callable[[Cell, int], list[str]], runs_dir: Path,
              threads: int, jobs: int, ledger: Path | None = None) -> dict[tuple[str, int], dict]:
    """``run_train`` for every (cell, seed), in ``runs_dir/KEY-sSEED``, ``jobs`` at a time; results by
    (cell key, seed). ``train_args(cell, seed)`` gives the run's `ddistill train` flags. With a ``ledger``,
    each run is recorded there as soon as it is done (``record_runs``), so a stopped table keeps what finished.
    A failed run stops nothing else: the failures are reported together at the end."""
    pairs = [(cell, seed) for cell in dict.fromkeys(cells) for seed in seeds]

    def run(pair: tuple[Cell, int]) -> dict:
        cell, seed = pair
        name = f"{cell.key}-s{seed}"
        result = run_train(f"{cell.key} seed {seed}", train_args(cell, seed), runs_dir / name, threads)
        if ledger is not None:
            record_runs(runs_dir, ledger, [name])
        return result

    # Every run is tried even when one fails (pool.map would cancel the queue at the first error
    # it yields); the failures are raised together once the others are done.
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        futures = {(cell.key, seed): pool.submit(run, (cell, seed)) for cell, seed in pairs}
    failed = [str(f.exception()) for f in futures.values() if f.exception() is not None]
    if failed:
        raise SystemExit(f"{len(failed)} of {len(futures)} runs failed:\n" + "\n".join(failed))
    return {pair: future.result() for pair, future in futures.items()}
