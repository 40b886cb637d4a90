from dcml.config import load_config
from dcml.training.schedule import CONQUER, DIVIDE, FINETUNE, describe_schedule, plan_schedule

#: Every setting the schedule reads, set here so that no test depends on the emoji preset's tuning.
SCHEDULE = ["schedule.epochs=20", "schedule.conquer_epoch=14", "schedule.finetune_epoch=null",
            "schedule.freeze_backbone_after_recluster=0", "clustering.learners=4", "clustering.recluster_every=2",
            "clustering.recluster_after_conquer=true", "clustering.hierarchical=false", "optimizer.lr_decay_every=null",
            "model.embedding_dim=128"]


def _config(*overrides: str):
    return load_config("emoji", [*SCHEDULE, *overrides])


def test_cvpr_v1_schedule_is_explicit():
    # v1 as released: 200 epochs, slices until 80 (its hidden 190 * 8/19), K = 1 fine-tuning from 190.
    config = _config("schedule.epochs=200", "schedule.conquer_epoch=80", "schedule.finetune_epoch=190",
                                   "clustering.recluster_every=2")
    plans = plan_schedule(config)
    assert [p.phase for p in plans[:80]] == [DIVIDE] * 80
    assert [p.phase for p in plans[80:190]] == [CONQUER] * 110
    assert [p.phase for p in plans[190:]] == [FINETUNE] * 10
    assert [p.epoch for p in plans if p.recluster and p.phase != FINETUNE] == list(range(0, 190, 2))
    assert [p.epoch for p in plans if p.phase == FINETUNE and p.recluster] == [190]
    assert {p.active_learners for p in plans[:190]} == {4} and {p.active_learners for p in plans[190:]} == {1}


def test_no_reclustering_after_conquer_when_switched_off():
    plans = plan_schedule(_config("clustering.recluster_after_conquer=false"))
    assert [p.epoch for p in plans if p.recluster] == [0, 2, 4, 6, 8, 10, 12]


def test_hierarchical_division_doubles_at_each_reclustering():
    # TPAMI: 1, 2, 4, ..., 32 by epoch 10 with T = 2.
    config = _config("clustering.hierarchical=true", "clustering.learners=32", "model.learner_head=masks",
                                   "schedule.epochs=14", "schedule.conquer_epoch=null")
    active = [p.active_learners for p in plan_schedule(config)]
    assert active == [1, 1, 2, 2, 4, 4, 8, 8, 16, 16, 32, 32, 32, 32]


def test_backbone_freeze_and_step_decay():
    config = _config("schedule.freeze_backbone_after_recluster=1", "optimizer.lr_decay_every=5",
                                   "optimizer.lr_decay_factor=0.1", "clustering.recluster_every=3", "schedule.epochs=10",
                                   "schedule.conquer_epoch=null")
    plans = plan_schedule(config)
    assert [p.epoch for p in plans if p.backbone_frozen] == [0, 3, 6, 9]
    assert [round(p.lr_scale, 6) for p in plans] == [1.0] * 5 + [0.1] * 5
    text = describe_schedule(plans)
    assert "re-cluster before 1, 4, ..., 10 (every 3)" in text and "backbone frozen in 1, 4, ..., 10 (every 3)" in text
    assert "epochs 1-10" in text and "lr x 0.1, 1" in text


def test_compact_epochs_shortens_runs_of_four_or_more():
    from dcml.training.schedule import compact_epochs

    assert compact_epochs([1, 3, 5, 7, 9, 12]) == "1, 3, ..., 9 (every 2), 12"
    assert compact_epochs([1, 4, 7]) == "1, 4, 7"
    assert compact_epochs([]) == ""
