"""Where a run's per-epoch figures go besides ``log.jsonl``: one small interface, TensorBoard behind it.

A logger receives each finished epoch's log record (the line ``log.jsonl`` gets) plus the values
only the live run knows (learning rates, the loss parameters); it must never change the run.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dcml.training.run_files import TENSORBOARD_DIR  # the folder run_files counts among a run's files


class RunLogger:
    """Base class: override :meth:`epoch` (and :meth:`close` when holding files)."""

    def epoch(self, record: dict, learning_rates: dict[str, float], loss_parameters: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _scalars(record: dict, learning_rates: dict[str, float], loss_parameters: dict[str, torch.Tensor]) -> dict[str, float]:
    """Every figure of an epoch as a flat ``tag -> value`` mapping (what TensorBoard plots)."""
    values: dict[str, float] = {"loss/all": record["loss"]}
    for learner, loss in enumerate(record.get("learner_loss", [])):
        if loss is not None:
            values[f"loss/learner_{learner}"] = loss
    for group, rate in learning_rates.items():
        values[f"lr/{group}"] = rate
    for name, tensor in loss_parameters.items():
        flat = tensor.detach().float().reshape(-1).cpu()
        if flat.numel() <= 64:  # per learner: one curve each; per class (hundreds): the mean only
            for index, value in enumerate(flat.tolist()):
                values[f"loss_parameters/{name}_{index}"] = value
        else:
            values[f"loss_parameters/{name}_mean"] = float(flat.mean())
    for learner, count in enumerate(record.get("cluster_images", []) if record.get("learners", 1) > 1 else []):
        values[f"clusters/images_{learner}"] = count
    for row, metrics in (record.get("val") or {}).items():
        for metric, value in metrics.items():
            if not metric.startswith("num_") and isinstance(value, (int, float)):
                values[f"val/{row}/{metric}"] = value
    for key in ("images_per_second", "data_wait_share", "recluster_seconds"):
        if key in record:
            values[f"speed/{key}"] = record[key]
    return values


class TensorBoardLogger(RunLogger):
    """Scalars per epoch in ``RUN/tensorboard`` (``tensorboard --logdir RUN``): losses per learner,
    learning rates, betas, cluster sizes, validation metrics, speed."""

    def __init__(self, out_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(out_dir) / TENSORBOARD_DIR))

    def epoch(self, record: dict, learning_rates: dict[str, float], loss_parameters: dict[str, torch.Tensor]) -> None:
        step = int(record["epoch"]) + 1  # 1-based, as the console and --dry-run number epochs
        for tag, value in _scalars(record, learning_rates, loss_parameters).items():
            self.writer.add_scalar(tag, float(value), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()



def log_epoch(loggers: list[RunLogger], record: dict, optimizer: torch.optim.Optimizer, loss: torch.nn.Module) -> None:
    """Hand a finished epoch's record, the learning rates and the learnable loss parameters to every logger."""
    if not loggers:
        return
    rates = {group["name"]: group["lr"] for group in optimizer.param_groups}
    parameters = {name: parameter for name, parameter in loss.named_parameters() if parameter.requires_grad}
    for logger in loggers:
        logger.epoch(record, rates, parameters)
