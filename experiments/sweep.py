"""Tune every method the same way, on validation only, as the paper did.

    python experiments/sweep.py --committee mlp-l mlp-m --trials 16 --jobs 2 --ledger docs/results/runs
    python experiments/sweep.py --committee mlp-l lm --teacher-budget lm=0.1 --teacher-option lm=dtype=auto

For each method (``--methods``: DiverseDistill and the baselines that fit the committee), an Optuna
study (TPE, seeded) proposes ``--trials`` settings from one search space that every method shares
(``SPACE``: the student's learning rate and alpha for all, the paper's grids for what only a method
has: beta, d_emb, d_m for DiverseDistill, the tolerance for AEKD, the projector's learning rate for FD),
and each trial is a real ``ddistill train`` run on seed 0 whose *validation* MSE is the objective. The
test split is not read to choose. Then each method's chosen config is run on ``--seeds`` (the chosen
trial itself is the first seed's run: same config, same seed, same numbers) and only those runs' test
MSE is reported, with a paired t-test of DiverseDistill against each baseline over the seeds.

Writes ``--out``/COMMITTEE.md and .json (every trial's settings and validation MSE, the chosen one per
method) and ``--configs``/COMMITTEE-METHOD.yaml, the chosen run config (``ddistill train --config``).
Trials are kept as run folders (``--runs-dir``, named KEY-sSEED as the tables name their runs) and in an
SQLite study there, so a stopped sweep continues. With ``--ledger`` (docs/results/runs) every finished
run, trial or chosen config on a test seed, is also recorded there as it ends, and the .json is rewritten
after each trial: a sweep started again on a fresh machine from a checkout (no runs folder, no study)
takes its finished trials back from the two and runs only the rest. ``movielens_tables.py --tuned`` runs
its cells at the chosen settings, and with the same ledger trains none of the sweep's runs again.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import Cell, copy_record, paired_t, reuse_runs, run_train, summarise  # noqa: E402
from movielens_tables import teacher_budget, teacher_option, teacher_options  # noqa: E402

# one space for every method: (flag, values); a method tunes the rows that apply to it
SHARED = {"--lr": [0.02, 0.04, 0.06, 0.1, 0.15], "--alpha": [0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0]}
OWN = {
    "diversedistill": {"--beta": [0.1, 0.3, 0.5, 0.8, 1.0], "--d-emb": [128, 256, 512], "--d-m": [32, 64, 128]},
    "aekd": {"--tolerance": [0.4, 0.6, 0.8]},
    "fd": {"--module-lr": [0.001, 0.003, 0.01]},
    "ld": {}, "mt": {},
}
SINGLE, MULTI = ("ld", "fd", "diversedistill"), ("mt", "aekd", "diversedistill")


def space(method: str) -> dict[str, list]:
    return {**SHARED, **OWN[method]}


def main() -> None:
    import optuna

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--committee", nargs="+", required=True, help="teacher names (folders in --checkpoints)")
    p.add_argument("--methods", nargs="+", help="default: ld, fd, diversedistill (one teacher); mt, aekd, "
                                                "diversedistill (two or more)")
    p.add_argument("--trials", type=int, default=16, help="per method, the same for all")
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "ml-100k")
    p.add_argument("--checkpoints", type=Path, default=REPO / "checkpoints")
    p.add_argument("--steps", type=int, default=8000)
    p.add_argument("--seed", type=int, default=0, help="the training seed every trial uses")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="the seeds each method's chosen config is then run on, for the test MSE")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--jobs", type=int, default=1, help="trials at a time")
    p.add_argument("--teacher-budget", action="append", default=[], metavar="NAME=SHARE", type=teacher_budget)
    p.add_argument("--teacher-option", action="append", default=[], metavar="NAME=KEY=VALUE", type=teacher_option)
    p.add_argument("--runs-dir", type=Path, default=REPO / "runs" / "sweeps")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "sweeps")
    p.add_argument("--configs", type=Path, default=REPO / "configs" / "tuned")
    p.add_argument("--ledger", type=Path, help="record every finished run here (docs/results/runs) under the name the "
                                               "tables give it (KEY-sSEED): the tables reuse them, and a sweep "
                                               "started on a fresh machine takes its finished trials back")
    args = p.parse_args()

    committee = tuple(args.committee)
    methods = args.methods or list(SINGLE if len(committee) == 1 else MULTI)
    # the budgets of this committee's teachers (one --teacher-budget list serves sweeps on several committees)
    budgets = {t: share for t, share in args.teacher_budget if t in committee}
    options = teacher_options(args)
    name = "-".join(committee) + "".join(f"-{t}budget{s:g}" for t, s in budgets.items())
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{(args.runs_dir / f'{name}.db').resolve()}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    recorded = args.out / f"{name}.json"  # the trials of an earlier start, on this machine or another
    earlier = json.loads(recorded.read_text()) if recorded.exists() else {"space": {}, "methods": {}}
    # the methods an earlier call swept on this committee and this one does not are kept as they were
    report = {"committee": list(committee), "teachers": teacher_hashes(args.checkpoints, committee),
              "budgets": budgets, "steps": args.steps, "seed": args.seed, "objective": "valid_mse",
              "space": {**earlier["space"], **{m: space(m) for m in methods}},
              "methods": {m: entry for m, entry in earlier["methods"].items() if m not in methods}}
    writing = threading.Lock()  # trials end in --jobs threads

    def finished(cell: Cell, seed: int) -> dict | None:
        """The result of the run RUNS/NAME/KEY-sSEED if it has finished there, or in the ledger (same
        teachers, steps and code: copied from it); else None."""
        run_dir = args.runs_dir / name / f"{cell.key}-s{seed}"
        if args.ledger:
            reuse_runs(args.ledger, run_dir.parent, {cell.key}, args.checkpoints, args.steps, options)
        return json.loads((run_dir / "result.json").read_text()) if (run_dir / "result.json").exists() else None

    def run(cell: Cell, seed: int, flags: list[str]) -> dict:
        """The run's result (``finished``), or ``run_train`` with ``flags``, recorded in the ledger."""
        if (result := finished(cell, seed)) is None:
            run_dir = args.runs_dir / name / f"{cell.key}-s{seed}"
            result = run_train(run_dir.name, flags, run_dir, args.threads)
            if args.ledger:
                copy_record(run_dir, args.ledger / run_dir.name)
        return result

    for method in methods:
        cell = Cell(method, committee).with_budgets(budgets)
        distributions = {flag: optuna.distributions.CategoricalDistribution(values)
                         for flag, values in space(method).items()}

        def objective(trial: optuna.Trial, cell=cell) -> float:
            tuned = cell.with_params({flag: trial.suggest_categorical(flag, d.choices)
                                      for flag, d in distributions.items()})
            flags = [*tuned.flags(args.checkpoints, options), "--data", str(args.data), "--seed", str(args.seed),
                     "--steps", str(args.steps)]
            trial.set_user_attr("run", tuned.key)
            return run(tuned, args.seed, flags)["valid_mse"]

        study = optuna.create_study(study_name=f"{name}-{method}", storage=storage, load_if_exists=True,
                                    direction="minimize", sampler=optuna.samplers.TPESampler(seed=args.seed))
        for stale in (t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING):
            study.tell(stale.number, state=optuna.trial.TrialState.FAIL)  # left by a stopped sweep
        if not study.trials:  # a fresh study: the finished trials of an earlier start come back first
            recorded_trials = earlier["methods"].get(method, {}).get("trials", [])
            restore_trials(study, recorded_trials, distributions,
                           lambda params, cell=cell: finished(cell.with_params(params), args.seed))
            if recorded_trials:  # the others were made with other teachers, steps or code, or never recorded
                print(f"{method}: {len(study.trials)} of the {len(recorded_trials)} trials in {recorded} taken back",
                      flush=True)

        def completed(study=study) -> list:
            return [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE][: args.trials]

        def save_progress(study, trial, method=method) -> None:  # so a fresh machine continues from here
            with writing:
                report["methods"][method] = {"trials": [trial_entry(t) for t in completed()]}
                write_json(report, recorded)

        if len(completed()) < args.trials:
            study.optimize(objective, n_trials=args.trials - len(completed()), n_jobs=args.jobs,
                           callbacks=[save_progress])
        trials = completed()
        best = min(trials, key=lambda t: t.value)
        report["methods"][method] = {"trials": [trial_entry(t) for t in trials], "chosen": trial_entry(best)}
        chosen_dir = args.runs_dir / name / f"{best.user_attrs['run']}-s{args.seed}"
        chosen = yaml.safe_load((chosen_dir / "config.yaml").read_text())["config"]
        args.configs.mkdir(parents=True, exist_ok=True)
        header = (f"# Chosen by `python experiments/sweep.py {' '.join(sys.argv[1:])}`: the best of {len(trials)} "
                  f"trials by validation MSE ({best.value:.4f}), seed {args.seed}; the seed is the table's to set.\n")
        (args.configs / f"{name}-{method}.yaml").write_text(header + yaml.safe_dump(chosen, sort_keys=False))

    def run_chosen(method: str, seed: int) -> float:
        config = args.configs / f"{name}-{method}.yaml"
        tuned = Cell(method, committee).with_budgets(budgets).with_params(report["methods"][method]["chosen"]["params"])
        return run(tuned, seed, ["--config", str(config), "--seed", str(seed)])["test_mse"]

    test_chosen(report, methods, run_chosen, args)
    write_json(report, recorded)
    text = "\n".join(report_lines(report, committee, args))
    (args.out / f"{name}.md").write_text(text + "\n")
    print(text)


