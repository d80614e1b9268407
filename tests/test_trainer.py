"""The DiverseDistill trainer: module shapes, gradient routing, gating, collapse, baselines."""

import copy
import math

import numpy as np
import pytest
import torch

from services.teacher_server.checkpoint import save_teacher
from services.teacher_server.client import LocalTeacher
from trainer.answer_probe import rank_auc
from trainer.budget import budget_rows, rows_allowed, sample_rows, top_rows
from trainer.committee import Committee, select_pairs
from trainer.data.movielens import VALID_FRACTION
from trainer.distill_module import DistillationModule, DMConfig
from trainer.fit_teacher import MLPFitConfig, fit_teacher
from trainer.domains import Batch
from trainer.methods import (
    DistillConfig,
    DiverseDistill,
    FeatureDistillation,
    MethodContext,
    TrainingDiverged,
    disagreement_targets,
    min_norm_weights,
    shuffle_rows,
)
from trainer.models import build_recsys_mlp
from trainer.student import RecsysStudent
from trainer.teacher_cache import TeacherOutputs
from trainer.train import BatchStream, TrainConfig, Trainer
from trainer.zeroth_order import SPSAEndpoint


@pytest.fixture(scope="module")
def tiny_teachers(synthetic_data, tmp_path_factory):
    """Two small fitted MLP teachers of different widths, as checkpoints."""
    folder = tmp_path_factory.mktemp("teachers")
    paths = []
    for kind, embed in (("mlp-m", 8), ("mlp-l", 12)):
        result = fit_teacher(kind, synthetic_data, seed=0, config=MLPFitConfig(max_epochs=4, embed_dim=embed))
        paths.append(save_teacher(result.teacher, folder / kind))
    return paths


def native_outputs(endpoints, inputs, split):
    """Each teacher's Predict on every row of ``split`` (what the trainer caches)."""
    outputs = []
    for e in endpoints:
        out = e.predict(inputs.for_spec(e.spec, split, slice(0, len(split)), for_answer=False))
        outputs.append(TeacherOutputs(out.prediction, out.hidden, out.question))
    return outputs


AFTER_WARMUP = 10_000  # a step past any warm-up these tests set


def make_context(synthetic_data, teacher_paths, budgets=None, **distill):
    torch.manual_seed(0)
    fit, _ = synthetic_data.split_validation(VALID_FRACTION, 0)
    student = RecsysStudent(build_recsys_mlp(synthetic_data, fit, (16, 8), embed_dim=4))
    from services.teacher_server.checkpoint import load_teacher
    from trainer.data.inputs import MovieLensInputs

    endpoints = [LocalTeacher(load_teacher(p)) for p in teacher_paths]
    inputs = MovieLensInputs(synthetic_data, fit)
    config = DistillConfig(dm=DMConfig(d_emb=16, d_m=8, mlp_hidden=32), **distill)
    ctx = MethodContext(
        student, config, Committee(endpoints, budgets=budgets),
        inputs_for=lambda spec, rows: inputs.for_spec(spec, fit, rows, for_answer=True),
        teacher_outputs=native_outputs(endpoints, inputs, fit) if DiverseDistill.wants_teacher_outputs(config) else None,
        generator=torch.Generator().manual_seed(0),
    )
    return ctx, fit


def batch_of(fit, rows):
    rows = np.asarray(rows)
    return Batch(rows, (torch.as_tensor(fit.user[rows]), torch.as_tensor(fit.item[rows])), torch.as_tensor(fit.rating[rows]))


# -- the Distillation Module --------------------------------------------------------------


def test_question_augmenter_is_the_papers_formula():
    torch.manual_seed(0)
    dm = DistillationModule(10, 6, [7, 5, 3], [4, 9, 2], DMConfig(d_emb=8, d_m=4, mlp_hidden=16))
    x = torch.randn(5, 10)
    questions, w = dm.question(x)
    assert [q.shape for q in questions] == [(5, 7), (5, 5), (5, 3)]
    assert w.shape == (5, 3) and bool(((w > 0) & (w < 1)).all())
    qa = dm.question
    with torch.no_grad():
        qa.importance_bias.copy_(torch.tensor([0.5, -1.0, 0.0]))  # ours: starts at 0 (w = paper's)
    questions, w = dm.question(x)
    for b in range(5):  # one sample, written out: M = x W_M, rows = (E M^T) M, w = sigmoid(x W_F E^T + b)
        m = torch.einsum("i,imd->md", x[b], qa.W_M)
        rows = (qa.E @ m.T) @ m
        for i, mlp in enumerate(qa.question_mlps):
            assert torch.allclose(questions[i][b], mlp(rows[i]), atol=1e-5)
        assert torch.allclose(w[b], torch.sigmoid(x[b] @ qa.W_F @ qa.E.T + qa.importance_bias), atol=1e-6)
    a = dm.answer(1, torch.randn(5, 9))
    assert a.shape == (5, 6)


def test_linear_answer_readout_on_the_teachers_own_scale():
    """answer_hidden=0, answer_norm="teacher": a = W (p - mu) / sigma + b with the teacher's statistics,
    an affine map of p, so a linear head on it can express the teacher's own head; a LayerNorm cannot
    (it divides every row by its own spread and loses p's scale)."""
    torch.manual_seed(0)
    hidden = torch.relu(torch.randn(2000, 6) * torch.tensor([5.0, 1.0, 0.1, 2.0, 3.0, 1.0]))
    hidden[:, 2] = 0.0  # a feature dead on every calibration row
    dm = DistillationModule(4, 3, [2], [6], DMConfig(d_emb=4, d_m=2, mlp_hidden=8))  # the default readout
    dm.answer.calibrate(0, hidden)
    std = hidden.std(0)
    assert torch.allclose(dm.answer.hidden_std_0[[0, 1, 3, 4, 5]], std[[0, 1, 3, 4, 5]])
    assert dm.answer.hidden_std_0[2] == pytest.approx(0.01 * float(std.mean()))  # the floor, not 0
    linear = dm.answer.answer_mlps[0][-1]
    assert len([m for m in dm.answer.answer_mlps[0] if isinstance(m, torch.nn.Linear)]) == 1
    p = hidden[:5]
    expected = linear((p - hidden.mean(0)) / dm.answer.hidden_std_0)
    assert torch.allclose(dm.answer(0, p), expected, atol=1e-5)
    a, b = dm.answer(0, p), dm.answer(0, 3 * p)  # affine: a(3p) - a(0) = 3 (a(p) - a(0))
    zero = dm.answer(0, torch.zeros(1, 6))
    assert torch.allclose(b - zero, 3 * (a - zero), atol=1e-4)
    layer = DistillationModule(4, 3, [2], [6], DMConfig(d_emb=4, d_m=2, mlp_hidden=8, answer_norm="layer"))
    assert torch.allclose(layer.answer(0, p), layer.answer(0, 3 * p), atol=1e-4)  # scale is lost
    with pytest.raises(ValueError, match="answer_norm"):
        DistillationModule(4, 3, [2], [6], DMConfig(answer_norm="batch"))


