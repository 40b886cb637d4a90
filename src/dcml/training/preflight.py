"""Checks that run before the first training step, shared by the trainer and ``--dry-run``.

Each raises a one-line :class:`~dcml.errors.UserError`; the trainer runs them as it builds a run,
the dry run runs them without building one.
"""

from __future__ import annotations

from dcml.config import TrainConfig
from dcml.data.records import Split
from dcml.errors import UserError


def check_selection_metric(config: TrainConfig, val: Split) -> None:
    """The validation split must give the row ``evaluation.selection_metric`` names."""
    row, _, metric = config.evaluation.selection_metric.partition("/")
    rows = ("leave_one_out", "cross_vendor") if val.groups is not None else ("leave_one_out",)
    if row not in rows or not metric:
        raise UserError(
            f"evaluation.selection_metric {config.evaluation.selection_metric!r}: validation gives rows "
            f"{', '.join(rows)}; use e.g. {rows[-1]}/recall@1 or {rows[-1]}/map@r"
        )


def create_configured_loss(config: TrainConfig, num_classes: int):
    """The loss ``config.loss`` describes (unknown PML losses or settings fail here)."""
    from dcml.losses import create_loss

    lo = config.loss
    settings = {
        "margin": {"alpha": lo.alpha, "beta": lo.beta, "nu": lo.nu, "beta_mode": lo.beta_mode},
        "triplet": {"margin": lo.triplet_margin},
        "pml": {"loss_name": lo.pml_loss, "miner_name": lo.pml_miner, "per_learner": lo.pml_per_learner,
                "loss_kwargs": lo.pml_kwargs, "miner_kwargs": lo.pml_miner_kwargs},
    }[lo.name]
    return create_loss(lo.name, num_learners=config.clustering.learners, num_classes=num_classes, **settings)


def check_distributed(config: TrainConfig, under_torchrun: bool) -> None:
    """What a torchrun run refuses: features kept from one rank's batches, nccl without GPUs."""
    from dcml.training.distributed import resolve_backend

    if not under_torchrun:
        return
    if config.clustering.reuse_training_features:
        raise UserError("clustering.reuse_training_features is not supported under torchrun (each rank sees only "
                        "its own batches); set it to false")
    resolve_backend(config.device, config.runtime.distributed_backend)
