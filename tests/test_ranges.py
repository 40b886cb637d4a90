"""Every numeric input has a range: configuration fields, seeds, CLI flags and the selection metric.

Out-of-range values must be refused before any work, as one line (a UserError from the config, or
argparse's usage error for a flag), never as a crash mid-run.
"""

from __future__ import annotations

import contextlib
import json
import math

import numpy as np
import pytest

from dcml.cli import main
from dcml.config import MAX_IMAGE_SIZE, MAX_SEED, load_config
from dcml.errors import UserError


# ---------------------------------------------------------------------------- configuration
@pytest.mark.parametrize(
    "override, words",
    [
        ("seed=-1", "seed must be in 0..2147483647"),
        ("seed=18446744073709551616", "seed must be in 0..2147483647"),
        (f"seed={MAX_SEED + 1}", "seed must be in 0.."),
        (f"data.image_size={MAX_IMAGE_SIZE + 1}", f"data.image_size must be in 16..{MAX_IMAGE_SIZE}"),
        ("data.num_workers=100000", "data.num_workers must be in 0.."),
        ("data.eval_batch_size=10000000", "data.eval_batch_size must be in 1.."),
        ("runtime.feature_batch_size=10000000", "runtime.feature_batch_size must be in 1.."),
        ("runtime.prefetch_factor=100000", "runtime.prefetch_factor must be in 1.."),
        ("runtime.distributed_timeout_minutes=100000000", "runtime.distributed_timeout_minutes must be in 1.."),
        ("model.embedding_dim=1000000", "model.embedding_dim must be in 1.."),
        ("clustering.kmeans_iterations=3000000000", "clustering.kmeans_iterations must be in 1.."),
        ("schedule.epochs=1000000", "schedule.epochs must be in 1.."),
        ("schedule.freeze_backbone_after_recluster=1000", "schedule.freeze_backbone_after_recluster must be in 0..schedule.epochs"),
    ],
)
def test_integer_fields_have_an_upper_end(override, words):
    with pytest.raises(UserError, match=words.replace(".", r"\.")):
        load_config("emoji", [override])


FLOAT_FIELDS = [
    "data.validation_fraction", "model.dropout", "model.mask_lr_multiplier", "model.mask_regularization",
    "loss.settings.alpha", "loss.settings.beta", "loss.settings.nu", "loss.settings.cutoff",
    "loss.settings.nonzero_loss_cutoff", "optimizer.lr_backbone", "optimizer.lr_embedding",
    "optimizer.lr_beta", "optimizer.weight_decay", "optimizer.mask_weight_decay_multiplier", "optimizer.lr_decay_factor",
]


@pytest.mark.parametrize("field", FLOAT_FIELDS)
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "nan", "1e400"])
def test_float_fields_refuse_nan_and_infinity(field, value):
    with pytest.raises(UserError, match=rf"^{field.replace('.', '[.]')} must be a finite number; got (nan|inf|-inf)$"):
        load_config("emoji", [f"{field}={value}"])


def float_settings(settings, prefix: str = "") -> set[str]:
    """``section.field`` of every float (or optional float) field, nested sections included."""
    import dataclasses
    import typing

    from dcml.losses import LossSettings

    hints = typing.get_type_hints(type(settings), localns={"LossSettings": LossSettings})
    found = set()
    for item in dataclasses.fields(settings):
        value = getattr(settings, item.name)
        if dataclasses.is_dataclass(value):
            found |= float_settings(value, f"{prefix}{item.name}.")
        elif hints[item.name] in (float, typing.Optional[float]):
            found.add(f"{prefix}{item.name}")
    return found


def test_every_float_field_is_covered():
    from dcml.config import TrainConfig

    assert float_settings(TrainConfig()) == set(FLOAT_FIELDS)


def test_the_settings_of_another_loss_refuse_nan():
    """The finite-number check reaches the settings of whichever loss is chosen."""
    with pytest.raises(UserError, match=r"^loss[.]settings[.]margin must be a finite number; got nan$"):
        load_config("emoji", ["loss.name=triplet", "loss.settings.margin=nan"])


def test_the_ends_of_the_ranges_are_accepted():
    config = load_config("emoji", [f"seed={MAX_SEED}", f"data.image_size={MAX_IMAGE_SIZE}", "schedule.epochs=100000",
                                   "schedule.conquer_epoch=80", "optimizer.lr_backbone=0"])
    assert config.seed == MAX_SEED and config.data.image_size == MAX_IMAGE_SIZE


