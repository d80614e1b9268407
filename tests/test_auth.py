"""Who may call a teacher: bearer tokens, TLS and mutual TLS, over real servers on loopback.

Certificates are made fresh for each test session with ``cryptography`` (a CA, a server
certificate for 127.0.0.1/localhost, a client certificate, and a rogue CA's client).
"""

import datetime
import ipaddress
import json
import subprocess

import grpc
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import console_script, free_port, start_teacher_server
from services.teacher_server.auth import ClientAuth, ServerTLS
from services.teacher_server.client import LocalTeacher, RemoteTeacher, TeacherUnavailable, Unauthenticated
from services.teacher_server.server import ServerConfig, TeacherServer

TOKEN = "t0ken-for-tests-4f9a"


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject: str, issuer_key, issuer_name, *, ca: bool = False, san=None):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer_name or _name(subject))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    cert = builder.sign(issuer_key or key, hashes.SHA256())
    return key, cert


def _write(folder, name, key, cert):
    (folder / f"{name}.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (folder / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """Files: ca.pem, server.{pem,key}, client.{pem,key}, rogue.{pem,key} (signed by another CA)."""
    folder = tmp_path_factory.mktemp("pki")
    ca_key, ca = _certificate("test CA", None, None, ca=True)
    _write(folder, "ca", ca_key, ca)
    san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    _write(folder, "server", *_certificate("teacher", ca_key, ca.subject, san=san))
    _write(folder, "client", *_certificate("trainer", ca_key, ca.subject))
    rogue_ca_key, rogue_ca = _certificate("rogue CA", None, None, ca=True)
    _write(folder, "rogue", *_certificate("trainer", rogue_ca_key, rogue_ca.subject))
    _write(folder, "rogue-ca", rogue_ca_key, rogue_ca)
    (folder / "tokens").write_text(f"# accepted tokens\n{TOKEN}\nanother-token\n")
    return folder


def serve(teacher, **config):
    return TeacherServer(teacher, ServerConfig(host="127.0.0.1", port=0, http_port=None, **config)).start()


def answers_correctly(remote, teacher) -> bool:
    question = torch.randn(3, *teacher.spec.question_shape)
    return torch.allclose(remote.answer(question).hidden, LocalTeacher(teacher).answer(question).hidden, atol=1e-6)


def test_bearer_token_is_required_and_nothing_is_computed_without_it(mlp_teacher):
    server = serve(mlp_teacher, tokens=frozenset({TOKEN}))
    target = f"127.0.0.1:{server.port}"
    try:
        for auth in (ClientAuth(), ClientAuth(token="wrong"), ClientAuth(token=TOKEN + "x")):
            with pytest.raises(Unauthenticated, match="bearer token"):
                RemoteTeacher(target, auth=auth)  # Describe is refused too
        raw = grpc.insecure_channel(target)
        answer = raw.unary_unary("/ddistill.teacher.v1.TeacherService/Answer")
        with pytest.raises(grpc.RpcError) as info:
            answer(b"\x0a\x03garbage", timeout=10)  # not even parsed: the token check comes first
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        health = health_pb2_grpc.HealthStub(raw).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING  # probes need no secret
        raw.close()
        assert server.metrics.rows.labels("Answer")._value.get() == 0
        assert server.metrics.requests.labels("Answer", "UNAUTHENTICATED")._value.get() == 1
        assert server.metrics.requests.labels("Describe", "UNAUTHENTICATED")._value.get() == 3

        remote = RemoteTeacher(target, auth=ClientAuth(token=TOKEN))
        assert answers_correctly(remote, mlp_teacher)
        remote.close()
    finally:
        server.stop(grace=0)


def test_tls_serves_only_clients_that_trust_it(mlp_teacher, pki):
    server = serve(mlp_teacher, tls=ServerTLS(pki / "server.pem", pki / "server.key"))
    target = f"127.0.0.1:{server.port}"
    try:
        remote = RemoteTeacher(target, auth=ClientAuth(tls=True, ca=pki / "ca.pem"))
        assert remote.url == f"grpcs://{target}" and answers_correctly(remote, mlp_teacher)
        remote.close()
        with pytest.raises(TeacherUnavailable):
            RemoteTeacher(target, connect_timeout_s=3)  # plaintext against TLS
        with pytest.raises(TeacherUnavailable):
            RemoteTeacher(target, connect_timeout_s=3, auth=ClientAuth(tls=True, ca=pki / "rogue-ca.pem"))
    finally:
        server.stop(grace=0)


def test_mutual_tls_needs_a_client_certificate_from_the_trusted_ca(mlp_teacher, pki):
    tls = ServerTLS(pki / "server.pem", pki / "server.key", client_ca=pki / "ca.pem")
    server = serve(mlp_teacher, tls=tls)
    target = f"127.0.0.1:{server.port}"
    try:
        good = ClientAuth(tls=True, ca=pki / "ca.pem", cert=pki / "client.pem", key=pki / "client.key")
        remote = RemoteTeacher(target, auth=good)
        assert answers_correctly(remote, mlp_teacher)
        remote.close()
        for bad in (ClientAuth(tls=True, ca=pki / "ca.pem"),
                    ClientAuth(tls=True, ca=pki / "ca.pem", cert=pki / "rogue.pem", key=pki / "rogue.key")):
            with pytest.raises((TeacherUnavailable, Unauthenticated)):
                RemoteTeacher(target, connect_timeout_s=3, timeout_s=3, auth=bad)
    finally:
        server.stop(grace=0)


def test_client_auth_options_are_checked():
    with pytest.raises(ValueError, match="both cert= and key="):
        ClientAuth.from_options(True, {"cert": "c.pem"})
    with pytest.raises(ValueError, match="need a grpcs:// URL"):
        ClientAuth.from_options(False, {"ca": "ca.pem"})
    with pytest.raises(ValueError, match="token file .*missing"):
        ClientAuth.from_options(False, {"token_file": "/nonexistent/missing"})


def test_trainer_and_server_clis_with_tls_and_a_token(synthetic_dir, teacher_dirs, pki, tmp_path):
    """teacher-server with mutual TLS and a token file; ddistill train pointed at it by grpcs:// URL."""
    port = free_port()
    token_file = tmp_path / "trainer-token"
    token_file.write_text(TOKEN + "\n")
    server = start_teacher_server(
        teacher_dirs["mlp-l"], port, "--token-file", str(pki / "tokens"), "--tls-cert", str(pki / "server.pem"),
        "--tls-key", str(pki / "server.key"), "--tls-client-ca", str(pki / "ca.pem"),
        auth=ClientAuth(token=TOKEN, tls=True, ca=pki / "ca.pem", cert=pki / "client.pem", key=pki / "client.key"),
    )
    tls = f"ca={pki / 'ca.pem'}&cert={pki / 'client.pem'}&key={pki / 'client.key'}"
    ddistill = [console_script("ddistill"), "--threads", "1", "train", "--data", str(synthetic_dir), "--steps", "40",
                "--batch-size", "16", "--d-emb", "16", "--d-m", "8", "--device", "cpu"]
    try:
        run = tmp_path / "run"
        ok = subprocess.run([*ddistill, "--teacher", f"grpcs://localhost:{port}?token_file={token_file}&{tls}",
                             "--run-dir", str(run)], capture_output=True, text=True, timeout=600)
        assert ok.returncode == 0, ok.stderr[-3000:]
        assert json.loads(ok.stdout)["rows_sent"]["mlp-l"] > 0
        assert not any(TOKEN in p.read_text(errors="ignore") for p in run.rglob("*") if p.is_file())

        (tmp_path / "wrong").write_text("not-the-token\n")
        refused = subprocess.run([*ddistill, "--teacher", f"grpcs://localhost:{port}?token_file={tmp_path / 'wrong'}&{tls}",
                                  "--run-dir", str(tmp_path / "refused")], capture_output=True, text=True, timeout=600)
        assert refused.returncode == 3 and "missing or invalid bearer token" in refused.stderr
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_server_cli_refuses_unusable_security_settings(teacher_dirs, tmp_path, caplog, capsys):
    """``teacher-server``'s main, in this process: each bad setting stops start-up with exit code 2."""
    from services.teacher_server.server import main

    base = ["--checkpoint", str(teacher_dirs["mlp-l"]), "--port", "0", "--http-port", "-1"]
    (tmp_path / "empty").write_text("# no tokens here\n")
    for extra, message in (
        (["--token-file", str(tmp_path / "empty")], "holds no token"),
        (["--token-file", str(tmp_path / "absent")], "No such file"),
        (["--tls-cert", str(tmp_path / "absent.pem"), "--tls-key", str(tmp_path / "absent.key")], "No such file"),
    ):
        caplog.clear()
        assert main([*base, *extra]) == 2
        assert message in caplog.text, caplog.text
    with pytest.raises(SystemExit) as info:
        main([*base, "--tls-cert", "x.pem"])
    assert info.value.code == 2 and "go together" in capsys.readouterr().err
