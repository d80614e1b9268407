"""The teacher zoo: injection points are exact, and VJPs are true gradients."""

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, TEXTS
from services.teacher_server.zoo import FAMILIES, MLPTeacher
from trainer.models import build_recsys_mlp


def ids_of(data, n=6):
    return torch.from_numpy(np.stack([data.test.user[:n], data.test.item[:n]], 1))


def test_mlp_injecting_its_own_embedding_reproduces_the_forward(mlp_teacher, synthetic_data):
    ids = ids_of(synthetic_data)
    question, hidden, prediction = mlp_teacher.compute_predict({"ids": ids}, len(ids))
    model_hidden, model_pred = mlp_teacher.model(ids[:, 0], ids[:, 1])
    assert torch.equal(hidden, model_hidden) and torch.equal(prediction, model_pred)
    answer_hidden, answer_pred = mlp_teacher.compute_answer(question, {})
    assert torch.equal(answer_hidden, hidden) and torch.equal(answer_pred, prediction)


def test_mlp_question_changes_the_answer(mlp_teacher, synthetic_data):
    question, hidden, _ = mlp_teacher.compute_predict({"ids": ids_of(synthetic_data)}, 6)
    other_hidden, _ = mlp_teacher.compute_answer(question + 0.5, {})
    assert not torch.allclose(other_hidden, hidden)


def test_mlp_unknown_ids_use_the_unknown_row(mlp_teacher, synthetic_data):
    n_users = synthetic_data.n_users
    q_unknown, *_ = mlp_teacher.compute_predict({"ids": torch.tensor([[n_users + 50, 1], [-3, 1]])}, 2)
    q_zero, *_ = mlp_teacher.compute_predict({"ids": torch.tensor([[0, 1], [0, 1]])}, 2)
    assert torch.equal(q_unknown, q_zero)


def test_history_mean_leaves_out_the_rows_own_rating(synthetic_data):
    torch.manual_seed(0)
    train = synthetic_data.train
    model = build_recsys_mlp(synthetic_data, train, (8,), embed_dim=4, history=True)
    user, item, rating = int(train.user[0]), int(train.item[0]), int(train.rating[0])
    mine = train.user == user
    pair_ids = torch.as_tensor(train.item[mine] * 5 + train.rating[mine].astype(int) - 1)
    full_mean = model.user_history(pair_ids).mean(0)
    others = pair_ids[pair_ids != item * 5 + rating - 1]
    loo_mean = model.user_history(others).mean(0)

    def user_history_field(exclude):
        q = model.embed(torch.tensor([user]), torch.tensor([item]), exclude)
        return q[0, -8:-4]  # fields: ..., user history, item history (embed_dim 4 each)

    assert torch.allclose(user_history_field(None), full_mean, atol=1e-6)
    assert torch.allclose(user_history_field(torch.tensor([float(rating)])), loo_mean, atol=1e-6)


def test_lm_injecting_its_own_cls_state_reproduces_the_forward(lm_teacher):
    from transformers import AutoModel

    from services.teacher_server.zoo.minilm import pretrained_minilm_path

    question, hidden, prediction = lm_teacher.compute_predict({"text": TEXTS}, len(TEXTS))
    answer_hidden, answer_pred = lm_teacher.compute_answer(question, {"text": TEXTS})
    assert torch.equal(answer_hidden, hidden) and torch.equal(answer_pred, prediction)
    # ... and that forward is the stock BertModel's, mean-pooled.
    reference = AutoModel.from_pretrained(pretrained_minilm_path(), local_files_only=True).eval()
    batch = lm_teacher.tokenizer(TEXTS, padding=True, truncation=True, max_length=48, return_tensors="pt")
    with torch.no_grad():
        states = reference(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    assert torch.allclose(hidden, (states * mask).sum(1) / mask.sum(1), atol=1e-5)


def test_lm_answer_does_not_depend_on_padding_to_a_token_and_row_multiple(lm_teacher, monkeypatch):
    """On a GPU the LM pads texts to a multiple of 16 tokens and batches to a multiple of 16 rows (few
    shapes, few kernel choices); tokens are masked and extra rows dropped, so the answer, the
    prediction and the question gradient are the unpadded ones, row for row."""
    inputs = {"text": TEXTS}
    torch.manual_seed(0)
    question = torch.randn(len(TEXTS), lm_teacher.spec.hidden_size)
    d_hidden, d_pred = torch.randn(len(TEXTS), lm_teacher.spec.hidden_size), torch.randn(len(TEXTS))

    def outputs():
        own = lm_teacher.compute_predict(inputs, len(TEXTS))
        answer = lm_teacher.compute_answer(question, inputs)
        return (*own, *answer, lm_teacher.compute_answer_vjp(question, inputs, d_hidden, d_pred))

    plain = outputs()
    monkeypatch.setattr(lm_teacher, "token_multiple", lambda: 16)
    monkeypatch.setattr(lm_teacher, "row_multiple", lambda: 16)
    states = lm_teacher.prepare(inputs, slice(0, len(TEXTS)))[0]
    assert states.shape[1] % 16 == 0 and len(states) == 16 > len(TEXTS)
    padded = outputs()
    for a, b in zip(plain, padded):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)


