"""``ddistill``: the command line of the distillation fleet.

    ddistill fit-teacher --kind mlp-l --data ../shared/data/ml-100k --out checkpoints/mlp-l
    ddistill fit-teacher --kind vit --data ../shared/data/cifar-10-jpg.tar.gz --out checkpoints/vit
    ddistill train --teacher local:checkpoints/mlp-l --teacher grpc://localhost:50052 \
        --data ../shared/data/ml-100k --run-dir runs/dd-seed0
    ddistill train --resume runs/dd-seed0
    ddistill eval runs/dd-seed0 --base runs/none-seed0 [--json]
    ddistill export runs/dd-seed0 --out student/
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from services.teacher_server.client import TeacherUnavailable, Unauthenticated
from services.teacher_server.tuning import tune_allocator

DIVERGED_EXIT = 3  # `train` stopped early because the loss diverged; its result.json says where

log = logging.getLogger("ddistill")


ML100K_DATA_HELP = "ml-100k folder; split 80/20 at random by --split-seed"


def add_data_args(p: argparse.ArgumentParser, data_help: str = ML100K_DATA_HELP) -> None:
    g = p.add_argument_group("data (an ml-100k folder, or u.data-format train/test files)")
    g.add_argument("--data", type=Path, help=data_help)
    g.add_argument("--train", type=Path, help="training ratings file (u.data format)")
    g.add_argument("--test", type=Path, help="test ratings file (u.data format)")
    g.add_argument("--split-seed", type=int, default=0,
                   help="seed of the train/test and validation split (default 0); keep it equal for teachers "
                        "and students, or a student's test rows may be in its teachers' training data")
    p.add_argument("--seed", type=int, default=0, help="seed of training (initialisation, batches)")


def load_data(args: argparse.Namespace):
    from .data.movielens import load_movielens

    if args.data is not None and (args.train or args.test):
        raise SystemExit("give --data, or --train and --test, not both")
    if args.data is None and not (args.train and args.test):
        raise SystemExit("give --data DIR, or both --train FILE and --test FILE")
    return load_movielens(args.data, train_file=args.train, test_file=args.test, seed=args.split_seed)


def cmd_fit_teacher(args: argparse.Namespace) -> int:
    from services.teacher_server.checkpoint import save_teacher
    from services.teacher_server.zoo import resolve_device

    from .fit_teacher import LMFitConfig, MLPFitConfig, fit_teacher
    from .fit_vision import VISION_KINDS, default_vision_config

    if args.bf16 and args.kind != "lm":
        raise SystemExit("--bf16 is for --kind lm")
    if args.kind in VISION_KINDS:
        data, config = load_vision_data(args), default_vision_config(args.kind)
        for field, value in (("preset", args.preset), ("pretrained", args.pretrained), ("max_steps", args.max_steps),
                             ("time_budget_s", args.time_budget), ("inject_layer", args.inject_layer),
                             ("n_valid", args.valid_rows), ("lr", args.lr), ("batch_size", args.batch_size)):
            if value is not None:
                setattr(config, field, str(value) if field == "pretrained" else value)
        log.info("fitting %s (%s) on %s (%d train / %d test images)", args.kind, config.preset, data.source,
                 len(data.train), len(data.test))
    else:
        vision_only = (args.preset, args.pretrained, args.inject_layer, args.valid_rows, args.lr, args.batch_size)
        if any(v is not None for v in vision_only):
            raise SystemExit("--preset, --pretrained, --inject-layer, --valid-rows, --lr and --batch-size are for "
                             "the vision kinds (vit, clip)")
        data = load_data(args)
        if args.kind == "lm":
            config = LMFitConfig()
            if args.max_steps is not None:
                config.max_steps = args.max_steps
            if args.time_budget is not None:
                config.time_budget_s = args.time_budget
            config.bf16 = args.bf16
        else:
            config = MLPFitConfig()
            if args.max_epochs is not None:
                config.max_epochs = args.max_epochs
        log.info("fitting %s on %s (%d train / %d test ratings)", args.kind, data.source, len(data.train),
                 len(data.test))
    result = fit_teacher(
        args.kind, data, seed=args.seed, split_seed=args.split_seed, device=resolve_device(args.device), config=config
    )
    out = args.out or Path("checkpoints") / args.kind
    save_teacher(result.teacher, out, metadata={"fit": result.report})
    print(json.dumps({"checkpoint": str(out), **result.report}, indent=2))
    return 0


def load_vision_data(args: argparse.Namespace):
    from .data.cifar10 import load_cifar10

    if args.train or args.test:
        raise SystemExit("the vision kinds take --data (cifar-10-jpg.tar.gz or a folder with train/ and test/)")
    if args.data is None:
        raise SystemExit("give --data: a cifar-10-jpg.tar.gz or a folder with train/<class>/ and test/<class>/")
    return load_cifar10(args.data, cache_dir=args.cache_dir)


def cmd_train(args: argparse.Namespace) -> int:
    from .train import TrainingStopped, resume, train

    try:
        result = resume(args.resume) if args.resume else train(train_config(args), args.run_dir)
    except TrainingStopped as stopped:
        print(f"ddistill: {stopped}", file=sys.stderr)
        return 128 + stopped.signum  # the shell's convention for "ended by this signal"
    print(json.dumps(result, indent=2))
    return DIVERGED_EXIT if "diverged_at_step" in result else 0


def train_config(args: argparse.Namespace):
    """The TrainConfig of a new run: ``--config FILE`` (if given), then each flag given on top of it."""
    from .run_config import FLAG_FIELDS, build_config, read_config_file, with_overrides

    if args.run_dir is None:
        raise SystemExit("give --run-dir for a new run (or --resume RUN_DIR)")
    given = {dest: getattr(args, dest) for dest in FLAG_FIELDS if hasattr(args, dest)}
    overrides = {FLAG_FIELDS[dest]: str(v) if isinstance(v, Path) else v for dest, v in given.items()}
    if "teachers" in overrides and not overrides["teachers"]:
        del overrides["teachers"]
    config = with_overrides(read_config_file(args.config) if args.config else {}, overrides)
    built = build_config(config, source=str(args.config) if args.config else "flags")
    if built.data is None and not (built.train_file and built.test_file):
        raise SystemExit("give --data DIR, or both --train FILE and --test FILE (or data: in the --config file)")
    return built


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation import gap_recovery_rate
    from .run_dir import RunDir

    result = RunDir(args.run_dir).read_result()
    metric, lower_is_better = result.get("metric", "mse"), result.get("lower_is_better", True)
    key = f"test_{metric}"
    report = {"run": str(args.run_dir), "method": result["method"], "metric": metric, key: result[key]}
    if "teachers" in result:
        report["teachers"] = result["teachers"]
        scored = {name: v for name, v in result["teachers"].items() if v is not None}  # None: unreachable at the end
        best_name = (min if lower_is_better else max)(scored, key=scored.get)
        report["best_teacher"] = {"name": best_name, key: result["teachers"][best_name]}
        report["rows_saved"] = result.get("rows_saved/all")
        if "rows_sent" in result:  # what each teacher answered (DiverseDistill) or contributed (baselines)
            report["spend"] = {
                name: {"rows_sent": sent, "rows_possible": result["rows_possible"][name],
                       "budget": result.get("budgets", {}).get(name)}
                for name, sent in result["rows_sent"].items()
            }
    if "answers" in result:
        report["answers"] = result["answers"]
    if args.base:
        base = RunDir(args.base).read_result()
        report[f"base_{key}"] = base[key]
        if "best_teacher" in report:  # None (null) when the best teacher is no better than S_base
            report["grr"] = gap_recovery_rate(base[key], result[key], report["best_teacher"][key], lower_is_better)
    if args.json:
        print(json.dumps(report))
    else:
        label = {"mse": "MSE"}.get(metric, metric)
        print(f"{report['run']} ({report['method']}): test {label} {report[key]:.4f}")
        for name, value in report.get("teachers", {}).items():
            print(f"  teacher {name}: test {label} " + ("unreachable at the end of the run" if value is None
                                                          else f"{value:.4f}"))
        if f"base_{key}" in report:
            print(f"  S_base: test {label} {report[f'base_{key}']:.4f}")
        if report.get("grr") is not None:
            print(f"  gap recovery rate vs {report['best_teacher']['name']}: {report['grr']:.1%}")
        elif "grr" in report:
            print(f"  gap recovery rate: none (the best teacher, {report['best_teacher']['name']}, is no better than S_base)")
        if report.get("rows_saved") is not None:
            print(f"  teacher rows saved by gating: {report['rows_saved']:.1%}")
        for name, spend in report.get("spend", {}).items():
            budget = f" (budget {spend['budget']:.1%})" if spend["budget"] is not None else ""
            share = spend["rows_sent"] / max(spend["rows_possible"], 1)
            print(f"  teacher {name} answered {share:.1%} of rows: {spend['rows_sent']:,} of "
                  f"{spend['rows_possible']:,}{budget}")
        for name, probe in report.get("answers", {}).items():
            own = (f" (the teacher's own on {probe['teacher_beats_student']:.0%})"
                   if "teacher_beats_student" in probe else "")  # runs made before it was probed
            print(f"  answers of {name} on validation rows: teacher's own {label} {probe['teacher']:.4f}, "
                  f"read by the student's head {probe['answer']:.4f} (student {probe['student']:.4f}); "
                  f"better than the student's on {probe['answer_beats_student']:.0%} of rows{own}; importance "
                  f"mean {probe['importance_mean']:.2f}, {probe['gated_in']:.0%} gated in, "
                  f"AUC {probe['importance_auc']:.2f}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import load_student, save_student
    from .run_dir import RunDir

    run = RunDir(args.run_dir)
    student = load_student(run.student_dir)
    out = save_student(student, args.out, {"exported_from": str(run.path), "result": run.read_result()})
    n_params = sum(p.numel() for p in student.parameters())
    print(json.dumps({"student": str(out), "parameters": n_params}))
    return 0


def add_train_parser(sub) -> None:
    """``ddistill train``: every flag defaults to "not given", so that only the flags typed override a
    ``--config`` file; the defaults shown are the dataclasses' (``TrainConfig``, ``DistillConfig``)."""
    from .committee import FaultPolicy
    from .distill_module import DMConfig
    from .domains import DOMAINS
    from .methods import GATES, IMPORTANCE_TARGETS, METHODS, ROW_WEIGHTS, DistillConfig
    from .train import TrainConfig

    c, d, dm, faults = TrainConfig(method="none"), DistillConfig(), DMConfig(), FaultPolicy()
    p = sub.add_parser("train", help="distil a committee of teachers into a student (a run folder)",
                       argument_default=argparse.SUPPRESS,
                       epilog="Every setting can also be given in a --config file (configs/*.yaml; a run's own "
                              "config.yaml works too); flags given here override it.")
    p.add_argument("--config", type=Path, default=None, metavar="FILE",
                   help="a YAML run config (fields of TrainConfig, nested as distill:, distill.dm:, faults:)")
    p.add_argument("--teacher", action="append", metavar="URL",
                   help="local:CHECKPOINT_DIR (in this process), grpc://HOST:PORT or grpcs://HOST:PORT, repeatable; "
                        "options after ?: budget=0.1 (the most of each batch's rows this teacher answers), "
                        "dtype=auto|bfloat16 (local), grad=spsa (forward-only teachers), token_file=, ca= (README, 'Training against endpoints')")
    p.add_argument("--method", choices=sorted(METHODS), help="diversedistill (default); none (S_base); ld, fd (one teacher); mt, aekd (two or more)")
    p.add_argument("--domain", choices=sorted(DOMAINS),
                   help="dataset and student family: movielens (default; MLP-S, rating MSE) or cifar10 (ViT, accuracy)")
    g = p.add_argument_group("data (an ml-100k folder, or u.data-format train/test files)")
    g.add_argument("--data", type=Path, help=ML100K_DATA_HELP + " (cifar10: the JPEG archive or folder)")
    g.add_argument("--train", type=Path, help="training ratings file (u.data format)")
    g.add_argument("--test", type=Path, help="test ratings file (u.data format)")
    g.add_argument("--split-seed", type=int, help="seed of the train/test and validation split (default 0); the "
                                                  "one the teachers were fitted with")
    p.add_argument("--seed", type=int, help="seed of training: initialisation, batches, exploration (default 0)")
    p.add_argument("--run-dir", type=Path, default=None, help="folder for config, metrics, checkpoints and the student")
    p.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                   help="continue this run from its last checkpoint, with its own config")
    p.add_argument("--steps", type=int, help=f"optimizer steps (default {c.steps})")
    p.add_argument("--batch-size", type=int, help=f"rows per step (default {c.batch_size})")
    p.add_argument("--lr", type=float, help="the student's learning rate (default: the domain's, 0.06 / 0.1)")
    p.add_argument("--alpha", type=float, help=f"weight of the distillation loss (default {d.alpha:g})")
    p.add_argument("--beta", type=float, help=f"weight of L_reg on the Distillation Module (default {d.beta:g})")
    p.add_argument("--threshold", type=float,
                   help=f"the gate: skip (row, teacher) pairs with importance below this (default {d.threshold:g})")
    p.add_argument("--budget", type=float,
                   help="the call budget of every teacher without its own (?budget= on its URL): at most this share "
                        "of each batch's rows goes to it, at every step (default: none)")
    p.add_argument("--gate-warmup", type=int, help=f"steps before the gate closes (default {d.gate_warmup})")
    p.add_argument("--d-emb", type=int, help=f"Question Augmenter embedding width (default {dm.d_emb})")
    p.add_argument("--d-m", type=int, help=f"Question Augmenter M rows (default {dm.d_m})")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--eval-every", type=int, help=f"validation every this many steps (default {c.eval_every})")
    p.add_argument("--checkpoint-every", type=int, help=f"checkpoint every this many steps (default {c.checkpoint_every})")
    p.add_argument("--cache-dir", type=Path, help=f"teachers' cached outputs and decoded images (default {c.cache_dir})")
    g = p.add_argument_group("teacher faults (docs/reliability.md)")
    g.add_argument("--teacher-timeout", type=float,
                   help=f"deadline of one teacher request in seconds (default {c.teacher_timeout_s:g}); a slower "
                        "teacher counts as down")
    g.add_argument("--on-teacher-failure", choices=["wait", "skip"],
                   help="wait (default): retry until the teacher is back (the run stays exact); "
                        "skip: go on with the rest of the committee, the missing teacher weighing 0")
    g.add_argument("--teacher-wait", type=float,
                   help=f"wait: stop the run (resumable) if a teacher is not back within this many s "
                        f"(default {faults.wait_s:g})")
    g.add_argument("--teacher-retry-after", type=float,
                   help=f"skip: seconds before a failed teacher is asked again (default {faults.retry_after_s:g})")
    dd, fd = METHODS["diversedistill"], METHODS["fd"]
    g = p.add_argument_group("research controls (ablations of DiverseDistill and the baselines; docs/method.md)")
    g.add_argument("--optimizer", choices=["auto", "adagrad", "sgd-cosine"],
                   help="the student's optimizer; auto (default): the domain's paper recipe")
    g.add_argument("--module-lr", type=float, help="Adagrad learning rate of the Distillation Module or FD projector "
                   f"(default: the method's, DiverseDistill {dd.module_lr:g}, FD {fd.module_lr:g})")
    g.add_argument("--module-weight-decay", type=float, help="its weight decay (default: the method's, DiverseDistill "
                   f"{dd.module_weight_decay:g}, FD {fd.module_weight_decay:g})")
    g.add_argument("--gamma", type=float, help=f"weight of the importance loss (default {d.gamma:g})")
    g.add_argument("--explore", type=float,
                   help=f"share of gated-out pairs asked anyway; under a budget, of its rows (default {d.explore:g})")
    g.add_argument("--importance", choices=IMPORTANCE_TARGETS,
                   help="what w learns to predict: disagreement (default: the row is among the --importance-share "
                        "of rows where the teacher's prediction is furthest from the student's), teacher (its "
                        "prediction beats the student's), answer (its answer, read by the student's head, does) or "
                        "paper (Eq. 3 as written: collapses to 0)")
    g.add_argument("--importance-share", type=float,
                   help=f"--importance disagreement: the share of rows whose target is 1 (default {d.importance_share:g})")
    g.add_argument("--gate", choices=GATES,
                   help="learned (default: w >= --threshold, or under a budget the largest w), shuffled (a control: "
                        "as many pairs, at random, the weights permuted too); under budgets only: sampled (rows drawn "
                        "in proportion to w), random (drawn uniformly), disagreement (the rows furthest from the "
                        "teacher's cached prediction: reads it on every row)")
    g.add_argument("--row-weight", choices=ROW_WEIGHTS,
                   help="a sent row's weight in L_distill: its own w (own, default) or the batch mean w (a control)")
    g.add_argument("--anchor", choices=["row", "mean"],
                   help="questions start at the teacher's own state for the row (row, default) or at its average "
                        "state, a function of the student's x alone as in the paper (mean)")
    g.add_argument("--tolerance", type=float,
                   help=f"AEKD: the most weight one teacher may get (default {d.tolerance:g}; raised to 1/teachers)")
    g.add_argument("--temperature", type=float,
                   help=f"LD, MT, AEKD on classes: soft labels at this softmax temperature, loss times T^2 "
                        f"(default {d.temperature:g})")
    g.add_argument("--answer-hidden", type=int, help=f"hidden width of the Answer Augmenter's readouts: 0 linear "
                   f"(default), {dm.mlp_hidden} the paper's MLP")
    g.add_argument("--answer-norm", choices=["teacher", "layer"],
                   help="the readout's input: standardised by the teacher's own statistics (default), or a "
                        "LayerNorm per row")
    g.add_argument("--sequential", dest="concurrent", action="store_false",
                   help="call teachers one after another (benchmarks)")
    g.add_argument("--wire-dtype", choices=["float32", "bfloat16", "float16"],
                   help="dtype of questions and answers on the wire (default float32)")
    p.set_defaults(func=cmd_train)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddistill", description="DiverseDistill from a fleet of frozen teachers")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fit-teacher", help="train a MovieLens or CIFAR-10 teacher and save a servable checkpoint")
    p.add_argument("--kind", required=True, choices=["mlp-m", "mlp-l", "lm", "vit", "clip"],
                   help="MovieLens: mlp-m, mlp-l, lm; CIFAR-10: vit, clip (--data: the JPEG archive or folder)")
    add_data_args(p, data_help="ml-100k folder (split 80/20 at random by --split-seed), or for vit/clip "
                               "cifar-10-jpg.tar.gz or a folder with train/ and test/ (5,000 validation "
                               "images held out of train by --split-seed)")
    p.add_argument("--out", type=Path, help="checkpoint folder (default checkpoints/KIND)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--max-epochs", type=int, help="MLP kinds: epoch limit (early stopping decides before)")
    p.add_argument("--max-steps", type=int, help="lm, vit, clip: optimizer step limit (vit/clip: the cosine "
                                                      "schedule's length)")
    p.add_argument("--time-budget", type=float, help="lm, vit, clip: training time limit in seconds")
    p.add_argument("--bf16", action="store_true",
                   help="lm: forward under bfloat16 autocast (weights and optimizer stay float32; ~1.8x faster per step "
                   "on this CPU's bf16 units, more on a GPU)")
    g = p.add_argument_group("vision kinds (vit, clip)")
    g.add_argument("--preset", help="model size: vit-cifar (default), vit-cifar-tiny, vit-b16-224, vit-l16-224; "
                                    "clip-cifar (default), clip-cifar-tiny, clip-b32, clip-b16 (224 px: GPU only)")
    g.add_argument("--pretrained", type=Path, help="start from local weights: vit, a Hugging Face folder; "
                                                   "clip, a weights file for the preset's architecture")
    g.add_argument("--inject-layer", type=int, help="layer whose class-token input the question replaces "
                                                    "(default: the middle one)")
    g.add_argument("--lr", type=float, help="AdamW peak learning rate (default 2e-3, for training from scratch; "
                                            "use ~1e-5 to 1e-4 when fine-tuning --pretrained weights)")
    g.add_argument("--batch-size", type=int, help="images per step (default 128)")
    g.add_argument("--valid-rows", type=int, help="validation images held out of train for early stopping "
                                                  "(default 5,000: 500 per class)")
    g.add_argument("--cache-dir", type=Path, default=Path("runs/.cache"),
                   help="where the decoded CIFAR-10 arrays are cached (default runs/.cache)")
    p.set_defaults(func=cmd_fit_teacher)

    add_train_parser(sub)

    p = sub.add_parser("eval", help="a finished run's test MSE, its teachers', and the gap recovery rate")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--base", type=Path, help="the S_base run (method none) to compute GRR against")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="write the trained student alone (no Distillation Module, no teachers)")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tune_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return args.func(args)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        log.error("%s", err)
        return 2
    except (TeacherUnavailable, Unauthenticated) as err:
        log.error("%s", err)
        return 3


if __name__ == "__main__":
    sys.exit(main())
