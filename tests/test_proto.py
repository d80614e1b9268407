"""The generated Python code in proto/ must be what the .proto produces today."""

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

PROTO = Path("ddistill/teacher/v1/teacher.proto")
GENERATED = ["teacher_pb2.py", "teacher_pb2.pyi", "teacher_pb2_grpc.py"]


def test_generated_code_is_not_stale(tmp_path):
    pytest.importorskip("grpc_tools")
    # The documented command (README, "Wire contract"), writing into a scratch folder.
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", str(REPO / "proto"), f"--python_out={tmp_path}",
         f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", str(REPO / "proto" / PROTO)],
        check=True,
    )
    for name in GENERATED:
        fresh = (tmp_path / PROTO.parent / name).read_text()
        committed = (REPO / "proto" / PROTO.parent / name).read_text()
        assert fresh == committed, (
            f"proto/{PROTO.parent / name} is stale: regenerate it with the command in README.md (Wire contract)"
        )


def test_service_has_the_documented_rpcs():
    from ddistill.teacher.v1 import teacher_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["TeacherService"]
    assert service.full_name == "ddistill.teacher.v1.TeacherService"
    assert {m.name for m in service.methods} == {"Describe", "Answer", "AnswerVJP", "Predict"}
