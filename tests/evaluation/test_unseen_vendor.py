"""The unseen-vendor protocol: one group leaves training and validation; its test images query the others."""

import numpy as np
import pytest
from reference import reference_retrieval

from dcml.data.records import Dataset, EvaluationSpec, Protocol, Split
from dcml.errors import UserError
from dcml.evaluation.paired import protocol_query_scores
from dcml.evaluation.protocols import CROSS_GROUP_ROW, LEAVE_ONE_OUT_ROW, UNSEEN_GROUP_ROW
from dcml.evaluation.runner import evaluate_dataset, report_rows

VENDORS = ("google", "twitter", "openmoji")


def toy_dataset(rng, classes=(12, 6, 10)) -> Dataset:
    """Three vendors drawing every class once (a few classes miss one vendor); train / val / test class-disjoint."""
    splits, start = {}, 0
    for name, count in zip(("train", "val", "test"), classes):
        labels, groups = [], []
        for label in range(start, start + count):
            for vendor in range(3):
                if not (label % 5 == 0 and vendor == label % 3):  # some classes lack one vendor
                    labels.append(label)
                    groups.append(vendor)
        paths = [f"/data/{name}/{label}_{vendor}.png" for label, vendor in zip(labels, groups)]
        splits[name] = Split(name, paths, np.array(labels), np.array(groups))
        start += count
    spec = EvaluationSpec(Protocol.CROSS_GROUP, (1, 2, 4, 8), ("test",))
    return Dataset("toy", __import__("pathlib").Path("/data"), splits, spec, VENDORS, "vendors")


def test_holding_out_removes_the_vendor_from_training_and_validation_only():
    dataset = toy_dataset(np.random.default_rng(0))
    held = dataset.holding_out("twitter")
    assert held.evaluation.unseen_group == 1
    for name in ("train", "val"):
        split = held.split(name)
        assert 1 not in split.groups.tolist()
        original = dataset.split(name)
        assert split.num_images == int((original.groups != 1).sum())
        assert all("_1.png" not in str(p) for p in split.paths)
    assert held.split("test") is dataset.split("test")
    assert dataset.evaluation.unseen_group is None  # the original is untouched


def test_holding_out_refuses_unknown_vendors_and_datasets_without_groups():
    dataset = toy_dataset(np.random.default_rng(0))
    with pytest.raises(UserError, match="one of toy's vendors: google, twitter, openmoji; got 'apple'"):
        dataset.holding_out("apple")
    with pytest.raises(UserError, match="already holds out"):
        dataset.holding_out("google").holding_out("twitter")
    plain = Dataset("plain", dataset.root, {"test": Split("test", ["/a", "/b"], np.array([0, 0]))},
                    EvaluationSpec(Protocol.LEAVE_ONE_OUT, (1,), ("test",)))
    with pytest.raises(UserError, match="needs a dataset with groups"):
        plain.holding_out("google")


@pytest.mark.parametrize("vendor", VENDORS)
def test_unseen_row_queries_the_held_out_vendor_against_the_other_vendors(vendor):
    rng = np.random.default_rng(1)
    dataset = toy_dataset(rng).holding_out(vendor)
    test = dataset.split("test")
    x = rng.standard_normal((test.num_images, 6)).astype(np.float32)
    rows = evaluate_dataset(dataset, lambda split: x, with_nmi=False)
    assert set(rows) == {LEAVE_ONE_OUT_ROW, CROSS_GROUP_ROW, UNSEEN_GROUP_ROW}
    assert set(report_rows(dataset, with_nmi=False)) == set(rows)
    unseen = VENDORS.index(vendor)
    queries = test.groups == unseen
    normalised = x / np.linalg.norm(x, axis=1, keepdims=True)
    expected = reference_retrieval(normalised, test.labels, (1, 2, 4, 8), query_mask=queries)
    got = rows[UNSEEN_GROUP_ROW]
    assert got["num_queries"] == expected["num_queries"] == int(queries.sum()) - expected["num_excluded_queries"]
    for key in ("recall@1", "recall@2", "recall@8", "map@r", "r_precision"):
        assert got[key] == pytest.approx(expected[key], abs=1e-12), key
    # The per-query scores behind the demo's and the study's intervals have the same means.
    scores = protocol_query_scores(normalised, test.labels, test.groups, unseen_group=unseen)
    assert scores[UNSEEN_GROUP_ROW].mean("recall@1") == pytest.approx(got["recall@1"], abs=1e-12)
    assert scores[UNSEEN_GROUP_ROW].mean("map@r") == pytest.approx(got["map@r"], abs=1e-12)
    assert set(test.groups[scores[UNSEEN_GROUP_ROW].rows].tolist()) == {unseen}