# ---------------------------------------------------------------------------- seeds reach every engine
@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_kmeans_takes_derived_seeds_beyond_a_c_int(backend):
    """The trainer's per-epoch seed is seed x 100003 + epoch: above 2**31 for seeds >= 21475."""
    from dcml.backends import get_backend

    x = np.random.default_rng(0).standard_normal((60, 4)).astype(np.float32)
    search = get_backend(backend)
    for seed in (MAX_SEED * 100_003 + 999, 2**64, -(2**70)):
        assert search.kmeans(x, 3, seed=seed, iterations=5).assignment.shape == (60,)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_seed_folding_keeps_every_seed_the_engine_took(backend):
    """Seeds the engines accepted before (small run seeds x the stride + up to 1000 epochs, negatives)
    give the same k-means as without folding, so published numbers do not move."""
    from dcml.backends import _FAISS_SEEDS, _TORCH_SEEDS, fold_seed

    accepted = _FAISS_SEEDS if backend == "faiss" else _TORCH_SEEDS
    for seed in [0, 1, 10 * 100_003 + 1000, -5, accepted[0], accepted[1] - 1]:
        assert fold_seed(seed, accepted) == seed
    assert accepted[0] <= fold_seed(accepted[1], accepted) < accepted[1]
    assert accepted[0] <= fold_seed(-(2**200), accepted) < accepted[1]


def test_clustering_with_a_large_run_seed():
    from dcml.clustering import cluster_training_set

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(8), 4)
    features = rng.standard_normal((32, 6)).astype(np.float32)
    result = cluster_training_set(features, labels, 2, backend="faiss", seed=MAX_SEED * 100_003 + 7, iterations=5)
    assert result.num_clusters == 2


