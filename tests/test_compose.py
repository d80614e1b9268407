"""docker-compose.yml is consistent (real CLI invocations, unique ports, read-only checkpoints),
and the fleet it defines comes up and trains when its services run as local processes.

There is no Docker engine here, so the file is checked against our own code instead.
"""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import REPO, console_script, free_port, wait_for
from services.teacher_server.server import parse_args as teacher_server_args
from trainer.cli import build_parser as ddistill_parser

COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
TEACHERS = {name: s for name, s in SERVICES.items() if s["command"][0] == "teacher-server"}


def test_every_command_is_a_real_invocation_of_our_clis():
    assert set(TEACHERS) == {"mlp-m", "mlp-l", "lm"}
    for name, service in SERVICES.items():
        program, *args = service["command"]
        if program == "teacher-server":
            parsed = teacher_server_args(args)
            assert parsed.checkpoint.name == name
        elif program == "ddistill":
            parsed = ddistill_parser().parse_args(args)
            assert parsed.command == "train"
        else:
            pytest.fail(f"service {name} runs {program!r}, not one of our CLIs")


def test_published_ports_are_unique_and_teachers_are_reachable_by_name():
    published = [p.split(":")[0] for s in SERVICES.values() for p in s.get("ports", [])]
    assert len(published) == len(set(published))
    trainer_args = ddistill_parser().parse_args(SERVICES["trainer"]["command"][1:])
    hosts = {url.removeprefix("grpc://").split(":")[0] for url in trainer_args.teacher}
    assert hosts == set(TEACHERS)
    for url in trainer_args.teacher:
        port = int(url.rsplit(":", 1)[1])
        assert port == teacher_server_args(TEACHERS[url.split("//")[1].split(":")[0]]["command"][1:]).port


def test_checkpoints_are_mounted_read_only_where_the_command_reads_them():
    for name, service in TEACHERS.items():
        checkpoint = str(teacher_server_args(service["command"][1:]).checkpoint)
        mounts = [v.split(":") for v in service["volumes"]]
        assert [checkpoint, "ro"] in [m[1:] for m in mounts], f"{name}: {checkpoint} not mounted read-only"


def test_healthchecks_are_valid_python_against_the_http_side_port():
    for name, service in TEACHERS.items():
        test = service["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", "-c"]
        compile(test[3], f"{name}-healthcheck", "exec")
        http_port = teacher_server_args(service["command"][1:]).http_port
        assert f"127.0.0.1:{http_port}/healthz" in test[3]
        assert service["restart"] == "unless-stopped"


COMPOSE_FILES = ["docker-compose.yml", "deploy/compose.secure.yml", "deploy/compose.gpu.yml"]


