"""What each LM call buys: test MSE against the share of rows the language model answers.

    python experiments/lm_budget_curve.py --shares 0.025 0.05 0.1 0.2 --jobs 2 --ledger docs/results/runs \
        --teacher-option lm=dtype=auto --out docs/results/lm-budget
    python experiments/lm_budget_curve.py ... --aekd-shares 0.2 0.5 1   # AEKD alone at larger shares (cheap)
    python experiments/lm_budget_curve.py ... --report-only              # from the finished runs alone

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

from common import Cell, finished_runs, of_seeds, paired_t, reuse_runs, run_cells, spread, summarise  # noqa: E402
from movielens_tables import teacher_option, teacher_options  # noqa: E402

METHODS = {"diversedistill": "DiverseDistill (w picks the LM's rows)", "aekd": "AEKD (uniform LM rows)"}


def cells(shares: list[float], aekd_shares: list[float] = ()) -> dict[tuple[str, float], Cell]:
    """(method, share) -> its cell; share 0 leaves the LM out. ``aekd_shares``: points for AEKD alone
    (cheap: the LM's Predict over the training rows is cached, while DiverseDistill asks it afresh)."""
    out = {("diversedistill", 0.0): Cell("diversedistill", ("mlp-l",)), ("aekd", 0.0): Cell("ld", ("mlp-l",))}
    for method, share in [(m, s) for s in shares for m in METHODS] + [("aekd", s) for s in aekd_shares]:
        out[method, share] = Cell(method, ("mlp-l", "lm")).with_budgets({"lm": share})
    return dict(sorted(out.items(), key=lambda item: (item[0][1], item[0][0])))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "ml-100k")
    p.add_argument("--checkpoints", type=Path, default=REPO / "checkpoints")
    p.add_argument("--shares", type=float, nargs="+", default=[0.025, 0.05, 0.1, 0.2])
    p.add_argument("--aekd-shares", type=float, nargs="*", default=[], help="more shares, for AEKD alone")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: the curve from the runs already finished, each point over the seeds it has")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=8000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--teacher-option", action="append", default=[], metavar="NAME=KEY=VALUE", type=teacher_option)
    p.add_argument("--runs-dir", type=Path, default=REPO / "runs" / "v2")
    p.add_argument("--ledger", type=Path)
    p.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "lm-budget")
    args = p.parse_args()

    chosen = cells(sorted(args.shares), sorted(set(args.aekd_shares) - set(args.shares)))
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
    if args.report_only:
        done = finished_runs(order, args.seeds, args.runs_dir)
    else:
        done = run_cells(order, args.seeds, train_args, args.runs_dir, args.threads, args.jobs, args.ledger)
    base = [done["none", s]["test_mse"] for s in args.seeds]
    points: dict[str, list[dict]] = {method: [] for method in METHODS}
    for (method, share), cell in chosen.items():
        seeds = [s for s in args.seeds if (cell.key, s) in done]
        if not seeds:
            continue
        runs = [done[cell.key, s] for s in seeds]
        lm_rows = [r["rows_sent"].get("lm", 0) / max(r["rows_possible"].get("lm", 1), 1) for r in runs]
        points[method].append({
            "share": share, "key": cell.key, "seeds": seeds, "test_mse": [r["test_mse"] for r in runs],
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
    def value(point: dict | None) -> str:
        if point is None:
            return "not run"
        return summarise(point["test_mse"]) + of_seeds(len(point["seeds"]), len(args.seeds))

    for share in sorted({point["share"] for rows in points.values() for point in rows}):
        dd, aekd = ({p["share"]: p for p in points[m]}.get(share) for m in ("diversedistill", "aekd"))
        paired = dd and aekd and len(dd["seeds"]) == len(aekd["seeds"]) == len(args.seeds) > 1
        t, pvalue = paired_t(dd["test_mse"], aekd["test_mse"]) if paired else (float("nan"),) * 2
        answered = (dd or aekd)["lm_rows_answered"]
        minutes = f"{dd['train_seconds'] / 60:.0f} min" if dd else "-"
        lines.append(f"| {share:.1%} | {answered:.2%} | {value(dd)} | {value(aekd)} | {t:.2f} | {pvalue:.3f} | "
                     f"{minutes} |")
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
    ax.set_xscale("symlog", linthresh=2.5)  # the small shares apart, 100% still on the axis
    shares = sorted({100 * r["share"] for rows in points.values() for r in rows})
    ax.set_xticks(shares, [f"{share:g}" for share in shares])
    ax.set_xlim(-0.3, 1.1 * max(shares))
    ax.set_xlabel("share of rows the LM answers (%)")
    ax.set_ylabel("test MSE (mean ± std, 3 seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
