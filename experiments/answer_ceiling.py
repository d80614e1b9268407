"""How good can an answer trained on the fitting rows' labels be? A ceiling for DiverseDistill.

DiverseDistill's Answer Augmenter learns from L_reg = L(head_S(a_i), y): answers are
read out of a teacher's last hidden state and trained against the *labels of the rows
the teachers were fitted on*. On those rows a teacher's hidden state encodes the labels
better than it does anywhere else (it was fitted to them), so a readout trained there
learns more than generalises. This script measures that without any DiverseDistill
machinery: a ridge regression from each teacher's hidden state to the rating, fitted in
closed form on the fitting rows and scored on the validation rows, next to the teacher's
own head (fitted by early stopping on those same validation rows, so the comparison
flatters the teacher a little). A weak penalty shows the leak (low fit MSE, validation
MSE above the teacher's); a strong one shows what a well-regularised readout can reach.

    python experiments/answer_ceiling.py --teacher checkpoints/mlp-l --teacher checkpoints/mlp-m

Prints a markdown table (and writes it with ``--out FILE``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainer.domains import DOMAINS  # noqa: E402
from trainer.evaluation import rating_mse  # noqa: E402
from trainer.teacher_cache import teacher_outputs  # noqa: E402
from trainer.teachers import open_teacher  # noqa: E402


def ridge_readout(hidden: torch.Tensor, target: torch.Tensor, penalty: float) -> torch.Tensor:
    """Weights (with a bias, unpenalised) of the ridge regression hidden -> target, in float64."""
    x = torch.cat([hidden.double(), torch.ones(len(hidden), 1, dtype=torch.float64)], 1)
    eye = torch.eye(x.shape[1], dtype=torch.float64)
    eye[-1, -1] = 0.0
    return torch.linalg.solve(x.T @ x + penalty * len(x) * eye, x.T @ target.double())


def apply(weights: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    return hidden.double() @ weights[:-1] + weights[-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", action="append", required=True, type=Path, help="teacher checkpoint folder")
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "ml-100k")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--penalties", type=float, nargs="+", default=[1e-8, 1e-3, 1e-2, 0.1, 0.3, 1.0],
                   help="ridge penalties (per row: the penalty matrix is penalty * rows * I)")
    p.add_argument("--out", type=Path, help="also write the table here")
    args = p.parse_args()

    domain = DOMAINS["movielens"](data=str(args.data), split_seed=args.split_seed)
    y_fit, y_valid = domain.targets(domain.fit), domain.targets(domain.valid)
    lines = ["| teacher | teacher's head: fit MSE | teacher's head: valid MSE | ridge penalty | ridge: fit MSE | "
             "ridge: valid MSE |", "|---|---|---|---|---|---|"]
    for folder in args.teacher:
        endpoint = open_teacher(f"local:{folder}", seed=0, timeout_s=600, wire_dtype="float32", device=torch.device("cpu"))
        fit, valid = (teacher_outputs(endpoint, domain, split, None) for split in (domain.fit, domain.valid))
        own = (rating_mse(fit.prediction, y_fit), rating_mse(valid.prediction, y_valid))
        for penalty in args.penalties:
            weights = ridge_readout(fit.hidden, y_fit, penalty)
            lines.append(f"| {endpoint.spec.name} | {own[0]:.4f} | {own[1]:.4f} | {penalty:g} | "
                         f"{rating_mse(apply(weights, fit.hidden), y_fit):.4f} | "
                         f"{rating_mse(apply(weights, valid.hidden), y_valid):.4f} |")
        endpoint.close()
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
