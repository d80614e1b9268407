"""experiments/lm_budget_curve.py: test MSE against the LM's share of rows, for DiverseDistill and AEKD."""

import json
import subprocess
import sys

from conftest import REPO


def test_lm_budget_curve_runs_both_methods_per_share_and_aekd_alone_at_its_extra_shares(
        synthetic_dir, teacher_dirs, lm_teacher, tmp_path):
    """Real (short) runs on MLP-L + the pretrained MiniLM under a budget; then the same curve again
    from the finished runs alone (--report-only), with one run taken away."""
    from services.teacher_server.checkpoint import save_teacher

    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    (checkpoints / "mlp-l").symlink_to(teacher_dirs["mlp-l"])
    save_teacher(lm_teacher, checkpoints / "lm")
    command = [sys.executable, "experiments/lm_budget_curve.py", "--data", str(synthetic_dir),
               "--checkpoints", str(checkpoints), "--shares", "0.25", "--aekd-shares", "1", "--seeds", "0", "1",
               "--steps", "12", "--jobs", "2", "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]
    first = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    points = json.loads((tmp_path / "out" / "curve.json").read_text())["points"]
    assert [p["share"] for p in points["diversedistill"]] == [0.0, 0.25]
    assert [p["share"] for p in points["aekd"]] == [0.0, 0.25, 1.0]
    assert all(len(p["test_mse"]) == 2 and all(0 < m < 10 for m in p["test_mse"]) for p in points["aekd"])
    lines = (tmp_path / "out" / "curve.md").read_text().splitlines()
    assert any(line.startswith("| 100.0% |") and "| not run |" in line for line in lines)  # AEKD alone there
    assert (tmp_path / "out" / "curve.png").stat().st_size > 0

    (tmp_path / "runs" / "diversedistill-mlp-l-lm-lmbudget0.25-s1" / "result.json").unlink()
    again = subprocess.run([*command, "--report-only"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "train --" not in again.stdout
    row = next(line for line in (tmp_path / "out" / "curve.md").read_text().splitlines() if line.startswith("| 25.0% |"))
    assert "(1 of 2 seeds)" in row and "| nan | nan |" in row  # no paired test over one seed
