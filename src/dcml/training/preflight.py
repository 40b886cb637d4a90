"""Checks that run before the first training step, shared by the trainer and ``--dry-run``.

Each raises a one-line :class:`~dcml.errors.UserError`; the trainer runs them as it builds a run,
the dry run runs them without building one.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path

import numpy as np

from dcml.config import TrainConfig
from dcml.data.records import Dataset, EvaluationSpec, Protocol, Split
from dcml.errors import UserError

_RECALL = re.compile(r"recall@(\d+)")


def check_selection_metric(config: TrainConfig, data: Dataset | Split) -> None:
    """``evaluation.selection_metric`` must name a score validation will produce, and one it can compute.

    ``data`` is the prepared dataset (its validation split and Recall@K list); the names come from
    :func:`dcml.evaluation.runner.report_rows`, the function the validation evaluation itself uses.
    Given only the validation split, the dataset's own Recall@K list is unknown: every K the split
    can answer passes then, unless ``evaluation.recall_ks`` sets the list.
    """
    from dcml.evaluation.metrics import NMI
    from dcml.evaluation.runner import report_rows

    e = config.evaluation
    if isinstance(data, Split):
        ks = tuple(e.recall_ks) if e.recall_ks else tuple(range(1, max(data.num_images, 2)))
        data = Dataset("validation", Path("."), {"val": data}, EvaluationSpec(Protocol.LEAVE_ONE_OUT, ks, ("val",)))
    val = data.split("val")
    rows = report_rows(data, "val", with_nmi=e.val_nmi)
    name = e.selection_metric
    row, _, metric = name.partition("/")
    known = [f"{r}/{score}" for r, plan in rows.items() for score in plan.scores]
    where = f"evaluation.selection_metric {name!r}"
    if name not in known:
        recall = _RECALL.fullmatch(metric)
        if row in rows and recall and int(recall.group(1)) > rows[row].references:
            raise UserError(f"{where}: validation has {val.num_images} images, so a query has {rows[row].references} "
                            f"references and Recall@K needs K <= {rows[row].references}")
        if row in rows and recall:
            raise UserError(f"{where}: validation reports Recall@K for K = {', '.join(map(str, rows[row].ks))} "
                            f"(evaluation.recall_ks sets the list)")
        if row in rows and metric == NMI:
            raise UserError(f"{where}: validation computes NMI only with evaluation.val_nmi=true")
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}?" if close else f"choose one of: {', '.join(known)}"
        raise UserError(f"{where} is not a validation score ({hint})")
    cross_group = rows[row].excludes_own_group
    if not _has_positive(val, cross_group=cross_group):
        rule = "of its class in another group" if cross_group else "of its class"
        raise UserError(f"{where}: no validation query has a positive (another image {rule}), so the score is undefined; "
                        f"validation needs classes with at least two images")


def _has_positive(split: Split, cross_group: bool) -> bool:
    """Whether some query of ``split`` has a positive: a class with two images (in two groups, across groups)."""
    _, classes = np.unique(split.labels, return_inverse=True)
    classes = classes.reshape(-1)
    if not cross_group:
        return bool(np.bincount(classes).max(initial=0) >= 2)
    pairs = np.unique(np.stack([classes, np.asarray(split.groups)]), axis=1)  # distinct (class, group) pairs
    return bool(np.bincount(pairs[0]).max(initial=0) >= 2)


def create_configured_loss(config: TrainConfig, num_classes: int):
    """The loss ``config.loss`` describes, built through the loss registry (unknown PML losses fail here)."""
    from dcml.losses import build_loss

    return build_loss(config.loss.name, config.loss.settings, num_learners=config.clustering.learners,
                      num_classes=num_classes)


def check_distributed(config: TrainConfig, under_torchrun: bool) -> None:
    """What a torchrun run refuses: nccl without GPUs. (Reused training features work: the ranks
    pool the rows their batches visited before each re-clustering.)"""
    from dcml.training.distributed import resolve_backend

    if not under_torchrun:
        return
    resolve_backend(config.device, config.runtime.distributed_backend)
