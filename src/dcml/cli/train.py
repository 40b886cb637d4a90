"""`dcml train` and `dcml evaluate`: train with divide and conquer, evaluate a checkpoint."""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

from dcml.cli.arguments import positive_int, seed_int
from dcml.errors import UserError
from dcml.training.quick import QUICK_OVERRIDES  # shared with dcml demo
from dcml.training.run_files import check_run_folder

DEFAULT_PRESET = "emoji"


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
    train.add_argument("--preset", default=None,
                       help=f"preset name or YAML file (default: {DEFAULT_PRESET}; with --resume: the run's own settings)")
    train.add_argument("--data-root", default=None, help="dataset folder (sets data.root)")
    train.add_argument("--weights", default=None, metavar="PATH",
                       help="backbone state dict file (sets model.weights), e.g. ResNet-50 ImageNet weights on an offline machine")
    train.add_argument("--learners", type=positive_int, default=None, help="K, the number of learners (sets clustering.learners)")
    train.add_argument("--epochs", type=positive_int, default=None, help="sets schedule.epochs")
    train.add_argument("--seed", type=seed_int, default=None, help="sets seed")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one setting, e.g. --set clustering.unit=class (repeatable)")
    train.add_argument("--quick", action="store_true", help="a tiny budget for smoke tests (about a minute on a CPU)")
    train.add_argument("--out", type=Path, default=None, help="output folder (default: runs/<preset>-<time>)")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --out from its last.pt (settings that would change the run are refused; "
                       "--data-root, --epochs, --weights and --set runtime.*/device/data.num_workers may change)")
    train.add_argument("--overwrite", action="store_true",
                       help="replace the run files (config.yaml, log.jsonl, last.pt, best.pt, metrics.json) already in "
                       "--out; other files there are left alone")
    train.add_argument("--dry-run", action="store_true", help="check the dataset and settings, print the plan, do not train")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=True,
                       help="also log every epoch's losses, learning rates, betas, cluster sizes and validation metrics "
                       "to DIR/tensorboard (view with: tensorboard --logdir DIR; default: on)")
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
    evaluate.add_argument("--grid", type=Path, default=None, metavar="PNG",
                          help="also draw the queries with the lowest average precision and their top 5 (green: same "
                          "class, red: not), on the evaluated split (leave-one-out within it)")
    evaluate.add_argument("--overwrite", action="store_true", help="replace an existing --grid file")
    evaluate.add_argument("--no-progress", action="store_true")
    evaluate.set_defaults(handler=_evaluate)

    upgrade = subparsers.add_parser(
        "upgrade-checkpoint",
        help="convert checkpoints written by dcml 0.1 (format 1) to the current format",
        description="dcml 0.1 pickled numpy objects into best.pt / last.pt; this dcml loads only tensors, numbers, "
        "strings, lists and dicts (loading a file can never run code). This reads a format-1 file with numpy's "
        "array rebuilders as the only Python objects allowed, and writes the same content in the current format. "
        "Each converted file replaces the old one, which is kept beside it as NAME.v1.pt.",
    )
    upgrade.add_argument("paths", type=Path, nargs="+", metavar="FILE_OR_RUN",
                         help="a checkpoint file, or a run folder (its best.pt and last.pt)")
    upgrade.set_defaults(handler=_upgrade)


#: What ``--resume`` may change: where the data and weights are, how fast it runs, how long it
#: trains. Anything else would make the rest of the run another experiment than its beginning.
RESUMABLE_SETTINGS = ("data.root", "data.num_workers", "data.eval_batch_size", "data.max_image_pixels", "model.weights",
                      "device", "runtime.", "schedule.epochs")


def config_from_args(args: argparse.Namespace, base: dict | None = None):
    """The settings the command line asks for: a preset (or ``base``, a run's saved settings) plus the flags."""
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
    if base is not None:
        return load_config(None, overrides, base=base)
    return load_config(args.preset or DEFAULT_PRESET, overrides)


