"""The paper's MovieLens tables on ml-100k, with seeds, spread and a paired test.

    python experiments/movielens_tables.py                      # everything, 3 seeds
    python experiments/movielens_tables.py --skip-teacher lm --jobs 2   # the MLP committee only (CPU-friendly)
    python experiments/movielens_tables.py --no-dd-with lm --jobs 2     # + the LM's baselines, not its DiverseDistill

Every cell is a real ``ddistill train`` run (a subprocess, so each is exactly what a
user would run) in ``--runs-dir``; a run whose ``result.json`` exists is reused, so
the script can be stopped and started again. Tables (paper numbering):

* 3: one teacher (LM, MLP-L): LD, FD, DiverseDistill;
* 4: MLP-L + LM (the paper's), MLP-L + MLP-M and all three: MT, AEKD and DiverseDistill;
* 5: DiverseDistill over committee compositions;
* gate: DiverseDistill on the largest committee at several thresholds: test MSE and
  the share of teacher rows the gate saved;
* anchor (ours): DiverseDistill on MLP-L + MLP-M with the paper's questions (a function
  of the student's x alone, ``--anchor mean``) against questions anchored at each row's
  own teacher state (``--anchor row``), gated (τ = 0.6) and ungated (τ = 0).
* importance (ours): DiverseDistill on MLP-L + MLP-M with w trained to predict where the
  teacher disagrees most with the student (``--importance disagreement``, at the default
  share and at 0.6, which gates out more pairs) or where it beats the student
  (``--importance teacher``), gated and ungated, and the disagreement gate's control
  (``--gate shuffled``: as many pairs sent, chosen at random).
* budget (ours): DiverseDistill on MLP-L + MLP-M gated by budget (``--budget``: each teacher
  gets the given share of each batch's rows, those with the largest w) at 30% and 10%, each
  against rows drawn with probability proportional to w (``--gate sampled``), uniformly
  (``--gate random``, each row weighted by its own w) and its shuffled control (as many rows,
  chosen at random, the weights permuted too), next to the threshold gate and no gate (with
  each row's own w as its weight, and with the weights permuted): does w pick rows worth more
  than random ones when rows are scarce, and does weighting a row by its own w help?

Every DiverseDistill cell also reports its answer probe (``trainer.answer_probe``, on
the validation rows at the end of the run): the teacher's own prediction from the
question, the answer read by the student's head, and how often that beats the student.

Writes ``--out``/movielens.md (mean ± std over seeds of test MSE and GRR against the
same seed's S_base and the committee's best teacher, and a paired t-test of
DiverseDistill against the best baseline of each table), movielens.json, and two
plots: grr.png (GRR bars) and gate.png (MSE and rows saved vs threshold).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import (  # noqa: E402  (experiments/, beside this script)
    Cell,
    finished_runs,
    of_seeds,
    paired_t,
    plot_grr,
    reuse_runs,
    run_cells,
    spread,
    summarise,
    summarise_grr,
)
from trainer.evaluation import gap_recovery_rate  # noqa: E402
from trainer.methods import DistillConfig  # noqa: E402

DEFAULT_THRESHOLD = DistillConfig().threshold
DEFAULT_ANCHOR = DistillConfig().anchor
DEFAULT_IMPORTANCE = DistillConfig().importance
DEFAULT_GATE = DistillConfig().gate
DEFAULT_SHARE = DistillConfig().importance_share


def tau(threshold: float | None) -> float:
    """A cell's gate threshold (None: the trainer's default)."""
    return DEFAULT_THRESHOLD if threshold is None else threshold


def tables(skip: set[str], thresholds: list[float], no_dd: set[str] = frozenset()) -> dict[str, list[Cell]]:
    """The cells of each table, leaving out those with a ``skip`` teacher and the DiverseDistill
    cells with a ``no_dd`` teacher (whose baselines are cheap but whose DiverseDistill is not)."""
    def ok(cell: Cell) -> bool:
        return not skip.intersection(cell.teachers) and not (
            cell.method == "diversedistill" and no_dd.intersection(cell.teachers))

    single = [Cell(m, (t,)) for t in ("lm", "mlp-l") for m in ("ld", "fd", "diversedistill")]
    multi = [Cell(m, c) for c in (("mlp-l", "lm"), ("mlp-l", "mlp-m"), ("mlp-l", "mlp-m", "lm"))
             for m in ("mt", "aekd", "diversedistill")]
    committees = [("lm",), ("mlp-m",), ("mlp-l",), ("mlp-l", "mlp-m"), ("mlp-m", "lm"), ("mlp-l", "lm"),
                  ("mlp-l", "mlp-m", "lm")]
    composition = [Cell("diversedistill", c) for c in committees]
    largest = max((c for c in committees if not (skip | no_dd).intersection(c)), key=len)
    gate = [Cell("diversedistill", largest, t) for t in thresholds]
    anchor = [Cell("diversedistill", ("mlp-l", "mlp-m"), threshold, anchor=a)
              for threshold in (None, 0.0) for a in ("mean", "row")]
    importance = [Cell("diversedistill", ("mlp-l", "mlp-m"), threshold, importance=target, share=share, gate=g)
                  for target, threshold, share, g in (
                      ("disagreement", None, None, None), ("disagreement", None, None, "shuffled"),
                      ("disagreement", None, 0.6, None), ("disagreement", None, 0.6, "shuffled"),
                      ("disagreement", 0.0, None, None), ("teacher", None, None, None), ("teacher", 0.0, None, None))]
    budget = [Cell("diversedistill", ("mlp-l", "mlp-m")), Cell("diversedistill", ("mlp-l", "mlp-m"), 0.0),
              Cell("diversedistill", ("mlp-l", "mlp-m"), 0.0, gate="shuffled")]
    budget += [Cell("diversedistill", ("mlp-l", "mlp-m"), budget=b, gate=g) for b in (0.3, 0.1)
               for g in (None, "sampled", "random", "shuffled")]
    out = {"3": single, "4": multi, "5": composition, "gate": gate, "anchor": anchor, "importance": importance,
           "budget": budget}
    return {name: [c for c in cells if ok(c)] for name, cells in out.items()}


def tuned(cells: list[Cell], sweeps: Path) -> tuple[list[Cell], dict[str, str]]:
    """``cells`` at the settings chosen by the validation sweeps in ``sweeps`` (experiments/sweep.py's
    COMMITTEE.json), one rule for every method: a cell takes its method's chosen settings from the sweep on
    its own committee; where that committee was not swept, from the sweep that agrees with it on whether
    the LM is in it and then shares the most teachers with it (ties: the first sweep by name). A method no
    sweep tuned keeps the trainer's defaults. Also, by the tuned cells' keys, the committee each took its
    settings from (for the table notes)."""
    reports = [json.loads(f.read_text()) for f in sorted(sweeps.glob("*.json"))]
    out, source = [], {}
    for cell in cells:
        swept = [r for r in reports if "chosen" in r["methods"].get(cell.method, {})]  # not a sweep under way
        if not swept:
            out.append(cell)
            continue
        report = max(swept, key=lambda r: (tuple(r["committee"]) == cell.teachers,
                                           ("lm" in r["committee"]) == ("lm" in cell.teachers),
                                           len(set(r["committee"]) & set(cell.teachers))))
        out.append(cell.with_params(report["methods"][cell.method]["chosen"]["params"]))
        source[out[-1].key] = committee_name(report["committee"], report.get("budgets", {}).items())
    return out, source


def teacher_options(args: argparse.Namespace) -> dict[str, dict[str, str]]:
    """--teacher-option NAME=KEY=VALUE as {NAME: {KEY: VALUE}}."""
    options: dict[str, dict[str, str]] = {}
    for name, key, value in args.teacher_option:
        if key == "budget":  # it changes the run, so it belongs in the run's key
            raise SystemExit(f"give a call budget as --teacher-budget {name}={value}, not as a --teacher-option")
        options.setdefault(name, {})[key] = value
    return options


def train_args(cell: Cell, seed: int, args: argparse.Namespace) -> list[str]:
    device = ["--device", args.device] if args.device else []
    return [*cell.flags(args.checkpoints, teacher_options(args)), "--data", str(args.data), "--seed", str(seed),
            "--steps", str(args.steps), *device]


def teacher_budget(text: str) -> tuple[str, float]:
    """NAME=SHARE, e.g. lm=0.1."""
    name, _, share = text.partition("=")
    try:
        value = float(share)
    except ValueError:
        value = None
    if not name or value is None or not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected NAME=SHARE with SHARE in (0, 1] (e.g. lm=0.1), not {text!r}")
    return name, value


def teacher_option(text: str) -> tuple[str, str, str]:
    """NAME=KEY=VALUE, e.g. lm=dtype=bfloat16."""
    parts = text.split("=", 2)
    if len(parts) != 3 or not all(parts):
        raise argparse.ArgumentTypeError(f"expected NAME=KEY=VALUE (e.g. lm=dtype=bfloat16), not {text!r}")
    return parts[0], parts[1], parts[2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "ml-100k")
    p.add_argument("--checkpoints", type=Path, default=REPO / "checkpoints", help="folder of lm, mlp-m, mlp-l")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=8000)
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time")
    p.add_argument("--teacher-option", action="append", default=[], metavar="NAME=KEY=VALUE", type=teacher_option,
                   help="a URL option of this teacher: lm=dtype=bfloat16 (the LM's calls 1.3-1.9x faster on a bf16 "
                        "CPU), lm=device=cuda (the LM on the GPU, the student where --device says)")
    p.add_argument("--teacher-budget", action="append", default=[], metavar="NAME=SHARE", type=teacher_budget,
                   help="this teacher's call budget in every cell it is in (lm=0.1: the LM answers at most 10%% of "
                        "rows, for DiverseDistill and the baselines alike); part of the cells' keys")
    p.add_argument("--device", help="the trainer's device (default: the trainer's, auto)")
    p.add_argument("--skip-teacher", action="append", default=[], help="leave out cells with this teacher")
    p.add_argument("--no-dd-with", action="append", default=[], metavar="TEACHER",
                   help="leave out only the DiverseDistill cells with this teacher (the LM: hours per run on a CPU)")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.0, 0.5, 0.6, 0.7])
    p.add_argument("--tables", nargs="+", default=["3", "4", "5", "gate", "anchor", "importance", "budget"])
    p.add_argument("--tuned", type=Path, metavar="SWEEPS",
                   help="run each cell at the settings a validation sweep chose (docs/results/sweeps: "
                        "experiments/sweep.py's reports; the rule is tuned()'s); default: the trainer's defaults")
    p.add_argument("--runs-dir", type=Path, default=REPO / "runs" / "tables")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "results")
    p.add_argument("--ledger", type=Path,
                   help="a folder of finished runs' result.json and config.yaml (docs/results/runs): runs found there "
                        "with the same teachers (weights' hash, precision) and steps are reused, not trained; each run "
                        "of these tables is recorded there when it is done")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: write the tables from the runs already finished (in --runs-dir and, with "
                        "--ledger, the ledger), each cell over the seeds it has, the others listed as not run")
    args = p.parse_args()

    budgets = dict(args.teacher_budget)
    chosen = {k: [c.with_budgets(budgets) for c in v]
              for k, v in tables(set(args.skip_teacher), args.thresholds, set(args.no_dd_with)).items() if k in args.tables}
    tuned_from: dict[str, str] = {}
    if args.tuned:
        for name, cells in chosen.items():
            chosen[name], source = tuned(cells, args.tuned)
            tuned_from.update(source)
    cells = [Cell("none"), *(cell for cells in chosen.values() for cell in cells)]
    if args.ledger:
        reused = reuse_runs(args.ledger, args.runs_dir, {c.key for c in cells}, args.checkpoints, args.steps,
                            teacher_options(args))
        print(f"{len(reused)} runs reused from {args.ledger}", flush=True)
    if args.report_only:
        done = finished_runs(cells, args.seeds, args.runs_dir)
    else:
        done = run_cells(cells, args.seeds, lambda cell, seed: train_args(cell, seed, args), args.runs_dir,
                         args.threads, args.jobs, args.ledger)
    base = {seed: done["none", seed] for seed in args.seeds}
    # the paper's GRR is against the dataset's best teacher (MLP-L on MovieLens), whatever the committee
    overall = min(v for r in done.values() for v in r.get("teachers", {}).values())
    results: dict[str, dict] = {}
    for cells in chosen.values():
        for cell in cells:
            seeds = [seed for seed in args.seeds if (cell.key, seed) in done]
            if cell.key in results or not seeds:
                continue
            runs = [done[cell.key, seed] for seed in seeds]
            mse = [r["test_mse"] for r in runs]
            best = [min(r["teachers"].values()) for r in runs]
            grr = [gap_recovery_rate(base[s]["test_mse"], m, overall) for s, m in zip(seeds, mse)]
            grr_committee = [gap_recovery_rate(base[s]["test_mse"], m, b) for s, m, b in zip(seeds, mse, best)]
            results[cell.key] = {
                "label": cell.label, "seeds": seeds, "method": cell.method, "teachers": list(cell.teachers),
                "threshold": cell.threshold, "anchor": cell.anchor or DEFAULT_ANCHOR,
                "importance": cell.importance or DEFAULT_IMPORTANCE, "share": cell.share or DEFAULT_SHARE,
                "gate": cell.gate or DEFAULT_GATE, "budget": cell.budget, "test_mse": mse, "grr": grr,
                "grr_committee": grr_committee, "best_teacher_mse": best[0], "dataset_best_teacher_mse": overall,
                "teacher_budgets": dict(cell.teacher_budgets),
                "params": dict(cell.params), "tuned_from": tuned_from.get(cell.key),
                "rows_answered": {t: statistics.mean(r["rows_sent"][t] / max(r["rows_possible"][t], 1) for r in runs)
                                  for t in runs[0].get("rows_sent", {})},
                "rows_saved": [r.get("rows_saved/all") for r in runs],
                "answers": [r.get("answers") for r in runs],
            }

    args.out.mkdir(parents=True, exist_ok=True)
    base_mse = [base[s]["test_mse"] for s in args.seeds]
    lines = [
        "# MovieLens (ml-100k) tables", "",
        f"Made by `python experiments/movielens_tables.py {' '.join(sys.argv[1:])}`: seeds {args.seeds}, "
        f"{args.steps} steps, split seed 0. S_base (no distillation): test MSE {summarise(base_mse)}. "
        f"GRR = (S_base - S) / (S_base - T_best), per seed against that seed's S_base, with T_best the dataset's "
        f"best teacher (test MSE {overall:.4f}), as the paper defines it; 'committee GRR' takes the committee's own "
        "best teacher instead (n/a where it is no better than S_base). 'Rows answered': per teacher, the share of "
        "the rows it answered (DiverseDistill) or whose output the loss read (baselines).", "",
    ]
    lines += settings_lines(list(results.values()), args.tuned)
    lines += summary_lines([results[c.key] for name in ("3", "4", "5") for c in chosen.get(name, [])
                            if c.key in results], len(args.seeds))
    for name, cells in chosen.items():
        if not cells:
            continue
        lines += [f"## Table {name}", "", "| run | test MSE | GRR | committee GRR | rows answered |",
                  "|---|---|---|---|---|"]
        for cell in cells:
            if cell.key not in results:
                lines.append(f"| {cell.label} | not run | | | |")
                continue
            r = results[cell.key]
            threshold = f" τ={tau(cell.threshold):g}" if name == "gate" else ""
            if name == "anchor":
                threshold = (f" τ={tau(cell.threshold):g}, "
                             f"{cell.anchor or DEFAULT_ANCHOR}-anchored questions")
            if name in ("importance", "budget"):
                threshold = setting(r)
            answered = ", ".join(f"{t} {share:.1%}" for t, share in r["rows_answered"].items()) or "-"
            label = f"{r['label']}{threshold}{of_seeds(len(r['seeds']), len(args.seeds))}"
            lines.append(f"| {label} | {summarise(r['test_mse'])} | {summarise_grr(r['grr'])} | "
                         f"{summarise_grr(r['grr_committee'])} | {answered} |")
        lines += [""] + paired_lines([results[c.key] for c in cells if c.key in results], len(args.seeds))
        lines.append("")
    lines += probe_lines([results[c.key] for cells in chosen.values() for c in cells if c.key in results])
    (args.out / "movielens.md").write_text("\n".join(lines))
    (args.out / "movielens.json").write_text(json.dumps({"base": base_mse, "cells": results}, indent=1))
    plot(results, chosen, args.out)
    print("\n".join(lines))


def committee_name(teachers: Iterable[str], budgets: Iterable[tuple[str, float]]) -> str:
    """"MLP-L + LM (LM at 10.0%)": the teachers, then the call budgets ((name, share) pairs)."""
    return " + ".join(t.upper() for t in teachers) + "".join(f" ({t.upper()} at {share:.1%})" for t, share in budgets)


SUMMARY_METHODS = {"ld": "LD", "fd": "FD", "mt": "MT", "aekd": "AEKD", "diversedistill": "DiverseDistill"}


def summary_lines(cells: list[dict], n_seeds: int) -> list[str]:
    """One row per committee (its budgets included), one column per method: test MSE, mean ± std
    over seeds, the row's lowest mean in bold; a cell with fewer seeds says how many."""
    rows: dict[tuple, dict[str, dict]] = {}
    for cell in cells:
        committee = (tuple(cell["teachers"]), tuple(sorted(cell["teacher_budgets"].items())))
        rows.setdefault(committee, {})[cell["method"]] = cell
    if not rows:
        return []
    lines = ["## Summary: test MSE by committee and method", "",
             "| committee | " + " | ".join(SUMMARY_METHODS.values()) + " |",
             "|---|" + "---|" * len(SUMMARY_METHODS)]
    for (teachers, budgets), by_method in rows.items():
        name = committee_name(teachers, budgets)
        best = min(statistics.mean(c["test_mse"]) for c in by_method.values())
        values = []
        for method in SUMMARY_METHODS:
            cell = by_method.get(method)
            if cell is None:
                values.append("-")
                continue
            text = summarise(cell["test_mse"])
            text = f"**{text}**" if statistics.mean(cell["test_mse"]) == best else text
            values.append(text + of_seeds(len(cell["test_mse"]), n_seeds))
        lines.append(f"| {name} | " + " | ".join(values) + " |")
    return lines + [""]


