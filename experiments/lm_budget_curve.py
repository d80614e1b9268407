"""What each LM call buys: test MSE against the share of rows the language model answers.

    python experiments/lm_budget_curve.py --shares 0.025 0.05 0.1 0.2 --jobs 2 --ledger docs/results/runs \
        --teacher-option lm=dtype=auto --out docs/results/lm-budget

The committee is MLP-L + LM, the LM under a call budget (``?budget=SHARE``: at most that share of each
batch's rows, at every step). DiverseDistill picks the LM's rows by its importance weights (learned
selection); AEKD, the strongest baseline on this committee, reads the LM's output on as many rows
drawn uniformly. Share 0 is the committee without the LM: DiverseDistill on MLP-L alone, and for AEKD,
which needs two teachers, logit distillation from MLP-L (what AEKD's weights reduce to with one teacher).
Every point is a real ``ddistill train`` run per seed (``--runs-dir``, shared with the tables, so the
10% runs of Tables 3-5 are not trained twice), paired across methods by seed.

Writes ``--out``/curve.md (mean ± std over seeds, the paired t-test of DiverseDistill against AEKD
at each share), curve.json and curve.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import Cell, paired_t, reuse_runs, run_cells, spread, summarise  # noqa: E402
from movielens_tables import teacher_option, teacher_options  # noqa: E402

METHODS = {"diversedistill": "DiverseDistill (w picks the LM's rows)", "aekd": "AEKD (uniform LM rows)"}


def cells(shares: list[float]) -> dict[tuple[str, float], Cell]:
    """(method, share) -> its cell; share 0 leaves the LM out."""
    out = {("diversedistill", 0.0): Cell("diversedistill", ("mlp-l",)), ("aekd", 0.0): Cell("ld", ("mlp-l",))}
    for share in shares:
        for method in METHODS:
            out[method, share] = Cell(method, ("mlp-l", "lm")).with_budgets({"lm": share})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "ml-100k")
    p.add_argument("--checkpoints", type=Path, default=REPO / "checkpoints")
    p.add_argument("--shares", type=float, nargs="+", default=[0.025, 0.05, 0.1, 0.2])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=8000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--teacher-option", action="append", default=[], metavar="NAME=KEY=VALUE", type=teacher_option)
    p.add_argument("--runs-dir", type=Path, default=REPO / "runs" / "v2")
    p.add_argument("--ledger", type=Path)
    p.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "lm-budget")
    args = p.parse_args()

    chosen = cells(sorted(args.shares))
    every = [Cell("none"), *chosen.values()]
    options = teacher_options(args)
    if args.ledger:
        reused = reuse_runs(args.ledger, args.runs_dir, {c.key for c in every}, args.checkpoints, args.steps, options)
        print(f"{len(reused)} runs reused from {args.ledger}", flush=True)

    def train_args(cell: Cell, seed: int) -> list[str]:
        return [*cell.flags(args.checkpoints, options), "--data", str(args.data), "--seed", str(seed),
                "--steps", str(args.steps)]

    # cheapest first: a stopped curve keeps its small shares
    order = sorted(every, key=lambda c: dict(c.teacher_budgets).get("lm", 0.0))
    done = run_cells(order, args.seeds, train_args, args.runs_dir, args.threads, args.jobs, args.ledger)
    base = [done["none", s]["test_mse"] for s in args.seeds]
    points = {}
    for (method, share), cell in chosen.items():
        runs = [done[cell.key, s] for s in args.seeds]
        lm_rows = [r["rows_sent"].get("lm", 0) / max(r["rows_possible"].get("lm", 1), 1) for r in runs]
        points.setdefault(method, []).append({
            "share": share, "key": cell.key, "test_mse": [r["test_mse"] for r in runs],
            "valid_mse": [r["valid_mse"] for r in runs], "lm_rows_answered": statistics.mean(lm_rows),
            "train_seconds": statistics.mean(r["train_seconds"] for r in runs),
        })

    args.out.mkdir(parents=True, exist_ok=True)
    lines = ["# Test MSE against the LM's share of rows (MLP-L + LM, ml-100k)", "",
             f"Made by `python experiments/lm_budget_curve.py {' '.join(sys.argv[1:])}`: seeds {args.seeds}, "
             f"{args.steps} steps. S_base: {summarise(base)}. Share 0: the committee without the LM "
             "(DiverseDistill on MLP-L; for AEKD, LD on MLP-L). Paired t-test over seeds, DiverseDistill vs AEKD "
             "(negative t: DiverseDistill lower MSE).", "",
             "| LM budget | LM rows answered | DiverseDistill | AEKD | t | p | run time (DD) |", "|---|---|---|---|---|---|---|"]
    for dd, aekd in zip(points["diversedistill"], points["aekd"]):
        t, pvalue = paired_t(dd["test_mse"], aekd["test_mse"]) if len(args.seeds) > 1 else (float("nan"),) * 2
        lines.append(f"| {dd['share']:.1%} | {dd['lm_rows_answered']:.2%} | {summarise(dd['test_mse'])} | "
                     f"{summarise(aekd['test_mse'])} | {t:.2f} | {pvalue:.3f} | {dd['train_seconds'] / 60:.0f} min |")
    (args.out / "curve.md").write_text("\n".join(lines) + "\n")
    (args.out / "curve.json").write_text(json.dumps({"base": base, "points": points}, indent=1))
    plot(points, base, args.out / "curve.png")
    print("\n".join(lines))


def plot(points: dict, base: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for method, label in METHODS.items():
        rows = points[method]
        ax.errorbar([100 * r["share"] for r in rows], [statistics.mean(r["test_mse"]) for r in rows],
                    yerr=[spread(r["test_mse"]) for r in rows], marker="o", capsize=3, label=label)
    ax.axhline(statistics.mean(base), color="grey", linestyle=":", label="S_base (no teacher)")
    ax.set_xlabel("share of rows the LM answers (%)")
    ax.set_ylabel("test MSE (mean ± std, 3 seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
