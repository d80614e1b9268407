"""The fleet across hosts: each teacher at its own address, the trainer on another host, real faults.

Hosts are network namespaces on a virtual switch (``netns.py``), so what crosses between them is a
real network: a partition drops packets instead of refusing connections, a vanished host never
answers, netem loses and delays packets. Skipped, with the reason, where namespaces cannot be made.
"""

import json
import re
import subprocess
import time

import pytest

from conftest import console_script
from netns import Network
from trainer.run_dir import RunDir

why_not = Network.available()
pytestmark = pytest.mark.skipif(why_not is not None, reason=f"fleet-across-hosts tests: {why_not}")

PORT = 50051
RUN = ["--batch-size", "16", "--d-emb", "16", "--d-m", "8", "--eval-every", "60", "--checkpoint-every", "60",
       "--device", "cpu", "--seed", "4", "--gate-warmup", "30"]


@pytest.fixture
def network():
    net = Network()
    yield net
    net.close()


def serve(host, checkpoint):
    """``teacher-server`` on ``host``'s own address, once it says it serves."""
    process = host.popen([console_script("teacher-server"), "--checkpoint", str(checkpoint), "--host", host.address,
                          "--port", str(PORT), "--http-port", "-1", "--threads", "1"],
                         stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if re.search(r"serving teacher \S+ .* on gRPC port", line):
            return process
        if not line and process.poll() is not None:
            break
    raise AssertionError(f"the teacher on {host.name} ({host.address}) did not come up")


def train(host, *args) -> subprocess.Popen:
    command = [console_script("ddistill"), "--threads", "1", "train", *map(str, args)]
    if host is None:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return host.popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process, timeout=600) -> tuple[dict, str]:
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err[-3000:]
    return json.loads(out), err


def last_step(run) -> int:
    return max((m["step"] for m in RunDir(run).read_metrics()), default=0)