def teacher_hashes(checkpoints: Path, committee: tuple[str, ...]) -> dict[str, str]:
    """Each teacher's weights hash: the teachers the sweep's choices were made with (fits differ across
    machines: docs/results.md, "The ledger")."""
    return {t: yaml.safe_load((checkpoints / t / "teacher.yaml").read_text())["weights_sha256"] for t in committee}


def trial_entry(trial) -> dict:
    return {"params": trial.params, "valid_mse": trial.value, "run": trial.user_attrs["run"]}


def write_json(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))


def restore_trials(study, trials: list[dict], distributions: dict, result: Callable[[dict], dict | None]) -> None:
    """Add to the empty ``study`` the recorded ``trials`` (the .json's entries, in their order) whose
    finished run ``result(params)`` gives, at the validation MSE that run holds; a trial whose settings
    are no longer in the space, or whose run is neither in the runs folder nor the ledger, is left out
    (and run again if the sampler proposes it)."""
    import optuna

    for entry in trials:
        params = entry["params"]
        if set(params) != set(distributions) or any(v not in distributions[k].choices for k, v in params.items()):
            continue
        if (finished := result(params)) is None:
            continue
        study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions,
                                                  value=finished["valid_mse"],
                                                  user_attrs={"run": entry["run"]}))


