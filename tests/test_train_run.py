"""Whole runs through the CLI: local and served teachers, resume after SIGKILL, eval, export, baselines."""

import json
import os
import signal
import subprocess

import pytest
import torch
import yaml

from conftest import console_script, free_port, start_teacher_server, wait_for
from trainer.export import load_student
from trainer.models import build_recsys_mlp
from trainer.run_dir import RunDir
from trainer.student import RecsysStudent

SMALL = ["--steps", "120", "--batch-size", "16", "--d-emb", "16", "--d-m", "8", "--gate-warmup", "40",
         "--eval-every", "40", "--checkpoint-every", "40", "--device", "cpu"]


def ddistill(*args, timeout=600, check=True):
    result = subprocess.run([console_script("ddistill"), "--threads", "1", *map(str, args)], capture_output=True, text=True,
                            timeout=timeout)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_train_local_then_eval_and_export(synthetic_dir, teacher_dirs, tmp_path):
    run = tmp_path / "dd"
    out = ddistill("train", "--teacher", f"local:{teacher_dirs['mlp-m']}", "--teacher", f"local:{teacher_dirs['mlp-l']}",
                   "--data", synthetic_dir, "--run-dir", run, *SMALL)
    result = json.loads(out.stdout)
    assert result["steps"] == 120 and set(result["teachers"]) == {"mlp-m", "mlp-l"}
    assert 0 <= result["rows_saved/all"] < 1 and sum(result["rows_possible"].values()) == 2 * 120 * 16
    metrics = RunDir(run).read_metrics()
    assert [m["step"] for m in metrics if "valid_mse" in m] == [40, 80, 120]
    assert list((run / "tb").iterdir())  # TensorBoard events were written
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert [c["name"] for c in config["committee"]] == ["mlp-m", "mlp-l"]
    assert all(len(c["weights_sha256"]) == 64 for c in config["committee"])

    base = tmp_path / "base"
    ddistill("train", "--method", "none", "--data", synthetic_dir, "--run-dir", base, *SMALL)
    report = json.loads(ddistill("eval", run, "--base", base, "--json").stdout)
    assert report["test_mse"] == result["test_mse"] and set(report["teachers"]) == {"mlp-m", "mlp-l"}
    assert report["teachers"]["mlp-l"] == pytest.approx(
        yaml.safe_load((teacher_dirs["mlp-l"] / "teacher.yaml").read_text())["metadata"]["fit"]["test_mse"]
    )
    assert "grr" in report and report["base_test_mse"] == RunDir(base).read_result()["test_mse"]
    text = ddistill("eval", run, "--base", base).stdout
    assert "gap recovery rate" in text and "teacher mlp-l" in text
    # The answer probe: every validation row asked of every teacher, numbers that say why a run helps or not.
    assert set(report["answers"]) == {"mlp-m", "mlp-l"}
    for probe in report["answers"].values():
        assert probe["student"] == pytest.approx(result["valid_mse"])
        assert 0 < probe["teacher"] < 5 and 0 < probe["answer"] < 5
        assert 0 <= probe["answer_beats_student"] <= 1 and 0 <= probe["teacher_beats_student"] <= 1
        assert 0 <= probe["gated_in"] <= 1
        assert 0 < probe["importance_mean"] < 1 and 0 <= probe["importance_auc"] <= 1
    assert "answers of mlp-l on validation rows" in text

    exported = tmp_path / "student"
    ddistill("export", run, "--out", exported)
    student = load_student(exported)
    assert set((exported).iterdir()) == {exported / "student.safetensors", exported / "student.yaml"}
    undistilled = load_student(base / "student")
    assert student.state_dict().keys() == undistilled.state_dict().keys()
    assert sum(p.numel() for p in student.parameters()) == sum(p.numel() for p in undistilled.parameters())
    user, item = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])
    assert torch.equal(student.predict(user, item), load_student(run / "student").predict(user, item))


def test_a_diverging_run_stops_cleanly_and_says_so(synthetic_dir, tmp_path):
    """A learning rate that overflows the student: the run stops before the bad update, keeps its
    result and metrics, says why, and exits 3 (not a traceback, not a NaN checkpoint)."""
    run = tmp_path / "diverged"
    out = ddistill("train", "--method", "none", "--lr", "1e38", "--data", synthetic_dir, "--run-dir", run, *SMALL,
                   check=False)
    assert out.returncode == 3, out.stderr[-2000:]
    assert "training diverged at step 2" in out.stderr and "Traceback" not in out.stderr
    result = RunDir(run).read_result()
    assert result["diverged_at_step"] == 1 and result["steps"] == 1
    assert {"step": 1, "diverged": 1.0} in RunDir(run).read_metrics()


