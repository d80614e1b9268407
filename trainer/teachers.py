"""Teacher URLs on the trainer's command line, with per-teacher options.

    --teacher local:checkpoints/mlp-l              in this process (the embedded default)
    --teacher local:checkpoints/lm?dtype=bfloat16  in this process, computing in bfloat16
    --teacher local:checkpoints/lm?device=cuda     in this process, on the GPU (the trainer's device by default)
    --teacher grpc://mlp-l:50051                   a teacher server
    --teacher grpc://api-host:443?grad=spsa&directions=16
                                                   forward-only: zeroth-order VJP estimates
    --teacher grpcs://mlp-l:50051?token_file=/run/secrets/token&ca=ca.pem
                                                   TLS (cert=/key= for mutual TLS) and a bearer token
    --teacher grpc://serve-host:9000?application=mlp-l
                                                   a teacher on Ray Serve (deploy/serve_movielens.yaml)

``grad`` is ``vjp`` (the teacher's AnswerVJP; default when its spec offers it) or
``spsa`` (antithetic random directions; default when it does not). ``token_file`` names a
file whose first token is sent as ``authorization: Bearer``; without it,
``$DDISTILL_TEACHER_TOKEN`` is sent when set. ``ca``, ``cert``, ``key`` are PEM files
for ``grpcs://`` (``ca`` defaults to the system's roots). ``dtype`` (local teachers; a
server takes ``teacher-server --dtype``) is the compute dtype: float32, bfloat16 or float16.
``device`` (local teachers; a server takes ``--device``) puts the teacher on another device than
the trainer's: a large teacher on the GPU beside a small student on the CPU, or teachers on
different GPUs (``cuda:1``); answers reach the trainer on its own device either way.
``budget`` (any teacher) is its call budget: the most of each batch's rows it may answer
(``trainer.budget``), e.g. ``local:checkpoints/lm?budget=0.1``; it is the trainer's, not the endpoint's.
"""

from __future__ import annotations

import logging
from urllib.parse import parse_qs, urlsplit

from services.teacher_server.auth import ClientAuth
from services.teacher_server.client import TeacherEndpoint, connect

from .budget import check_share
from .zeroth_order import SPSAEndpoint

log = logging.getLogger(__name__)
GRAD_OPTIONS = {"grad", "directions", "eps"}
AUTH_OPTIONS = {"token_file", "ca", "cert", "key", "application"}
LOCAL_OPTIONS = {"dtype", "device"}
TRAINER_OPTIONS = {"budget"}
OPTIONS = GRAD_OPTIONS | AUTH_OPTIONS | LOCAL_OPTIONS | TRAINER_OPTIONS
SCHEMES = ("local:", "grpc://", "grpcs://")


def url_options(url: str) -> tuple[str, dict[str, str]]:
    """(the URL without its query, its options), or a ValueError naming what is wrong with it."""
    base, _, query = url.partition("?")
    if not base.startswith(SCHEMES):
        raise ValueError(f"teacher URL {url!r}: expected local:CHECKPOINT_DIR, grpc://HOST:PORT or grpcs://HOST:PORT")
    try:
        options = {k: v[-1] for k, v in parse_qs(query, strict_parsing=bool(query)).items()}
    except ValueError:
        raise ValueError(f"teacher URL {url!r}: options must read ?key=value&key=value") from None
    unknown = set(options) - OPTIONS
    if unknown:
        raise ValueError(f"teacher URL {url!r}: unknown option(s) {sorted(unknown)}; known: {sorted(OPTIONS)}")
    return base, options


def url_budget(url: str) -> float | None:
    """The teacher's call budget from its URL (``?budget=``), checked; None when it has none."""
    _, options = url_options(url)
    return check_share(options["budget"], f"teacher URL {url!r}") if "budget" in options else None


def check_teacher_url(url: str) -> None:
    """Refuse, before anything is loaded, a URL that names no teacher: an unknown scheme or option, a
    bad budget, a grpc:// URL without a port, a local: folder that holds no teacher checkpoint."""
    from pathlib import Path

    base, _ = url_options(url)
    url_budget(url)
    if base.startswith(("grpc://", "grpcs://")) and not urlsplit(base).port:
        raise ValueError(f"teacher URL {url!r}: give a port, grpc://HOST:PORT")
    if base.startswith("local:") and not (Path(base.removeprefix("local:")) / "teacher.yaml").is_file():
        raise FileNotFoundError(f"teacher URL {url!r}: {base.removeprefix('local:')} holds no teacher checkpoint "
                                "(teacher.yaml); fit one with `ddistill fit-teacher` or point at its folder")


def open_teacher(url: str, *, seed: int = 0, **connect_options) -> TeacherEndpoint:
    base, options = url_options(url)
    remote = base.startswith(("grpc://", "grpcs://"))
    if remote and not urlsplit(base).port:
        raise ValueError(f"teacher URL {url!r}: give a port, grpc://HOST:PORT")
    if base.startswith("local:"):
        if set(options) & AUTH_OPTIONS:
            raise ValueError(f"teacher URL {url!r}: {sorted(AUTH_OPTIONS)} apply to grpc(s):// teachers only")
        connect_options = {"device": options.get("device", connect_options.get("device", "cpu")),
                           "dtype": options.get("dtype", "float32")}
    else:
        misplaced = sorted(LOCAL_OPTIONS & set(options))
        if misplaced:
            name = misplaced[0]
            raise ValueError(f"teacher URL {url!r}: {name} applies to local: teachers (a server takes --{name})")
        connect_options.pop("device", None)
        if remote:
            connect_options["auth"] = ClientAuth.from_options(base.startswith("grpcs://"), options)
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
        "compute_dtype": spec.compute_dtype, "gradient": "spsa" if isinstance(endpoint, SPSAEndpoint) else "vjp",
    }
