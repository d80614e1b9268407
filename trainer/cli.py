"""``ddistill``: the command line of the distillation fleet.

    ddistill fit-teacher --kind mlp-l --data ../shared/data/ml-100k --out checkpoints/mlp-l
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

log = logging.getLogger("ddistill")


def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data (an ml-100k folder, or u.data-format train/test files)")
    g.add_argument("--data", type=Path, help="ml-100k folder; split 80/20 at random by --seed")
    g.add_argument("--train", type=Path, help="training ratings file (u.data format)")
    g.add_argument("--test", type=Path, help="test ratings file (u.data format)")
    g.add_argument("--seed", type=int, default=0, help="seed of the split and of training (default 0)")


def load_data(args: argparse.Namespace):
    from .data.movielens import load_movielens

    if args.data is not None and (args.train or args.test):
        raise SystemExit("give --data, or --train and --test, not both")
    if args.data is None and not (args.train and args.test):
        raise SystemExit("give --data DIR, or both --train FILE and --test FILE")
    return load_movielens(args.data, train_file=args.train, test_file=args.test, seed=args.seed)


def cmd_fit_teacher(args: argparse.Namespace) -> int:
    from services.teacher_server.checkpoint import save_teacher
    from services.teacher_server.zoo import resolve_device

    from .fit_teacher import LMFitConfig, MLPFitConfig, fit_teacher

    data = load_data(args)
    if args.kind == "lm":
        config = LMFitConfig()
        if args.max_steps is not None:
            config.max_steps = args.max_steps
        if args.time_budget is not None:
            config.time_budget_s = args.time_budget
    else:
        config = MLPFitConfig()
        if args.max_epochs is not None:
            config.max_epochs = args.max_epochs
    log.info("fitting %s on %s (%d train / %d test ratings)", args.kind, data.source, len(data.train), len(data.test))
    result = fit_teacher(args.kind, data, seed=args.seed, device=resolve_device(args.device), config=config)
    out = args.out or Path("checkpoints") / args.kind
    save_teacher(result.teacher, out, metadata={"fit": result.report})
    print(json.dumps({"checkpoint": str(out), **result.report}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddistill", description="DiverseDistill from a fleet of frozen teachers")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fit-teacher", help="train a MovieLens teacher and save a servable checkpoint")
    p.add_argument("--kind", required=True, choices=["mlp-m", "mlp-l", "lm"])
    add_data_args(p)
    p.add_argument("--out", type=Path, help="checkpoint folder (default checkpoints/KIND)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--max-epochs", type=int, help="MLP kinds: epoch limit (early stopping decides before)")
    p.add_argument("--max-steps", type=int, help="lm: optimizer step limit")
    p.add_argument("--time-budget", type=float, help="lm: fine-tuning time limit in seconds")
    p.set_defaults(func=cmd_fit_teacher)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as err:
        log.error("%s", err)
        return 2


if __name__ == "__main__":
    sys.exit(main())