def test_train_against_a_served_teacher(synthetic_dir, teacher_dirs, tmp_path):
    port = free_port()
    # its kept graphs expire at once: every AnswerVJP is sent again in full, and the trainer says so
    server = start_teacher_server(teacher_dirs["mlp-l"], port, "--graph-ttl", "1e-9")
    try:
        # the paper's questions with the disagreement target: the teachers' Predict outputs are read for the
        # target alone, over gRPC for the served teacher
        out = ddistill("train", "--teacher", f"grpc://127.0.0.1:{port}", "--teacher",
                       f"local:{teacher_dirs['mlp-m']}", "--data", synthetic_dir, "--run-dir", tmp_path / "r", *SMALL,
                       "--anchor", "mean", "--importance", "disagreement", "--gate", "shuffled")
        result = json.loads(out.stdout)
        assert set(result["teachers"]) == {"mlp-l", "mlp-m"} and result["rows_sent"]["mlp-l"] > 0
        assert all(0 <= probe["importance_auc"] <= 1 for probe in result["answers"].values())
        committee = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())["committee"]
        assert committee[0]["url"] == f"grpc://127.0.0.1:{port}"
        metrics = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
        missed = [m["graphs_missed/mlp-l"] for m in metrics if "graphs_missed/mlp-l" in m]
        assert missed and set(missed) == {1.0} and not any("graphs_missed/mlp-m" in m for m in metrics)
        assert out.stderr.count("AnswerVJPs found the graph their Answer left on the server gone") == 1
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_seed_gives_the_same_run_with_teachers_in_process_or_served(synthetic_dir, teacher_dirs, tmp_path):
    """The same seed, MLP-L once in-process and once behind a teacher-server: the same student to the
    last digit, the same rows sent (the teachers answer bit for bit alike; the student's initialisation
    must not depend on which kind of endpoint drew from the RNG first)."""
    port = free_port()
    server = start_teacher_server(teacher_dirs["mlp-l"], port)
    try:
        results = {}
        for kind, url in (("local", f"local:{teacher_dirs['mlp-l']}"), ("served", f"grpc://127.0.0.1:{port}")):
            out = ddistill("train", "--teacher", url, "--teacher", f"local:{teacher_dirs['mlp-m']}",
                           "--data", synthetic_dir, "--run-dir", tmp_path / kind, *SMALL, "--seed", "3")
            results[kind] = json.loads(out.stdout)
    finally:
        server.terminate()
        server.wait(timeout=30)
    local, served = results["local"], results["served"]
    assert local["rows_sent"] == served["rows_sent"] and 0 < local["rows_sent"]["mlp-l"] < 120 * 16
    assert local["test_mse"] == served["test_mse"] and local["valid_mse"] == served["valid_mse"]


def disagreement(run, teacher_dir, data) -> float:
    """Mean squared difference between a run's student and a teacher on the test rows."""
    from services.teacher_server.checkpoint import load_teacher
    from services.teacher_server.client import LocalTeacher
    from trainer.data.inputs import MovieLensInputs
    from trainer.evaluation import endpoint_predictions

    student = load_student(run / "student")
    ours = student.predict(torch.as_tensor(data.test.user), torch.as_tensor(data.test.item)).detach()
    theirs = endpoint_predictions(LocalTeacher(load_teacher(teacher_dir)), MovieLensInputs(data, data.train), data.test)
    return float(((ours - theirs) ** 2).mean())


@pytest.mark.parametrize("method", ["ld", "mt", "aekd"])
def test_logit_baselines_pull_the_student_towards_the_teachers(method, synthetic_dir, synthetic_data, teacher_dirs,
                                                                tmp_path):
    teachers = ["--teacher", f"local:{teacher_dirs['mlp-l']}"]
    if method in ("mt", "aekd"):
        teachers += ["--teacher", f"local:{teacher_dirs['mlp-l']}"]  # two copies: any weighting gives that teacher
    ddistill("train", "--method", method, *teachers, "--data", synthetic_dir, "--run-dir", tmp_path / method,
             *SMALL, "--alpha", "5")
    ddistill("train", "--method", "none", "--data", synthetic_dir, "--run-dir", tmp_path / "none", *SMALL)
    result = RunDir(tmp_path / method).read_result()
    assert result["method"] == method
    # unbudgeted baselines read every row's teacher output: their spend is every row
    assert result["rows_saved/all"] == 0.0 and result["rows_sent"] == result["rows_possible"]
    distilled = disagreement(tmp_path / method, teacher_dirs["mlp-l"], synthetic_data)
    plain = disagreement(tmp_path / "none", teacher_dirs["mlp-l"], synthetic_data)
    assert distilled < 0.5 * plain


def test_feature_distillation_learns_to_predict_the_teachers_features(synthetic_dir, teacher_dirs, tmp_path):
    ddistill("train", "--method", "fd", "--teacher", f"local:{teacher_dirs['mlp-l']}", "--data", synthetic_dir,
             "--run-dir", tmp_path / "fd", *SMALL)
    losses = [m["loss/distill"] for m in RunDir(tmp_path / "fd").read_metrics() if "loss/distill" in m]
    assert len(losses) == 3 and losses[-1] < 0.8 * losses[0]