def test_calibration_puts_questions_in_the_teachers_space():
    torch.manual_seed(0)
    dm = DistillationModule(4, 2, [3], [2], DMConfig(d_emb=4, d_m=2, mlp_hidden=8))
    native = torch.randn(1000, 3) * torch.tensor([10.0, 0.1, 1.0]) + torch.tensor([5.0, -2.0, 0.0])
    dm.question.calibrate(0, native)
    with torch.no_grad():
        mlp = dm.question.question_mlps[0]
        mlp[-1].weight.zero_()
        mlp[-1].bias.zero_()
        questions, _ = dm.question(torch.randn(3, 4))
    assert torch.allclose(questions[0], native.mean(0).expand(3, 3), atol=1e-5)


def test_anchored_questions_start_at_each_rows_own_state(synthetic_data, tiny_teachers):
    """anchor=row: the first question of a row is the teacher's own state for it, so the first
    answer is the teacher's ordinary forward; the mean anchor asks every row the same question."""
    ctx, fit = make_context(synthetic_data, tiny_teachers, anchor="row")
    method = DiverseDistill(ctx)
    rows = np.arange(40)
    out = ctx.student(*batch_of(fit, rows).inputs)
    questions, _ = method.dm.question(out.x, method.anchors(rows, out.x.device))
    for i, endpoint in enumerate(ctx.committee.endpoints):
        native = ctx.teacher_outputs[i]
        assert torch.equal(questions[i], native.question[rows])
        answer = endpoint.answer(questions[i].detach(), {})
        assert torch.allclose(answer.prediction, native.prediction[rows], atol=1e-5)
        assert torch.allclose(answer.hidden, native.hidden[rows], atol=1e-5)
    with pytest.raises(ValueError, match="native questions"):
        method.dm.question(out.x)
    mean_ctx, _ = make_context(synthetic_data, tiny_teachers, anchor="mean", importance="teacher")
    assert mean_ctx.teacher_outputs is None  # nothing to compute for the paper's questions and a label target
    questions, _ = DiverseDistill(mean_ctx).dm.question(out.x.detach())
    assert not torch.allclose(questions[0], ctx.teacher_outputs[0].question[rows], atol=1e-2)


# -- gradient routing ---------------------------------------------------------------------


def one_step_grads(method, batch):
    for p in list(method.student.parameters()) + list(method.parameters()):
        p.grad = None
    loss, _ = method.loss(batch, step=10_000)
    loss.backward()
    method.after_backward()
    return loss


def test_one_step_moves_student_and_module_but_never_teachers(synthetic_data, tiny_teachers):
    # the paper's mean anchor: with row anchoring the question MLPs' last layers start at zero, so
    # in the first step only they (not E, W_M, the MLPs' first layers) receive a gradient
    ctx, fit = make_context(synthetic_data, tiny_teachers, threshold=0.0, explore=0.0, anchor="mean")
    method = DiverseDistill(ctx)
    teachers = [e.teacher for e in ctx.committee.endpoints]
    before_teachers = [copy.deepcopy(t.state_dict()) for t in teachers]
    before_student = copy.deepcopy(ctx.student.state_dict())
    before_module = copy.deepcopy(method.state_dict())
    optimizers = [torch.optim.SGD(ctx.student.parameters(), lr=0.1), torch.optim.SGD(method.parameters(), lr=0.1)]
    one_step_grads(method, batch_of(fit, range(32)))
    for o in optimizers:
        o.step()
    for t, before in zip(teachers, before_teachers):
        assert all(torch.equal(v, before[k]) for k, v in t.state_dict().items())
        assert all(p.grad is None for p in t.parameters())
    moved = lambda module, before: {k for k, v in module.state_dict().items() if not torch.equal(v, before[k])}  # noqa
    assert {"model.tower.0.weight", "model.head.weight", "model.user.weight"} <= moved(ctx.student, before_student)
    module_moved = moved(method, before_module)
    for name in ("dm.question.E", "dm.question.W_M", "dm.question.W_F", "dm.question.importance_bias",
                 "dm.question.question_mlps.0.1.weight",
                 "dm.question.question_mlps.1.3.weight", "dm.answer.answer_mlps.0.1.weight",
                 "dm.answer.answer_mlps.1.1.weight"):
        assert name in module_moved, name