def test_chosen(report: dict, methods: list[str], run_chosen: Callable[[str, int], float],
                args: argparse.Namespace) -> None:
    """Each of ``methods``' chosen config on every seed of ``--seeds``: ``report["methods"][m]["test"]``,
    the seeds' test MSE in order. The chosen trial is the run of ``--seed`` (same config and seed)."""
    from concurrent.futures import ThreadPoolExecutor

    pairs = [(method, seed) for method in methods for seed in args.seeds]
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        scores = list(pool.map(lambda pair: run_chosen(*pair), pairs))
    report["seeds"] = args.seeds
    for method in methods:
        report["methods"][method]["test"] = [score for (m, _), score in zip(pairs, scores) if m == method]


def report_lines(report: dict, committee: tuple[str, ...], args: argparse.Namespace) -> list[str]:
    methods = {m: entry for m, entry in report["methods"].items() if "test" in entry}  # finished sweeps only
    lines = [f"# Sweep: {' + '.join(t.upper() for t in committee)}", "",
             f"Made by `python experiments/sweep.py {' '.join(sys.argv[1:])}`: {args.trials} trials per method "
             f"(Optuna TPE, seed {args.seed}), each a {args.steps}-step run on seed {args.seed}, chosen by "
             f"validation MSE only; then each chosen config on seeds {', '.join(map(str, report['seeds']))}, "
             "whose test MSE is the only time the test split is read. Teachers (weights hash): "
             + ", ".join(f"{t} `{h[:8]}…`" for t, h in report["teachers"].items()) + ".", "",
             "| method | chosen settings | validation MSE (chosen trial) | test MSE | trials |", "|---|---|---|---|---|"]
    for method, entry in methods.items():
        settings = ", ".join(f"{k.lstrip('-')} {v:g}" for k, v in entry["chosen"]["params"].items())
        distinct = len({json.dumps(t["params"], sort_keys=True) for t in entry["trials"]})  # TPE may repeat one
        lines.append(f"| {method} | {settings} | {entry['chosen']['valid_mse']:.4f} | {summarise(entry['test'])} "
                     f"| {len(entry['trials'])} ({distinct} distinct) |")
    if "diversedistill" in methods and len(report["seeds"]) > 1:
        lines += ["", "Paired t-test over the seeds, DiverseDistill against each baseline (test MSE):", ""]
        for method in (m for m in methods if m != "diversedistill"):
            dd, other = methods["diversedistill"]["test"], methods[method]["test"]
            t, p = paired_t(dd, other)
            gap = statistics.mean(dd) - statistics.mean(other)
            lines.append(f"- vs {method}: DiverseDistill {gap:+.4f}, t = {t:.2f}, p = {p:.3f}")
    return lines


if __name__ == "__main__":
    main()
