"""Where a student disagrees most with a teacher, is the teacher the better of the two?

    python experiments/disagreement_rows.py --run runs/budget/none-s0 --teacher checkpoints/mlp-l

The disagreement importance target (``--importance disagreement``) marks the rows where the
student's prediction is furthest from the teacher's. This splits the validation rows of a
finished run by that distance (the top 10% and 30% against the other 70%) and prints, for
each part, the teacher's and the student's MSE against the true ratings: whether those
rows are where the teacher has the most to teach, or where it is least reliable.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from services.teacher_server.checkpoint import load_teacher  # noqa: E402
from services.teacher_server.client import LocalTeacher  # noqa: E402
from trainer.domains.movielens import MovieLensDomain  # noqa: E402
from trainer.export import load_student  # noqa: E402
from trainer.teacher_cache import teacher_outputs  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True, help="a finished MovieLens run folder (its student/)")
    p.add_argument("--teacher", type=Path, action="append", required=True, help="teacher checkpoint folder")
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "ml-100k")
    args = p.parse_args()

    domain = MovieLensDomain(str(args.data))
    split = domain.valid
    y = domain.targets(split).double()
    with torch.no_grad():
        student = load_student(args.run / "student")(*domain.student_inputs(split)).prediction.double()
    print(f"{args.run}: {len(y)} validation rows")
    print("| teacher | rows (by disagreement) | teacher MSE | student MSE | teacher's gain |")
    print("|---|---|---|---|---|")
    for path in args.teacher:
        endpoint = LocalTeacher(load_teacher(path))
        teacher = teacher_outputs(endpoint, domain, split, cache_dir=None).prediction.double()
        distance = (student - teacher) ** 2
        cut30, cut10 = torch.quantile(distance, torch.tensor([0.7, 0.9], dtype=distance.dtype))
        for label, rows in (("top 10%", distance > cut10), ("top 30%", distance > cut30),
                            ("other 70%", distance <= cut30), ("all", torch.ones_like(distance, dtype=torch.bool))):
            t, s = ((teacher - y) ** 2)[rows].mean().item(), ((student - y) ** 2)[rows].mean().item()
            print(f"| {endpoint.spec.name} | {label} | {t:.3f} | {s:.3f} | {s - t:+.3f} |")


if __name__ == "__main__":
    main()