def test_every_parameter_gets_exactly_the_gradient_of_its_own_losses(synthetic_data, tiny_teachers):
    """Algorithm 1, Eq. 4, parameter by parameter against plain autograd through the in-process teachers:
    the student gets d(L_task + alpha L_distill) and nothing else; the Distillation Module gets
    d(beta L_reg + gamma L_imp) and nothing else; the importance loss reaches only the importance head
    (W_F, b, and E, which it shares with the questions), never W_M, the question or answer MLPs or the
    student; L_reg never reaches the importance head."""
    ctx, fit = make_context(synthetic_data, tiny_teachers, threshold=0.0, explore=0.0, alpha=0.7, beta=0.5, gamma=0.8)
    method = DiverseDistill(ctx)
    with torch.no_grad():  # anchored question MLPs start at zero: give them a last layer that passes a gradient
        for mlp in method.dm.question.question_mlps:
            mlp[-1].weight.normal_(0, 0.1)
    batch = batch_of(fit, range(24))
    one_step_grads(method, batch)
    student = dict(ctx.student.named_parameters())
    module = dict(method.named_parameters())
    stitched = {n: p.grad.clone() for n, p in {**student, **module}.items() if p.grad is not None}

    out = ctx.student(*batch.inputs)
    y, n_rows = batch.target, len(batch.target)
    task = ((out.prediction - y) ** 2).mean()
    questions, w = method.dm.question(out.x.detach(), method.anchors(batch.rows, out.x.device))
    distill, reg = 0.0, 0.0
    for i, endpoint in enumerate(ctx.committee.endpoints):
        hidden, prediction = endpoint.teacher.answer(questions[i], None)  # differentiable, in-process
        a = method.dm.answer(i, hidden)
        distill = distill + (w[:, i].detach() * ((a.detach() - out.h) ** 2).sum(-1)).sum() / n_rows
        per_row = (prediction - y) ** 2 + (ctx.student.head_frozen(a) - y) ** 2
        reg = reg + (w[:, i].detach() * per_row).sum() / n_rows
    distance = method.distances(out.prediction.detach(), batch.rows)
    importance = torch.nn.functional.binary_cross_entropy(
        w, disagreement_targets(distance, ctx.distill.importance_share))

    def grads(loss, params: dict) -> dict:
        found = torch.autograd.grad(loss, list(params.values()), retain_graph=True, allow_unused=True)
        return {n: g for n, g in zip(params, found) if g is not None and bool(g.abs().sum() > 0)}

    expected = {**grads(task + 0.7 * distill, student), **grads(0.5 * reg + 0.8 * importance, module)}
    assert set(stitched) == set(expected)  # no parameter gets a gradient it should not, none misses one
    for name, grad in expected.items():
        assert torch.allclose(stitched[name], grad, atol=1e-5, rtol=1e-4), name
    assert any(n.startswith("dm.answer") for n in expected) and any("question_mlps" in n for n in expected)

    head = {"dm.question.W_F", "dm.question.importance_bias", "dm.question.E"}
    assert set(grads(importance, {**student, **module})) == head
    assert not {"dm.question.W_F", "dm.question.importance_bias"} & set(grads(reg, module))
    assert not set(grads(distill, module)) and not set(grads(reg + importance, student))


@pytest.mark.parametrize("anchor", ["mean", "row"])
def test_question_gradient_equals_autograd_through_the_teacher(anchor, synthetic_data, tiny_teachers):
    """The VJP-stitched gradient on F_Q equals plain autograd through the in-process teacher models."""
    ctx, fit = make_context(synthetic_data, tiny_teachers, threshold=0.0, explore=0.0, gamma=0.0, anchor=anchor)
    method = DiverseDistill(ctx)
    if anchor == "row":  # anchored question MLPs start at zero: give them a nonzero last layer to check
        with torch.no_grad():
            for mlp in method.dm.question.question_mlps:
                mlp[-1].weight.normal_(0, 0.1)
    batch = batch_of(fit, range(20))
    one_step_grads(method, batch)
    stitched = {n: p.grad.clone() for n, p in method.dm.question.named_parameters() if p.grad is not None}

    out = ctx.student(*batch.inputs)
    questions, w = method.dm.question(out.x.detach(), method.anchors(batch.rows, out.x.device))
    reg = 0.0
    for i, endpoint in enumerate(ctx.committee.endpoints):
        hidden, prediction = endpoint.teacher.answer(questions[i], None)  # differentiable, in-process
        a = method.dm.answer(i, hidden)
        per_row = (prediction - batch.target) ** 2 + (ctx.student.head_frozen(a) - batch.target) ** 2
        reg = reg + (w[:, i].detach() * per_row).sum() / len(batch.target)
    params = [p for _, p in method.dm.question.named_parameters()]
    reference = torch.autograd.grad(0.5 * reg, params, allow_unused=True)
    checked = 0
    for (name, _), grad in zip(method.dm.question.named_parameters(), reference):
        if grad is not None and name in stitched:
            assert torch.allclose(stitched[name], grad, atol=1e-5, rtol=1e-4), name
            checked += 1
    assert checked >= 6  # W_M, E and the question MLPs' layers were compared


# -- importance: no collapse --------------------------------------------------------------


def mean_importance_after(steps, importance, synthetic_data, tiny_teachers):
    ctx, fit = make_context(synthetic_data, tiny_teachers, threshold=0.0, explore=0.0, importance=importance)
    method = DiverseDistill(ctx)
    optimizer = torch.optim.Adagrad(list(method.parameters()) + list(ctx.student.parameters()), lr=0.05)
    stream = BatchStream(len(fit), 32, seed=0)
    for step in range(steps):
        optimizer.zero_grad()
        one_step_grads(method, batch_of(fit, stream.rows(step)))
        optimizer.step()
    with torch.no_grad():
        x = ctx.student(torch.as_tensor(fit.user), torch.as_tensor(fit.item)).x
        _, w = method.dm.question(x, method.anchors(np.arange(len(fit)), x.device))
    return w.mean().item()


@pytest.mark.parametrize("bias", [True, False])
def test_importance_can_learn_its_targets_base_rate(bias):
    """A teacher that beats the student on 80% of rows: w must be able to say so. Without the bias
    b, w = sigmoid(x W_F E^T) averages ~0.5 over centred x whatever the target (the gate then shuts)."""
    torch.manual_seed(0)
    qa = DistillationModule(16, 4, [3], [5], DMConfig(d_emb=8, d_m=4, mlp_hidden=8)).question
    qa.importance_bias.requires_grad_(bias)
    optimizer = torch.optim.Adam([p for p in qa.parameters() if p.requires_grad], lr=0.01)
    for _ in range(300):
        x = torch.randn(256, 16)
        target = (torch.rand(256, 1) < 0.8).float()
        optimizer.zero_grad()
        torch.nn.functional.binary_cross_entropy(qa(x)[1], target).backward()
        optimizer.step()
    w = qa(torch.randn(4096, 16))[1].mean().item()
    assert (0.75 < w < 0.85) if bias else (w < 0.65), w