def test_lm_tokenizes_each_text_once_and_as_the_tokenizer_does(lm_teacher, monkeypatch):
    """The cached token ids give exactly the tokenizer's padded, truncated batch (with and without a
    token multiple); each distinct text goes to the tokenizer once; the cache is bounded."""
    from services.teacher_server.zoo import minilm

    tokenizer, asked = lm_teacher.tokenizer, []

    class Counting:  # the real tokenizer, recording the texts it is asked to encode
        def __call__(self, texts, **kwargs):
            asked.extend(texts)
            return tokenizer(texts, **kwargs)

        def __getattr__(self, name):
            return getattr(tokenizer, name)

    long_text = " ".join(["word"] * 200)  # past max_length (48 here): truncated
    texts = [*TEXTS, long_text, TEXTS[0], ""]
    monkeypatch.setattr(lm_teacher, "_token_cache", {})
    monkeypatch.setattr(lm_teacher, "tokenizer", Counting())
    for multiple in (None, 16):
        monkeypatch.setattr(lm_teacher, "token_multiple", lambda multiple=multiple: multiple)
        expected = tokenizer(texts, padding=True, truncation=True, max_length=lm_teacher.max_length,
                             pad_to_multiple_of=multiple, return_tensors="pt")
        for _ in range(2):
            input_ids, mask = lm_teacher.tokenize(texts)
            assert torch.equal(input_ids, expected["input_ids"]) and torch.equal(mask, expected["attention_mask"])
    assert sorted(asked) == sorted(set(texts))  # four calls, each distinct text encoded once
    monkeypatch.setattr(minilm, "TOKEN_CACHE_TEXTS", 3)
    monkeypatch.setattr(lm_teacher, "_token_cache", {})
    lm_teacher.tokenize(TEXTS)
    assert len(lm_teacher._token_cache) == 3
    input_ids, _ = lm_teacher.tokenize([*TEXTS, "Movie: Fargo"])  # one more than fits: the cache starts again
    assert len(lm_teacher._token_cache) == 1 and input_ids.shape[0] == 4


def test_lm_question_is_the_cls_token_after_layer_one(lm_teacher):
    question, *_ = lm_teacher.compute_predict({"text": TEXTS[:1]}, 1)
    batch = lm_teacher.tokenizer(TEXTS[:1], return_tensors="pt", truncation=True, max_length=48)
    with torch.no_grad():
        states = lm_teacher.bert(**batch, output_hidden_states=True).hidden_states
    assert torch.allclose(question, states[1][:, 0], atol=1e-6)  # hidden_states[1]: after layer 1


def test_lm_rejects_an_injection_layer_outside_the_encoder():
    from services.teacher_server.zoo import MiniLMTeacher

    with pytest.raises(ValueError, match="inject_layer"):
        MiniLMTeacher.pretrained("x", inject_layer=6)


