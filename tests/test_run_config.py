"""Run configs in files (trainer.run_config): flags on top, round trips, clear refusals."""

import json
import shutil
import subprocess

import pytest
import yaml

from conftest import REPO, console_script
from test_train_run import SMALL, ddistill
from trainer.run_config import ConfigError, build_config, read_config_file, with_overrides


def test_a_runs_own_config_yaml_reproduces_the_run(synthetic_dir, teacher_dirs, tmp_path):
    """Train with flags, then train again from the first run's config.yaml alone: the same run."""
    first = json.loads(ddistill("train", "--teacher", f"local:{teacher_dirs['mlp-m']}",
                                "--teacher", f"local:{teacher_dirs['mlp-l']}?budget=0.25", "--data", synthetic_dir,
                                "--run-dir", tmp_path / "a", *SMALL, "--seed", "2", "--alpha", "0.7").stdout)
    second = json.loads(ddistill("train", "--config", tmp_path / "a" / "config.yaml", "--run-dir", tmp_path / "b").stdout)
    for key in ("test_mse", "valid_mse", "rows_sent", "rows_possible", "budgets", "steps"):
        assert first[key] == second[key], key
    assert second["budgets"] == {"mlp-m": None, "mlp-l": 0.25}
    assert second["rows_sent"]["mlp-l"] == 120 * 16 // 4  # the budget held at every step
    saved = [yaml.safe_load((tmp_path / run / "config.yaml").read_text())["config"] for run in ("a", "b")]
    assert saved[0] == saved[1]


def test_flags_override_the_file_field_by_field(synthetic_dir, teacher_dirs, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "method": "ld", "teachers": [f"local:{teacher_dirs['mlp-l']}"], "data": str(synthetic_dir),
        "steps": 40, "batch_size": 16, "eval_every": 20, "device": "cpu", "distill": {"alpha": 0.3, "beta": 0.2},
    }))
    result = json.loads(ddistill("train", "--config", config, "--steps", "20", "--alpha", "0.9",
                                 "--run-dir", tmp_path / "r").stdout)
    assert result["steps"] == 20 and result["method"] == "ld"
    saved = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())["config"]
    assert saved["distill"]["alpha"] == 0.9 and saved["distill"]["beta"] == 0.2 and saved["batch_size"] == 16


@pytest.mark.parametrize("config, says", [
    ({"stepz": 10}, "config: stepz: unknown setting; known here: method, teachers"),
    ({"distill": {"alpah": 1.0}}, "config: distill.alpah: unknown setting; known here: alpha, beta"),
    ({"distill": {"dm": {"d_emb": "wide"}}}, "config: distill.dm.d_emb: Input should be a valid integer"),
    ({"steps": [1]}, "config: steps: Input should be a valid integer"),
    ({"method": "xkd"}, "unknown method 'xkd'; expected one of"),
    ({"teachers": "local:x"}, "config: teachers: Input should be a valid list"),
    ({"method": "ld", "teachers": ["http://host:1"]}, "expected local:CHECKPOINT_DIR, grpc://HOST:PORT or grpcs://"),
    ({"method": "ld", "teachers": ["grpc://host"]}, "give a port"),
    ({"method": "ld", "teachers": ["grpc://host:1?budget=1.5"]}, "budget must be in (0, 1]"),
    ({"method": "ld", "teachers": ["grpc://host:1?colour=red"]}, "unknown option(s) ['colour']"),
    ({"method": "ld", "teachers": ["local:/no/such/teacher"]}, "holds no teacher checkpoint (teacher.yaml)"),
    ({"method": "none", "distill": {"budget": 0}}, "distill.budget (--budget): budget must be in (0, 1]"),
    ({"method": "none", "faults": {"on_failure": "pray"}}, "on_failure must be wait or skip"),
])
def test_a_bad_config_is_refused_naming_the_field(config, says):
    with pytest.raises((ConfigError, FileNotFoundError)) as refused:
        build_config(config)
    assert says in str(refused.value)


def test_the_cli_refuses_a_bad_config_in_one_line_before_loading_anything(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("teachers: [local:/no/such/teacher]\ndistill: {gate: best}\n")
    out = subprocess.run([console_script("ddistill"), "train", "--config", str(config), "--run-dir", str(tmp_path / "r"),
                          "--data", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "holds no teacher checkpoint" in out.stderr or "gate must be one of" in out.stderr
    assert not (tmp_path / "r").exists()
    config.write_text("- not a mapping\n")
    out = subprocess.run([console_script("ddistill"), "train", "--config", str(config), "--run-dir", str(tmp_path / "r")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "a run config is a mapping of settings" in out.stderr


def test_shipped_configs_are_valid(tmp_path, teacher_dirs, monkeypatch):
    """Every configs/*.yaml builds (teacher checkpoints stood in by the tests' small ones)."""
    for name in ("mlp-m", "mlp-l", "lm", "vit", "clip"):
        shutil.copytree(teacher_dirs["mlp-l"], tmp_path / "checkpoints" / name)
    monkeypatch.chdir(tmp_path)
    shipped = sorted((REPO / "configs").glob("*.yaml"))
    assert len(shipped) >= 4
    for path in shipped:
        config = build_config(read_config_file(path), source=path.name)
        assert config.teachers and config.data, path.name


def test_overrides_make_the_nested_fields_they_name():
    assert with_overrides({"distill": {"alpha": 1}}, {"distill.dm.d_m": 8, "steps": 3}) == {
        "distill": {"alpha": 1, "dm": {"d_m": 8}}, "steps": 3}
