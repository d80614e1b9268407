"""Keep concurrent table runs inside a deadline: stop the lowest-priority run while any would miss it.

Runs that share one GPU slow each other down (their processes time-slice it), so a table started
with more runs than the time allows can end with none of them finished, all of the device time
lost. This watchdog looks at every running run of RUNS_DIR each --interval seconds (its progress:
the last step in RUN_DIR/metrics.jsonl; its process: the one RUN_DIR/trainer.pid names), projects
each run's finish from its rate since the last look, and while some run would finish after the
deadline, stops the run of lowest priority (the highest seed, then the last name; with SIGTERM, so
it checkpoints the step it is in) and measures the others' pace afresh. The others go on faster
where the GPU was what they waited for, and what finishes is a whole run. It never stops the last
run, stops no more once a stop did not speed the others up (each run is then slow on its own), and
exits when no run is left (or none started by the deadline).

    python experiments/deadline_shed.py --runs-dir RUNS --deadline-at EPOCH_SECONDS --steps 8000
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import time
from pathlib import Path


def last_step(run_dir: Path) -> int:
    """The last step the run logged (0 before its first log line)."""
    step = 0
    try:
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            try:
                step = max(step, int(json.loads(line).get("step", 0)))
            except (ValueError, AttributeError):
                continue  # a line being written
    except FileNotFoundError:
        pass
    return step


def running(runs_dir: Path) -> dict[str, int]:
    """Run name -> pid of each process training into a folder of ``runs_dir`` (its RUN/trainer.pid,
    written by the trainer however it was started: by hand, or forked by a table script)."""
    found = {}
    for pid_file in runs_dir.glob("*/trainer.pid"):
        try:
            pid = int(pid_file.read_text())
        except (OSError, ValueError):  # gone since the glob, or being written
            continue
        if (pid_file.parent / "result.json").exists() or not Path(f"/proc/{pid}").exists():
            continue  # finished, or killed outright (the file outlives the process)
        found[pid_file.parent.name] = pid
    return found


def priority(name: str) -> tuple[int, str]:
    """Lower is kept longer: seed first (seed 0 of every cell before any seed 1), then the name."""
    seed = re.search(r"-s(\d+)$", name)
    return (int(seed.group(1)) if seed else 0, name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs-dir", type=Path, required=True)
    p.add_argument("--deadline-at", type=float, required=True, help="Unix time by which runs must have finished")
    p.add_argument("--steps", type=int, required=True, help="each run's total steps")
    p.add_argument("--interval", type=float, default=20.0, help="seconds between looks")
    args = p.parse_args()

    base: dict[str, tuple[float, int]] = {}  # name -> (time, step) a run's rate is measured from
    started, pace_before, shedding, last_seen = time.time(), None, True, None
    while True:
        time.sleep(args.interval)
        now, pids = time.time(), running(args.runs_dir)
        last_seen = now if pids else last_seen
        # done when no run has trained for three looks (runs start one after another), or none came by the deadline
        if not pids and (now - last_seen > 3 * args.interval if last_seen else now > args.deadline_at):
            return
        steps, finish, rate = {name: last_step(args.runs_dir / name) for name in pids}, {}, {}
        for name, step in steps.items():
            if step == 0:
                continue
            if name not in base:
                base[name] = (now, step)  # measured from its first logged step: startup is not its pace
            elif now - base[name][0] >= 2 * args.interval and step > base[name][1]:
                rate[name] = (step - base[name][1]) / (now - base[name][0])
                finish[name] = now + (args.steps - step) / rate[name]
        late = [n for n, t in finish.items() if t > args.deadline_at]
        print(f"{now - started:6.0f} s: {len(pids)} running, {len(late)} projected late"
              + "".join(f"; {n} step {steps[n]}" + (f" ends in {finish[n] - now:.0f} s" if n in finish else "")
                        for n in sorted(pids, key=priority)), flush=True)
        # Decide once every run has a rate measured under the present load (a run that has not logged
        # for a long while counts as measured), and never stop the last run: that speeds up nobody.
        unmeasured = [n for n in pids if n not in finish] if now - started < 10 * args.interval else []
        if not shedding or not late or unmeasured or len(pids) < 2:
            continue
        pace = sum(rate.values()) / len(rate)  # steps/s of the average measured run
        if pace_before is not None and pace < 1.1 * pace_before:
            print(f"the last stop did not speed the others up ({pace_before:.1f} -> {pace:.1f} steps/s each): "
                  "they are not waiting for each other, and no more runs are stopped", flush=True)
            shedding = False
            continue
        pace_before = pace
        victim = max(pids, key=priority)
        print(f"stopping {victim}: {len(late)} run(s) would end after the deadline", flush=True)
        try:
            os.kill(pids[victim], signal.SIGTERM)
        except ProcessLookupError:
            pass
        base.clear()  # the survivors' pace from here on is what counts

if __name__ == "__main__":
    main()