def settings_lines(cells: list[dict], sweeps: Path | None) -> list[str]:
    """Where each method's settings came from: the trainer's defaults, or per committee the sweep whose
    chosen settings the cells took (``tuned``)."""
    if sweeps is None:
        return ["Every cell runs at the trainer's default settings (no `--tuned`).", ""]
    lines = [f"Settings: each cell at the settings chosen on validation by the sweeps in `{sweeps}` "
             "(experiments/sweep.py); a committee that was not swept takes them from the swept committee that "
             "agrees with it on the LM and shares the most teachers with it.", "",
             "| method | committee | settings | chosen on |", "|---|---|---|---|"]
    seen = set()
    for c in cells:
        row = (c["method"], " + ".join(t.upper() for t in c["teachers"]))
        if row in seen:
            continue
        seen.add(row)
        params = ", ".join(f"{k.lstrip('-')} {v:g}" for k, v in c["params"].items()) or "trainer defaults"
        lines.append(f"| {row[0]} | {row[1]} | {params} | {c['tuned_from'] or 'not tuned (no sweep of this method)'} |")
    return lines + [""]


def paired_lines(cells: list[dict], n_seeds: int) -> list[str]:
    """Per committee, a paired t-test over seeds of its best DiverseDistill cell against its best
    baseline, for the committees where both have every seed."""
    lines = []
    for teachers in dict.fromkeys(tuple(c["teachers"]) for c in cells):
        full = [c for c in cells if tuple(c["teachers"]) == teachers and len(c["seeds"]) == n_seeds]
        dd = [c for c in full if c["method"] == "diversedistill"]
        baselines = [c for c in full if c["method"] != "diversedistill"]
        if not (dd and baselines) or n_seeds < 2:
            continue
        best_base = min(baselines, key=lambda r: statistics.mean(r["test_mse"]))
        best_dd = min(dd, key=lambda r: statistics.mean(r["test_mse"]))
        t, pvalue = paired_t(best_dd["test_mse"], best_base["test_mse"])
        lines.append(f"Paired t-test over seeds, {best_dd['label']} vs {best_base['label']}: t = {t:.2f}, "
                     f"p = {pvalue:.3f} (negative t: DiverseDistill lower MSE).")
    return lines


