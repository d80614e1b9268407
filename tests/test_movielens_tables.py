"""experiments/movielens_tables.py: every cell run for real (short), reused when finished, and reported."""

import json
import subprocess
import sys

from conftest import REPO


def test_tables_script_runs_every_cell_and_reuses_finished_runs(synthetic_dir, teacher_dirs, tmp_path):
    checkpoints = teacher_dirs["mlp-l"].parent
    command = [sys.executable, "experiments/movielens_tables.py", "--data", str(synthetic_dir),
               "--checkpoints", str(checkpoints), "--seeds", "0", "1", "--steps", "30", "--threads", "1",
               "--skip-teacher", "lm", "--tables", "3", "4", "gate", "anchor", "importance", "budget",
               "--thresholds", "0",
               "--jobs", "2", "--teacher-option", "mlp-l=device=cpu", "--device", "cpu",
               "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]
    first = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    config = (tmp_path / "runs" / "mt-mlp-l-mlp-m-s0" / "config.yaml").read_text()
    assert f"local:{checkpoints / 'mlp-l'}?device=cpu\n" in config and f"local:{checkpoints / 'mlp-m'}\n" in config
    assert "device: cpu" in config

    report = json.loads((tmp_path / "out" / "movielens.json").read_text())
    cells = report["cells"]
    assert set(cells) == {"ld-mlp-l", "fd-mlp-l", "diversedistill-mlp-l", "mt-mlp-l-mlp-m", "aekd-mlp-l-mlp-m",
                          "diversedistill-mlp-l-mlp-m", "diversedistill-mlp-l-mlp-m-tau0",
                          "diversedistill-mlp-l-mlp-m-anchor-mean", "diversedistill-mlp-l-mlp-m-tau0-anchor-mean",
                          # the importance table's cells at the defaults are the cells above: one run each
                          "diversedistill-mlp-l-mlp-m-gate-shuffled",
                          "diversedistill-mlp-l-mlp-m-share0.6", "diversedistill-mlp-l-mlp-m-share0.6-gate-shuffled",
                          "diversedistill-mlp-l-mlp-m-importance-teacher",
                          "diversedistill-mlp-l-mlp-m-tau0-importance-teacher",
                          "diversedistill-mlp-l-mlp-m-budget0.3", "diversedistill-mlp-l-mlp-m-budget0.3-gate-shuffled",
                          "diversedistill-mlp-l-mlp-m-budget0.1", "diversedistill-mlp-l-mlp-m-budget0.1-gate-shuffled",
                          "diversedistill-mlp-l-mlp-m-budget0.3-gate-sampled",
                          "diversedistill-mlp-l-mlp-m-budget0.1-gate-sampled",
                          "diversedistill-mlp-l-mlp-m-budget0.3-gate-random",
                          "diversedistill-mlp-l-mlp-m-budget0.1-gate-random",
                          "diversedistill-mlp-l-mlp-m-tau0-gate-shuffled"}
    for cell in cells.values():
        assert len(cell["test_mse"]) == 2 and all(0 < m < 10 for m in cell["test_mse"])
        assert len(cell["grr"]) == 2
    assert cells["diversedistill-mlp-l-mlp-m-tau0"]["rows_saved"] == [0.0, 0.0]  # τ = 0 sends every pair
    text = (tmp_path / "out" / "movielens.md").read_text()
    assert "## Table 3" in text and "## Table 4" in text and "## Table gate" in text and "Paired t-test" in text
    assert "aekd (MLP-L + MLP-M)" in text
    assert "## Table anchor" in text and "τ=0, row-anchored questions" in text and "mean-anchored" in text
    assert "## Table importance" in text and "importance disagreement (share 0.6), shuffled gate" in text
    assert "## Table budget" in text and "budget 10%, row anchor, importance disagreement (share 0.65), shuffled gate" in text
    assert cells["diversedistill-mlp-l-mlp-m-budget0.1"]["budget"] == 0.1
    shuffled = cells["diversedistill-mlp-l-mlp-m-gate-shuffled"]
    assert shuffled["gate"] == "shuffled" and shuffled["importance"] == "disagreement"
    # The answer probe of every DiverseDistill cell: one row per (cell, teacher).
    assert "## What the answers are worth" in text
    probe_rows = [line for line in text.splitlines() if line.startswith("| diversedistill")
                  and ("| mlp-l |" in line or "| mlp-m |" in line)]
    assert len(probe_rows) == 1 + 2 * 18  # DiverseDistill on MLP-L, then 18 distinct settings on MLP-L + MLP-M
    assert all(set(a) == {"mlp-l", "mlp-m"} for a in cells["diversedistill-mlp-l-mlp-m-anchor-mean"]["answers"])
    assert (tmp_path / "out" / "grr.png").stat().st_size > 0 and (tmp_path / "out" / "gate.png").stat().st_size > 0

    # A second invocation trains nothing new: every run's result.json is reused.
    second = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0 and "train --method" not in second.stdout

    # --report-only trains nothing: a cell missing a seed is reported over the seeds it has, one
    # missing every seed is listed as not run, and the paired test skips both.
    (tmp_path / "runs" / "aekd-mlp-l-mlp-m-s1" / "result.json").unlink()
    for seed in (0, 1):
        (tmp_path / "runs" / f"fd-mlp-l-s{seed}" / "result.json").unlink()
    partial = subprocess.run([*command, "--report-only"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert partial.returncode == 0, partial.stderr[-3000:]
    assert "train --" not in partial.stdout
    assert not (tmp_path / "runs" / "aekd-mlp-l-mlp-m-s1" / "result.json").exists()
    cells = json.loads((tmp_path / "out" / "movielens.json").read_text())["cells"]
    assert cells["aekd-mlp-l-mlp-m"]["seeds"] == [0] and len(cells["aekd-mlp-l-mlp-m"]["test_mse"]) == 1
    assert "fd-mlp-l" not in cells
    text = (tmp_path / "out" / "movielens.md").read_text()
    assert "| aekd (MLP-L + MLP-M) (1 of 2 seeds) |" in text and "| fd (MLP-L) | not run |" in text
    assert "diversedistill (MLP-L + MLP-M) vs mt (MLP-L + MLP-M)" in text  # AEKD, with one seed, is left out


def test_tables_summary_puts_each_committee_on_one_row_with_its_best_method_in_bold(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "experiments"))  # the script imports its sibling `common`
    from movielens_tables import summary_lines

    def cell(method, teachers, mse, budgets=None):
        return {"method": method, "teachers": teachers, "test_mse": mse, "teacher_budgets": budgets or {}}

    lines = summary_lines([cell("ld", ["mlp-l"], [0.83, 0.84, 0.85]), cell("diversedistill", ["mlp-l"], [0.82, 0.83, 0.84]),
                           cell("mt", ["mlp-l", "lm"], [0.80, 0.81, 0.82], {"lm": 0.1}),
                           cell("diversedistill", ["mlp-l", "lm"], [0.84], {"lm": 0.1})], n_seeds=3)
    assert lines[2] == "| committee | LD | FD | MT | AEKD | DiverseDistill |"
    assert lines[4] == "| MLP-L | 0.8400 ± 0.0100 | - | - | - | **0.8300 ± 0.0100** |"
    assert lines[5] == "| MLP-L + LM (LM at 10.0%) | - | - | **0.8100 ± 0.0100** | - | 0.8400 (1 of 3 seeds) |"


def test_tuned_cells_take_their_methods_settings_from_the_nearest_swept_committee(monkeypatch, tmp_path):
    """The committee's own sweep first; else the sweep that agrees on the LM, then shares most teachers."""
    monkeypatch.syspath_prepend(str(REPO / "experiments"))
    from common import Cell
    from movielens_tables import tuned

    def sweep(committee, lr):
        report = {"committee": committee, "budgets": {}, "methods": {"mt": {"chosen": {"params": {"--lr": lr}}}}}
        (tmp_path / f"{'-'.join(committee)}.json").write_text(json.dumps(report))

    sweep(["mlp-l", "mlp-m"], 0.02)
    sweep(["mlp-l", "lm"], 0.04)
    under_way = {"committee": ["mlp-m", "lm"], "budgets": {}, "methods": {"mt": {"trials": []}}}  # no choice yet
    (tmp_path / "mlp-m-lm.json").write_text(json.dumps(under_way))
    cells, source = tuned([Cell("mt", ("mlp-l", "mlp-m")), Cell("mt", ("mlp-l", "lm")), Cell("mt", ("mlp-m", "lm")),
                           Cell("mt", ("mlp-l", "mlp-m", "lm")), Cell("mt", ("mlp-m",)), Cell("ld", ("mlp-l",))],
                          tmp_path)
    assert [dict(c.params).get("--lr") for c in cells] == [0.02, 0.04, 0.04, 0.04, 0.02, None]
    assert cells[2].key == "mt-mlp-m-lm-lr0.04" and source[cells[2].key] == "MLP-L + LM"
    assert cells[5] == Cell("ld", ("mlp-l",)) and cells[5].key not in source  # no sweep of LD: its defaults
    assert cells[0].flags(tmp_path)[-2:] == ["--lr", "0.02"]
