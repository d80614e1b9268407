"""Teacher URLs on the trainer's command line, with per-teacher options.

    --teacher local:checkpoints/mlp-l              in this process (the embedded default)
    --teacher grpc://mlp-l:50051                   a teacher server
    --teacher grpc://api-host:443?grad=spsa&directions=16
                                                   forward-only: zeroth-order VJP estimates

``grad`` is ``vjp`` (the teacher's AnswerVJP; default when its spec offers it) or
``spsa`` (antithetic random directions; default when it does not).
"""

from __future__ import annotations

import logging
from urllib.parse import parse_qs, urlsplit

from services.teacher_server.client import TeacherEndpoint, connect

from .zeroth_order import SPSAEndpoint

log = logging.getLogger(__name__)
OPTIONS = {"grad", "directions", "eps"}


def open_teacher(url: str, *, seed: int = 0, **connect_options) -> TeacherEndpoint:
    base, _, query = url.partition("?")
    options = {k: v[-1] for k, v in parse_qs(query, strict_parsing=bool(query)).items()}
    unknown = set(options) - OPTIONS
    if unknown:
        raise ValueError(f"teacher URL {url!r}: unknown option(s) {sorted(unknown)}; known: {sorted(OPTIONS)}")
    if base.startswith("grpc://") and not urlsplit(base).port:
        raise ValueError(f"teacher URL {url!r}: give a port, grpc://HOST:PORT")
    if base.startswith("local:"):
        connect_options = {"device": connect_options.get("device", "cpu")}
    else:
        connect_options.pop("device", None)
    endpoint = connect(base, **connect_options)
    grad = options.get("grad", "vjp" if endpoint.spec.supports_vjp else "spsa")
    if grad not in ("vjp", "spsa"):
        raise ValueError(f"teacher URL {url!r}: grad must be vjp or spsa, not {grad!r}")
    if grad == "spsa":
        directions, eps = int(options.get("directions", 8)), float(options.get("eps", 1e-3))
        log.info("teacher %s: zeroth-order VJP (SPSA, %d directions)", endpoint.spec.name, directions)
        return SPSAEndpoint(endpoint, directions=directions, eps=eps, seed=seed)
    return endpoint


def identity(endpoint: TeacherEndpoint) -> dict:
    """What makes a committee member the same teacher across runs and resumes."""
    spec = endpoint.spec
    return {
        "url": endpoint.url, "name": spec.name, "family": spec.family, "weights_sha256": spec.weights_sha256,
        "gradient": "spsa" if isinstance(endpoint, SPSAEndpoint) else "vjp",
    }