def _flatten(config, prefix: str = "") -> dict:
    """Setting -> value of every field of a configuration (``loss.settings.alpha``), as its sections'
    dataclasses nest: a mapping-valued setting (``loss.settings.loss_kwargs``) stays one value."""
    import dataclasses

    flat = {}
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        if dataclasses.is_dataclass(value):
            flat.update(_flatten(value, f"{prefix}{item.name}."))
        else:
            flat[f"{prefix}{item.name}"] = list(value) if isinstance(value, tuple) else value  # as YAML writes it
    return flat


def resume_config(args: argparse.Namespace, payload: dict):
    """The run's saved settings with what the command line may change on a resume; anything else refused."""
    from dcml.config import load_config

    saved = load_config(None, [], base=payload["config"])
    # With --preset the command is taken as typed (e.g. the original command with --resume added).
    requested = config_from_args(args) if args.preset is not None else config_from_args(args, base=payload["config"])
    before, after = _flatten(saved), _flatten(requested)
    changed = [key for key in after if before.get(key) != after[key]]
    refused = [key for key in changed if not any(key == allowed or (allowed.endswith(".") and key.startswith(allowed))
                                                   for allowed in RESUMABLE_SETTINGS)]
    if refused:
        key = refused[0]
        more = f" (and {len(refused) - 1} more setting{'s' if len(refused) > 2 else ''})" if len(refused) > 1 else ""
        raise UserError(f"--resume continues {args.out} with its own settings, but {key} would change from "
                        f"{before.get(key)!r} to {after[key]!r}{more}; start a new run with another --out (a resume may "
                        "change only --data-root, --epochs, --weights, device, data.num_workers and runtime.*)")
    done = int(payload["next_epoch"])
    if requested.schedule.epochs < done:
        raise UserError(f"{args.out} has already trained {done} epochs; --epochs {requested.schedule.epochs} would end it "
                        "before that (use --epochs {done} or more)".replace("{done}", str(done)))
    return requested


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
        if args.overwrite:
            raise UserError("--resume and --overwrite contradict each other: --resume continues the run in --out, "
                            "--overwrite starts it anew")
        if not (args.out / ckpt.LAST).is_file():
            raise UserError(f"{args.out / ckpt.LAST} not found: {args.out} holds no run to resume "
                            "(drop --resume to start one there)")
        # Under torchrun every rank reads it: on several nodes --out must be a folder they share.
        resume_payload = ckpt.load_checkpoint(args.out / ckpt.LAST, resumable=True)
        config = resume_config(args, resume_payload)
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
    # Before the process group exists: torch._dynamo (which torchvision and timm import) keeps a
    # reference to a group created earlier, and gloo's threads then cannot stop at exit (SIGABRT).
    import torch._dynamo  # noqa: F401

    dist = distributed.setup(config.device, r.distributed_backend, r.distributed_timeout_minutes)
    try:
        return _run_training(args, config, resume_payload, dist)
    finally:
        distributed.teardown()


