"""`dcml train --dry-run`: everything that can be checked before training, as a printable report.

The dry run reads the dataset (its layout, the validation carve), resolves the device, builds the
backbone's structure (on the ``meta`` device: no weights, no memory) and runs the checks the trainer
runs before its first step: the settings against the dataset and the backbone, the selection metric
against the validation split, the loss settings, a ``model.weights`` file (read and fitted to the
backbone). Whether the default pretrained weights are available offline is reported as a warning
line, not an error: training would stop there, and the line says how to fix it. Nothing is written.
Problems are the usual one-line :class:`~dcml.errors.UserError` / :class:`~dcml.errors.DatasetError`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dcml.config import TrainConfig
from dcml.errors import MissingDependencyError, UserError


def dry_run_report(config: TrainConfig) -> str:
    """The resolved configuration, the dataset's split counts, the checks and the planned schedule."""
    import yaml

    from dcml.config import validate_against_data
    from dcml.evaluation.protocols import protocol_of
    from dcml.training.schedule import describe_schedule, plan_schedule
    from dcml.training.distributed import launched_by_torchrun
    from dcml.training.preflight import check_distributed, check_selection_metric, create_configured_loss
    from dcml.training.trainer import autocast_for, prepare_dataset, resolve_device

    dataset = prepare_dataset(config)  # reads the layout; carves the validation classes if needed
    device = resolve_device(config.device)
    autocast_for(config.runtime.precision, device)  # bf16 needs CUDA
    check_distributed(config, launched_by_torchrun())
    train = dataset.split("train")
    num_train_classes = len(np.unique(train.labels))
    blocks = backbone_blocks(config.model.backbone)
    validate_against_data(config, num_train_classes, blocks, protocol_of(dataset.evaluation).name)
    check_selection_metric(config, dataset)
    create_configured_loss(config, num_train_classes)
    weights = weights_status(config)
    plans = plan_schedule(config)

    lines = [yaml.safe_dump(config.to_dict(), sort_keys=False).rstrip()]
    lines.append(f"# dataset {dataset.name}: " + ", ".join(
        f"{n} {s.num_classes} classes / {s.num_images} images" for n, s in dataset.splits.items()))
    lines.append("# summary")
    lines += summary_lines(config, dataset, device, blocks, plans)
    lines.append(weights)
    lines.append("# schedule")
    lines.append(describe_schedule(plans))
    if weights.startswith("warning"):
        lines.append("# every other check passed; training would stop when it loads the backbone's weights (see the warning)")
    else:
        lines.append("# all checks passed: the same command without --dry-run would start training")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- checks
def backbone_blocks(name: str) -> int | None:
    """How many blocks (units) backbone ``name`` has, from its structure alone.

    Built on the ``meta`` device with ``pretrained=False``: no weights are read and no memory is
    allocated, so even ResNet-50 takes milliseconds.
    """
    import torch

    from dcml.models.backbones import create_backbone

    with torch.device("meta"):
        return create_backbone(name, pretrained=False).num_units


def weights_status(config: TrainConfig) -> str:
    """One line: which weights training would load, or a warning that it would stop and how to fix it.

    A ``model.weights`` file is read and fitted to the backbone (a missing or unfitting file is a
    UserError, as in training); default pretrained weights are only looked up, never loaded.
    """
    from dcml.models.backbones import create_backbone, default_weights_path

    m = config.model
    if m.weights is not None:
        path = Path(m.weights).expanduser()
        if not path.is_file():
            raise UserError(f"model.weights: weights file {path} not found (--weights PATH)")
        create_backbone(m.backbone, pretrained=False, weights=path)  # reads the file, checks it fits
        return f"weights: {path} (fits {m.backbone})"
    if not m.pretrained:
        return f"weights: none, {m.backbone} starts from a random initialisation (model.pretrained=false)"
    try:
        path = default_weights_path(m.backbone)
    except MissingDependencyError as error:
        return f"warning: training would stop here: {error}"
    if path is None:
        return f"weights: {m.backbone}'s own pretrained weights (not checked by the dry run)"
    return f"weights: ImageNet {m.backbone} available offline ({path})"


