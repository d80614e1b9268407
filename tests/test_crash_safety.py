"""A trainer killed mid-checkpoint, and a disk that fills up mid-checkpoint, lose nothing.

Checkpoints are written to a staging folder, fsynced and renamed (``atomic_files``); these
tests kill a real ``ddistill train`` process while it writes one every step, and make
real writes fail with EFBIG (``RLIMIT_FSIZE``, what a full disk looks like to a writer).
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

from conftest import REPO, console_script
from trainer.run_dir import RunDir

ARGS = ["--batch-size", "16", "--d-emb", "16", "--d-m", "8", "--gate-warmup", "50", "--eval-every", "50",
        "--checkpoint-every", "1", "--device", "cpu", "--seed", "7", "--steps", "250"]


def train(*args) -> subprocess.Popen:
    return subprocess.Popen([console_script("ddistill"), "--threads", "1", "train", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def partial_checkpoints(run) -> list:
    return list((run / "checkpoints").glob(".step-*"))


def test_sigkill_during_checkpoint_writes_never_corrupts_the_run(synthetic_dir, teacher_dirs, tmp_path):
    teacher = ["--teacher", f"local:{teacher_dirs['mlp-l']}", "--data", synthetic_dir]
    whole = train(*teacher, *ARGS, "--run-dir", tmp_path / "whole")
    assert whole.wait(timeout=600) == 0
    expected = json.loads(whole.stdout.read())

    run = tmp_path / "killed"
    process, kills, caught_mid_write = train(*teacher, *ARGS, "--run-dir", run), 0, False
    while kills < 12 and not (caught_mid_write and kills >= 3):
        # every other kill aims inside a write: it fires the moment a staging folder shows up (a busy
        # poll, so a loaded machine only makes the write last longer); the others land wherever
        aim_mid_write, deadline = kills % 2 == 0, time.monotonic() + 300
        while RunDir(run).latest_checkpoint() is None and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)  # one whole checkpoint first, so that there is always one to resume from
        before, left = RunDir(run).latest_checkpoint(), set(partial_checkpoints(run))  # left: by the last kill
        while process.poll() is None and time.monotonic() < deadline:
            if aim_mid_write and set(partial_checkpoints(run)) - left:
                break
            if not aim_mid_write and RunDir(run).latest_checkpoint() not in (None, before):
                time.sleep(0.01 * (kills % 3))
                break
            time.sleep(0 if aim_mid_write else 0.02)
        assert process.poll() is None, "the run finished before it could be killed"
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        kills += 1
        caught_mid_write |= bool(set(partial_checkpoints(run)) - left)
        latest = RunDir(run).latest_checkpoint()
        assert latest is not None
        RunDir.load_checkpoint(latest)  # complete and readable, whatever the moment of the kill
        process = train("--resume", run)
    assert process.wait(timeout=600) == 0
    assert caught_mid_write, "no kill landed inside a checkpoint write"
    resumed = json.loads(process.stdout.read())
    for key in ("test_mse", "valid_mse", "rows_sent", "rows_possible"):
        assert resumed[key] == expected[key], key
    assert not partial_checkpoints(run)  # the resume cleared what the kills left
    steps = [m["step"] for m in RunDir(run).read_metrics() if "valid_mse" in m]
    assert steps == [50, 100, 150, 200, 250]


FULL_DISK = textwrap.dedent("""
    import resource, signal, sys, torch
    from trainer.run_dir import RunDir

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    run = RunDir(sys.argv[1])
    run.checkpoints.mkdir(parents=True)
    small = {"student": {"w": torch.ones(10)}}
    assert run.save_checkpoint(1, small, {"rng": torch.zeros(3)}, {}) is not None
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))  # the disk is now "full"
    big = {"student": {"w": torch.ones(100_000)}}
    assert run.save_checkpoint(2, big, {"rng": torch.zeros(3)}, {}) is None  # reported, not raised
    print("ok")
""")


def test_a_full_disk_mid_checkpoint_keeps_the_previous_one(tmp_path):
    run = tmp_path / "run"
    out = subprocess.run([sys.executable, "-c", FULL_DISK, str(run)], capture_output=True, text=True, timeout=120,
                         cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
    assert "checkpoint at step 2 not written" in out.stderr and "File too large" in out.stderr
    latest = RunDir(run).latest_checkpoint()
    assert latest.name == "step-00000001" and not partial_checkpoints(run)
    weights, _, state = RunDir.load_checkpoint(latest)
    assert state["step"] == 1 and weights["student"]["w"].shape == (10,)
