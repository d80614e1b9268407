"""Compare groups of finished runs, seed by seed: mean ± std of the test metric and paired t-tests.

    python experiments/compare_runs.py --out docs/results/budget-rows.md \
        --group "disagreement gate=runs/budget-seeds/budget0.1-disagreement-alpha2-s*" \
        --group "uniform rows=runs/budget-seeds/budget0.1-random-alpha2-s*"

For runs made one by one with ``ddistill train`` (a control, more seeds of a cell) rather than by
a table script: each ``--group NAME=GLOB[,GLOB]`` names run folders (their ``result.json``), paired with
the other groups by the ``seed`` the run recorded. Every pair of groups is tested on the seeds
both have (two-sided paired t-test), with how many of those seeds the first group is better in.
"""

from __future__ import annotations

import argparse
import glob
import itertools
import json
import shlex
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from experiments.common import paired_t, summarise  # noqa: E402


def load_group(pattern: str) -> dict[int, dict]:
    """Seed -> result of every finished run folder matching ``pattern`` (globs joined by commas; one
    run per seed)."""
    results: dict[int, dict] = {}
    for folder in sorted(f for g in pattern.split(",") for f in glob.glob(g)):
        file = Path(folder) / "result.json"
        if not file.is_file():
            continue
        result = json.loads(file.read_text())
        if result["seed"] in results:
            raise SystemExit(f"{pattern!r}: two runs with seed {result['seed']} (one run per seed per group)")
        results[result["seed"]] = result
    if not results:
        raise SystemExit(f"{pattern!r}: no finished run (no result.json)")
    return results


def report(groups: dict[str, dict[int, dict]]) -> str:
    first = next(iter(next(iter(groups.values())).values()))  # any run: they share the metric
    metric, lower = first.get("metric", "mse"), first.get("lower_is_better", True)
    key = f"test_{metric}"
    lines = [f"| group | seeds | test {metric} | per seed | teacher rows saved |", "|---|---|---|---|---|"]
    for name, runs in groups.items():
        values = [runs[s][key] for s in sorted(runs)]
        saved = [r["rows_saved/all"] for r in runs.values() if "rows_saved/all" in r]
        lines.append(f"| {name} | {len(runs)} | {summarise(values)} | {', '.join(f'{v:.4f}' for v in values)} | "
                     + (f"{100 * statistics.mean(saved):.1f}%" if saved else "") + " |")
    lines += ["", f"| paired on common seeds | seeds | difference in test {metric} | p | first better in |",
              "|---|---|---|---|---|"]
    for (a, runs_a), (b, runs_b) in itertools.combinations(groups.items(), 2):
        seeds = sorted(set(runs_a) & set(runs_b))
        if len(seeds) < 2:
            continue
        x, y = [runs_a[s][key] for s in seeds], [runs_b[s][key] for s in seeds]
        _, p = paired_t(x, y)
        better = sum((u < v) if lower else (u > v) for u, v in zip(x, y))
        lines.append(f"| {a} vs {b} | {len(seeds)} | {statistics.mean(x) - statistics.mean(y):+.4f} | {p:.3f} | "
                     f"{better}/{len(seeds)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--group", action="append", required=True, metavar="NAME=GLOB[,GLOB]",
                   help="a group of run folders (repeat; at least two groups for a test)")
    p.add_argument("--title", default="", help="a heading for the report")
    p.add_argument("--out", type=Path, help="also write the report (markdown) here")
    args = p.parse_args()

    groups = {}
    for spec in args.group:
        name, sep, pattern = spec.rpartition("=")  # a name may hold "=" (α = 2), a path seldom does
        if not sep or not name or not pattern:
            raise SystemExit(f"--group wants NAME=GLOB, got {spec!r}")
        groups[name] = load_group(pattern)
    command = " ".join(["python", "experiments/compare_runs.py", *(shlex.quote(a) for a in sys.argv[1:])])
    text = (f"## {args.title}\n\n" if args.title else "") + f"Made by `{command}`.\n\n" + report(groups)
    print(text, end="")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