def test_paper_importance_collapses_and_ours_does_not(synthetic_data, tiny_teachers):
    paper = mean_importance_after(150, "paper", synthetic_data, tiny_teachers)
    assert paper < 0.1  # minimising sum_i w_i * loss_i over w drives every w to 0
    for ours in ("teacher", "answer"):
        assert mean_importance_after(150, ours, synthetic_data, tiny_teachers) > 0.3, ours


def test_disagreement_targets_mark_each_teachers_furthest_rows():
    distance = torch.tensor([[0.0, 5.0], [1.0, 4.0], [2.0, 3.0], [3.0, 2.0], [4.0, 1.0]])  # [rows, teachers]
    assert disagreement_targets(distance, 0.6).tolist() == [[0, 1], [0, 1], [1, 1], [1, 0], [1, 0]]
    assert disagreement_targets(torch.rand(1000, 3), 0.7).mean(0).allclose(torch.tensor(0.7), atol=0.01)


def test_disagreement_importance_learns_where_the_teacher_disagrees(synthetic_data, tiny_teachers):
    """w trained on the label-free target must rank the rows where the teacher's prediction is far from the
    student's above the others (on every fitting row, not only the batches it saw), at about the target's base
    rate: the signal the teacher-beats-student target, mostly label noise, does not give it."""
    ctx, fit = make_context(synthetic_data, tiny_teachers, threshold=0.0, explore=0.0, importance="disagreement",
                            importance_share=0.7)
    method = DiverseDistill(ctx)
    optimizer = torch.optim.Adagrad(list(method.parameters()) + list(ctx.student.parameters()), lr=0.05)
    stream = BatchStream(len(fit), 32, seed=0)
    for step in range(300):
        optimizer.zero_grad()
        one_step_grads(method, batch_of(fit, stream.rows(step)))
        optimizer.step()
    rows = np.arange(len(fit))
    with torch.no_grad():
        out = ctx.student(torch.as_tensor(fit.user), torch.as_tensor(fit.item))
        _, w = method.dm.question(out.x, method.anchors(rows, out.x.device))
        target = disagreement_targets(method.distances(out.prediction, rows), ctx.distill.importance_share).bool()
    for i in range(2):
        assert 0.55 < w[:, i].mean() < 0.85
        assert rank_auc(w[:, i], target[:, i]) > 0.6, i


def test_rank_auc():
    scores = torch.tensor([0.1, 0.4, 0.35, 0.8])
    assert rank_auc(scores, torch.tensor([False, False, True, True])) == 0.75  # 3 of 4 pairs ordered
    assert rank_auc(scores, torch.tensor([False, True, True, True])) == 1.0
    assert rank_auc(-scores, torch.tensor([False, True, True, True])) == 0.0
    assert np.isnan(rank_auc(scores, torch.zeros(4, dtype=torch.bool)))


# -- gating ---------------------------------------------------------------------------------


def test_select_pairs_gates_and_explores():
    w = torch.tensor([[0.9, 0.1], [0.5, 0.7], [0.61, 0.59]])
    sent, gated = select_pairs(w, 0.6, 0.0)
    assert gated.tolist() == [[True, False], [False, True], [True, False]] and torch.equal(sent, gated)
    many = torch.full((4000, 2), 0.1)
    sent, gated = select_pairs(many, 0.6, 0.25, torch.Generator().manual_seed(0))
    assert not gated.any() and 0.22 < sent.float().mean() < 0.28


def test_gated_step_sends_only_selected_rows_and_counts_them(synthetic_data, tiny_teachers):
    ctx, fit = make_context(synthetic_data, tiny_teachers, threshold=0.6, explore=0.0, gate_warmup=0, anchor="mean")
    method = DiverseDistill(ctx)
    with torch.no_grad():  # make teacher 0 important for every row, teacher 1 for none
        method.dm.question.W_F.zero_()
    calls = []
    for endpoint in ctx.committee.endpoints:
        original = endpoint.answer
        endpoint.answer = lambda q, x=None, keep_graph=False, original=original: (
            calls.append(len(q)) or original(q, x, keep_graph))
    _, w = method.dm.question(torch.zeros(1, ctx.student.d_in))
    assert torch.allclose(w, torch.full_like(w, 0.5))  # w = sigmoid(0): below 0.6 -> everything skipped
    loss, logs = method.loss(batch_of(fit, range(16)), step=1)
    assert calls == [] and logs["loss/distill"] == 0.0
    assert ctx.committee.rows_sent.tolist() == [0, 0] and ctx.committee.rows_possible.tolist() == [16, 16]
    # During warm-up the gate is open: everything is sent.
    method.ctx.distill.gate_warmup = 5
    method.loss(batch_of(fit, range(16)), step=1)
    assert calls == [16, 16] and ctx.committee.rows_sent.tolist() == [16, 16]
    assert ctx.committee.saving().tolist() == [0.5, 0.5]


def test_a_student_whose_features_overflowed_stops_before_asking_the_teachers(synthetic_data, tiny_teachers):
    ctx, fit = make_context(synthetic_data, tiny_teachers, gate_warmup=0, anchor="mean")
    method = DiverseDistill(ctx)
    with torch.no_grad():
        next(ctx.student.parameters()).fill_(float("inf"))  # what a too-large step leaves behind
    with pytest.raises(TrainingDiverged, match="training diverged at step 8: the student's features"):
        method.loss(batch_of(fit, range(16)), step=7)
    assert ctx.committee.rows_possible.tolist() == [0, 0]  # no teacher was asked a NaN question