# ---------------------------------------------------------------------------- CLI flags
def _usage_error(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    return err


@pytest.mark.parametrize("seed", ["-1", str(2**31), str(2**40)])
def test_metrics_seed_has_a_range(tmp_path, capsys, seed):
    err = _usage_error(capsys, ["metrics", "--embeddings", str(tmp_path / "e.npy"), "--labels", str(tmp_path / "l.npy"), "--seed", seed])
    assert f"argument --seed: expected a seed in 0..{MAX_SEED}" in err


@pytest.mark.parametrize("flags", [["--set", "seed=-1"], ["--set", "loss.settings.alpha=.inf"],
                                   ["--set", f"data.image_size={MAX_IMAGE_SIZE * 2}"], ["--epochs", "1000000"]])
def test_train_dry_run_refuses_out_of_range_settings(tmp_path, capsys, flags):
    code = main(["train", "--preset", "emoji", "--dry-run", "--out", str(tmp_path / "run"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("dcml: error:") and err.count("\n") == 1


@pytest.mark.parametrize("command", [["train", "--preset", "emoji", "--dry-run"], ["demo"]])
@pytest.mark.parametrize("seed", ["-1", "18446744073709551616"])
def test_seed_flags_have_the_configurations_range(tmp_path, capsys, command, seed):
    err = _usage_error(capsys, [*command, "--out", str(tmp_path / "out"), "--seed", seed])
    assert f"argument --seed: expected a seed in 0..{MAX_SEED}" in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- JSON output
def test_json_text_writes_null_for_non_finite_numbers(tmp_path):
    from dcml.atomic_files import json_text, save_json_atomically

    payload = {"a": float("nan"), "b": [np.float32("inf"), 1.5, np.int64(3)], "c": {"d": -math.inf}, "e": "nan", "f": np.bool_(True)}
    expected = {"a": None, "b": [None, 1.5, 3], "c": {"d": None}, "e": "nan", "f": True}
    assert json.loads(json_text(payload)) == expected
    save_json_atomically(tmp_path / "m.json", payload)
    text = (tmp_path / "m.json").read_text()
    assert "NaN" not in text and "Infinity" not in text and json.loads(text) == expected


# ---------------------------------------------------------------------------- selection metric
@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    from training.conftest import write_folder_dataset

    return write_folder_dataset(tmp_path_factory.mktemp("tiny"), {"train": 12, "val": 4, "test": 6})


def _dry_run(root, capsys, *overrides):
    from training.conftest import tiny_overrides

    argv = ["train", "--preset", "emoji", "--dry-run"]
    for override in [*tiny_overrides(root), *overrides]:
        argv += ["--set", override]
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "metric, extra, words",
    [
        ("leave_one_out/recal@1", [], "did you mean leave_one_out/recall@1?"),
        ("leave_one_ot/map@r", [], "did you mean leave_one_out/map@r?"),
        ("cross_vendor/recall@1", [], "is not a validation score"),  # the folder dataset has no groups
        ("leave_one_out/recall@3", [], "validation reports Recall@K for K = 1, 2, 4, 8"),
        ("leave_one_out/recall@16", [], "a query has 15 references and Recall@K needs K <= 15"),
        ("leave_one_out/recall@16", ["evaluation.recall_ks=[1, 16]"], "Recall@K needs K <= 15"),
        ("leave_one_out/nmi", [], "evaluation.val_nmi=true"),
    ],
)
def test_dry_run_refuses_a_selection_metric_validation_cannot_give(tiny_root, capsys, metric, extra, words):
    code, _, err = _dry_run(tiny_root, capsys, f"evaluation.selection_metric={metric}", *extra)
    assert code == 2 and words in err and err.startswith("dcml: error: evaluation.selection_metric") and err.count("\n") == 1


@pytest.mark.parametrize("metric, extra", [("leave_one_out/map@r", []), ("leave_one_out/r_precision", []),
                                           ("leave_one_out/recall@8", []), ("leave_one_out/nmi", ["evaluation.val_nmi=true"]),
                                           ("leave_one_out/recall@15", ["evaluation.recall_ks=[1, 15]"])])
def test_dry_run_accepts_every_score_validation_gives(tiny_root, capsys, metric, extra):
    code, out, _ = _dry_run(tiny_root, capsys, f"evaluation.selection_metric={metric}", *extra)
    assert code == 0 and "all checks passed" in out


def test_selection_names_are_the_names_validation_produces(tiny_root):
    """The pre-flight names come from report_rows; the evaluation must produce exactly those."""
    from training.conftest import tiny_overrides

    from dcml.evaluation.runner import evaluate_dataset, report_rows
    from dcml.training.trainer import prepare_dataset

    for extra in ([], ["evaluation.recall_ks=[1, 3, 15, 16]"]):
        dataset = prepare_dataset(load_config("emoji", [*tiny_overrides(tiny_root), *extra]))
        val = dataset.split("val")
        for with_nmi in (False, True):
            with pytest.warns(UserWarning, match="Recall@16 skipped") if extra else contextlib.nullcontext():
                rows = evaluate_dataset(dataset, lambda s: np.eye(4)[s.labels % 4] + 0.1, split="val", with_nmi=with_nmi)
            expected = report_rows(dataset, "val", with_nmi)
            assert {name: tuple(k for k in row if not k.startswith("num_")) for name, row in rows.items()} == \
                {name: plan.scores for name, plan in expected.items()}
            assert val.num_images == 16


def test_trainer_preflight_with_only_the_validation_split_still_catches_typos(tiny_root):
    """The trainer passes its validation split: row and metric names are still checked."""
    from training.conftest import tiny_overrides

    from dcml.training.preflight import check_selection_metric
    from dcml.training.trainer import prepare_dataset

    config = load_config("emoji", [*tiny_overrides(tiny_root), "evaluation.selection_metric=leave_one_out/recal@1"])
    val = prepare_dataset(config).split("val")
    with pytest.raises(UserError, match="did you mean leave_one_out/recall@1"):
        check_selection_metric(config, val)


def test_selection_on_a_validation_split_without_positives(tiny_root):
    from dcml.data.records import Dataset, EvaluationSpec, Protocol, Split
    from dcml.training.preflight import check_selection_metric

    config = load_config("emoji", ["evaluation.selection_metric=cross_vendor/recall@1"])
    # Two images per class, but both from the same vendor: cross-vendor has no positive at all.
    val = Split("val", [f"{i}.png" for i in range(8)], np.repeat(np.arange(4), 2), np.repeat(np.arange(4), 2))
    data = Dataset("toy", tiny_root, {"val": val}, EvaluationSpec(Protocol.CROSS_GROUP, (1, 2), ("test",)))
    with pytest.raises(UserError, match="no validation query has a positive"):
        check_selection_metric(config, data)
    config = load_config("emoji", ["evaluation.selection_metric=leave_one_out/recall@1"])
    check_selection_metric(config, data)  # leave-one-out does have positives
    with pytest.raises(UserError, match="did you mean cross_vendor/recall@1"):
        check_selection_metric(load_config("emoji", ["evaluation.selection_metric=cross_vendr/recall@1"]), data)