def vjp_by_autograd(teacher, question, inputs, d_hidden, d_pred):
    q = question.clone().requires_grad_(True)
    prepared = teacher.prepare(inputs, slice(None))
    hidden, prediction = teacher.answer(q, prepared)
    (grad,) = torch.autograd.grad((hidden, prediction), q, (d_hidden, d_pred))
    return grad


@pytest.mark.parametrize("which", ["mlp", "lm"])
def test_vjp_equals_autograd_on_the_model(which, mlp_teacher, lm_teacher, synthetic_data):
    torch.manual_seed(1)
    teacher = mlp_teacher if which == "mlp" else lm_teacher
    inputs = {} if which == "mlp" else {"text": TEXTS}
    n = 6 if which == "mlp" else len(TEXTS)
    question = torch.randn(n, *teacher.spec.question_shape)
    d_hidden, d_pred = torch.randn(n, teacher.spec.hidden_size), torch.randn(n)
    grad = teacher.compute_answer_vjp(question, inputs, d_hidden, d_pred)
    assert torch.allclose(grad, vjp_by_autograd(teacher, question, inputs, d_hidden, d_pred), atol=1e-6)


def test_vjp_matches_finite_differences_in_float64(mlp_teacher):
    teacher = copy.deepcopy(mlp_teacher).double()
    torch.manual_seed(2)
    question = torch.randn(4, *teacher.spec.question_shape, dtype=torch.float64)
    d_hidden = torch.randn(4, teacher.spec.hidden_size, dtype=torch.float64)
    d_pred = torch.randn(4, dtype=torch.float64)
    grad = teacher.compute_answer_vjp(question, {}, d_hidden, d_pred)

    def objective(q):
        hidden, prediction = teacher.compute_answer(q, {})
        return float((hidden * d_hidden).sum() + (prediction * d_pred).sum())

    eps = 1e-6
    for _ in range(5):  # directional derivatives along random directions
        direction = torch.randn_like(question)
        numeric = (objective(question + eps * direction) - objective(question - eps * direction)) / (2 * eps)
        assert numeric == pytest.approx(float((grad * direction).sum()), rel=1e-6, abs=1e-8)


def test_vjp_with_one_cotangent_is_the_partial_gradient(mlp_teacher):
    question = torch.randn(3, *mlp_teacher.spec.question_shape)
    d_pred = torch.randn(3)
    only_pred = mlp_teacher.compute_answer_vjp(question, {}, None, d_pred)
    with_zero_hidden = mlp_teacher.compute_answer_vjp(question, {}, torch.zeros(3, mlp_teacher.spec.hidden_size), d_pred)
    assert torch.allclose(only_pred, with_zero_hidden)


def test_chunked_computation_equals_one_pass(mlp_teacher):
    question = torch.randn(50, *mlp_teacher.spec.question_shape)
    whole = mlp_teacher.compute_answer(question, {})
    chunked_teacher = copy.deepcopy(mlp_teacher)
    chunked_teacher.chunk_rows = 7
    chunked = chunked_teacher.compute_answer(question, {})
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(whole, chunked))
    d = torch.randn(50, mlp_teacher.spec.hidden_size)
    assert torch.allclose(
        mlp_teacher.compute_answer_vjp(question, {}, d, None), chunked_teacher.compute_answer_vjp(question, {}, d, None),
        atol=1e-6,
    )


def test_teachers_are_frozen(mlp_teacher, lm_teacher):
    for teacher in (mlp_teacher, lm_teacher):
        assert not teacher.training
        assert not any(p.requires_grad for p in teacher.parameters())
    assert isinstance(mlp_teacher, MLPTeacher)


def test_each_family_name_is_its_class_family_and_mlp_processes_never_import_transformers():
    assert {family: cls.family for family, cls in FAMILIES.items()} == {family: family for family in FAMILIES}
    # What an MLP teacher's server and a trainer import: no transformers (seconds of start-up per process).
    probe = ("import sys; import services.teacher_server.server, services.teacher_server.checkpoint, trainer.train, "
             "trainer.cli; from services.teacher_server.zoo import FAMILIES, MLPTeacher; FAMILIES['recsys-mlp']; "
             "print(sorted(m for m in ('transformers', 'open_clip') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