@pytest.mark.parametrize("share", [0.025, 0.1, 0.25, 1 / 3, 0.999, 1.0])
def test_a_budget_is_never_exceeded_and_is_spent(share):
    """k_t rows at step t: never more than b of the rows from the start, within one row of exactly b, at most
    ceil(b B) in a batch, and a function of the step alone."""
    batch, total = 64, 0
    for step in range(2000):
        k = rows_allowed(share, batch, step)
        assert 0 <= k <= math.ceil(share * batch) and k == rows_allowed(share, batch, step)
        total += k
        assert share * batch * (step + 1) - 1 < total <= share * batch * (step + 1) + 1e-9
    assert rows_allowed(0.1, 64, 9) == 7  # 0.1 * 64 * 10 = 64 exactly: the rounding does not lose the row


def test_budget_rows_follow_their_rule_and_explore_inside_the_budget():
    w = torch.tensor([0.1, 0.2, 0.3, 0.4])
    assert budget_rows(w, 2, "top").tolist() == [False, False, True, True]
    assert top_rows(w, 0).sum() == 0 and top_rows(w, 9).all()
    generator = torch.Generator().manual_seed(0)
    for rule, share in {"sampled": [0.1, 0.2, 0.3, 0.4], "uniform": [0.25] * 4}.items():
        draws = torch.stack([budget_rows(w, 1, rule, 0.0, generator) for _ in range(4000)]).float()
        assert (draws.sum(1) == 1).all()
        assert torch.allclose(draws.mean(0), torch.tensor(share), atol=0.03), rule
    zero = torch.tensor([0.1, 0.0, 0.5, 0.0])
    assert not torch.stack([sample_rows(zero, 2, generator) for _ in range(200)])[:, [1, 3]].any()  # w = 0: never
    wide = torch.arange(64.0)
    explored = torch.stack([budget_rows(wide, 8, "top", 0.5, generator) for _ in range(400)])
    assert (explored.sum(1) == 8).all()  # exploration comes out of the budget
    below = explored[:, :56].sum(1).float().mean()  # slots given to rows the rule did not pick
    assert 3.5 < below < 4.5
    with pytest.raises(ValueError, match="rule"):
        budget_rows(w, 1, "best")


def test_a_budgeted_teacher_gets_its_share_at_every_step_warm_up_included(synthetic_data, tiny_teachers):
    """Teacher 0 under a budget of 1/4, teacher 1 without: in warm-up teacher 1 gets every row and teacher 0 a
    quarter drawn at random; after it, teacher 0 gets the quarter with the largest w whatever level w is at,
    while teacher 1's threshold gate (0.6) shuts at w = 0.5."""
    ctx, fit = make_context(synthetic_data, tiny_teachers, threshold=0.6, explore=0.0, gate_warmup=3,
                            budgets=[0.25, None])
    method = DiverseDistill(ctx)
    batch = batch_of(fit, range(64))
    warm = []
    for step in range(3):
        _, logs = method.loss(batch, step=step)
        assert [len(a.rows) for a in method.answers] == [16, 64] and logs["sent/mlp-m"] == 0.25
        warm.append(set(method.answers[0].rows.tolist()))
    assert len(set.union(*warm)) > 16  # drawn afresh each step
    with torch.no_grad():
        method.dm.question.W_F.zero_()
    method.loss(batch, step=3)
    assert len(method.answers[0].rows) == 16 and method.answers[1] is None
    with torch.no_grad():  # now w varies by row: the rows sent are the top quarter of teacher 0's w
        method.dm.question.W_F.normal_(0, 1.0)
    method.loss(batch, step=4)
    out = method.student(*batch.inputs)
    _, w = method.dm.question(out.x.detach(), method.anchors(batch.rows, out.x.device))
    assert sorted(method.answers[0].rows.tolist()) == sorted(w[:, 0].topk(16).indices.tolist())
    assert ctx.committee.rows_sent[0] == 5 * 16 and ctx.committee.rows_possible[0] == 5 * 64
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="budget must be in"):
            DiverseDistill(make_context(synthetic_data, tiny_teachers, budgets=[bad, None])[0])


def test_a_budgeted_teachers_importance_learns_from_the_rows_it_answered_only(synthetic_data, tiny_teachers):
    """The disagreement target of a budgeted teacher is measured on its answers, never on its cached
    predictions for the rows it was not asked about: those are NaN here, and the loss stays finite."""
    ctx, fit = make_context(synthetic_data, tiny_teachers, explore=0.0, gate_warmup=0, budgets=[0.25, None])
    ctx.teacher_outputs[0].prediction = torch.full_like(ctx.teacher_outputs[0].prediction, float("nan"))
    method = DiverseDistill(ctx)
    batch = batch_of(fit, range(64))
    for step in range(3):
        loss, logs = method.loss(batch, step=step)
        assert torch.isfinite(loss) and logs["loss/importance"] > 0
        loss.backward()
        method.after_backward()
    assert method.answered_count.tolist() == [48, 0]
    window = method.answered_distance[0]
    assert int(torch.isfinite(window).sum()) == 48 and torch.isnan(method.answered_distance[1]).all()
    # the cut is the quantile of those answered distances
    cut = method.answered_cut(0, torch.tensor([]))
    assert cut == torch.quantile(window[:48], 1 - ctx.distill.importance_share)


