"""Each dataset protocol evaluates the right splits, and `dcml zero-shot` prints and saves them."""

import json

import numpy as np
import pytest
from PIL import Image

from dcml.cli import main
from dcml.data.records import Dataset, EvaluationSpec, Protocol, Split
from dcml.evaluation.metrics import retrieval_metrics
from dcml.evaluation.runner import evaluate_dataset, format_table


def split(name, labels, groups=None, offset=0):
    return Split(name, [f"/img/{name}/{i}.png" for i in range(len(labels))], labels=labels, groups=groups)


def embed_by_label(noise_seed=0):
    """Embeddings that are the class one-hot plus a little noise: every metric is near 1."""

    def embed(s: Split) -> np.ndarray:
        rng = np.random.default_rng(noise_seed + len(s.labels))
        return (np.eye(50)[s.labels] + 0.05 * rng.standard_normal((len(s.labels), 50))).astype(np.float32)

    return embed


def dataset(protocol, splits, ks=(1, 2)):
    names = tuple(splits)
    eval_splits = names[-2:] if protocol is Protocol.QUERY_GALLERY else names[1:] if protocol is Protocol.VEHICLEID else ("test",)
    return Dataset("toy", root=".", splits=splits, evaluation=EvaluationSpec(protocol, ks, eval_splits))


def test_leave_one_out():
    labels = np.repeat(np.arange(6), 3)
    rows = evaluate_dataset(dataset(Protocol.LEAVE_ONE_OUT, {"train": split("train", labels), "test": split("test", labels)}), embed_by_label())
    assert list(rows) == ["leave_one_out"] and rows["leave_one_out"]["recall@1"] == 1.0 and "nmi" in rows["leave_one_out"]


def test_cross_group_reports_both_protocols():
    labels = np.repeat(np.arange(6), 3)
    groups = np.tile(np.arange(3), 6)
    rows = evaluate_dataset(dataset(Protocol.CROSS_GROUP, {"test": split("test", labels, groups)}), embed_by_label())
    assert list(rows) == ["leave_one_out", "cross_vendor"]
    assert rows["cross_vendor"]["nmi"] == rows["leave_one_out"]["nmi"]


def test_query_gallery_searches_the_gallery_only():
    q_labels, g_labels = np.arange(5), np.arange(5)
    data = dataset(Protocol.QUERY_GALLERY, {"train": split("train", np.arange(4)), "query": split("query", q_labels), "gallery": split("gallery", g_labels)})
    rows = evaluate_dataset(data, embed_by_label())
    assert rows["query_gallery"]["num_queries"] == 5 and rows["query_gallery"]["recall@1"] == 1.0


def test_vehicleid_reports_standard_and_leave_one_out_per_test_set():
    labels = np.repeat(np.arange(8), 3)
    data = dataset(Protocol.VEHICLEID, {"train": split("train", labels), "test_800": split("test_800", labels), "test_1600": split("test_1600", labels)})
    rows = evaluate_dataset(data, embed_by_label())
    assert list(rows) == ["test_800/standard", "test_800/leave_one_out", "test_1600/standard", "test_1600/leave_one_out"]
    assert rows["test_800/standard"]["repeats"] == 10


def test_split_override_and_normalisation():
    labels = np.repeat(np.arange(4), 2)
    data = dataset(Protocol.LEAVE_ONE_OUT, {"val": split("val", labels), "test": split("test", labels)})
    scaled = lambda s: embed_by_label()(s) * np.arange(1, len(s.labels) + 1)[:, None]  # noqa: E731
    rows = evaluate_dataset(data, scaled, split="val", with_nmi=False)
    x = embed_by_label()(data.splits["val"])
    expected = retrieval_metrics(x / np.linalg.norm(x, axis=1, keepdims=True), labels, ks=(1, 2))
    assert rows["leave_one_out"]["map@r"] == pytest.approx(expected["map@r"])


def test_format_table_has_a_line_per_row():
    table = format_table({"a": {"recall@1": 0.5, "map@r": 0.25}, "bb": {"recall@1": 1.0}}, (1,))
    lines = table.splitlines()
    assert len(lines) == 3 and "50.00" in lines[1] and "25.00" in lines[1] and lines[2].rstrip().endswith("-")


def test_zero_shot_cli_on_a_folder_dataset(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for k, name in enumerate("abcd"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(3):
            pixels = np.clip(rng.integers(0, 60, (20, 20, 3)) + 60 * k, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / name / f"{i}.png")
    out = tmp_path / "results" / "zs.json"
    code = main(["zero-shot", "--dataset", "folder", "--root", str(tmp_path / "data"), "--image-size", "32", "--out", str(out)])
    captured = capsys.readouterr()
    printed = captured.out
    assert code == 0, captured.err
    assert "leave_one_out" in printed and "R@1" in printed and "R@8" not in printed
    assert "warning: Recall@8 skipped: only 5 references per query" in captured.err
    saved = json.loads(out.read_text())
    assert saved["backbone"] == "efficientnet_lite0" and set(saved["metrics"]) == {"leave_one_out"}
    assert {"recall@1", "map@r", "nmi"} <= set(saved["metrics"]["leave_one_out"])


@pytest.mark.parametrize("flag, value", [("--batch-size", "0"), ("--batch-size", "100000"), ("--image-size", "4096"),
                                         ("--image-size", "8"), ("--workers", "-1"), ("--seed", "-1"), ("--seed", str(2**31))])
def test_zero_shot_out_of_range_numbers_are_usage_errors(capsys, flag, value):
    with pytest.raises(SystemExit) as exit_info:
        main(["zero-shot", flag, value])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"argument {flag}: expected" in err and ".." in err
