"""What a run tells the user: its log records, one console line per epoch and ``metrics.json`` at the end."""

from __future__ import annotations


def epoch_line(record: dict, epochs: int, selection_metric: str) -> str:
    line = f"epoch {record['epoch'] + 1:>3}/{epochs}  {record['phase']:<8} K={record['learners']}  loss {record['loss']:.4f}"
    if "score" in record:
        line += f"  val {selection_metric} {100 * record['score']:.2f}" + (" *" if record.get("best") else "")
    if "cluster_images" in record and record["learners"] > 1:
        line += f"  clusters {record['cluster_images']}"
    return line + f"  {record['seconds']:.1f} s"


def run_result(*, dataset: str, config, epochs: int, best_epoch: int | None, best_score: float, best_val: dict | None,
               test: dict, seconds: float, timings: dict) -> dict:
    """``metrics.json``: the test metrics of the selected epoch, which epoch that was and why, and the timings."""
    recluster = timings["recluster_features"] + timings["kmeans"]
    busy = sum(timings[k] for k in ("train", "recluster_features", "kmeans"))
    return {
        "dataset": dataset,
        "selected_epoch": None if best_epoch is None else best_epoch + 1,
        "selection_metric": config.evaluation.selection_metric,
        "selection_score": best_score if best_epoch is not None else None,
        "val": best_val,
        "test": test,
        "learners": config.clustering.learners,
        "epochs": epochs,
        "seconds": seconds,
        "timings": dict(timings),
        "recluster_share": recluster / max(busy, 1e-9),
    }


def epoch_record(plan) -> dict:
    """The start of an epoch's ``log.jsonl`` record: what its plan says."""
    return {"epoch": plan.epoch, "phase": plan.phase, "learners": plan.active_learners,
            "backbone_frozen": plan.backbone_frozen, "lr_scale": plan.lr_scale}


def add_throughput(record: dict, train_seconds: float) -> None:
    """Images per second and the share of the training time spent waiting for data."""
    record["images_per_second"] = record["images"] / max(train_seconds, 1e-9)
    record["data_wait_share"] = record["data_wait_seconds"] / max(train_seconds, 1e-9)