def test_budget_gates_draw_rows_by_their_rule_and_keep_or_permute_the_weights(synthetic_data, tiny_teachers):
    """Under a budget of one row in four: learned always takes the top row, sampled draws in proportion to w,
    random uniformly; all three keep each row's own w as its weight, the shuffled control permutes it."""
    w = torch.tensor([[0.1, 0.9], [0.2, 0.9], [0.3, 0.1], [0.4, 0.1]])
    expected = {"learned": [0.0, 0.0, 0.0, 1.0], "sampled": [0.1, 0.2, 0.3, 0.4], "random": [0.25] * 4}
    for gate, share in expected.items():
        ctx, _ = make_context(synthetic_data, tiny_teachers, budget=0.25, gate=gate, explore=0.0)
        method, generator = DiverseDistill(ctx), torch.Generator().manual_seed(0)
        draws = []
        for _ in range(2000):
            sent, gated_in, weights = method.gate(w, AFTER_WARMUP, generator)
            assert torch.equal(sent, gated_in) and gated_in.sum(0).tolist() == [1, 1] and torch.equal(weights, w)
            draws.append(gated_in[:, 0].float())
        assert torch.allclose(torch.stack(draws).mean(0), torch.tensor(share), atol=0.03), gate
        sent, gated_in, weights = method.gate(w, 0, generator)  # warm-up: the budget still holds, rows uniform
        assert gated_in.sum(0).tolist() == [1, 1] and torch.equal(sent, gated_in)
    ctx, _ = make_context(synthetic_data, tiny_teachers, budget=0.25, gate="shuffled", explore=0.0)
    _, _, weights = DiverseDistill(ctx).gate(w, AFTER_WARMUP, torch.Generator().manual_seed(1))
    assert torch.equal(weights.sort(0).values, w.sort(0).values) and not torch.equal(weights, w)
    for gate in ("random", "sampled", "disagreement"):
        with pytest.raises(ValueError, match="give every teacher a budget"):
            DiverseDistill(make_context(synthetic_data, tiny_teachers, gate=gate, budgets=[0.25, None])[0])


def test_baselines_read_a_budgeted_teachers_outputs_on_its_share_of_rows_only(synthetic_data, tiny_teachers):
    """At equal spend: LD on a teacher with a budget of 1/4 pulls on 16 of 64 rows (drawn afresh each step); MT
    averages, per row, the teachers that answered it; AEKD weighs each teacher's loss over its own rows; the
    committee counts the rows used as it does DiverseDistill's sent rows."""
    from trainer.methods import AdaptiveEnsemble, LogitDistillation, MultiTeacherAveraging

    ctx, fit = make_context(synthetic_data, tiny_teachers[:1], budgets=[0.25])
    ld = LogitDistillation(ctx)
    batch = batch_of(fit, range(64))
    pulled = []
    for step in range(3):
        state = ctx.generator.get_state()
        loss, logs = ld.loss(batch, step)
        ctx.generator.set_state(state)
        used = budget_rows(torch.ones(64), 16, "uniform", 0.0, ctx.generator)  # the rows the loss drew
        with torch.no_grad():
            prediction = ctx.student.predict(*batch.inputs)
            soft = ctx.teacher_outputs[0].prediction[batch.rows]
            expected = (((prediction - soft) ** 2) * used).sum() / 64
        assert logs["loss/distill"] == pytest.approx(float(expected), rel=1e-5)
        pulled.append(set(used.nonzero().squeeze(1).tolist()))
    assert len(set.union(*pulled)) > 16  # drawn afresh each step
    assert ctx.committee.rows_sent.tolist() == [3 * 16] and ctx.committee.rows_possible.tolist() == [3 * 64]

    ctx, fit = make_context(synthetic_data, tiny_teachers, budgets=[0.25, None])
    mt = MultiTeacherAveraging(ctx)
    rows = np.arange(64)
    used = [torch.zeros(64, dtype=torch.bool), None]
    used[0][:16] = True
    soft, has = mt.soft_target(rows, used, torch.device("cpu"))
    p0, p1 = (t.prediction[rows] for t in ctx.teacher_outputs)
    assert torch.allclose(soft[:16], (p0[:16] + p1[:16]) / 2) and torch.allclose(soft[16:], p1[16:]) and has.all()
    soft, has = mt.soft_target(rows, [used[0], used[0]], torch.device("cpu"))
    assert has.tolist() == used[0].tolist() and torch.allclose(soft[:16], (p0[:16] + p1[:16]) / 2)
    assert mt.soft_target(rows, [None, None], torch.device("cpu"))[1] is None

    aekd = AdaptiveEnsemble(ctx)
    batch = batch_of(fit, range(64))
    state = ctx.generator.get_state()
    _, logs = aekd.loss(batch, 0)
    ctx.generator.set_state(state)
    used = budget_rows(torch.ones(64), 16, "uniform", 0.0, ctx.generator)
    with torch.no_grad():
        prediction = ctx.student.predict(*batch.inputs)
        losses = [((prediction - t.prediction[batch.rows]) ** 2 * u).sum() / 64
                  for t, u in zip(ctx.teacher_outputs, (used, torch.ones(64)))]
    weights = [logs["aekd_weight/mlp-m"], logs["aekd_weight/mlp-l"]]
    assert logs["loss/distill"] == pytest.approx(sum(w * float(l) for w, l in zip(weights, losses)), rel=1e-5)


def test_mt_on_classes_averages_the_teachers_probabilities_at_the_temperature():
    """The paper's MT for classes: the target is the mean of the teachers' softmax at T (not the softmax of
    their mean logits), and the loss is KL at T, times T^2."""
    from types import SimpleNamespace

    from trainer.methods import MultiTeacherAveraging, soft_label_rows

    logits = [torch.tensor([[4.0, 0.0, 0.0]]), torch.tensor([[0.0, 0.0, 4.0]])]
    for t in (1.0, 3.0):
        ctx = MethodContext(SimpleNamespace(task="classification"), DistillConfig(temperature=t),
                            teacher_outputs=[TeacherOutputs(p, torch.zeros(1, 1), torch.zeros(1, 1)) for p in logits])
        soft, has = MultiTeacherAveraging(ctx).soft_target(np.array([0]), [None, None], torch.device("cpu"))
        expected = (torch.softmax(logits[0] / t, -1) + torch.softmax(logits[1] / t, -1)) / 2
        assert has is None and torch.allclose(torch.softmax(soft / t, -1), expected, atol=1e-6)
        student = torch.tensor([[1.0, 2.0, 0.5]])
        kl = (expected * (expected.log() - torch.log_softmax(student / t, -1))).sum(-1)
        assert torch.allclose(soft_label_rows(student, soft, "classification", t), t * t * kl, atol=1e-5)
    assert not torch.allclose(expected, torch.softmax((logits[0] + logits[1]) / 2 / 3.0, -1), atol=1e-3)


