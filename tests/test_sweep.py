"""experiments/sweep.py: each method tuned on validation only, its chosen config then run on the test seeds."""

import json
import shutil
import subprocess
import sys

import yaml
from conftest import REPO


def test_sweep_tunes_each_method_on_validation_and_writes_its_chosen_config(synthetic_dir, teacher_dirs, tmp_path):
    """Two methods, three trials each, from the shared space: every trial a real run, the chosen one the
    lowest validation MSE, written as a config that `ddistill train --config` takes; a second call trains
    nothing new."""
    checkpoints = teacher_dirs["mlp-l"].parent
    command = [sys.executable, "experiments/sweep.py", "--committee", "mlp-l", "mlp-m", "--methods", "mt",
               "diversedistill", "--trials", "3", "--data", str(synthetic_dir), "--checkpoints", str(checkpoints),
               "--steps", "20", "--teacher-budget", "mlp-m=0.5", "--runs-dir", str(tmp_path / "runs"),
               "--out", str(tmp_path / "out"), "--configs", str(tmp_path / "configs"), "--seeds", "0", "1",
               "--ledger", str(tmp_path / "ledger"), "--teacher-budget", "lm=0.1"]  # lm: not in the committee
    first = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "mlp-l-mlp-m-mlp-mbudget0.5.json").read_text())
    assert report["teachers"] == {t: yaml.safe_load((teacher_dirs[t] / "teacher.yaml").read_text())["weights_sha256"]
                                  for t in ("mlp-l", "mlp-m")}  # the teachers the choices were made with
    for method in ("mt", "diversedistill"):
        entry = report["methods"][method]
        assert len(entry["trials"]) == 3
        assert entry["chosen"]["valid_mse"] == min(t["valid_mse"] for t in entry["trials"])
        assert set(entry["chosen"]["params"]) >= {"--lr", "--alpha"}
        run = tmp_path / "runs" / "mlp-l-mlp-m-mlp-mbudget0.5" / f"{entry['chosen']['run']}-s0"
        assert json.loads((run / "result.json").read_text())["valid_mse"] == entry["chosen"]["valid_mse"]
        chosen = tmp_path / "configs" / f"mlp-l-mlp-m-mlp-mbudget0.5-{method}.yaml"
        from trainer.run_config import build_config, read_config_file

        config = build_config(read_config_file(chosen))
        assert config.method == method and config.distill.alpha == entry["chosen"]["params"]["--alpha"]
        assert config.teachers[1].endswith("?budget=0.5")
        seed1 = tmp_path / "runs" / "mlp-l-mlp-m-mlp-mbudget0.5" / f"{entry['chosen']['run']}-s1"
        seed1 = json.loads((seed1 / "result.json").read_text())  # the chosen config, run on the next seed
        assert entry["test"] == [json.loads((run / "result.json").read_text())["test_mse"], seed1["test_mse"]]
        assert seed1["seed"] == 1 and seed1["method"] == method
        for seed, test_mse in enumerate(entry["test"]):  # recorded under the name the tables give the run
            record = tmp_path / "ledger" / f"{entry['chosen']['run']}-s{seed}" / "result.json"
            assert json.loads(record.read_text())["test_mse"] == test_mse
    assert {"--beta", "--d-emb", "--d-m"} <= set(report["space"]["diversedistill"])
    text = (tmp_path / "out" / "mlp-l-mlp-m-mlp-mbudget0.5.md").read_text()
    assert "- vs mt: DiverseDistill" in text and "| 3 (" in text and " distinct) |" in text
    second = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0 and "train --method" not in second.stdout
    for method in ("mt", "diversedistill"):  # every trial is in the ledger, not only the chosen ones
        for trial in report["methods"][method]["trials"]:
            assert (tmp_path / "ledger" / f"{trial['run']}-s0" / "result.json").exists()

    # A fresh machine: the runs folder and the SQLite study are gone; the checkout's report and ledger
    # give every finished trial back, so nothing is trained and the same configs are chosen.
    shutil.rmtree(tmp_path / "runs")
    third = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0 and "train --method" not in third.stdout, third.stdout[-2000:]
    assert "mt: 3 of the 3 trials in" in third.stdout and "diversedistill: 3 of the 3 trials" in third.stdout
    again = json.loads((tmp_path / "out" / "mlp-l-mlp-m-mlp-mbudget0.5.json").read_text())
    for method in ("mt", "diversedistill"):
        assert again["methods"][method]["trials"] == report["methods"][method]["trials"]
        assert again["methods"][method]["chosen"] == report["methods"][method]["chosen"]
        assert again["methods"][method]["test"] == report["methods"][method]["test"]

    # The tables at the chosen settings (--tuned) take the sweep's runs from the ledger and train only the
    # cells no sweep ran: AEKD (not swept here, so at the trainer's defaults) and S_base.
    tables = subprocess.run([sys.executable, "experiments/movielens_tables.py", "--data", str(synthetic_dir),
                             "--checkpoints", str(checkpoints), "--seeds", "0", "1", "--steps", "20", "--tables", "4",
                             "--skip-teacher", "lm", "--teacher-budget", "mlp-m=0.5", "--tuned", str(tmp_path / "out"),
                             "--ledger", str(tmp_path / "ledger"), "--runs-dir", str(tmp_path / "tables"),
                             "--out", str(tmp_path / "tables-out")], cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    assert tables.returncode == 0, tables.stderr[-3000:]
    assert "train --method aekd" in tables.stdout
    assert "train --method mt" not in tables.stdout and "train --method diversedistill" not in tables.stdout
    cells = json.loads((tmp_path / "tables-out" / "movielens.json").read_text())["cells"]
    for method in ("mt", "diversedistill"):
        entry = report["methods"][method]
        assert cells[entry["chosen"]["run"]]["test_mse"] == entry["test"]
        assert cells[entry["chosen"]["run"]]["tuned_from"] == "MLP-L + MLP-M (MLP-M at 50.0%)"
    assert cells["aekd-mlp-l-mlp-m-mlp-mbudget0.5"]["params"] == {}
    text = (tmp_path / "tables-out" / "movielens.md").read_text()
    assert "| aekd | MLP-L + MLP-M | trainer defaults | not tuned (no sweep of this method) |" in text