@pytest.mark.parametrize("path", COMPOSE_FILES)
def test_compose_files_follow_the_compose_spec(path):
    """The Compose Specification's JSON schema, as `docker compose config` would check it."""
    result = subprocess.run([console_script("check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
                             str(REPO / path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_as_non_root_and_picks_the_torch_build_by_index():
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    assert "USER ddistill" in dockerfile and "constraints/cpu.txt" in dockerfile
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in dockerfile
    assert 'pip install --index-url "$TORCH_INDEX" -c constraints/cpu.txt torch' in dockerfile
    assert shlex.split("teacher-server --help")[0] in dockerfile


def test_gpu_overlay_pins_each_teacher_to_its_own_gpu_with_the_cuda_image():
    gpu = yaml.safe_load((REPO / "deploy" / "compose.gpu.yml").read_text())
    variables = set()
    for name in [*TEACHERS, "trainer"]:
        service = gpu["services"][name]
        assert service["image"].endswith(":cuda")
        assert service["build"]["args"]["TORCH_INDEX"].startswith("https://download.pytorch.org/whl/cu")
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        (device_id,) = device["device_ids"]
        assert device_id.startswith("${") and device_id.endswith(":-0}")
        variables.add(device_id[2:].split(":")[0])
        if "command" in service:  # an overlay's command must still be a real invocation of the same server
            parsed = teacher_server_args(service["command"][1:])
            assert parsed.checkpoint.name == name and parsed.dtype == "bfloat16"
    assert len(variables) == len(TEACHERS) + 1  # each service pinned on its own


SECURE = yaml.safe_load((REPO / "deploy" / "compose.secure.yml").read_text())


def test_secure_overlay_gives_every_teacher_mtls_and_tokens_from_secrets():
    declared = set(SECURE["secrets"])
    for name in TEACHERS:
        service = SECURE["services"][name]
        args = teacher_server_args(service["command"][1:])
        assert args.checkpoint == teacher_server_args(TEACHERS[name]["command"][1:]).checkpoint
        assert args.tls_cert and args.tls_key and args.tls_client_ca and args.token_file
        for path in (args.tls_cert, args.tls_key, args.tls_client_ca, args.token_file):
            assert str(path).startswith("/run/secrets/") and path.name in service["secrets"], path
        assert set(service["secrets"]) <= declared
    trainer = SECURE["services"]["trainer"]
    parsed = ddistill_parser().parse_args(trainer["command"][1:])
    assert {url.split("//")[1].split(":")[0] for url in parsed.teacher} == set(TEACHERS)
    for url in parsed.teacher:
        assert url.startswith("grpcs://")
        options = dict(o.split("=") for o in url.split("?")[1].split("&"))
        assert set(options) == {"token_file", "ca", "cert", "key"}
        assert all(v.startswith("/run/secrets/") and v.rsplit("/", 1)[1] in trainer["secrets"] for v in options.values())
    assert set(trainer["secrets"]) <= declared
    assert all(spec["file"].startswith("./secrets/") for spec in SECURE["secrets"].values())


# -- the compose fleet as local processes ------------------------------------------------------
# What `docker compose up` + `docker compose run trainer` do, from the file's own service
# definitions: each service's command and environment, its volumes as path rewrites (host
# folders the test provides), its container ports on free loopback ports, service names
# resolved to those ports, the healthcheck command polled before the trainer starts
# (depends_on: service_healthy). Only the trainer's run length is added (--steps etc.).


def compose_mounts(service: dict, host_folders: dict[str, Path]) -> list[tuple[str, Path]]:
    """(container path, host path) per volume; ``host_folders`` replaces the file's host side."""
    mounts = []
    for volume in service.get("volumes", []):
        host, container, *_ = volume.split(":")
        mounts.append((container, host_folders[host]))
    return mounts


def on_host(arg: str, mounts: list[tuple[str, Path]]) -> str:
    for container, host in mounts:
        if arg == container or arg.startswith(container + "/"):
            return str(host) + arg[len(container):]
    return arg


def with_value(args: list[str], flag: str, value) -> list[str]:
    i = args.index(flag)
    return [*args[: i + 1], str(value), *args[i + 2:]]


@pytest.fixture
def fleet_folders(teacher_dirs, synthetic_dir, tmp_path):
    """Host folders for the compose file's host-side volume paths."""
    from services.teacher_server.checkpoint import save_teacher
    from services.teacher_server.zoo import MiniLMTeacher

    torch.manual_seed(0)
    lm = MiniLMTeacher.pretrained("lm", max_length=48).freeze()
    data = tmp_path / "data"
    data.mkdir()
    (data / "ml-100k").symlink_to(synthetic_dir)
    return {
        "./checkpoints/mlp-m": teacher_dirs["mlp-m"],
        "./checkpoints/mlp-l": teacher_dirs["mlp-l"],
        "./checkpoints/lm": save_teacher(lm, tmp_path / "checkpoints" / "lm"),
        "../shared/data": data,
        "./runs": tmp_path / "runs",
    }


def test_the_compose_fleet_runs_as_local_processes_and_trains(fleet_folders):
    env = {**os.environ}
    processes, grpc_ports, health = {}, {}, {}
    try:
        for name, service in TEACHERS.items():
            program, *args = service["command"]
            args = [on_host(a, compose_mounts(service, fleet_folders)) for a in args]
            parsed = teacher_server_args(args)
            grpc_ports[name] = {parsed.port: free_port()}
            http_port = free_port()
            args = with_value(with_value(args, "--port", grpc_ports[name][parsed.port]), "--http-port", http_port)
            processes[name] = subprocess.Popen(
                [console_script(program), *args, "--host", "127.0.0.1", "--threads", "1"],
                env={**env, **service.get("environment", {})},
            )
            check = service["healthcheck"]["test"]
            health[name] = [sys.executable, "-c",
                            check[3].replace(f"127.0.0.1:{parsed.http_port}", f"127.0.0.1:{http_port}")]

        def healthy(name):
            assert processes[name].poll() is None, f"{name} exited with {processes[name].returncode}"
            return subprocess.run(health[name], capture_output=True, timeout=30).returncode == 0

        for name in TEACHERS:  # depends_on: condition: service_healthy
            assert wait_for(lambda: healthy(name), timeout=180), f"{name} never passed its healthcheck"

        trainer = SERVICES["trainer"]
        program, *args = trainer["command"]
        mounts = compose_mounts(trainer, fleet_folders)
        args = [on_host(a, mounts) for a in args]
        for i, arg in enumerate(args):  # service names resolve to the teachers' loopback ports
            if arg.startswith("grpc://"):
                host, port = arg.removeprefix("grpc://").split(":")
                args[i] = f"grpc://127.0.0.1:{grpc_ports[host][int(port)]}"
        result = subprocess.run(
            [console_script(program), "--threads", "1", *args, "--steps", "30", "--batch-size", "16",
             "--d-emb", "16", "--d-m", "8", "--gate-warmup", "10", "--eval-every", "30",
             "--checkpoint-every", "30", "--device", "cpu"],
            capture_output=True, text=True, timeout=600, env={**env, **trainer.get("environment", {})},
        )
        assert result.returncode == 0, result.stderr[-3000:]
    finally:
        for process in processes.values():
            process.terminate()
        for process in processes.values():
            process.wait(timeout=60)

    out = json.loads(result.stdout)
    assert out["steps"] == 30 and set(out["teachers"]) == set(TEACHERS)
    assert all(out["rows_sent"][name] > 0 for name in TEACHERS), out["rows_sent"]
    assert np.isfinite(out["test_mse"])
    run_dir = Path(on_host(ddistill_parser().parse_args(trainer["command"][1:]).run_dir.as_posix(), mounts))
    committee = yaml.safe_load((run_dir / "config.yaml").read_text())["committee"]
    assert [m["name"] for m in committee] == ["mlp-m", "mlp-l", "lm"]