def test_disagreement_gate_sends_the_rows_furthest_from_each_teacher(synthetic_data, tiny_teachers):
    """The diagnostic gate ranks rows by w's target (the student's distance to the teacher's own
    prediction), not by w: under a budget of 1/4, each teacher gets the 16 rows furthest from it."""
    ctx, fit = make_context(synthetic_data, tiny_teachers, budget=0.25, gate="disagreement", explore=0.0,
                            gate_warmup=0, importance="teacher")  # its own need for the teachers' outputs
    assert ctx.teacher_outputs is not None
    method = DiverseDistill(ctx)
    batch = batch_of(fit, range(64))
    method.loss(batch, step=1)
    with torch.no_grad():
        distance = method.distances(method.student(*batch.inputs).prediction, batch.rows)
    for i, answer in enumerate(method.answers):
        assert sorted(answer.rows.tolist()) == sorted(distance[:, i].topk(16).indices.tolist())
    assert distance[:, 0].topk(16).indices.tolist() != distance[:, 1].topk(16).indices.tolist()  # per teacher
    with pytest.raises(ValueError, match="distance"):
        method.gate(torch.rand(64, 2), AFTER_WARMUP, None)


def test_mean_row_weight_keeps_the_gates_rows_and_gives_them_the_batch_mean_w(synthetic_data, tiny_teachers):
    """The control for the rows' weight: the gate picks the same rows as with their own w, but each
    carries its teacher's batch mean of w; an unknown choice is refused."""
    w = torch.tensor([[0.1, 0.9], [0.2, 0.8], [0.3, 0.1], [0.6, 0.2]])
    distance = torch.tensor([[4.0, 0.0], [0.0, 3.0], [1.0, 1.0], [2.0, 2.0]])
    for gate, top in (("learned", [3, 0]), ("disagreement", [0, 1])):
        picked = {}
        for row_weight in ("own", "mean"):
            ctx, _ = make_context(synthetic_data, tiny_teachers, budget=0.25, gate=gate, explore=0.0,
                                  row_weight=row_weight)
            sent, gated_in, weights = DiverseDistill(ctx).gate(w, AFTER_WARMUP, None, distance=distance)
            picked[row_weight] = gated_in
            assert gated_in.float().argmax(0).tolist() == top, gate
            expected = w if row_weight == "own" else w.mean(0, keepdim=True).expand_as(w)
            assert torch.allclose(weights, expected), (gate, row_weight)
        assert torch.equal(picked["own"], picked["mean"])
    with pytest.raises(ValueError, match="row_weight"):
        DiverseDistill(make_context(synthetic_data, tiny_teachers, row_weight="median")[0])


