"""Who may call a teacher: bearer tokens on every TeacherService RPC, and TLS / mutual TLS.

A teacher runs on a port that other teams can reach, so a server can require

* a bearer token (``authorization: Bearer <token>`` metadata) on every TeacherService
  RPC. Tokens come from a file (``--token-file``, one per line, ``#`` comments) or the
  ``DDISTILL_TEACHER_TOKENS`` environment variable (comma-separated), never from the
  command line, where ``ps`` would show them. A call without a valid token gets
  UNAUTHENTICATED before its request is even decoded: nothing is computed. Health and
  reflection stay open, so probes and load balancers need no secret.
* TLS with the server's certificate, and mutual TLS when ``--tls-client-ca`` is given
  (clients must present a certificate signed by that CA).

The client side (``ClientAuth``) carries the token and the channel credentials (and,
for teachers on Ray Serve, the ``application`` metadata that routes a call).
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc

TOKENS_ENV = "DDISTILL_TEACHER_TOKENS"  # server: accepted tokens, comma-separated
TOKEN_ENV = "DDISTILL_TEACHER_TOKEN"  # client: the token to send when a teacher URL names none
PROTECTED_PREFIX = "/ddistill.teacher.v1.TeacherService/"


class AuthConfigError(ValueError):
    """A token file or certificate that cannot be used."""


def read_token_file(path: str | Path) -> list[str]:
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as err:
        raise AuthConfigError(f"token file {path}: {err.strerror or err}") from None
    tokens = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not tokens:
        raise AuthConfigError(f"token file {path} holds no token")
    return tokens


def server_tokens(token_file: str | Path | None) -> frozenset[str] | None:
    """Accepted tokens from ``token_file`` or, without one, ``$DDISTILL_TEACHER_TOKENS``; None: no check."""
    if token_file is not None:
        return frozenset(read_token_file(token_file))
    env = os.environ.get(TOKENS_ENV, "")
    tokens = [t.strip() for t in env.split(",") if t.strip()]
    return frozenset(tokens) if tokens else None


def _read(path: str | Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise AuthConfigError(f"{what} {path}: {err.strerror or err}") from None


@dataclass(frozen=True)
class ServerTLS:
    cert: Path  # PEM certificate chain of the server
    key: Path  # PEM private key
    client_ca: Path | None = None  # set: mutual TLS, clients must present a cert signed by this CA

    def credentials(self) -> grpc.ServerCredentials:
        pair = (_read(self.key, "TLS key"), _read(self.cert, "TLS certificate"))
        client_ca = _read(self.client_ca, "client CA")
        return grpc.ssl_server_credentials(
            [pair], root_certificates=client_ca, require_client_auth=client_ca is not None
        )


class TokenCheck:
    """Is a call's ``authorization: Bearer <token>`` metadata one of the accepted tokens?

    Shared by the plain server's interceptor and the Ray Serve deployment."""

    def __init__(self, tokens: Iterable[str]) -> None:
        self._tokens = [t.encode() for t in tokens]
        if not self._tokens:
            raise AuthConfigError("a token check needs at least one token")

    def __call__(self, metadata) -> bool:
        for key, value in metadata or ():
            if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
                given = value.removeprefix("Bearer ").encode()
                # compare against every token in constant time: no early exit that leaks which matched
                return any([hmac.compare_digest(given, t) for t in self._tokens])
        return False


UNAUTHENTICATED_DETAILS = "missing or invalid bearer token for this teacher"


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Rejects TeacherService calls without a valid bearer token, before anything runs.

    ``on_reject(method)`` is told of every rejection (the server counts them in its metrics).
    """

    def __init__(self, tokens: Iterable[str], on_reject: Callable[[str], None] | None = None) -> None:
        self._valid = TokenCheck(tokens)
        self._on_reject = on_reject

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if not method.startswith(PROTECTED_PREFIX) or self._valid(handler_call_details.invocation_metadata):
            return continuation(handler_call_details)
        if self._on_reject is not None:
            self._on_reject(method.removeprefix(PROTECTED_PREFIX))

        def reject(_request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_DETAILS)

        # no deserializer: the request bytes are never even parsed
        return grpc.unary_unary_rpc_method_handler(reject)


@dataclass(frozen=True)
class ClientAuth:
    """What a client presents: a bearer token, and TLS settings for ``grpcs://`` endpoints."""

    token: str | None = None
    tls: bool = False
    ca: Path | None = None  # None with tls: the system's root certificates
    cert: Path | None = None  # client certificate and key, for mutual TLS
    key: Path | None = None
    application: str | None = None  # Ray Serve: the application (teacher) a call is routed to

    @classmethod
    def from_options(cls, tls: bool, options: dict[str, str]) -> ClientAuth:
        """From a teacher URL's options: ``token_file``, ``ca``, ``cert``, ``key``, ``application``.

        Without ``token_file`` the token is ``$DDISTILL_TEACHER_TOKEN`` when set.
        """
        token_file = options.get("token_file")
        token = read_token_file(token_file)[0] if token_file else (os.environ.get(TOKEN_ENV) or None)
        if ("cert" in options) != ("key" in options):
            raise AuthConfigError("mutual TLS needs both cert= and key=")
        if not tls and any(k in options for k in ("ca", "cert", "key")):
            raise AuthConfigError("ca=, cert= and key= need a grpcs:// URL")
        paths = {k: Path(options[k]) for k in ("ca", "cert", "key") if k in options}
        return cls(token=token, tls=tls, application=options.get("application") or None, **paths)

    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        pairs = [("authorization", f"Bearer {self.token}")] if self.token else []
        if self.application:
            pairs.append(("application", self.application))
        return tuple(pairs) or None

    def channel(self, target: str, options: list[tuple[str, object]]) -> grpc.Channel:
        if not self.tls:
            return grpc.insecure_channel(target, options=options)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca, "CA certificate"),
            private_key=_read(self.key, "TLS key"),
            certificate_chain=_read(self.cert, "TLS certificate"),
        )
        return grpc.secure_channel(target, credentials, options=options)