def setting(cell: dict) -> str:
    """A DiverseDistill result's gate and module settings, for its row label."""
    budget = cell.get("budget")  # results from before the budget gate have none
    text = f" budget {budget:.0%}" if budget is not None else f" τ={tau(cell['threshold']):g}"
    text += f", {cell['anchor']} anchor"
    text += f", importance {cell['importance']}"
    text += f" (share {cell['share']:g})" if cell["importance"] == "disagreement" else ""
    return text + (f", {cell['gate']} gate" if cell["gate"] != "learned" else "")


def probe_lines(cells: list[dict]) -> list[str]:
    """The answer probes of the DiverseDistill cells (runs made before the probe existed have none)."""
    cells = list({(c["label"], setting(c)): c for c in cells
                  if c["method"] == "diversedistill" and all(c["answers"])}.values())
    if not cells:
        return []
    lines = ["## What the answers are worth (validation rows, end of each run)", "",
             "Per teacher, mean over seeds: the MSE of the teacher's own prediction from the question it was "
             "asked (y_Q), of the answer read by the student's head (head_S(a)), of the student itself; the share "
             "of rows whose answer, and whose y_Q, beats the student's prediction; the share gated in (w >= τ); "
             "the AUC of w for the rows of its own target (`--importance`; 0.5: chance).", "",
             "| run | teacher | y_Q MSE | head_S(a) MSE | student MSE | answer better | y_Q better | gated in "
             "| AUC of w |",
             "|---|---|---|---|---|---|---|---|---|"]
    for cell in cells:
        for name in cell["answers"][0]:
            mean = {k: statistics.mean(a[name][k] for a in cell["answers"]) for k in cell["answers"][0][name]}
            teacher_better = f"{mean['teacher_beats_student']:.1%}" if "teacher_beats_student" in mean else "-"
            lines.append(f"| {cell['label']}{setting(cell)} | {name} | {mean['teacher']:.4f} | {mean['answer']:.4f} | "
                         f"{mean['student']:.4f} | {mean['answer_beats_student']:.1%} | {teacher_better} | "
                         f"{mean['gated_in']:.1%} | "
                         f"{mean['importance_auc']:.2f} |")
    return lines + [""]


def plot(results: dict, chosen: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [c for name in ("3", "4", "5") for c in chosen.get(name, [])]
    if cells:
        plot_grr(results, list(dict.fromkeys(c.key for c in cells if c.key in results)), out / "grr.png")
    gate = [c for c in chosen.get("gate", []) if c.key in results]
    if gate:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        x = [tau(c.threshold) for c in gate]
        ax.errorbar(x, [statistics.mean(results[c.key]["test_mse"]) for c in gate],
                    yerr=[spread(results[c.key]["test_mse"]) for c in gate], marker="o", label="test MSE")
        ax.set_xlabel("gate threshold τ")
        ax.set_ylabel("test MSE")
        twin = ax.twinx()
        twin.plot(x, [100 * statistics.mean(results[c.key]["rows_saved"]) for c in gate], "s--", color="tab:orange",
                  label="rows saved")
        twin.set_ylabel("teacher rows saved (%)")
        fig.tight_layout()
        fig.savefig(out / "gate.png", dpi=120)


if __name__ == "__main__":
    main()