# ---------------------------------------------------------------------------- summary
def summary_lines(config: TrainConfig, dataset, device, blocks: int | None, plans) -> list[str]:
    from dcml.evaluation.protocols import protocol_of
    from dcml.training.schedule import CONQUER, DIVIDE, FINETUNE, compact_epochs

    c, s, m, d, sc = config.clustering, config.sampler, config.model, config.data, config.schedule
    spec = dataset.evaluation
    val = dataset.split("val")
    head = (f"learned masks over all {m.embedding_dim} dims" if m.learner_head == "masks"
            else f"fixed slices of {m.embedding_dim // c.learners} dims")
    division = "hierarchical 1 -> 2 -> ... -> K" if c.hierarchical else "flat k-means"
    epoch_rule = (f"{s.batches_per_epoch} batches per epoch" if s.batches_per_epoch is not None
                  else f"an epoch runs until the {s.epoch_length} cluster's pass over its {s.pass_unit} is done")
    trainable = "all" if m.trainable_blocks is None else f"the last {m.trainable_blocks}"
    lines = [
        f"protocol: {protocol_of(spec).name} on {', '.join(spec.splits)}; Recall@K for K = {', '.join(map(str, spec.recall_ks))}"
        + (f"; held out of train and val: {d.held_out_group} (its test images query the others: the unseen_vendor row)"
           if d.held_out_group is not None else ""),
        f"selection: {config.evaluation.selection_metric} on the {val.num_classes} validation classes "
        f"({val.num_images} images), " + ("after every epoch" if config.evaluation.every == 1
                                           else f"every {config.evaluation.every} epochs and after the last"),
        f"learners: K = {c.learners}, {head} (d = {m.embedding_dim}), {division} on {c.space} features "
        f"every {c.recluster_every} epochs",
        f"batch: P x M = {s.classes_per_batch} classes x {s.images_per_class} images = "
        f"{s.classes_per_batch * s.images_per_class} images from one cluster; {epoch_rule}",
        f"images: {d.image_size} px, train augmentation {d.train_augmentation}"
        + (f" ({d.augmented_views} cached augmented views per image)" if d.augmented_views else "") + f"; backbone {m.backbone} "
        f"({blocks if blocks is not None else '?'} blocks, {trainable} trainable); device {device}",
    ]
    import os

    from dcml.training.distributed import launched_by_torchrun

    if launched_by_torchrun():
        world = int(os.environ["WORLD_SIZE"])
        lines.append(f"processes: {world} torchrun ranks; each draws its own share of an epoch's batches "
                     f"({world} batches per optimiser step)")
    else:
        lines.append("processes: 1 (under torchrun --nproc_per_node N each rank draws its own batches: "
                     "N batches per optimiser step)")
    phases = {phase: [p.epoch + 1 for p in plans if p.phase == phase] for phase in (DIVIDE, CONQUER, FINETUNE)}
    span = lambda epochs: f"{epochs[0]}-{epochs[-1]}" if len(epochs) > 1 else f"{epochs[0]}"  # noqa: E731
    parts = [f"{len(plans)} epochs"]
    if phases[DIVIDE]:
        parts.append(f"divide in epochs {span(phases[DIVIDE])}")
    if phases[CONQUER]:
        parts.append(f"conquer (full embedding) from epoch {phases[CONQUER][0]} (schedule.conquer_epoch={sc.conquer_epoch})")
    if phases[FINETUNE]:
        parts.append(f"K = 1 fine-tuning from epoch {phases[FINETUNE][0]} (schedule.finetune_epoch={sc.finetune_epoch})")
    lines.append("schedule: " + "; ".join(parts))
    kmeans = [p.epoch + 1 for p in plans if p.recluster and p.active_learners > 1]
    if kmeans:
        lines.append(f"re-clustering (k-means) before epochs {compact_epochs(kmeans)}: {len(kmeans)} passes over the training set")
    else:
        lines.append("re-clustering: none (a single learner)")
    growth = [(p.epoch + 1, p.active_learners) for i, p in enumerate(plans)
              if p.phase != FINETUNE and (i == 0 or p.active_learners != plans[i - 1].active_learners)]
    if c.hierarchical and len(growth) > 1:
        lines.append("hierarchical division: " + ", ".join(f"K = {k} from epoch {e}" for e, k in growth))
    frozen = [p.epoch + 1 for p in plans if p.backbone_frozen]
    if frozen:
        lines.append(f"backbone frozen in epochs {compact_epochs(frozen)}")
    decayed = sorted({p.lr_scale for p in plans})
    if decayed != [1.0]:
        lines.append(f"learning rate x {config.optimizer.lr_decay_factor:g} every {config.optimizer.lr_decay_every} epochs")
    return lines
