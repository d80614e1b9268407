"""docker-compose.yml is consistent: real CLI invocations, unique ports, read-only checkpoints.

There is no Docker engine here, so the file is checked against our own code instead.
"""

import shlex

import pytest
import yaml

from conftest import REPO
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


def test_dockerfile_runs_as_non_root_and_installs_the_cpu_torch():
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    assert "USER ddistill" in dockerfile and "constraints/cpu.txt" in dockerfile
    assert shlex.split("teacher-server --help")[0] in dockerfile


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
