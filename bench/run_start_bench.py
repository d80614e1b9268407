"""What a table script pays to start a training run: a fresh interpreter against a forked one.

    python bench/run_start_bench.py --teacher checkpoints/mlp-l --rounds 5

A table or sweep script starts every cell's run as a process of its own. Started as
``python -m trainer.cli train ...``, each pays for importing torch and the trainer and for building
its first optimizer (which imports torch._dynamo); forked by ``experiments/common.trainer_process``
from a server that has done those once, it does not. Both run the same short DiverseDistill run
(``--steps``, one thread) on ml-100k; the configurations take turns ``--rounds`` times, and each
round's ratio is taken within it (this VM's speed drifts between minutes). Reported: the median
wall seconds of each and the median ratio, with the results' test MSE (the same in both, or the
bench fails).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "experiments"))

from common import trainer_process  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", type=Path, default=REPO / "checkpoints" / "mlp-l")
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "ml-100k")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", type=Path)
    args = p.parse_args()

    def argv(run_dir: Path) -> list[str]:
        return ["--threads", "1", "train", "--method", "diversedistill", "--teacher", f"local:{args.teacher}",
                "--data", str(args.data), "--steps", str(args.steps), "--run-dir", str(run_dir)]

    def fresh(run_dir: Path) -> None:
        subprocess.run([sys.executable, "-m", "trainer.cli", *argv(run_dir)], cwd=REPO, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def forked(run_dir: Path) -> None:
        process = trainer_process(argv(run_dir), run_dir.parent / f"{run_dir.name}.log")
        process.start()
        process.join()
        assert process.exitcode == 0, f"forked run failed; see {run_dir}.log"

    seconds: dict[str, list[float]] = {"fresh interpreter": [], "forked": []}
    ratios, mse = [], set()
    with tempfile.TemporaryDirectory() as tmp:
        forked(Path(tmp) / "warm-up")  # starts the fork server (its imports are paid once, here)
        for r in range(args.rounds):
            for name, start in (("fresh interpreter", fresh), ("forked", forked)):
                run_dir = Path(tmp) / f"{name.replace(' ', '-')}-{r}"
                began = time.perf_counter()
                start(run_dir)
                seconds[name].append(time.perf_counter() - began)
                mse.add(json.loads((run_dir / "result.json").read_text())["test_mse"])
            ratios.append(seconds["fresh interpreter"][-1] / seconds["forked"][-1])
    if len(mse) != 1:
        raise SystemExit(f"the two ways gave different runs: test MSE {sorted(mse)}")
    report = {"steps": args.steps, "rounds": args.rounds, "test_mse": mse.pop(),
              "median_seconds": {k: statistics.median(v) for k, v in seconds.items()},
              "fresh_over_forked": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}}
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