def wait_until(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def lm_dir(lm_teacher, tmp_path_factory):
    from services.teacher_server.checkpoint import save_teacher

    return save_teacher(lm_teacher, tmp_path_factory.mktemp("lm") / "lm")


def three_teachers_against_in_process(network, synthetic_dir, checkpoints, tmp_path, netem=()):
    """MLP-M, MLP-L and the LM each on a host of its own, the trainer on a fourth (``netem`` on every link):
    the run and the in-process run with the same seed, as (remote, local) results."""
    trainer = network.host("trainer")
    hosts = {name: network.host(name) for name in checkpoints}
    for host in (trainer, *hosts.values()):
        if netem:
            host.netem(*netem)
    for name, host in hosts.items():
        serve(host, checkpoints[name])
    common = ["--data", synthetic_dir, "--steps", "60", *RUN]
    budget = {"lm": "?budget=0.25"}
    remote = train(trainer, *[x for name in checkpoints
                              for x in ("--teacher", f"grpc://{hosts[name].address}:{PORT}{budget.get(name, '')}")],
                   *common, "--run-dir", tmp_path / "remote")
    local = train(None, *[x for name, path in checkpoints.items()
                          for x in ("--teacher", f"local:{path}{budget.get(name, '')}")],
                  *common, "--run-dir", tmp_path / "local")
    return finish(remote)[0], finish(local)[0]


def test_three_teachers_on_their_own_hosts_train_as_in_process(network, synthetic_dir, teacher_dirs, lm_dir, tmp_path):
    """Each teacher at its own address on its own host: the same run, to the last digit, as in-process."""
    checkpoints = {"mlp-m": teacher_dirs["mlp-m"], "mlp-l": teacher_dirs["mlp-l"], "lm": lm_dir}
    remote, local = three_teachers_against_in_process(network, synthetic_dir, checkpoints, tmp_path)
    assert remote["test_mse"] == local["test_mse"] and remote["rows_sent"] == local["rows_sent"]
    assert remote["rows_sent"]["lm-test"] == 60 * 16 // 4 and set(remote["teacher_failures"].values()) == {0}
    assert remote["rows_sent"]["mlp-l"] > 0 and remote["rows_sent"]["mlp-m"] > 0


def test_loss_and_delay_on_every_link_change_nothing(network, synthetic_dir, teacher_dirs, tmp_path):
    """5% packet loss and 3 ms of delay on every host's link (tc netem): TCP carries the calls through, and
    the run is still the in-process one."""
    unavailable = network.netem_available()
    if unavailable:
        pytest.skip(unavailable)
    checkpoints = {"mlp-m": teacher_dirs["mlp-m"], "mlp-l": teacher_dirs["mlp-l"]}
    remote, local = three_teachers_against_in_process(network, synthetic_dir, checkpoints, tmp_path,
                                                      netem=("loss", "5%", "delay", "3ms"))
    assert remote["test_mse"] == local["test_mse"] and remote["rows_sent"] == local["rows_sent"]


def test_a_partitioned_teacher_is_waited_for_and_the_run_ends_as_an_uninterrupted_one(
        network, synthetic_dir, teacher_dirs, tmp_path):
    """MLP-L's link goes down for 4 s mid-run (its calls hang to their 1 s deadline, no connection refused) and
    comes back; the wait policy retries the same requests, and the run ends with the uninterrupted metrics."""
    trainer, host = network.host("trainer"), network.host("mlp-l")
    serve(host, teacher_dirs["mlp-l"])
    args = ["--teacher", f"grpc://{host.address}:{PORT}", "--teacher", f"local:{teacher_dirs['mlp-m']}",
            "--data", synthetic_dir, "--steps", "180", *RUN, "--on-teacher-failure", "wait", "--teacher-timeout", "1"]
    whole, _ = finish(train(trainer, *args, "--run-dir", tmp_path / "whole"))
    run = tmp_path / "partitioned"
    process = train(trainer, *args, "--run-dir", run)
    wait_until(lambda: last_step(run) >= 60, 300)
    host.cut()
    time.sleep(4)
    assert process.poll() is None, "the trainer gave up during the partition"
    host.restore()
    result, err = finish(process)
    assert "unavailable" in err and "is back" in err
    assert result["test_mse"] == whole["test_mse"] and result["rows_sent"] == whole["rows_sent"]
    assert result["teacher_failures"]["mlp-l"] > 0 and result["rows_missed"]["mlp-l"] == 0


def test_a_vanished_host_is_skipped_and_the_run_finishes_without_it(network, synthetic_dir, teacher_dirs, tmp_path):
    """MLP-L's host is unplugged for good mid-run: with the skip policy the run goes on with MLP-M (MLP-L's
    pairs weigh 0 and count as missed, never as sent), says so, and finishes."""
    trainer, host = network.host("trainer"), network.host("mlp-l")
    serve(host, teacher_dirs["mlp-l"])
    run = tmp_path / "run"
    process = train(trainer, "--teacher", f"grpc://{host.address}:{PORT}", "--teacher", f"local:{teacher_dirs['mlp-m']}",
                    "--data", synthetic_dir, "--steps", "150", *RUN, "--on-teacher-failure", "skip",
                    "--teacher-timeout", "1", "--teacher-retry-after", "2", "--run-dir", run,
                    "--cache-dir", tmp_path / "cache")  # nothing cached: its test score must be asked for
    wait_until(lambda: last_step(run) >= 60, 300)
    host.unplug()
    result, err = finish(process)
    assert result["steps"] == 150 and result["rows_missed"]["mlp-l"] > 0 and result["teacher_failures"]["mlp-l"] > 0
    assert "continuing without it (weight 0)" in err
    assert result["teachers"]["mlp-l"] is None and result["teachers"]["mlp-m"] > 0  # scored where reachable
    assert "cannot be reached to score it" in err
    possible, sent, missed = (result[k]["mlp-l"] for k in ("rows_possible", "rows_sent", "rows_missed"))
    assert sent + missed <= possible and sent > 0  # answered before it vanished


def test_a_teacher_restarted_at_the_same_address_is_used_again(network, synthetic_dir, teacher_dirs, tmp_path):
    """The server on MLP-L's host is killed and started again on the same address: the waiting run picks it
    up and ends as the uninterrupted one."""
    trainer, host = network.host("trainer"), network.host("mlp-l")
    server = serve(host, teacher_dirs["mlp-l"])
    args = ["--teacher", f"grpc://{host.address}:{PORT}", "--data", synthetic_dir, "--steps", "150", *RUN,
            "--on-teacher-failure", "wait", "--teacher-timeout", "2"]
    whole, _ = finish(train(trainer, *args, "--run-dir", tmp_path / "whole"))
    run = tmp_path / "restarted"
    process = train(trainer, *args, "--run-dir", run)
    wait_until(lambda: last_step(run) >= 60, 300)
    server.kill()
    server.wait()
    time.sleep(1)
    serve(host, teacher_dirs["mlp-l"])
    result, _ = finish(process)
    assert result["test_mse"] == whole["test_mse"] and result["rows_sent"] == whole["rows_sent"]
