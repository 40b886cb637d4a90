"""`dcml train` and `dcml evaluate`: train with divide and conquer, evaluate a checkpoint."""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

from dcml.cli.arguments import positive_int
from dcml.errors import UserError

#: `--quick`: the smoke-test budget (the same for `dcml train` and `dcml demo`): a few epochs at
#: 64 px with only the backbone's last units training, so a run takes about a minute on two cores.
QUICK_OVERRIDES = (
    "data.image_size=64",
    "data.train_augmentation=none",
    "data.cache_frozen_features=true",
    "model.trainable_blocks=3",
    "schedule.epochs=4",
    "schedule.conquer_epoch=3",
    "schedule.finetune_epoch=null",
    "clustering.recluster_every=2",
)


def register(subparsers) -> None:
    train = subparsers.add_parser(
        "train",
        help="train an embedding with divide and conquer (or a single metric with --learners 1)",
        description="Train with the divide-and-conquer recipe of a YAML preset. Every setting can be "
        "overridden with --set section.field=value (see the preset files in dcml/presets). Several GPUs or "
        "nodes: torchrun --nproc_per_node N -m dcml train ... (PyTorch DDP; rank 0 writes). Writes "
        "DIR/config.yaml, DIR/log.jsonl (one line per epoch), DIR/last.pt (resumable), DIR/best.pt "
        "(the epoch selected on the validation classes) and DIR/metrics.json (test metrics of that epoch).",
    )
    train.add_argument("--preset", default="emoji", help="preset name or YAML file (default: %(default)s)")
    train.add_argument("--data-root", default=None, help="dataset folder (sets data.root)")
    train.add_argument("--weights", default=None, metavar="PATH",
                       help="backbone state dict file (sets model.weights), e.g. ResNet-50 ImageNet weights on an offline machine")
    train.add_argument("--learners", type=positive_int, default=None, help="K, the number of learners (sets clustering.learners)")
    train.add_argument("--epochs", type=positive_int, default=None, help="sets schedule.epochs")
    train.add_argument("--seed", type=int, default=None, help="sets seed")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one setting, e.g. --set clustering.unit=class (repeatable)")
    train.add_argument("--quick", action="store_true", help="a tiny budget for smoke tests (about a minute on a CPU)")
    train.add_argument("--out", type=Path, default=None, help="output folder (default: runs/<preset>-<time>)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    train.add_argument("--dry-run", action="store_true", help="check the dataset and settings, print the plan, do not train")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.set_defaults(handler=_train)

    evaluate = subparsers.add_parser(
        "evaluate",
        help="evaluate a checkpoint under its dataset's protocol",
        description="Load DIR/best.pt (or any dcml checkpoint) and print the metrics of the dataset's "
        "own protocol on the test data, or on --split.",
    )
    evaluate.add_argument("checkpoint", type=Path, help="a checkpoint file, or a run folder (uses its best.pt)")
    evaluate.add_argument("--split", default=None, help="evaluate this split instead of the protocol's test data (e.g. val)")
    evaluate.add_argument("--data-root", default=None, help="dataset folder, if it moved since training")
    evaluate.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    evaluate.add_argument("--no-progress", action="store_true")
    evaluate.set_defaults(handler=_evaluate)


def config_from_args(args: argparse.Namespace):
    from dcml.config import load_config

    # Later wins: the --quick budget, then --set, then the dedicated flags.
    overrides = list(QUICK_OVERRIDES) if args.quick else []
    overrides.extend(args.overrides)
    if args.data_root is not None:
        overrides.append(f"data.root={json.dumps(str(args.data_root))}")
    if args.weights is not None:
        overrides.append(f"model.weights={json.dumps(str(Path(args.weights).expanduser()))}")
    if args.learners is not None:
        overrides.append(f"clustering.learners={args.learners}")
    if args.epochs is not None:
        overrides.append(f"schedule.epochs={args.epochs}")
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    return load_config(args.preset, overrides)


def _default_out(preset: str) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{Path(preset).stem}-{stamp}"


def _train(args: argparse.Namespace) -> int:
    from dcml.training import checkpoint as ckpt
    from dcml.training import distributed

    resume_payload = None
    if args.resume:
        if args.out is None:
            raise UserError("--resume needs --out DIR (the run to continue)")
        # Under torchrun every rank reads it: on several nodes --out must be a folder they share.
        resume_payload = ckpt.load_checkpoint(args.out / ckpt.LAST)
        from dcml.config import load_config

        extra = [f"schedule.epochs={args.epochs}"] if args.epochs is not None else []
        config = load_config(None, list(args.overrides) + extra, base=resume_payload["config"])
    else:
        config = config_from_args(args)

    if args.dry_run:
        import os

        from dcml.training.dry_run import dry_run_report

        report = dry_run_report(config)  # every rank checks; under torchrun only rank 0 prints
        if os.environ.get("RANK", "0") == "0":
            print(report)
        return 0

    r = config.runtime
    dist = distributed.setup(config.device, r.distributed_backend, r.distributed_timeout_minutes)
    try:
        return _run_training(args, config, resume_payload, dist)
    finally:
        distributed.teardown()


def _run_training(args: argparse.Namespace, config, resume_payload, dist) -> int:
    from dcml.training import checkpoint as ckpt
    from dcml.training.trainer import Trainer, write_config

    out = dist.broadcast(args.out or _default_out(args.preset))  # rank 0's time stamp names the folder

    def check_out() -> None:
        if resume_payload is None and (out / ckpt.LAST).exists():
            raise UserError(f"{out} already holds a run; pass --resume to continue it, or choose another --out")

    dist.on_main(check_out)
    trainer = Trainer(config, out, progress=not args.no_progress and sys.stderr.isatty(), distributed=dist)
    if resume_payload is not None:
        trainer.resume(resume_payload)
        if trainer.start_epoch >= len(trainer.plans) and dist.is_main:
            print(f"{out}: all {len(trainer.plans)} epochs are done; reporting the selected epoch")
    elif dist.is_main:
        write_config(out, config)
    try:
        result = trainer.fit()
    except KeyboardInterrupt:
        if dist.is_main:
            done = len(trainer.history)
            print(f"dcml: interrupted after {done} finished epoch(s); continue with: dcml train --out {out} --resume",
                  file=sys.stderr)
        return 130
    if dist.is_main:
        _print_result(result, trainer.dataset.evaluation.recall_ks, out)
    return 0


def _print_result(result: dict, ks, out: Path) -> None:
    from dcml.evaluation.runner import format_table

    print(f"selected epoch {result['selected_epoch']} by validation {result['selection_metric']} "
          f"({100 * result['selection_score']:.2f}); test metrics in %:")
    print(format_table(result["test"], ks))
    print(f"re-clustering took {100 * result['recluster_share']:.1f}% of training time; total {result['seconds']:.0f} s; wrote {out}/metrics.json")


def _evaluate(args: argparse.Namespace) -> int:
    from dcml.config import load_config
    from dcml.evaluation.runner import format_table
    from dcml.training import checkpoint as ckpt
    from dcml.training.trainer import Trainer

    path = args.checkpoint
    if path.is_dir():
        path = path / ckpt.BEST
    payload = ckpt.load_checkpoint(path)
    overrides = [f"data.root={json.dumps(str(args.data_root))}"] if args.data_root else []
    config = load_config(None, overrides, base=payload["config"])
    trainer = Trainer(config, None, progress=not args.no_progress and sys.stderr.isatty())
    trainer.model.load_state_dict(payload["model"])
    trainer.active_learners = int(payload.get("active_learners", config.clustering.learners))
    rows = trainer.evaluate(args.split, with_nmi=True)
    # best.pt names its (0-based) epoch; last.pt the next epoch to run, i.e. the 1-based last one done.
    epoch = int(payload["epoch"]) + 1 if payload.get("epoch") is not None else payload.get("next_epoch")
    if args.json:
        print(json.dumps({"checkpoint": str(path), "epoch": epoch, "metrics": rows}))
        return 0
    print(f"{path} (epoch {epoch}) on {trainer.dataset.name} {args.split or 'test'}; metrics in %")
    print(format_table(rows, trainer.dataset.evaluation.recall_ks))
    return 0
