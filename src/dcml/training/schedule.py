"""The epoch-by-epoch plan of a run, computed from the configuration alone.

One pure function decides, for every epoch, the phase (divide / conquer / finetune), whether the
training set is re-clustered, how many learners are active, whether the backbone is frozen and the
learning-rate scale, so the trainer, ``--dry-run`` and the tests all read the same plan.
"""

from __future__ import annotations

from dataclasses import dataclass

from dcml.config import TrainConfig

DIVIDE, CONQUER, FINETUNE = "divide", "conquer", "finetune"


@dataclass(frozen=True)
class EpochPlan:
    epoch: int
    phase: str  # DIVIDE: loss on the batch's learner; CONQUER: full embedding, batches per cluster; FINETUNE: K = 1
    recluster: bool
    active_learners: int  # clusters (and learners) in use this epoch
    backbone_frozen: bool
    lr_scale: float


def plan_schedule(config: TrainConfig) -> list[EpochPlan]:
    s, c, o = config.schedule, config.clustering, config.optimizer
    plans: list[EpochPlan] = []
    active = 1 if c.hierarchical else c.learners
    last_recluster = None
    for epoch in range(s.epochs):
        if s.finetune_epoch is not None and epoch >= s.finetune_epoch:
            phase = FINETUNE
        elif s.conquer_epoch is not None and epoch >= s.conquer_epoch:
            phase = CONQUER
        else:
            phase = DIVIDE
        if phase == FINETUNE:
            recluster = epoch == s.finetune_epoch  # one cluster of everything, once
            active = 1
        else:
            due = epoch % c.recluster_every == 0
            recluster = epoch == 0 or (due and (phase == DIVIDE or c.recluster_after_conquer))
            if recluster and c.hierarchical and epoch > 0 and active < c.learners:
                active *= 2
        if recluster:
            last_recluster = epoch
        frozen = (
            s.freeze_backbone_after_recluster > 0
            and last_recluster is not None
            and epoch - last_recluster < s.freeze_backbone_after_recluster
            and phase != FINETUNE
        )
        scale = o.lr_decay_factor ** (epoch // o.lr_decay_every) if o.lr_decay_every else 1.0
        plans.append(EpochPlan(epoch, phase, recluster, active, frozen, scale))
    return plans


def compact_epochs(epochs: list[int]) -> str:
    """``[1, 3, 5, 7, 9, 12]`` -> ``"1, 3, ..., 9 (every 2), 12"``: runs of 4+ equal steps shortened."""
    parts: list[str] = []
    i = 0
    while i < len(epochs):
        j = i
        if i + 1 < len(epochs):
            step = epochs[i + 1] - epochs[i]
            while j + 1 < len(epochs) and epochs[j + 1] - epochs[j] == step:
                j += 1
            if j - i + 1 >= 4:
                parts.append(f"{epochs[i]}, {epochs[i] + step}, ..., {epochs[j]} (every {step})")
                i = j + 1
                continue
        parts.append(str(epochs[i]))
        i += 1
    return ", ".join(parts)


def describe_schedule(plans: list[EpochPlan]) -> str:
    """Runs of equal epochs on one line each, numbered from 1 as the training log does.

    E.g. ``epochs 1-14  divide  learners=4  re-cluster before 1, 3, ...`` (a re-clustering happens
    at the start of the epoch it names).
    """
    lines = []
    start = 0
    for i in range(1, len(plans) + 1):
        if i == len(plans) or (plans[i].phase, plans[i].active_learners) != (plans[start].phase, plans[start].active_learners):
            chunk = plans[start:i]
            span = f"{chunk[0].epoch + 1}" if len(chunk) == 1 else f"{chunk[0].epoch + 1}-{chunk[-1].epoch + 1}"
            reclusters = [p.epoch + 1 for p in chunk if p.recluster]
            frozen = [p.epoch + 1 for p in chunk if p.backbone_frozen]
            decayed = sorted({p.lr_scale for p in chunk})
            line = f"epochs {span:<9} {chunk[0].phase:<8} learners={chunk[0].active_learners}"
            if reclusters:
                line += f"  re-cluster before {compact_epochs(reclusters)}"
            if frozen:
                line += f"  backbone frozen in {compact_epochs(frozen)}"
            if decayed != [1.0]:
                line += f"  lr x {', '.join(f'{v:g}' for v in decayed)}"
            lines.append(line)
            start = i
    return "\n".join(lines)
