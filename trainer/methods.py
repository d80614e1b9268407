"""Distillation methods: DiverseDistill and the baselines it is compared with.

Every method is a module holding its own trainable extras (the Distillation Module,
a feature projector, or nothing) and a ``loss`` for one batch. The training loop
is the same for all of them:

    loss = method.loss(batch, step); loss.backward(); method.after_backward()
    student_optimizer.step(); method_optimizer.step()

Gradient routing is expressed with ``detach`` inside each loss, so one backward
pass gives every parameter exactly its own gradient (Algorithm 1, Eq. 4): the
student gets L_task + alpha * L_distill with answers and weights detached; the
Distillation Module gets beta * L_reg (+ the importance loss), with the student's
x detached and its head used with detached weights; the teachers get nothing.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from services.teacher_server.spec import TeacherSpec

from .budget import budget_rows, check_share, rows_allowed
from .committee import Committee, select_pairs
from .distill_module import DistillationModule, DMConfig
from .domains import Batch
from .student import Student
from .teacher_cache import TeacherOutputs


class TrainingDiverged(RuntimeError):
    """Numbers stopped being finite at a step; the step's update is not taken."""

    def __init__(self, step: int, what: str) -> None:
        super().__init__(f"training diverged at step {step + 1}: {what} (a smaller --alpha or learning rate "
                         "usually helps; docs/results.md, CIFAR-10)")


@dataclass
class DistillConfig:
    alpha: float = 1.0  # weight of the distillation loss on the student
    beta: float = 0.5  # weight of L_reg on the Distillation Module
    gamma: float = 1.0  # weight of the importance loss (ours; see DiverseDistill)
    threshold: float = 0.6  # gate: pairs with w < threshold are not sent
    # the call budget (ours; trainer.budget) of every teacher without its own (a teacher URL's ?budget=):
    # at most this share of each batch's rows goes to it, at every step; DiverseDistill picks them by w
    # (uniformly in warm-up), the baselines draw them uniformly. None: no budget, the threshold gate
    budget: float | None = None
    gate_warmup: int = 500  # steps before the gate closes (w starts at ~0.5 < 0.6)
    explore: float = 0.05  # fraction of below-threshold pairs asked anyway
    # what w is trained to predict (DiverseDistill): "disagreement" (ours: the row is among the batch's
    # importance_share of rows where the teacher's own prediction is furthest from the student's),
    # "teacher" (ours, earlier: the teacher's prediction beats the student's on the row; mostly label
    # noise on MovieLens, and the gate shuts), "answer" (ours, earlier still: the answer read by the
    # student's head beats the student's prediction) or "paper" (Eq. 3 literally: every w collapses to 0)
    importance: str = "disagreement"
    # importance="disagreement": the share of each batch's rows marked 1. w learns little beyond this base
    # rate on MovieLens (AUC ~0.57), so with threshold 0.6 it sets the saving: 0.6 shut the gate on
    # 62% of pairs, 0.7 on 3% (seed 0, 1,500 steps); 0.65 aims between (docs/method.md, Gating)
    importance_share: float = 0.65
    # which pairs the gate lets in: "learned" (w >= threshold, or with a budget the rows with the largest
    # w), "shuffled" (a control: per teacher, the learned decisions and weights permuted across the
    # batch's rows, so as many pairs are sent, chosen at random, each carrying a weight the gate let
    # in: under a budget, one of the top share of w's values); with a budget only, "sampled" (the
    # rows drawn at random with probability proportional to w) or "random" (drawn uniformly; each row
    # keeps its own w as its distillation weight)
    gate: str = "learned"
    # each gated-in pair's distillation weight in L_distill: "own" (its w_ib, the paper's) or "mean" (ours,
    # a control: the batch's mean w for that teacher, what uniformly drawn rows carry on average; it keeps
    # the gate's choice of rows and takes away the larger w those rows may carry)
    row_weight: str = "own"
    # where questions start: "row" (ours: the teacher's own state for the row, from its Predict
    # over the training rows, cached) or "mean" (its average state: the question is a function of
    # the student's x alone, as in the paper). Row is the default: on MovieLens it is what lets
    # the answers carry the teachers' knowledge (docs/results.md).
    anchor: str = "row"
    tolerance: float = 0.6  # AEKD: the most weight one teacher may get (the paper's C)
    temperature: float = 1.0  # LD, MT, AEKD on classes: soft labels are the teachers' softmax at this T
    dm: DMConfig | None = None


