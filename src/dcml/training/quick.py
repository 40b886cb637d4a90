"""The smoke-test budget shared by ``dcml train --quick`` and ``dcml demo --quick``."""

#: A few epochs at 64 px with only the backbone's last units training, so a run takes about a
#: minute on two cores. Too short for divide and conquer to show anything: smoke use only.
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