def _run_training(args: argparse.Namespace, config, resume_payload, dist) -> int:
    from dcml.training import checkpoint as ckpt
    from dcml.training.stopping import TrainingStopped
    from dcml.training.trainer import Trainer, write_config

    out = dist.broadcast(args.out or _default_out(args.preset))  # rank 0's time stamp names the folder

    def prepare_out() -> None:
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} is a file, not a folder")
        ckpt.remove_stale_temporaries(out)  # left by a process killed while it saved
        if resume_payload is None:
            check_run_folder(out, args.overwrite)

    dist.on_main(prepare_out)
    # A resume takes every weight from last.pt: no ImageNet weights file is needed (or read).
    trainer = Trainer(config, out, progress=not args.no_progress and sys.stderr.isatty(), distributed=dist,
                      load_pretrained=resume_payload is None)
    if resume_payload is not None:
        trainer.resume(resume_payload)
        if trainer.start_epoch >= len(trainer.plans) and dist.is_main:
            print(f"{out}: all {len(trainer.plans)} epochs are done; reporting the selected epoch")
    elif dist.is_main:
        write_config(out, config)
    if args.tensorboard and dist.is_main:
        from dcml.training.logger import TensorBoardLogger

        trainer.loggers.append(TensorBoardLogger(out))
    try:
        result = trainer.fit()
    except TrainingStopped as stopped:
        if dist.is_main:
            saved = f"{stopped.saved}; " if stopped.saved else ""
            print(f"dcml: stopped by {stopped.signal_name}: {saved}continue with: dcml train --out {out} --resume",
                  file=sys.stderr)
        return stopped.exit_code
    except KeyboardInterrupt:
        if dist.is_main:
            done = len(trainer.history)
            print(f"dcml: interrupted after {done} finished epoch(s); continue with: dcml train --out {out} --resume",
                  file=sys.stderr)
        return 130
    finally:
        for logger in trainer.loggers:
            logger.close()
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

    from dcml.atomic_files import refuse_to_overwrite

    path = args.checkpoint
    if path.is_dir():
        path = path / ckpt.BEST
    if args.grid is not None:
        if args.grid.suffix.lower() != ".png":
            raise UserError(f"--grid must name a .png file, got {args.grid}")
        refuse_to_overwrite([args.grid], args.overwrite, "retrieval grid")
    payload = ckpt.load_checkpoint(path)
    overrides = [f"data.root={json.dumps(str(args.data_root))}"] if args.data_root else []
    config = load_config(None, overrides, base=payload["config"])
    # Every weight comes from the checkpoint: no ImageNet weights file, no network.
    trainer = Trainer(config, None, progress=not args.no_progress and sys.stderr.isatty(), load_pretrained=False)
    try:
        trainer.model.load_state_dict(payload["model"])
    except RuntimeError as error:
        raise UserError(f"{path} does not fit the model its own settings describe ({str(error).strip().splitlines()[0]}): "
                        "the file is damaged") from None
    trainer.active_learners = int(payload.get("active_learners", config.clustering.learners))
    rows = trainer.evaluate(args.split, with_nmi=True)
    if args.grid is not None:
        from dcml.search.grid import worst_queries_grid

        split = trainer.dataset.split(args.split or trainer.dataset.evaluation.splits[0])
        worst_queries_grid(args.grid, trainer.embed(split), split.labels, list(split.paths))
        print(f"wrote {args.grid}: the lowest-AP queries of {split.name}", file=sys.stderr)
    # best.pt names its (0-based) epoch; last.pt the next epoch to run, i.e. the 1-based last one done.
    epoch = int(payload["epoch"]) + 1 if payload.get("epoch") is not None else payload.get("next_epoch")
    if args.json:
        from dcml.atomic_files import json_text

        print(json_text({"checkpoint": str(path), "epoch": epoch, "metrics": rows}))
        return 0
    print(f"{path} (epoch {epoch}) on {trainer.dataset.name} {args.split or 'test'}; metrics in %")
    print(format_table(rows, trainer.dataset.evaluation.recall_ks))
    return 0


def _upgrade(args: argparse.Namespace) -> int:
    from dcml.training import checkpoint as ckpt

    files: list[Path] = []
    for path in args.paths:
        if path.is_dir():
            found = [path / name for name in (ckpt.BEST, ckpt.LAST) if (path / name).is_file()]
            if not found:
                raise UserError(f"{path} holds no {ckpt.BEST} or {ckpt.LAST} to convert")
            files.extend(found)
        else:
            files.append(path)
    for path in files:
        kept = ckpt.upgrade_in_place(path)
        print(f"converted {path} to checkpoint format {ckpt.FORMAT_VERSION}; the original is kept as {kept}")
    return 0