@dataclass
class MethodContext:
    student: Student
    distill: DistillConfig
    committee: Committee | None = None
    # (teacher spec, training rows) -> that teacher's raw inputs for those rows
    inputs_for: Callable[[TeacherSpec, np.ndarray], dict] | None = None
    teacher_outputs: list[TeacherOutputs] | None = None  # baselines: Predict on every training row
    generator: torch.Generator | None = None


def task_loss_rows(prediction: torch.Tensor, target: torch.Tensor, task: str) -> torch.Tensor:
    if task == "regression":
        return (prediction - target) ** 2
    return F.cross_entropy(prediction, target, reduction="none")


class Method(nn.Module):
    name: ClassVar[str]
    needs_teacher_outputs: ClassVar[bool] = False
    teacher_count: ClassVar[tuple[int, int | None]] = (1, None)  # (min, max) committee size
    # Adagrad of the method's own modules (TrainConfig.module_lr / module_weight_decay override)
    module_lr: ClassVar[float] = 0.001
    module_weight_decay: ClassVar[float] = 0.0

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__()
        self.ctx = ctx
        for name, share in zip(ctx.committee.names if ctx.committee else [], self.budgets):
            if share is not None:
                check_share(share, f"teacher {name}")

    @property
    def budgets(self) -> list[float | None]:
        """Per teacher, its call budget (its URL's, else ``DistillConfig.budget``) or None."""
        committee = self.ctx.committee
        return [self.ctx.distill.budget if b is None else b for b in (committee.budgets if committee else [])]

    def used_rows(self, step: int, n_rows: int, device: torch.device) -> list[torch.Tensor | None]:
        """For the baselines, which read each teacher's Predict outputs: per teacher, the boolean mask of
        the batch's rows whose output the loss may use, None for every row; a teacher with a budget gets
        its allowed number of rows (``rows_allowed``), drawn uniformly, so methods compare at equal
        teacher spend. Counted in the committee's rows sent."""
        used = [None if share is None else
                budget_rows(torch.ones(n_rows), rows_allowed(share, n_rows, step), "uniform", 0.0,
                            self.ctx.generator).to(device)
                for share in self.budgets]
        self.ctx.committee.count_used(used, n_rows)
        return used

    @classmethod
    def wants_teacher_outputs(cls, distill: DistillConfig) -> bool:
        """Whether the trainer must compute every teacher's Predict outputs on the training rows."""
        return cls.needs_teacher_outputs

    @property
    def student(self) -> Student:
        return self.ctx.student

    def loss(self, batch: Batch, step: int) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def after_backward(self) -> None:
        pass

    def task_loss(self, prediction, target) -> torch.Tensor:
        return task_loss_rows(prediction, target, self.student.task).mean()


class NoDistillation(Method):
    """S_base: the student trained on the task loss alone."""

    name = "none"
    teacher_count = (0, 0)

    def loss(self, batch, step):
        loss = self.task_loss(self.student.predict(*batch.inputs), batch.target)
        return loss, {"loss/task": loss.item()}


def soft_label_rows(prediction: torch.Tensor, soft: torch.Tensor, task: str, temperature: float = 1.0) -> torch.Tensor:
    """Per row, the distance of the student's prediction to a teacher's: squared error for ratings,
    for classes KL(teacher || student) of the logits' softmax at ``temperature`` T, times T^2 (Hinton
    et al.: the gradients keep their scale as T changes)."""
    if task == "regression":
        return (prediction - soft) ** 2
    t = temperature
    return t * t * F.kl_div(F.log_softmax(prediction / t, -1), F.softmax(soft / t, -1), reduction="none").sum(-1)


def used_mean(rows: torch.Tensor, used: torch.Tensor | None) -> torch.Tensor:
    """A per-row loss averaged over the batch, counting only the ``used`` rows (None: every row; a
    budgeted teacher's rows: the others add 0, as an unsent pair adds 0 to DiverseDistill's L_distill)."""
    return rows.mean() if used is None else (rows * used).sum() / len(rows)


