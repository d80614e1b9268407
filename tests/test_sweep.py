"""experiments/sweep.py: each method tuned on validation only, its chosen config then run on the test seeds."""

import json
import subprocess
import sys

from conftest import REPO


def test_sweep_tunes_each_method_on_validation_and_writes_its_chosen_config(synthetic_dir, teacher_dirs, tmp_path):
    """Two methods, three trials each, from the shared space: every trial a real run, the chosen one the
    lowest validation MSE, written as a config that `ddistill train --config` takes; a second call trains
    nothing new."""
    checkpoints = teacher_dirs["mlp-l"].parent
    command = [sys.executable, "experiments/sweep.py", "--committee", "mlp-l", "mlp-m", "--methods", "mt",
               "diversedistill", "--trials", "3", "--data", str(synthetic_dir), "--checkpoints", str(checkpoints),
               "--steps", "20", "--teacher-budget", "mlp-m=0.5", "--runs-dir", str(tmp_path / "runs"),
               "--out", str(tmp_path / "out"), "--configs", str(tmp_path / "configs"), "--seeds", "0", "1"]
    first = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "mlp-l-mlp-m-mlp-mbudget0.5.json").read_text())
    for method in ("mt", "diversedistill"):
        entry = report["methods"][method]
        assert len(entry["trials"]) == 3
        assert entry["chosen"]["valid_mse"] == min(t["valid_mse"] for t in entry["trials"])
        assert set(entry["chosen"]["params"]) >= {"--lr", "--alpha"}
        run = tmp_path / "runs" / "mlp-l-mlp-m-mlp-mbudget0.5" / entry["chosen"]["run"]
        assert json.loads((run / "result.json").read_text())["valid_mse"] == entry["chosen"]["valid_mse"]
        chosen = tmp_path / "configs" / f"mlp-l-mlp-m-mlp-mbudget0.5-{method}.yaml"
        from trainer.run_config import build_config, read_config_file

        config = build_config(read_config_file(chosen))
        assert config.method == method and config.distill.alpha == entry["chosen"]["params"]["--alpha"]
        assert config.teachers[1].endswith("?budget=0.5")
        seed1 = tmp_path / "runs" / "mlp-l-mlp-m-mlp-mbudget0.5" / f"tuned-{entry['chosen']['run']}-s1"
        seed1 = json.loads((seed1 / "result.json").read_text())  # the chosen config, run on the next seed
        assert entry["test"] == [json.loads((run / "result.json").read_text())["test_mse"], seed1["test_mse"]]
        assert seed1["seed"] == 1 and seed1["method"] == method
    assert {"--beta", "--d-emb", "--d-m"} <= set(report["space"]["diversedistill"])
    assert "- vs mt: DiverseDistill" in (tmp_path / "out" / "mlp-l-mlp-m-mlp-mbudget0.5.md").read_text()
    second = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0 and "train --method" not in second.stdout