def test_shuffle_rows_permutes_each_column_on_its_own():
    values = torch.arange(400.0).reshape(200, 2)
    shuffled = shuffle_rows(values, torch.Generator().manual_seed(0))
    assert torch.equal(shuffled.sort(0).values, values)  # the same values in every column
    assert not torch.equal(shuffled, values)
    assert not torch.equal(shuffled[:, 0] // 2, shuffled[:, 1] // 2)  # rows not moved together


def test_shuffled_gate_sends_as_many_pairs_as_the_learned_one_chosen_at_random(synthetic_data, tiny_teachers):
    """The control for the gate: per teacher and batch, the same number of pairs as w >= threshold lets in,
    but not the same rows."""
    ctx, fit = make_context(synthetic_data, tiny_teachers, threshold=0.5, explore=0.0, gate_warmup=0)
    method = DiverseDistill(ctx)
    with torch.no_grad():  # w varies by row, and about half the rows pass 0.5
        method.dm.question.W_F.normal_(0, 1.0)
    batch = batch_of(fit, range(64))
    method.loss(batch, step=1)
    learned = [a.rows.tolist() for a in method.answers]
    ctx.distill.gate = "shuffled"
    method.loss(batch, step=1)
    shuffled = [a.rows.tolist() for a in method.answers]
    assert [len(r) for r in shuffled] == [len(r) for r in learned] and all(0 < len(r) < 64 for r in learned)
    assert shuffled != learned


# -- zeroth order ---------------------------------------------------------------------------


def test_spsa_estimate_points_along_the_true_vjp(mlp_teacher):
    exact = LocalTeacher(mlp_teacher)
    spsa = SPSAEndpoint(exact, directions=512, eps=1e-3, seed=0)
    torch.manual_seed(0)
    q = torch.randn(3, *exact.spec.question_shape)
    d_hidden, d_pred = torch.randn(3, exact.spec.hidden_size), torch.randn(3)
    true = exact.answer_vjp(q, None, d_hidden, d_pred)
    estimate = spsa.answer_vjp(q, None, d_hidden, d_pred)
    cosine = torch.nn.functional.cosine_similarity(true.flatten(), estimate.flatten(), dim=0)
    assert cosine > 0.8
    assert spsa.answer(q).hidden.shape == (3, exact.spec.hidden_size)


# -- batches ----------------------------------------------------------------------------------


def test_batch_stream_is_a_pure_function_of_seed_and_step():
    a, b = BatchStream(10, 4, seed=1), BatchStream(10, 4, seed=1)
    first_epoch = np.concatenate([a.rows(0), a.rows(1), a.rows(2)[:2]])
    assert sorted(first_epoch.tolist()) == list(range(10))
    assert np.array_equal(b.rows(7), a.rows(7)) and np.array_equal(BatchStream(10, 4, 1).rows(2), b.rows(2))
    assert not np.array_equal(BatchStream(10, 4, seed=2).rows(0), a.rows(0))


@pytest.mark.parametrize("grads, cap, expected", [
    ([[1.0, 0.0], [-2.0, 0.0]], 1.0, [2 / 3, 1 / 3]),  # opposite pulls cancel: a1 * 1 = a2 * 2
    ([[1.0, 0.0], [0.0, 2.0]], 1.0, [0.8, 0.2]),  # orthogonal: the smaller gradient weighs more
    ([[1.0, 0.0], [0.0, 2.0]], 0.6, [0.6, 0.4]),  # AEKD's tolerance caps it
    ([[1.0, 0.0], [0.0, 2.0]], 0.1, [0.5, 0.5]),  # a cap below 1/m is raised to 1/m
])
def test_aekd_weights_are_the_capped_min_norm_point(grads, cap, expected):
    assert min_norm_weights(torch.tensor(grads), cap).tolist() == pytest.approx(expected, abs=1e-4)


def test_aekd_weights_beat_every_point_of_a_grid():
    grads = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    weights = min_norm_weights(grads, 0.7)
    assert weights.sum().item() == pytest.approx(1.0, abs=1e-5) and weights.max() <= 0.7 + 1e-6

    def norm(a):
        return float((torch.as_tensor(a, dtype=grads.dtype) @ grads).norm())

    grid = [(a, b, 1 - a - b) for a in np.linspace(0, 0.7, 71) for b in np.linspace(0, 0.7, 71) if 0.3 <= a + b <= 1]
    assert norm(weights) <= min(norm(a) for a in grid) + 1e-4


def test_method_teacher_counts_are_checked():
    with pytest.raises(ValueError, match="exactly 1 teacher"):
        TrainConfig(method="ld", teachers=["local:a", "local:b"])
    with pytest.raises(ValueError, match="at least 1"):
        TrainConfig(method="diversedistill", teachers=[])
    with pytest.raises(ValueError, match="unknown method"):
        TrainConfig(method="xkd", teachers=[])


def test_concurrent_and_sequential_fan_out_agree(synthetic_dir, tiny_teachers, tmp_path):
    results = []
    for concurrent in (True, False):
        config = TrainConfig(
            teachers=[f"local:{p}" for p in tiny_teachers], data=str(synthetic_dir), steps=20,
            batch_size=16, concurrent=concurrent, eval_every=10, checkpoint_every=1000, cache_dir=None,
            device="cpu", student={"tower": (16, 8), "embed_dim": 4},
            distill=DistillConfig(gate_warmup=5, dm=DMConfig(d_emb=16, d_m=8, mlp_hidden=32)),
        )
        trainer = Trainer(config, tmp_path / f"run-{concurrent}")
        for _ in range(20):
            trainer.train_step()
        results.append({k: v.clone() for k, v in trainer.student.state_dict().items()})
        trainer.close()
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


@pytest.mark.parametrize("anchor", ["row", "mean"])  # from the training rows' outputs / its own Predict
def test_trainer_calibrates_answers_and_decays_the_module(anchor, synthetic_dir, tiny_teachers, tmp_path):
    config = TrainConfig(
        teachers=[f"local:{p}" for p in tiny_teachers], data=str(synthetic_dir), steps=4, batch_size=16,
        cache_dir=None, device="cpu", student={"tower": (16, 8), "embed_dim": 4}, calibration_rows=64,
        distill=DistillConfig(dm=DMConfig(d_emb=16, d_m=8, mlp_hidden=32), anchor=anchor),
    )
    trainer = Trainer(config, tmp_path / "run")
    try:  # DiverseDistill's own optimiser defaults, not FD's
        group = trainer.optimizers[1].param_groups[0]
        assert (group["lr"], group["weight_decay"]) == (DiverseDistill.module_lr, DiverseDistill.module_weight_decay)
        assert DiverseDistill.module_lr > FeatureDistillation.module_lr
        fit = trainer.domain.fit
        rows = np.sort(np.random.default_rng(config.seed).choice(len(fit), 64, replace=False))
        for i, endpoint in enumerate(trainer.endpoints):
            native = endpoint.predict(trainer.domain.teacher_inputs(endpoint.spec, fit, rows, for_answer=False))
            assert torch.allclose(getattr(trainer.method.dm.answer, f"hidden_mean_{i}"), native.hidden.mean(0), atol=1e-5)
            assert torch.allclose(getattr(trainer.method.dm.question, f"question_mean_{i}"), native.question.mean(0),
                                  atol=1e-5)
    finally:
        trainer.close()


@pytest.mark.parametrize("threshold", [0.99, 0.0])
def test_a_shut_gate_is_reported(threshold, synthetic_dir, tiny_teachers, tmp_path, caplog):
    """A gate no importance reaches must say so in the log (rows saved ~100% alone looks like success)."""
    from trainer.train import GATE_SHUT_LOGS, train

    config = TrainConfig(
        teachers=[f"local:{p}" for p in tiny_teachers], data=str(synthetic_dir), steps=GATE_SHUT_LOGS + 4,
        batch_size=16, cache_dir=None, device="cpu", student={"tower": [16, 8], "embed_dim": 4}, log_every=1,
        eval_every=1000, calibration_rows=64,
        distill=DistillConfig(dm=DMConfig(d_emb=16, d_m=8, mlp_hidden=32), threshold=threshold, gate_warmup=2,
                              explore=0.0),
    )
    with caplog.at_level("WARNING", logger="trainer.train"):
        result = train(config, tmp_path / "run")
    shut = [r for r in caplog.records if "the gate is shut" in r.getMessage()]
    if threshold:
        assert len(shut) == 1 and result["rows_saved/all"] > 0.5
    else:
        assert not shut and result["rows_saved/all"] == 0.0


def test_gap_recovery_rate_needs_a_teacher_better_than_the_student():
    from trainer.evaluation import gap_recovery_rate

    assert gap_recovery_rate(0.87, 0.85, 0.82) == pytest.approx(0.4)  # MSE: 0.02 of the 0.05 gap
    assert gap_recovery_rate(0.87, 0.85, 0.95) is None  # the teacher is worse than S_base: no gap
    assert gap_recovery_rate(0.30, 0.35, 0.55, lower_is_better=False) == pytest.approx(0.2)  # accuracy
    assert gap_recovery_rate(0.30, 0.35, 0.25, lower_is_better=False) is None
