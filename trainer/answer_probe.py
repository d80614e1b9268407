"""What a DiverseDistill run's answers are worth, measured on held-out rows.

DiverseDistill only helps the student where an answer, read by the student's own
head, is better than the student's own prediction; the importance weights are meant
to find those rows, and the gate sends only them. When a run does not beat its
baselines, these are the numbers that say why. At the end of a run, every
validation row is asked of every teacher (no gate) and we report, per teacher:

* ``teacher``: the metric of the teacher's own prediction y_Q from the question
  it was asked (is the question in the teacher's space?);
* ``answer``: the metric of head_S(a), the answer read by the student's head (did
  the Answer Augmenter carry the teacher's knowledge over?), next to ``student``,
  the student's own;
* ``answer_beats_student`` and ``teacher_beats_student``: the share of rows where the
  answer, or the teacher's own prediction, has the lower task loss;
* ``importance_mean``, ``gated_in`` (share the gate lets in: w >= threshold, or the
  budget share with the largest w over the split) and
  ``importance_auc``: how well w ranks the rows of its own target (the teacher, or
  the answer, beats the student, or the teacher disagrees most with the student:
  ``DistillConfig.importance``; 0.5: no better than chance).
"""

from __future__ import annotations

import numpy as np
import torch

from .methods import DiverseDistill, disagreement_targets, task_loss_rows
from .teacher_cache import TeacherOutputs


def rank_auc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Area under the ROC curve of ``scores`` for the boolean ``positive`` (Mann-Whitney U); NaN when
    one class is empty."""
    n_pos, n = int(positive.sum()), len(positive)
    if n_pos in (0, n):
        return float("nan")
    ranks = torch.empty(n, dtype=torch.float64)
    ranks[torch.argsort(scores)] = torch.arange(1, n + 1, dtype=torch.float64)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * (n - n_pos)))


@torch.no_grad()
def answer_probe(method: DiverseDistill, domain, split, native: list[TeacherOutputs] | None,
                 device: torch.device, chunk_rows: int = 1024) -> dict[str, dict[str, float]]:
    """Per teacher name, the numbers above on every row of ``split``. ``native``: each teacher's
    Predict outputs on ``split`` (needed for anchored questions only)."""
    student, committee = method.student, method.ctx.committee
    was_training = student.training
    student.eval()
    inputs, target = domain.student_inputs(split), domain.targets(split)
    own, weights = [], []
    teacher_pred: list[list[torch.Tensor]] = [[] for _ in committee.endpoints]
    answer_pred: list[list[torch.Tensor]] = [[] for _ in committee.endpoints]
    for start in range(0, len(target), chunk_rows):
        rows = np.arange(start, min(start + chunk_rows, len(target)))
        out = student(*(t[rows].to(device) for t in inputs))
        questions, w = method.dm.question(out.x, method.anchors(rows, device, native))
        own.append(out.prediction.cpu())
        weights.append(w.cpu())
        for i, endpoint in enumerate(committee.endpoints):
            reply = endpoint.answer(questions[i].cpu(), domain.teacher_inputs(endpoint.spec, split, rows, for_answer=True))
            teacher_pred[i].append(reply.prediction.float())
            answer_pred[i].append(student.head_frozen(method.dm.answer(i, reply.hidden.to(device))).cpu())
    student.train(was_training)
    own, weights = torch.cat(own), torch.cat(weights)
    s = method.ctx.distill
    distance = method.distances_if_used(own, np.arange(len(target)), native)
    _, gated_in, _ = method.gate(weights, s.gate_warmup, torch.Generator().manual_seed(0), explore=False,
                                 distance=distance)  # over the split, as the gate is after warm-up
    own_loss, own_score = task_loss_rows(own, target, student.task), domain.score(own, split)
    own_target = s.importance
    if own_target == "disagreement":
        disagrees = disagreement_targets(distance, s.importance_share).bool()
    report = {}
    for i, name in enumerate(committee.names):
        answers, teacher = torch.cat(answer_pred[i]), torch.cat(teacher_pred[i])
        beats = task_loss_rows(answers, target, student.task) < own_loss
        teacher_beats = task_loss_rows(teacher, target, student.task) < own_loss
        if own_target == "disagreement":
            positive = disagrees[:, i]
        else:
            positive = beats if own_target == "answer" else teacher_beats
        report[name] = {
            "teacher": domain.score(teacher, split),
            "answer": domain.score(answers, split),
            "student": own_score,
            "answer_beats_student": float(beats.float().mean()),
            "teacher_beats_student": float(teacher_beats.float().mean()),
            "importance_mean": float(weights[:, i].mean()),
            "gated_in": float(gated_in[:, i].float().mean()),
            "importance_auc": rank_auc(weights[:, i], positive),
        }
    return report
