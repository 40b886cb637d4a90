"""Entry point that `torchrun` starts in the distributed tests (not a test module itself).

    torchrun --nproc_per_node 2 ddp_worker.py step OUT ROOT      # three short epochs, dump each rank's state
    torchrun --nproc_per_node 2 ddp_worker.py bank OUT ROOT      # one epoch keeping training features, pooled
    torchrun --nproc_per_node 2 ddp_worker.py cli ARGS...         # `dcml ARGS...` with the tiny test backbone

Both register the tiny test backbone first (tests/training/conftest.py), which a plain
`python -m dcml` would not know.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import conftest  # noqa: E402  (registers the tiny backbone)
import torch  # noqa: E402
import torch._dynamo  # noqa: E402,F401 - before any process group (see dcml.cli.train)


def one_step(out: Path, root: Path) -> None:
    """Three epochs with learned masks and a backbone freeze after each re-clustering, so DDP is
    rebuilt twice (backbone frozen -> trainable -> frozen with the masks out of the loss)."""
    from dcml.config import load_config
    from dcml.training import distributed
    from dcml.training.trainer import Trainer

    overrides = conftest.tiny_overrides(root) + [
        "runtime.distributed_backend=gloo", "sampler.batches_per_epoch=4", "clustering.reuse_training_features=false",
        "model.learner_head=masks", "schedule.freeze_backbone_after_recluster=1", "clustering.recluster_every=2",
        "schedule.epochs=3", "schedule.conquer_epoch=2",
    ]
    config = load_config("emoji", overrides)
    dist = distributed.setup(config.device, "gloo")
    try:
        trainer = Trainer(config, None, progress=False, distributed=dist)
        initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        states, records = [], []
        for plan in trainer.plans:
            if plan.recluster:
                trainer.recluster(plan)
            records.append(trainer.train_epoch(plan))
            states.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
        val = trainer.evaluate("val", with_nmi=False)
        torch.save({
            "assignment": torch.from_numpy(trainer.clustering.assignment),
            "usable": torch.from_numpy(trainer.clustering.usable),
            "initial": initial,
            "states": states,
            "frozen": [plan.backbone_frozen for plan in trainer.plans],
            "beta": [p.detach().clone() for p in trainer.loss.learnable_parameters()],
            "records": records,
            "val": val,
            "shard": torch.from_numpy(dist.shard(trainer.train_split.num_images)),
        }, out / f"rank{dist.rank}.pt")
    finally:
        distributed.teardown()


def pooled_bank(out: Path, root: Path) -> None:
    """One epoch with reuse_training_features and frozen weights (lr 0): each rank's kept rows, the
    pooled bank and a fresh pass, to compare."""
    from dcml.config import load_config
    from dcml.training import distributed
    from dcml.training.trainer import Trainer

    overrides = conftest.tiny_overrides(root) + [
        "runtime.distributed_backend=gloo", "sampler.batches_per_epoch=4", "clustering.reuse_training_features=true",
        "optimizer.lr_backbone=0", "optimizer.lr_embedding=0", "optimizer.lr_beta=0", "schedule.epochs=2",
        "schedule.conquer_epoch=null",
    ]
    config = load_config("emoji", overrides)
    dist = distributed.setup(config.device, "gloo")
    try:
        trainer = Trainer(config, None, progress=False, distributed=dist)
        plan = trainer.plans[0]
        trainer.recluster(plan)
        trainer.train_epoch(plan)
        visits = trainer.feature_bank.visits.copy()
        pooled = trainer.feature_bank.pooled(dist).features
        fresh = trainer.embed(trainer.train_split, "backbone")
        torch.save({"visits": torch.from_numpy(visits), "pooled": torch.from_numpy(pooled), "fresh": torch.from_numpy(fresh)},
                   out / f"bank{dist.rank}.pt")
    finally:
        distributed.teardown()


if __name__ == "__main__":
    torch.set_num_threads(1)
    mode, *rest = sys.argv[1:]
    if mode == "step":
        one_step(Path(rest[0]), Path(rest[1]))
    elif mode == "bank":
        pooled_bank(Path(rest[0]), Path(rest[1]))
    elif mode == "cli":
        from dcml.cli import main

        sys.exit(main(rest))
    else:
        raise SystemExit(f"unknown mode {mode}")
