"""Checks of the CUDA paths (skipped without a GPU: run them on a GPU machine with
``pytest tests/test_gpu.py``). CI has no GPU; these caught a trainer that mixed a teacher's
CUDA results with CPU targets, which no CPU test can."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_local_teacher_on_the_gpu_answers_on_the_cpu_like_a_server(teacher_dirs, synthetic_data):
    from services.teacher_server.checkpoint import load_teacher
    from services.teacher_server.client import LocalTeacher
    from trainer.data.inputs import MovieLensInputs

    gpu, cpu = (LocalTeacher(load_teacher(teacher_dirs["mlp-l"], device=d)) for d in ("cuda", "cpu"))
    inputs = MovieLensInputs(synthetic_data, synthetic_data.train)
    raw = inputs.for_spec(gpu.spec, synthetic_data.train, slice(0, 32), for_answer=False)
    predicted = gpu.predict(raw)
    assert {t.device.type for t in predicted} == {"cpu"}
    torch.testing.assert_close(predicted.prediction, cpu.predict(raw).prediction, rtol=1e-4, atol=1e-4)
    question = predicted.question.cuda()  # the trainer's questions live on its device
    answer_raw = inputs.for_spec(gpu.spec, synthetic_data.train, slice(0, 32), for_answer=True)
    assert gpu.answer(question, answer_raw).hidden.device.type == "cpu"
    grad = gpu.answer_vjp(question, answer_raw, prediction_cotangent=torch.ones(32))
    assert grad.device.type == "cpu" and torch.isfinite(grad).all()


@pytest.mark.parametrize("method, trainer, teacher_query", [
    ("diversedistill", "cuda", ""), ("ld", "cuda", ""),
    ("diversedistill", "cpu", "?device=cuda"),  # the student on the CPU, the teacher on the GPU
])
def test_training_with_the_gpu(method, trainer, teacher_query, synthetic_dir, teacher_dirs, tmp_path):
    run = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "trainer.cli", "train", "--method", method, "--device", trainer,
         "--teacher", f"local:{teacher_dirs['mlp-l']}{teacher_query}", "--data", str(synthetic_dir),
         "--steps", "40", "--run-dir", str(run)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((run / "result.json").read_text())
    assert 0 < result["test_mse"] < 3 and set(result["teachers"]) == {"mlp-l"}


def test_fitting_the_lm_on_the_gpu(synthetic_dir, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "trainer.cli", "fit-teacher", "--kind", "lm", "--data", str(synthetic_dir),
         "--device", "cuda", "--bf16", "--max-steps", "5", "--out", str(tmp_path / "lm")],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert 0 < json.loads(done.stdout)["test_mse"] < 5
