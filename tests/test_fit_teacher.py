"""``ddistill fit-teacher``: it learns, it saves a servable checkpoint, and the CLI says what it did."""

import json
import subprocess

import numpy as np
import pytest
import torch

from conftest import console_script
from services.teacher_server.checkpoint import load_teacher
from services.teacher_server.client import LocalTeacher
from trainer.data.inputs import MovieLensInputs
from trainer.data.movielens import VALID_FRACTION
from trainer.evaluation import endpoint_mse, rating_mse
from trainer.fit_teacher import LMFitConfig, MLPFitConfig, fit_teacher


def global_mean_mse(data) -> float:
    return rating_mse(np.full(len(data.test), data.train.rating.mean()), data.test.rating)


def test_mlp_teacher_learns_real_movielens(ml100k):
    """Two epochs of MLP-M on ml-100k already beat predicting the mean by a wide margin."""
    result = fit_teacher("mlp-m", ml100k, seed=0, config=MLPFitConfig(max_epochs=2))
    baseline = global_mean_mse(ml100k)  # 1.27 on this split
    assert result.report["test_mse"] < baseline - 0.2
    assert result.report["test_mse"] == pytest.approx(
        endpoint_mse(LocalTeacher(result.teacher), MovieLensInputs(ml100k, ml100k.train), ml100k.test), abs=1e-6
    )


def test_fit_is_reproducible_by_seed(synthetic_data):
    a = fit_teacher("mlp-m", synthetic_data, seed=3, config=MLPFitConfig(max_epochs=2, embed_dim=8))
    b = fit_teacher("mlp-m", synthetic_data, seed=3, config=MLPFitConfig(max_epochs=2, embed_dim=8))
    assert a.report["test_mse"] == b.report["test_mse"]
    for (k, x), (_, y) in zip(a.teacher.state_dict().items(), b.teacher.state_dict().items()):
        assert torch.equal(x, y), k


@pytest.mark.parametrize("bf16", [False, True])
def test_lm_fit_moves_its_loss_and_saves_a_servable_teacher(synthetic_data, tmp_path, bf16):
    """A few steps on the real pretrained encoder: the run is bounded and the head learns the scale
    (under bfloat16 autocast too, whose weights stay float32)."""
    from services.teacher_server.checkpoint import save_teacher

    config = LMFitConfig(max_steps=12, batch_size=16, eval_every=6, eval_rows=64, warmup_steps=1, head_lr=1e-2,
                         bf16=bf16)
    result = fit_teacher("lm", synthetic_data, seed=0, config=config)
    assert result.report["steps"] == 12 and result.report["valid_rows"] == 64
    assert result.report["recipe"]["bf16"] == bf16
    assert {p.dtype for p in result.teacher.parameters()} == {torch.float32}
    assert result.report["test_mse"] < 3.0  # a random head on the 1-5 scale is far off; this one is on scale
    folder = save_teacher(result.teacher, tmp_path / "lm", {"fit": result.report})
    served = LocalTeacher(load_teacher(folder))
    fit_rows = synthetic_data.split_validation(VALID_FRACTION, 0)[0]
    assert endpoint_mse(served, MovieLensInputs(synthetic_data, fit_rows), synthetic_data.test) == pytest.approx(
        result.report["test_mse"], abs=1e-5
    )


def test_unknown_kind_is_refused(synthetic_data):
    with pytest.raises(ValueError, match="unknown teacher kind"):
        fit_teacher("mlp-xl", synthetic_data)


def test_cli_fits_from_train_test_files_and_writes_a_checkpoint(synthetic_dir, tmp_path):
    out = tmp_path / "teacher"
    result = subprocess.run(
        [console_script("ddistill"), "--threads", "1", "fit-teacher", "--kind", "mlp-l", "--train", str(synthetic_dir / "ua.base"),
         "--test", str(synthetic_dir / "ua.test"), "--out", str(out), "--max-epochs", "2", "--device", "cpu"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["checkpoint"] == str(out) and report["kind"] == "mlp-l" and "ua.base" in report["data"]
    teacher = load_teacher(out)
    assert teacher.spec.name == "mlp-l" and teacher.spec.hidden_size == 512


def test_cli_rejects_mixed_data_flags(synthetic_dir, tmp_path):
    result = subprocess.run(
        [console_script("ddistill"), "fit-teacher", "--kind", "mlp-m", "--data", str(synthetic_dir), "--train",
         str(synthetic_dir / "ua.base"), "--out", str(tmp_path / "x")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0 and "not both" in result.stderr
