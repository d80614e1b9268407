"""Teacher checkpoints: exact round trips, and clear errors for every way a folder can be wrong."""

import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import TEXTS, console_script, free_port
from services.teacher_server.checkpoint import (
    SPEC_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    file_sha256,
    load_teacher,
    save_teacher,
)
from services.teacher_server.client import RemoteTeacher


@pytest.fixture(scope="module")
def mlp_checkpoint(tmp_path_factory, mlp_teacher):
    return save_teacher(mlp_teacher, tmp_path_factory.mktemp("ckpt") / "mlp", {"fit": {"test_mse": 1.0}})


def test_mlp_round_trip_is_exact(mlp_checkpoint, mlp_teacher):
    loaded = load_teacher(mlp_checkpoint)
    assert loaded.spec == mlp_teacher.spec.replace(weights_sha256=file_sha256(mlp_checkpoint / WEIGHTS_FILE))
    question = torch.randn(5, *mlp_teacher.spec.question_shape)
    for a, b in zip(loaded.compute_answer(question, {}), mlp_teacher.compute_answer(question, {})):
        assert torch.equal(a, b)
    ids = torch.tensor([[1, 2], [3, 4]])
    for a, b in zip(loaded.compute_predict({"ids": ids}, 2), mlp_teacher.compute_predict({"ids": ids}, 2)):
        assert torch.equal(a, b)  # side tables and history travelled too


def test_lm_round_trip_is_exact_and_self_contained(tmp_path, lm_teacher):
    folder = save_teacher(lm_teacher, tmp_path / "lm")
    assert (folder / "tokenizer").is_dir()
    loaded = load_teacher(folder, name="renamed")
    assert loaded.spec.name == "renamed"
    question = torch.randn(len(TEXTS), 384)
    for a, b in zip(loaded.compute_answer(question, {"text": TEXTS}), lm_teacher.compute_answer(question, {"text": TEXTS})):
        assert torch.equal(a, b)


def test_description_is_readable_yaml(mlp_checkpoint):
    description = yaml.safe_load((mlp_checkpoint / SPEC_FILE).read_text())
    assert description["family"] == "recsys-mlp" and description["metadata"]["fit"]["test_mse"] == 1.0
    assert description["weights_sha256"] == file_sha256(mlp_checkpoint / WEIGHTS_FILE)


