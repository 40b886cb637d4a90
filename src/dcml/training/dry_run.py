"""`dcml train --dry-run`: everything that can be checked before training, as a printable report."""

from __future__ import annotations

from dcml.config import TrainConfig


def dry_run_report(config: TrainConfig) -> str:
    """The resolved configuration, the dataset's split counts and the planned schedule."""
    import yaml

    from dcml.training.schedule import describe_schedule, plan_schedule
    from dcml.training.trainer import prepare_dataset

    dataset = prepare_dataset(config)
    lines = [yaml.safe_dump(config.to_dict(), sort_keys=False).rstrip()]
    lines.append(f"# dataset {dataset.name}: " + ", ".join(
        f"{n} {s.num_classes} classes / {s.num_images} images" for n, s in dataset.splits.items()))
    lines.append("# schedule")
    lines.append(describe_schedule(plan_schedule(config)))
    return "\n".join(lines)
