"""experiments/cifar10_tables.py: the CIFAR-10 cells on tiny ViT and CLIP teachers."""

import json
import subprocess
import sys

import pytest

from conftest import REPO, write_learnable_cifar


def test_cifar10_tables_script_runs_every_cell(tmp_path):
    import torch

    pytest.importorskip("open_clip", reason="the CLIP teacher needs the vision extra (open_clip_torch)")
    from services.teacher_server.checkpoint import save_teacher
    from services.teacher_server.zoo import ClipTeacher, ViTTeacher

    torch.manual_seed(0)
    save_teacher(ViTTeacher.build("vit", "vit-cifar-tiny").freeze(), tmp_path / "checkpoints" / "vit")
    save_teacher(ClipTeacher.build("clip", "clip-cifar-tiny").freeze(), tmp_path / "checkpoints" / "clip")
    command = [sys.executable, "experiments/cifar10_tables.py", "--data",
               str(write_learnable_cifar(tmp_path / "tiny.tar.gz", n_train=20, n_test=5)),
               "--checkpoints", str(tmp_path / "checkpoints"), "--seeds", "0", "1", "--steps", "8",
               "--batch-size", "16", "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "out"),
               "--alpha-sweep", "0.5", "--jobs", "2", "--", "--gate-warmup", "4", "--cache-dir", str(tmp_path / "cache")]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "cifar10.json").read_text())
    assert set(report["cells"]) == {"ld-vit", "fd-vit", "fd-vit-alpha0.05", "mt-vit-clip", "diversedistill-vit-clip",
                                    "diversedistill-vit-clip-alpha0.05"}
    assert (tmp_path / "runs" / "diversedistill-vit-clip-alpha0.5-s0" / "result.json").is_file()  # the sweep: seed 0
    assert not (tmp_path / "runs" / "diversedistill-vit-clip-alpha0.5-s1").exists()
    for cell in report["cells"].values():
        assert len(cell["test_accuracy"]) == 2 and all(0 <= a <= 1 for a in cell["test_accuracy"])
    text = (tmp_path / "out" / "cifar10.md").read_text()
    assert "Paired t-test" in text and "paper: MT -12.5%" in text and "| 0.5 |" in text
    assert (tmp_path / "out" / "cifar10_grr.png").stat().st_size > 0