def test_saving_over_a_checkpoint_replaces_it_whole(tmp_path, mlp_teacher):
    folder = save_teacher(mlp_teacher, tmp_path / "x", {"v": 1})
    (folder / "stray.txt").write_text("from an older save")
    save_teacher(mlp_teacher, folder, {"v": 2})
    assert not (folder / "stray.txt").exists()
    assert yaml.safe_load((folder / SPEC_FILE).read_text())["metadata"] == {"v": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["x"]  # no staging folders left behind


def copy_checkpoint(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        if f.is_file():
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def edit_description(folder, **changes):
    description = yaml.safe_load((folder / SPEC_FILE).read_text())
    description.update(changes)
    (folder / SPEC_FILE).write_text(yaml.safe_dump(description))


BROKEN = {
    "missing folder": (lambda f: f.rename(f.with_name("gone")), "not found"),
    "no teacher.yaml": (lambda f: (f / SPEC_FILE).unlink(), "has no teacher.yaml"),
    "not yaml": (lambda f: (f / SPEC_FILE).write_text("{unclosed: ["), "not valid YAML"),
    "not a mapping": (lambda f: (f / SPEC_FILE).write_text("- 1\n- 2\n"), "must be a mapping"),
    "no family": (lambda f: edit_description(f, family=None) or _drop_key(f, "family"), "lacks family"),
    "unknown family": (lambda f: edit_description(f, family="gpt-17"), "unknown teacher family 'gpt-17'"),
    "wrong format": (lambda f: edit_description(f, format="other/9"), "format 'other/9'"),
    "no weights": (lambda f: (f / WEIGHTS_FILE).unlink(), "has no model.safetensors"),
    "garbage weights": (lambda f: (f / WEIGHTS_FILE).write_bytes(b"not safetensors"), "not a readable safetensors"),
    "config does not fit weights": (lambda f: _change_config(f, hidden=[64, 16]), "has shape"),
    "config the family rejects": (lambda f: _change_config(f, layers=3), "config does not fit family"),
}


def _drop_key(folder, key):
    description = yaml.safe_load((folder / SPEC_FILE).read_text())
    description.pop(key)
    (folder / SPEC_FILE).write_text(yaml.safe_dump(description))


def _change_config(folder, **changes):
    description = yaml.safe_load((folder / SPEC_FILE).read_text())
    description["config"].update(changes)
    (folder / SPEC_FILE).write_text(yaml.safe_dump(description))


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_checkpoints_give_clear_errors(case, tmp_path, mlp_checkpoint):
    folder = copy_checkpoint(mlp_checkpoint, tmp_path / "c")
    damage, fragment = BROKEN[case]
    damage(folder)
    with pytest.raises(CheckpointError) as info:
        load_teacher(folder)
    assert fragment in str(info.value)


def test_tampered_weights_fail_the_hash_check(tmp_path, mlp_checkpoint, mlp_teacher):
    from safetensors.torch import save_file

    folder = copy_checkpoint(mlp_checkpoint, tmp_path / "c")
    state = {k: v.clone() for k, v in mlp_teacher.state_dict().items()}
    state["model.head.bias"] += 1.0
    save_file(state, folder / WEIGHTS_FILE)
    with pytest.raises(CheckpointError, match="does not match the hash"):
        load_teacher(folder)


# -- the teacher-server command -------------------------------------------------------------


def test_server_cli_refuses_a_bad_checkpoint_with_a_clear_message(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "services.teacher_server.server", "--checkpoint", str(tmp_path / "nope"),
         "--port", "0", "--http-port", "-1"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "cannot load teacher" in result.stderr and "not found" in result.stderr


def test_server_cli_serves_and_drains_on_sigterm(mlp_checkpoint, mlp_teacher):
    port = free_port()
    process = subprocess.Popen(
        [console_script("teacher-server"), "--checkpoint", str(mlp_checkpoint), "--host", "127.0.0.1", "--port", str(port),
         "--http-port", "-1", "--threads", "1"],
        stderr=subprocess.PIPE, text=True,
    )
    try:
        client = RemoteTeacher(f"127.0.0.1:{port}", connect_timeout_s=120)
        assert client.spec.name == "mlp-tiny"
        question = torch.randn(4, *client.spec.question_shape)
        expected = mlp_teacher.compute_answer(question, {})
        assert torch.allclose(client.answer(question).hidden, expected[0], atol=1e-6)
        client.close()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        log = process.stderr.read()
        assert "serving teacher mlp-tiny" in log and "draining" in log
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)


def test_auto_dtype_is_bfloat16_only_where_the_cpu_computes_it(mlp_checkpoint, monkeypatch, caplog):
    """dtype=auto: bfloat16 on a CPU with AVX512-BF16 or AMX, float32 (said once) on one that would emulate
    it (the LM's Predict ~5x slower there than in float32). The CPU's answer is read from torch; the
    emulated case is this CPU told it has neither."""
    from services.teacher_server.zoo import base

    native = base.native_bfloat16(torch.device("cpu"))
    assert native == bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    assert load_teacher(mlp_checkpoint, dtype="auto").spec.compute_dtype == ("bfloat16" if native else "float32")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(base, "_warned_emulated_bf16", False)
    with caplog.at_level("WARNING"):
        dtypes = [load_teacher(mlp_checkpoint, dtype="auto").spec.compute_dtype for _ in range(2)]
    assert dtypes == ["float32", "float32"]
    assert sum("does not compute bfloat16 natively" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(ValueError, match="compute dtype must be one of"):
        load_teacher(mlp_checkpoint, dtype="bf16")