def test_resume_after_sigkill_or_sigterm_gives_the_uninterrupted_result(synthetic_dir, teacher_dirs, tmp_path):
    args = ["--teacher", f"local:{teacher_dirs['mlp-l']}", "--data", synthetic_dir, "--steps", "400",
            "--batch-size", "16", "--d-emb", "16", "--d-m", "8", "--gate-warmup", "100", "--eval-every", "100",
            "--checkpoint-every", "100", "--device", "cpu", "--seed", "3"]
    whole = json.loads(ddistill("train", *args, "--run-dir", tmp_path / "whole").stdout)

    run = tmp_path / "killed"
    process = subprocess.Popen([console_script("ddistill"), "--threads", "1", "train", *map(str, args), "--run-dir", str(run)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert wait_for(lambda: RunDir(run).latest_checkpoint() is not None, timeout=300)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (run / "result.json").exists(), "the run finished before it could be killed"
    killed_at = json.loads((RunDir(run).latest_checkpoint() / "state.json").read_text())["step"]
    assert 0 < killed_at < 400

    resumed = json.loads(ddistill("train", "--resume", run).stdout)
    for key in ("test_mse", "valid_mse", "rows_sent", "rows_possible", "teachers"):
        assert resumed[key] == whole[key], key
    steps = [m["step"] for m in RunDir(run).read_metrics() if "valid_mse" in m]
    assert steps == [100, 200, 300, 400]  # nothing logged twice, nothing lost

    # SIGTERM (a scheduler's preemption, a deadline): the run stops after the step it is in and checkpoints
    # it, whatever --checkpoint-every says, so a resume loses no steps. (checkpoint_every changes no result.)
    run = tmp_path / "stopped"
    command = [console_script("ddistill"), "--threads", "1", "train", *map(str, args), "--checkpoint-every", "1000",
               "--run-dir", str(run)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert wait_for(lambda: (run / "metrics.jsonl").is_file() and RunDir(run).read_metrics(), timeout=300)
    process.send_signal(signal.SIGTERM)
    stderr = process.communicate(timeout=300)[1]
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    stopped_at = json.loads((RunDir(run).latest_checkpoint() / "state.json").read_text())["step"]
    assert 0 < stopped_at < 400 and f"stopped by SIGTERM after step {stopped_at}, checkpointed" in stderr
    assert not (run / "result.json").exists()
    resumed = json.loads(ddistill("train", "--resume", run).stdout)
    for key in ("test_mse", "valid_mse", "rows_sent", "rows_possible", "teachers"):
        assert resumed[key] == whole[key], key


def test_resume_refuses_a_different_committee(synthetic_dir, teacher_dirs, tmp_path):
    run = tmp_path / "r"
    ddistill("train", "--teacher", f"local:{teacher_dirs['mlp-l']}", "--data", synthetic_dir, "--run-dir", run,
             *SMALL)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["config"]["teachers"] = [f"local:{teacher_dirs['mlp-m']}"]  # someone swapped the teacher
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    out = ddistill("train", "--resume", run, check=False)
    assert out.returncode != 0 and "refusing to resume" in out.stderr


@pytest.mark.parametrize("edit", ["lacks a setting", "has an unknown setting"])
def test_resume_refuses_a_run_made_by_another_version(edit, synthetic_dir, tmp_path):
    run = tmp_path / "r"
    ddistill("train", "--method", "none", "--data", synthetic_dir, "--run-dir", run, *SMALL)
    config = yaml.safe_load((run / "config.yaml").read_text())
    if edit == "lacks a setting":  # an older ddistill: resuming would take today's default silently
        del config["config"]["distill"]["anchor"]
    else:
        config["config"]["distill"]["sharpness"] = 2.0
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    out = ddistill("train", "--resume", run, check=False)
    assert out.returncode != 0 and "refusing to resume" in out.stderr
    assert ("distill.anchor" if edit == "lacks a setting" else "sharpness") in out.stderr


def test_a_new_run_does_not_overwrite_an_old_one(synthetic_dir, tmp_path):
    run = tmp_path / "r"
    ddistill("train", "--method", "none", "--data", synthetic_dir, "--run-dir", run, *SMALL)
    out = ddistill("train", "--method", "none", "--data", synthetic_dir, "--run-dir", run, *SMALL, check=False)
    assert out.returncode != 0 and "already holds a run" in out.stderr


def test_exported_student_is_the_size_of_a_plain_one(synthetic_data, tmp_path):
    from trainer.export import save_student

    student = RecsysStudent(build_recsys_mlp(synthetic_data, synthetic_data.train, (128, 64)))
    folder = save_student(student, tmp_path / "s")
    tensor_bytes = sum(t.numel() * t.element_size() for t in student.state_dict().values())
    size = (folder / "student.safetensors").stat().st_size
    assert tensor_bytes < size < tensor_bytes + 16_384  # the student's own tensors and a header, nothing else
