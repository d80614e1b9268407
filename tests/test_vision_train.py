"""The trainer on CIFAR-10 (--domain cifar10): the ViT student, training, and distillation from
served vision teachers (a ViT and a CLIP) over real gRPC, on a tiny JPEG archive."""

import json
import subprocess

import numpy as np
import pytest
import torch

from conftest import console_script, free_port, start_teacher_server, write_learnable_cifar
from services.teacher_server.checkpoint import save_teacher
from services.teacher_server.zoo import ViTTeacher
from trainer.methods import DistillConfig
from trainer.student import ViTStudent
from trainer.train import TrainConfig, Trainer


@pytest.fixture(autouse=True)
def one_torch_thread():
    """These tests train in this process while teacher servers compute beside it: two busy torch
    thread pools on two cores slow both down many times over."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_cifar(tmp_path_factory):
    return write_learnable_cifar(tmp_path_factory.mktemp("cifar") / "tiny-cifar.tar.gz")


def config(tiny_cifar, tmp_path, **overrides) -> TrainConfig:
    base = dict(domain="cifar10", data=str(tiny_cifar), steps=20, batch_size=16, eval_every=10,
                checkpoint_every=1000, device="cpu", cache_dir=None,
                distill=DistillConfig(gate_warmup=5))
    return TrainConfig(**{**base, **overrides})


def test_the_student_reads_x_and_h_where_the_vit_teacher_injects_and_answers():
    """Same weights: the student's x is the teacher's native question, h its answer, the logits equal."""
    torch.manual_seed(0)
    student = ViTStudent.build("vit-cifar-tiny").eval()
    teacher = ViTTeacher("same", student.vit)
    teacher.head.load_state_dict(student.head.state_dict())
    assert teacher.inject_layer == student.question_layer
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8))
    with torch.no_grad():
        out = student(images)
    question, hidden, prediction = teacher.freeze().compute_predict({"image": images}, 6)
    torch.testing.assert_close(out.x, question, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.h, hidden, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.prediction, prediction, rtol=1e-5, atol=1e-5)
    assert student.d_in == student.d_out == student.vit.config.hidden_size


def test_the_undistilled_student_learns_the_tiny_set(tiny_cifar, tmp_path):
    trainer = Trainer(config(tiny_cifar, tmp_path, method="none", steps=80), tmp_path / "run")
    before = trainer.evaluate(trainer.domain.test)
    for _ in range(80):
        trainer.train_step()
    after = trainer.evaluate(trainer.domain.test)
    assert trainer.domain.metric == "accuracy" and not trainer.domain.lower_is_better
    assert after > max(before, 0.3), (before, after)  # chance is 0.1
    assert trainer.student_lr(0) == pytest.approx(0.1) and trainer.student_lr(40) == pytest.approx(0.05)
    trainer.close()


def test_a_resumed_cifar_run_follows_the_uninterrupted_one(tiny_cifar, tmp_path):
    """SGD momentum and the cosine schedule survive a checkpoint: the same weights after 12 steps."""
    teacher = save_teacher(ViTTeacher.build("vit", "vit-cifar-tiny").freeze(), tmp_path / "vit")
    make = lambda run: Trainer(config(tiny_cifar, tmp_path, teachers=[f"local:{teacher}"], steps=12), tmp_path / run)  # noqa: E731
    straight = make("straight")
    for _ in range(12):
        straight.train_step()
    first = make("resumed")
    first.run.create({"config": first.config.to_dict(), "committee": first.identities()})
    for _ in range(6):
        first.train_step()
    first.save_checkpoint()
    first.close()
    second = make("resumed")
    second.restore()
    assert second.step == 6
    for _ in range(6):
        second.train_step()
    for key, value in straight.student.state_dict().items():
        torch.testing.assert_close(second.student.state_dict()[key], value, rtol=0, atol=0)
    straight.close()
    second.close()


def test_distils_from_served_vit_and_clip_teachers(tiny_cifar, tmp_path):
    pytest.importorskip("open_clip", reason="the CLIP teacher needs the vision extra (open_clip_torch)")
    from services.teacher_server.zoo import ClipTeacher

    torch.manual_seed(0)
    folders = [save_teacher(ViTTeacher.build("vit", "vit-cifar-tiny").freeze(), tmp_path / "vit"),
               save_teacher(ClipTeacher.build("clip", "clip-cifar-tiny").freeze(), tmp_path / "clip")]
    ports = [free_port() for _ in folders]
    servers = [start_teacher_server(folder, port) for folder, port in zip(folders, ports)]
    ddistill = console_script("ddistill")
    common = ["--domain", "cifar10", "--data", str(tiny_cifar), "--steps", "20", "--batch-size", "16",
              "--eval-every", "10", "--checkpoint-every", "10", "--device", "cpu",
              "--cache-dir", str(tmp_path / "cache")]
    try:
        runs = {}
        for method, teachers in (("none", []), ("diversedistill", ports), ("mt", ports)):
            runs[method] = tmp_path / method
            args = [a for port in teachers for a in ("--teacher", f"grpc://127.0.0.1:{port}")]
            result = subprocess.run(
                [ddistill, "--threads", "1", "train", "--method", method, *args, *common, "--gate-warmup", "5",
                 "--run-dir", str(runs[method])], capture_output=True, text=True, timeout=600)
            assert result.returncode == 0, result.stderr[-3000:]
    finally:
        for server in servers:
            server.terminate()
            server.wait(timeout=60)
    out = json.loads((runs["diversedistill"] / "result.json").read_text())
    assert out["metric"] == "accuracy" and 0.0 <= out["test_accuracy"] <= 1.0 and out["steps"] == 20
    assert set(out["teachers"]) == {"vit", "clip"} and all(out["rows_sent"][n] > 0 for n in ("vit", "clip"))
    assert all(out["rows_sent"][n] <= out["rows_possible"][n] == 20 * 16 for n in ("vit", "clip"))

    report = subprocess.run([ddistill, "eval", str(runs["diversedistill"]), "--base", str(runs["none"]), "--json"],
                            capture_output=True, text=True, timeout=120)
    report = json.loads(report.stdout)
    best = max(out["teachers"], key=out["teachers"].get)  # accuracy: higher is better
    assert report["best_teacher"] == {"name": best, "test_accuracy": out["teachers"][best]}
    base = json.loads((runs["none"] / "result.json").read_text())["test_accuracy"]
    if out["teachers"][best] > base:
        assert report["grr"] == pytest.approx((out["test_accuracy"] - base) / (out["teachers"][best] - base))
    else:  # tiny teachers may be no better than S_base: no gap to recover
        assert report["grr"] is None

    exported = subprocess.run([ddistill, "export", str(runs["diversedistill"]), "--out", str(tmp_path / "student")],
                              capture_output=True, text=True, timeout=120)
    assert exported.returncode == 0, exported.stderr[-2000:]
    from trainer.export import load_student

    student = load_student(tmp_path / "student")
    assert isinstance(student, ViTStudent)
    assert sum(p.numel() for p in student.parameters()) == sum(
        p.numel() for p in ViTStudent.build("vit-cifar-tiny").parameters())  # no Distillation Module inside
