"""Shared fixtures: synthetic MovieLens files, small real teachers, servers on loopback."""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DDISTILL_DATA", REPO.parent / "shared" / "data"))
ML100K = SHARED_DATA / "ml-100k"

# Under pytest-xdist (`make test`) the workers share the cores: each takes its share of torch's
# threads instead of all of them, so that N workers do not run N x cores threads.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, torch.get_num_threads() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def free_port() -> int:
    """A loopback port nothing listens on right now (for servers started as processes)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def console_script(name: str) -> str:
    """Path of one of our console scripts, installed next to the interpreter running the tests.

    CI runs ``.venv/bin/python -m pytest`` without activating the venv, so the scripts are not
    on PATH; resolving them here still exercises the real installed entry points.
    """
    path = Path(sys.executable).parent / name
    if not path.exists():
        pytest.fail(f"console script {name!r} not installed next to {sys.executable}; run `make install`")
    return str(path)


def start_teacher_server(checkpoint, port: int, *extra_args: str, auth=None):
    """A ``teacher-server`` process for ``checkpoint`` on a loopback port, once it serves.

    ``extra_args`` go to the command line (tokens, TLS); ``auth`` is the ClientAuth the
    readiness probe needs against such a server.
    """
    import subprocess

    from services.teacher_server.client import RemoteTeacher

    process = subprocess.Popen([
        console_script("teacher-server"), "--checkpoint", str(checkpoint), "--host", "127.0.0.1", "--port", str(port),
        "--http-port", "-1", "--threads", "1", "--log-level", "WARNING", *extra_args,
    ])
    RemoteTeacher(f"127.0.0.1:{port}", connect_timeout_s=120, auth=auth).close()
    return process


def wait_for(predicate, timeout: float) -> bool:
    """Polls ``predicate`` until it holds (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


OCCUPATIONS = ["artist", "engineer", "student", "writer"]


def write_synthetic_movielens(folder: Path, n_users: int = 60, n_items: int = 80, n_ratings: int = 3000, seed: int = 0):
    """u.data/u.user/u.item/u.occupation plus a train/test split (``ua.base``/``ua.test``).

    Ratings follow a planted rank-2 structure plus noise, so a model can learn them.
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    u_f, i_f = rng.normal(size=(n_users + 1, 2)), rng.normal(size=(n_items + 1, 2))
    pairs = rng.choice(n_users * n_items, size=n_ratings, replace=False)
    users, items = pairs // n_items + 1, pairs % n_items + 1
    score = 3.2 + (u_f[users] * i_f[items]).sum(1) + 0.3 * rng.normal(size=n_ratings)
    ratings = np.clip(np.rint(score), 1, 5).astype(int)
    times = 880_000_000 + rng.integers(0, 10_000_000, size=n_ratings)
    rows = [f"{u}\t{i}\t{r}\t{t}" for u, i, r, t in zip(users, items, ratings, times)]
    (folder / "u.data").write_text("\n".join(rows) + "\n")
    cut = int(0.8 * n_ratings)
    (folder / "ua.base").write_text("\n".join(rows[:cut]) + "\n")
    (folder / "ua.test").write_text("\n".join(rows[cut:]) + "\n")
    (folder / "u.occupation").write_text("\n".join(OCCUPATIONS) + "\n")
    (folder / "u.user").write_text("".join(
        f"{u}|{rng.integers(15, 70)}|{'MF'[u % 2]}|{OCCUPATIONS[u % len(OCCUPATIONS)]}|0000{u}\n"
        for u in range(1, n_users + 1)
    ))
    genre_flags = lambda i: "|".join("1" if (i + g) % 7 == 0 else "0" for g in range(19))  # noqa: E731
    (folder / "u.item").write_bytes("".join(
        f"{i}|Café Movie {i} ({1950 + i % 45})|01-Jan-{1950 + i % 45}||http://x|{genre_flags(i)}\n"
        for i in range(1, n_items + 1)
    ).encode("latin-1"))
    return folder


def write_learnable_cifar(path: Path, n_train: int = 40, n_test: int = 10, seed: int = 0) -> Path:
    """A tar.gz in the real archive's layout whose classes differ by colour (plus noise): learnable."""
    import io
    import tarfile

    from PIL import Image

    from services.teacher_server.images import CIFAR10_CLASSES

    rng = np.random.default_rng(seed)
    with tarfile.open(path, "w:gz") as archive:
        for split, n in (("train", n_train), ("test", n_test)):
            for label, name in enumerate(CIFAR10_CLASSES):
                base = np.array([20 + 23 * label, 230 - 21 * label, (60 + 97 * label) % 256])
                for i in range(n):
                    pixels = np.clip(base + rng.normal(0, 25, (32, 32, 3)), 0, 255).astype(np.uint8)
                    buffer = io.BytesIO()
                    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
                    info = tarfile.TarInfo(f"{split}/{name}/{i:04d}.jpg")
                    info.size = buffer.tell()
                    buffer.seek(0)
                    archive.addfile(info, buffer)
    return path


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    return write_synthetic_movielens(tmp_path_factory.mktemp("synthetic-ml"))


@pytest.fixture(scope="session")
def synthetic_data(synthetic_dir):
    from trainer.data.movielens import load_movielens

    return load_movielens(synthetic_dir, seed=0)


@pytest.fixture(scope="session")
def teacher_dirs(synthetic_data, tmp_path_factory) -> dict[str, Path]:
    """Small fitted MLP-M and MLP-L teacher checkpoints, in folders named by kind."""
    from services.teacher_server.checkpoint import save_teacher
    from trainer.fit_teacher import MLPFitConfig, fit_teacher

    folder = tmp_path_factory.mktemp("run-teachers")
    out = {}
    for kind in ("mlp-m", "mlp-l"):
        result = fit_teacher(kind, synthetic_data, seed=0, config=MLPFitConfig(max_epochs=3, embed_dim=8))
        out[kind] = save_teacher(result.teacher, folder / kind, {"fit": result.report})
    return out


@pytest.fixture(scope="session")
def ml100k():
    if not (ML100K / "u.data").is_file():
        pytest.skip(f"MovieLens-100k not found at {ML100K} (set DDISTILL_DATA)")
    from trainer.data.movielens import load_movielens

    return load_movielens(ML100K, seed=0)


@pytest.fixture(scope="session")
def mlp_teacher(synthetic_data):
    """A small MLP teacher with side features and history tables, random weights."""
    from services.teacher_server.zoo import MLPTeacher
    from trainer.models import build_recsys_mlp

    torch.manual_seed(0)
    model = build_recsys_mlp(synthetic_data, synthetic_data.train, (32, 16), embed_dim=8, history=True)
    return MLPTeacher("mlp-tiny", model).freeze()


@pytest.fixture(scope="session")
def lm_teacher():
    """The real pretrained MiniLM with a fresh head (the head's init is seeded)."""
    from services.teacher_server.zoo import MiniLMTeacher

    torch.manual_seed(0)
    return MiniLMTeacher.pretrained("lm-test", max_length=48).freeze()


@pytest.fixture(scope="session")
def served_mlp(mlp_teacher):
    """The MLP teacher behind a real gRPC server on a loopback port (and its HTTP port)."""
    from services.teacher_server.server import ServerConfig, TeacherServer

    server = TeacherServer(mlp_teacher, ServerConfig(host="127.0.0.1", port=0, http_port=0, max_rows=4096)).start()
    yield server
    server.stop(grace=0)


@pytest.fixture(scope="session")
def served_lm(lm_teacher):
    from services.teacher_server.server import ServerConfig, TeacherServer

    server = TeacherServer(lm_teacher, ServerConfig(host="127.0.0.1", port=0, http_port=None)).start()
    yield server
    server.stop(grace=0)


@pytest.fixture
def remote_mlp(served_mlp):
    from services.teacher_server.client import RemoteTeacher

    client = RemoteTeacher(f"127.0.0.1:{served_mlp.port}", timeout_s=30)
    yield client
    client.close()


@pytest.fixture
def remote_lm(served_lm):
    from services.teacher_server.client import RemoteTeacher

    client = RemoteTeacher(f"127.0.0.1:{served_lm.port}", timeout_s=60)
    yield client
    client.close()


TEXTS = [
    "User: 24 year old male technician. Average rating 3.61 over 271 movies. Movie: Toy Story (1995); Comedy.",
    "User: 53 year old female other. No other ratings. Movie: GoldenEye (1995); Action, Thriller.",
    "Movie: Heat",
]