def test_the_unseen_row_only_exists_when_a_vendor_is_held_out():
    dataset = toy_dataset(np.random.default_rng(2))
    assert UNSEEN_GROUP_ROW not in report_rows(dataset, with_nmi=False)
    # Validation (split=...) never reports it: selection stays blind to the held-out vendor.
    held = dataset.holding_out("openmoji")
    assert UNSEEN_GROUP_ROW not in report_rows(held, split="val", with_nmi=False)


def test_a_run_config_holds_out_through_prepare_dataset(monkeypatch):
    from dcml.config import load_config
    from dcml.training import datasets

    toy = toy_dataset(np.random.default_rng(3))
    monkeypatch.setattr("dcml.data.load_dataset", lambda name, root=None, **options: toy)
    config = load_config("emoji", ["data.held_out_group=openmoji"])
    prepared = datasets.prepare_dataset(config)
    assert prepared.evaluation.unseen_group == 2
    assert 2 not in prepared.split("train").groups.tolist()
    with pytest.raises(UserError, match="data.held_out_group must be one of"):
        datasets.prepare_dataset(load_config("emoji", ["data.held_out_group=Twitter"]))


def test_data_info_names_the_unseen_vendor_protocol_and_holds_out_on_request(monkeypatch, capsys):
    import json

    from dcml.cli import main

    toy = toy_dataset(np.random.default_rng(4))
    monkeypatch.setattr("dcml.data.load_dataset", lambda name, root=None, **options: toy)
    assert main(["data", "info", "toy", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info["protocols"]) == {LEAVE_ONE_OUT_ROW, CROSS_GROUP_ROW, UNSEEN_GROUP_ROW}
    test_groups = toy.split("test").groups
    assert f"openmoji: {int((test_groups == 2).sum())} test queries" in info["protocols"][UNSEEN_GROUP_ROW]["how"]
    assert main(["data", "info", "toy", "--held-out", "twitter", "--json"]) == 0
    held = json.loads(capsys.readouterr().out)
    assert held["protocols"][UNSEEN_GROUP_ROW]["held_out"] == "twitter"
    assert held["protocols"][UNSEEN_GROUP_ROW]["queries"] == int((test_groups == 1).sum())
    assert held["splits"]["train"]["images"] == int((toy.split("train").groups != 1).sum())
    assert main(["data", "info", "toy", "--held-out", "apple"]) == 2
    assert "must be one of toy's vendors" in capsys.readouterr().err
    assert main(["data", "info", "toy"]) == 0
    assert "unseen_vendor: training and validation leave one group out" in capsys.readouterr().out


def test_the_dry_run_says_which_vendor_is_held_out_and_how_many_views(monkeypatch):
    from dcml.config import load_config
    from dcml.training.dry_run import dry_run_report

    toy = toy_dataset(np.random.default_rng(5))
    monkeypatch.setattr("dcml.data.load_dataset", lambda name, root=None, **options: toy)
    config = load_config("emoji", ["data.held_out_group=openmoji", "data.train_augmentation=drawing", "data.augmented_views=3",
                                   "clustering.reuse_training_features=false", "model.pretrained=false", "device=cpu",
                                   "sampler.classes_per_batch=4", "clustering.learners=2", "clustering.min_classes_per_cluster=2"])
    report = dry_run_report(config)
    assert "held out of train and val: openmoji" in report
    assert "train augmentation drawing (3 cached augmented views per image)" in report
    train_images = int((toy.split("train").groups != 2).sum())
    assert f"train {toy.split('train').num_classes} classes / {train_images} images" in report