class LogitDistillation(Method):
    """LD: match the single teacher's prediction (for ratings: squared error to it)."""

    name = "ld"
    needs_teacher_outputs = True
    teacher_count = (1, 1)

    def soft_target(self, rows: np.ndarray, used: list[torch.Tensor | None],
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the soft label of each row, the rows that have one: None for all)."""
        return self.ctx.teacher_outputs[0].prediction[rows].to(device), used[0]

    def loss(self, batch, step):
        prediction = self.student.predict(*batch.inputs)
        task = self.task_loss(prediction, batch.target)
        soft, has = self.soft_target(batch.rows, self.used_rows(step, len(batch.rows), prediction.device),
                                     prediction.device)
        distill = used_mean(soft_label_rows(prediction, soft, self.student.task, self.ctx.distill.temperature), has)
        total = task + self.ctx.distill.alpha * distill
        return total, {"loss/task": task.item(), "loss/distill": distill.item()}


class MultiTeacherAveraging(LogitDistillation):
    """MT: match the average of all teachers' predictions (soft-label averaging): their ratings, or for
    classes their probabilities at the temperature (the paper's; returned as T log p, whose softmax at T
    is p, so that ``soft_label_rows`` reads it as it reads one teacher's logits)."""

    name = "mt"
    teacher_count = (1, None)

    def soft_target(self, rows, used, device):
        """The mean of the teachers' predictions; with budgets, of those that answered the row."""
        predictions = torch.stack([t.prediction[rows] for t in self.ctx.teacher_outputs]).to(device)
        t = self.ctx.distill.temperature
        classes = self.student.task != "regression"
        if classes:
            predictions = F.softmax(predictions / t, -1)
        if all(u is None for u in used):
            mean = predictions.mean(0)
            return (t * mean.clamp_min(1e-12).log() if classes else mean), None
        mask = torch.stack([torch.ones(len(rows), dtype=torch.bool, device=device) if u is None else u for u in used])
        count = mask.sum(0)
        mask = mask.reshape(mask.shape + (1,) * (predictions.dim() - 2)).to(predictions.dtype)
        mean = (predictions * mask).sum(0) / count.clamp(min=1).reshape(mask.shape[1:])
        return (t * mean.clamp_min(1e-12).log() if classes else mean), count > 0


def min_norm_weights(grads: torch.Tensor, cap: float) -> torch.Tensor:
    """argmin over a of ||sum_m a_m grads_m||^2 with sum a = 1 and 0 <= a_m <= cap.

    The min-norm point of the teachers' gradients (MGDA), with AEKD's tolerance as an upper
    bound so that no teacher takes all the weight (cap is raised to 1/m where it is below:
    the set is empty otherwise). Solved exactly on the m x m Gram matrix by trying every
    active set (each weight at 0, at the cap, or free; 3^m small KKT systems): m is the
    committee size, so this costs about 3 ms for 3 teachers (measured on our 2-core CPU
    under load), small next to a training step.
    """
    m = grads.shape[0]
    cap = max(cap, 1.0 / m)
    gram = (grads @ grads.T).double().cpu().numpy()
    best, best_value = None, np.inf
    for labels in itertools.product((0, 1, 2), repeat=m):  # 0: at zero, 1: at the cap, 2: free
        labels = np.array(labels)
        a = np.where(labels == 1, cap, 0.0)
        free = labels == 2
        rest = 1.0 - a.sum()
        if free.any():
            k = int(free.sum())
            kkt = np.block([[2 * gram[np.ix_(free, free)], np.ones((k, 1))], [np.ones((1, k)), np.zeros((1, 1))]])
            rhs = np.concatenate([-2 * gram[np.ix_(free, ~free)] @ a[~free], [rest]])
            a[free] = np.linalg.lstsq(kkt, rhs, rcond=None)[0][:k]
        if abs(a.sum() - 1) > 1e-9 or a.min() < -1e-9 or a.max() > cap + 1e-9:
            continue
        value = a @ gram @ a
        if value < best_value - 1e-12:
            best, best_value = a, value
    return torch.as_tensor(best.clip(0, cap), dtype=grads.dtype, device=grads.device)


class AdaptiveEnsemble(Method):
    """AEKD (Du et al., NeurIPS 2020, "Agree to Disagree"): multi-teacher soft labels weighted
    adaptively in gradient space.

    Each step, every teacher's soft-label loss L_m has a gradient g_m with respect to the
    student's output on the batch; the teachers' weights are the min-norm point of those
    gradients under AEKD's tolerance (no weight above ``tolerance``), so teachers that pull
    the student in opposite directions cancel instead of averaging to a compromise. Then
    loss = L_task + alpha * sum_m a_m L_m with a detached. Like the authors' code we take
    gradients at the student's output (the cheap upper bound of MGDA-UB); unlike it we keep
    the whole batch's gradient instead of its mean over rows, which for a scalar rating
    would leave one number per teacher.
    """

    name = "aekd"
    needs_teacher_outputs = True
    teacher_count = (2, None)

    def loss(self, batch, step):
        prediction = self.student.predict(*batch.inputs)
        task = self.task_loss(prediction, batch.target)
        used = self.used_rows(step, len(batch.rows), prediction.device)
        losses = [used_mean(soft_label_rows(prediction, t.prediction[batch.rows].to(prediction.device),
                                            self.student.task, self.ctx.distill.temperature), u)
                  for t, u in zip(self.ctx.teacher_outputs, used)]
        grads = torch.stack([torch.autograd.grad(loss, prediction, retain_graph=True)[0].flatten()
                             for loss in losses])
        weights = min_norm_weights(grads.detach(), self.ctx.distill.tolerance)
        distill = (weights * torch.stack(losses)).sum()
        total = task + self.ctx.distill.alpha * distill
        logs = {"loss/task": task.item(), "loss/distill": distill.item()}
        for name, weight in zip(self.ctx.committee.names, weights.tolist()):
            logs[f"aekd_weight/{name}"] = weight
        return total, logs


class FeatureDistillation(Method):
    """FD (FitNets-style): a learned projection of the student's h regresses the teacher's
    standardised last hidden state."""

    name = "fd"
    needs_teacher_outputs = True
    teacher_count = (1, 1)

    def __init__(self, ctx):
        super().__init__(ctx)
        hidden = ctx.teacher_outputs[0].hidden
        self.projector = nn.Linear(ctx.student.d_out, hidden.shape[1])
        self.register_buffer("mean", hidden.mean(0))
        self.register_buffer("std", hidden.std(0).clamp(min=1e-4))

    def loss(self, batch, step):
        out = self.student(*batch.inputs)
        task = self.task_loss(out.prediction, batch.target)
        teacher = (self.ctx.teacher_outputs[0].hidden[batch.rows].to(out.h.device) - self.mean) / self.std
        used = self.used_rows(step, len(batch.rows), out.h.device)[0]
        distill = used_mean(((self.projector(out.h) - teacher) ** 2).sum(-1), used)
        total = task + self.ctx.distill.alpha * distill
        return total, {"loss/task": task.item(), "loss/distill": distill.item()}


IMPORTANCE_TARGETS = ("teacher", "disagreement", "answer", "paper")
GATES = ("learned", "shuffled", "sampled", "random", "disagreement")
ROW_WEIGHTS = ("own", "mean")
# gates that need every teacher to have a budget: those that draw rows (so need to know how many), and
# the one that ranks rows by w's target
NEEDS_BUDGET = ("sampled", "random", "disagreement")
# how each gate picks a budgeted teacher's rows after warm-up (trainer.budget.RULES)
BUDGET_RULES = {"learned": "top", "shuffled": "top", "disagreement": "top", "sampled": "sampled", "random": "uniform"}
# a budgeted teacher's disagreement target cuts at a quantile of its last this many answered rows' distances
ANSWERED_WINDOW = 512


def disagreement_targets(distance: torch.Tensor, share: float) -> torch.Tensor:
    """1 for the ``share`` of rows with the largest ``distance`` [B, n], per teacher (column), else 0."""
    cut = torch.quantile(distance, 1.0 - share, dim=0, keepdim=True)
    return (distance > cut).float()


def shuffle_rows(values: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``values`` [B, n] with each column permuted at random across the rows, independently."""
    order = torch.stack([torch.randperm(len(values), generator=generator) for _ in range(values.shape[1])], 1)
    return values.gather(0, order.to(values.device))


class DiverseDistill(Method):
    """DiverseDistill (Liu et al., 2024): questions, answers, importance and gating.

    Losses per batch of B rows (sums over teachers i and the rows sent to them):

        L_task    = mean_b L(S(d_b), y_b)
        L_distill = 1/B sum_b sum_i  wbar_ib * ||a_ib - h_b||^2          (Eq. 2)
        L_reg     = 1/B sum_b sum_i  w_ib * (L(yQ_ib, y_b) + L(head_S(a_ib), y_b))   (Eq. 3)

    wbar is w with skipped pairs (w < threshold) set to 0. Our one change to the paper:
    minimising Eq. 3 over w drives every w to 0 (``importance="paper"`` shows it), so w
    enters L_reg detached and is trained instead against its own target. What should w
    say? Where the student has the most to learn from teacher i. The direct measure,
    [L(yQ_ib, y_b) < L(S(d_b), y_b)] (``importance="teacher"``: the teacher, asked about
    row b, predicts it better than the student), is mostly the label's noise with integer
    ratings: w learns nothing row-specific from it (AUC 0.50 on MovieLens), settles near its
    base rate of ~0.5 and the gate at 0.6 shuts. Its label-free expectation is steadier: if
    the teacher predicts E[y | row], then E[L(S, y) - L(T, y)] = (S - T)^2 for squared
    error, so the student has the most to learn where it disagrees with the teacher most
    (``importance="disagreement"``, the default):

        L_imp = BCE(w_ib, [D_ib > quantile_{1 - share}(D_i over the batch)]),
        D_ib  = distance of S(d_b) to teacher i's own prediction for row b

    (squared error; KL for classes), read from the teachers' cached Predict outputs, so it is
    known for every pair, sent or not, and w learns on all of them; ``share`` sets w's base
    rate, and so, with a fixed threshold, roughly how many pairs the gate lets in.
    ``importance="answer"`` (head_S(a_ib) beats the student) is the first target we used.
    The gate stays open for ``gate_warmup`` steps while w learns; then it lets in the pairs with
    w >= threshold (the paper's) or, with a ``budget``, the budget share of each batch's rows
    with the largest w per teacher (ours: a fixed number of teacher calls; w's ranking decides
    which rows, not its level) or, ``gate="sampled"``, drawn with probability proportional to w
    (every row keeps a chance, so the teacher's rows still cover the training set), or,
    ``gate="random"``, drawn uniformly (w then only weighs the rows in L_distill), or,
    ``gate="disagreement"``, the rows where the student is furthest from the teacher's own
    prediction: w's target itself rather than w, what a w that learned its target perfectly
    would pick (on MovieLens, with α raised to suit the budget, better rows than uniform ones or
    w's, and it is the rows: ``row_weight="mean"`` does as well; docs/results.md, gating by budget).
    ``gate="shuffled"`` is the control (as many pairs per teacher and batch, chosen at random).
    With ``anchor="row"`` the questions start at each row's own teacher state (``anchors``;
    see ``distill_module``), read from the teachers' cached Predict outputs.
    """

    name = "diversedistill"
    # The module's linear answer readouts need a larger step than FD's projector to follow the
    # student within 8,000 steps, and weight decay so that F_Q does not fit the training rows'
    # questions (docs/method.md; tested on MovieLens MLP-L + MLP-M).
    module_lr = 0.01
    module_weight_decay = 0.01

    @classmethod
    def wants_teacher_outputs(cls, distill):
        # the rows' native questions, or the teachers' own predictions for the disagreement target
        return distill.anchor == "row" or distill.importance == "disagreement" or distill.gate == "disagreement"

    def __init__(self, ctx):
        super().__init__(ctx)
        committee, student = ctx.committee, ctx.student
        if ctx.distill.anchor not in ("row", "mean"):
            raise ValueError(f"anchor must be row or mean, not {ctx.distill.anchor!r}")
        if ctx.distill.importance not in IMPORTANCE_TARGETS:
            raise ValueError(f"importance must be one of {IMPORTANCE_TARGETS}, not {ctx.distill.importance!r}")
        if ctx.distill.gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, not {ctx.distill.gate!r}")
        if ctx.distill.row_weight not in ROW_WEIGHTS:
            raise ValueError(f"row_weight must be one of {ROW_WEIGHTS}, not {ctx.distill.row_weight!r}")
        if ctx.distill.gate in NEEDS_BUDGET and None in self.budgets:
            raise ValueError(f"gate {ctx.distill.gate} picks a budget's share of rows: give every teacher a budget "
                             "(--budget, or ?budget= on its URL)")
        if not 0.0 < ctx.distill.importance_share < 1.0:
            raise ValueError(f"importance_share must be in (0, 1), not {ctx.distill.importance_share!r}")
        self.dm = DistillationModule(
            student.d_in, student.d_out,
            [s.question_shape[0] for s in committee.specs], [s.hidden_size for s in committee.specs],
            ctx.distill.dm or DMConfig(), anchored=ctx.distill.anchor == "row",
        )
        # budgeted teachers' recent answered distances (``answered_cut``); buffers, so checkpoints keep them
        self.register_buffer("answered_distance", torch.full((len(committee), ANSWERED_WINDOW), float("nan")))
        self.register_buffer("answered_count", torch.zeros(len(committee), dtype=torch.long))

    def anchors(self, rows: np.ndarray, device: torch.device,
                native: list[TeacherOutputs] | None = None) -> list[torch.Tensor] | None:
        """The rows' native questions for anchored questions (None for the paper's), from ``native``
        (each teacher's Predict outputs on the rows' split; default: the training rows')."""
        if self.ctx.distill.anchor != "row":
            return None
        return [t.question[rows].to(device) for t in (native or self.ctx.teacher_outputs)]

    def loss(self, batch, step):
        s = self.ctx.distill
        out = self.student(*batch.inputs)
        y = batch.target
        task = self.task_loss(out.prediction, y)
        questions, w = self.dm.question(out.x.detach(), self.anchors(batch.rows, out.x.device))
        if not bool(torch.isfinite(out.x).all() & torch.isfinite(w).all()):  # before any teacher is asked
            raise TrainingDiverged(step, "the student's features or the importance weights are not finite")
        gate_open = step < s.gate_warmup
        # what the disagreement gate ranks and the disagreement target marks (computed once for both)
        distance = self.distances_if_used(out.prediction.detach(), batch.rows)
        sent, gated_in, w_gate = self.gate(w.detach(), step, self.ctx.generator, distance=distance)
        budgets = self.budgets
        self.answers = self.ctx.committee.ask(
            questions, sent, lambda spec, rows: self.ctx.inputs_for(spec, batch.rows[rows])
        )
        n_rows = len(y)
        own_loss = task_loss_rows(out.prediction.detach(), y, self.student.task)
        distill = out.h.new_zeros(())
        reg = out.h.new_zeros(())
        importance_terms = []
        for i, answer in enumerate(self.answers):
            if answer is None:
                continue
            rows, w_i = answer.rows, w[answer.rows, i]
            a = self.dm.answer(i, answer.hidden)
            wbar = w_gate[rows, i] * gated_in[rows, i]
            distill = distill + (wbar * ((a.detach() - out.h[rows]) ** 2).sum(-1)).sum() / n_rows
            teacher_loss = task_loss_rows(answer.prediction, y[rows], self.student.task)
            answer_loss = task_loss_rows(self.student.head_frozen(a), y[rows], self.student.task)
            weight = w_i if s.importance == "paper" else w_i.detach()
            reg = reg + (weight * (teacher_loss + answer_loss)).sum() / n_rows
            if s.importance in ("teacher", "answer"):
                ours = teacher_loss if s.importance == "teacher" else answer_loss
                helps = (ours.detach() < own_loss[rows]).float()
                importance_terms.append(F.binary_cross_entropy(w_i, helps, reduction="none"))
            elif s.importance == "disagreement" and budgets[i] is not None:
                # a budgeted teacher's own predictions are known on the rows it answered, and only there
                d = soft_label_rows(out.prediction.detach()[rows], answer.prediction.detach(), self.student.task)
                target = (d > self.answered_cut(i, d)).float()
                importance_terms.append(F.binary_cross_entropy(w_i, target, reduction="none"))
        if s.importance == "disagreement":  # known for every pair of an unbudgeted teacher, sent or not
            free = [i for i, share in enumerate(budgets) if share is None]
            if free:
                target = disagreement_targets(distance[:, free], s.importance_share)
                importance_terms.insert(0, F.binary_cross_entropy(
                    w if len(free) == len(budgets) else w[:, free], target, reduction="none").flatten())
        importance = torch.cat(importance_terms).mean() if importance_terms else out.h.new_zeros(())
        total = task + s.alpha * distill + s.beta * reg + s.gamma * importance
        logs = {
            "loss/task": task.item(), "loss/distill": distill.item(), "loss/reg": reg.item(),
            "loss/importance": importance.item(), "gate/threshold": 0.0 if gate_open else s.threshold,
            "gate/gated_in": gated_in.float().mean().item(),  # share of pairs the gate let in
        }
        for i, name in enumerate(self.ctx.committee.names):
            logs[f"importance/{name}"] = w[:, i].mean().item()
            logs[f"sent/{name}"] = sent[:, i].float().mean().item()
        return total, logs

    def answered_cut(self, i: int, distance: torch.Tensor) -> torch.Tensor:
        """Where budgeted teacher i's disagreement target cuts: the (1 - importance_share) quantile of the
        distances on the last ``ANSWERED_WINDOW`` rows it answered, ``distance`` (this batch's) included.
        Its rows are too few per batch for a batch quantile (one or two at a 2.5% budget); they are mostly
        the rows w ranks high, so the cut sits above the training set's, which moves w's level but not its
        ranking, and under a budget only the ranking decides."""
        window, count = self.answered_distance[i], int(self.answered_count[i])
        slots = (count + torch.arange(len(distance))) % ANSWERED_WINDOW
        window[slots.to(window.device)] = distance.to(window.dtype)
        self.answered_count[i] += len(distance)
        return torch.nanquantile(window, 1.0 - self.ctx.distill.importance_share)

    def gate(self, w: torch.Tensor, step: int, generator: torch.Generator | None,
             explore: bool = True, distance: torch.Tensor | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The gate's one rule: (sent, gated_in, weights) for importance ``w`` [B, n] at ``step``, where
        ``weights`` are the distillation weights of the gated-in pairs (w, or for the shuffled
        control w permuted with the decisions; with ``row_weight="mean"`` each teacher's batch mean of
        w for every row). Before ``gate_warmup`` steps every pair is sent, and a budgeted teacher gets
        its allowed rows (``trainer.budget``) drawn uniformly; after, the threshold gate lets in
        w >= threshold, and a budgeted teacher gets its allowed rows by the gate's rule (``BUDGET_RULES``:
        the largest w for the learned gate). ``distance`` [B, n] (``distances``): what the disagreement
        gate ranks rows by."""
        s = self.ctx.distill
        gate_open = step < s.gate_warmup
        weights = shuffle_rows(w, generator) if s.gate == "shuffled" else w
        if s.gate == "random":
            scores = torch.ones_like(weights)  # every row equally likely
        elif s.gate == "disagreement":
            if distance is None:
                raise ValueError("the disagreement gate ranks rows by their distance to the teachers: pass it")
            scores = distance
        else:
            scores = weights
        if s.row_weight == "mean":  # the rows are still chosen by their own scores
            weights = weights.mean(0, keepdim=True).expand_as(weights)
        explore = s.explore if explore and not gate_open else 0.0
        sent, gated_in = select_pairs(scores, 0.0 if gate_open else s.threshold, explore, generator)
        for i, share in enumerate(self.budgets):
            if share is not None:
                rule = "uniform" if gate_open else BUDGET_RULES[s.gate]
                chosen = budget_rows(scores[:, i], rows_allowed(share, len(w), step), rule, explore, generator)
                sent[:, i] = chosen
                gated_in[:, i] = chosen
        return sent, gated_in, weights

    def distances(self, prediction: torch.Tensor, rows: np.ndarray,
                  native: list[TeacherOutputs] | None = None) -> torch.Tensor:
        """[B, n]: how far the student's ``prediction`` on ``rows`` is from each teacher's own (of the
        training split, or of the split ``native`` holds the teachers' Predict outputs for)."""
        return torch.stack([
            soft_label_rows(prediction, t.prediction[rows].to(prediction.device), self.student.task)
            for t in (native or self.ctx.teacher_outputs)
        ], 1)

    def distances_if_used(self, prediction: torch.Tensor, rows: np.ndarray,
                          native: list[TeacherOutputs] | None = None) -> torch.Tensor | None:
        """``distances`` when the disagreement gate or the disagreement target uses them; else None."""
        s = self.ctx.distill
        if s.gate != "disagreement" and s.importance != "disagreement":
            return None
        return self.distances(prediction, rows, native)

    def after_backward(self):
        self.ctx.committee.backward(self.answers)
        self.answers = None


METHODS: dict[str, type[Method]] = {
    m.name: m for m in (DiverseDistill, NoDistillation, LogitDistillation, FeatureDistillation, MultiTeacherAveraging,
                        AdaptiveEnsemble)
}
