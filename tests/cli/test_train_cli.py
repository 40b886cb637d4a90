"""`dcml train` / `dcml evaluate` through the command line: outputs, resume, one-line errors."""

from __future__ import annotations

import json

import pytest

from dcml.cli import main

from training.conftest import tiny_overrides


def _train_args(root, out, *extra):
    args = ["train", "--preset", "emoji", "--out", str(out), "--no-progress"]
    for override in tiny_overrides(root):
        args += ["--set", override]
    return args + list(extra)


def test_train_then_evaluate(tiny_folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_train_args(tiny_folder, out, "--epochs", "2", "--set", "schedule.conquer_epoch=1")) == 0
    printed = capsys.readouterr().out
    assert "selected epoch" in printed and "leave_one_out" in printed
    for name in ("config.yaml", "log.jsonl", "last.pt", "best.pt", "metrics.json"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert main(["evaluate", str(out), "--json", "--no-progress"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["epoch"] == metrics["selected_epoch"]
    assert evaluated["metrics"] == metrics["test"]
    assert main(["evaluate", str(out / "best.pt"), "--split", "val", "--no-progress"]) == 0
    assert "val" in capsys.readouterr().out

    # The same folder again: refused without --resume; a finished run resumed just reports.
    assert main(_train_args(tiny_folder, out)) == 2
    assert "holds files of a run; pass --resume" in capsys.readouterr().err
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert "all 2 epochs are done" in capsys.readouterr().out
    # Resuming with more epochs continues the same run.
    assert main(["train", "--out", str(out), "--resume", "--epochs", "3", "--no-progress"]) == 0
    log = (out / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in log] == [0, 1, 2]


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--set", "clustering.learners=3"), "must divide model.embedding_dim=16"),
        (("--set", "clustering.learners=8"), "too many for 12 training classes"),
        (("--set", "sampler.classes_per_batch=40"), "more than the 12 training classes"),
        (("--set", "loss.nmae=x"), "unknown setting loss.nmae; did you mean loss.name?"),
        (("--set", "data.root=/no/such/folder"), "/no/such/folder"),
    ],
)
def test_bad_settings_exit_2_with_one_line(tiny_folder, tmp_path, capsys, extra, message):
    assert main(_train_args(tiny_folder, tmp_path / "run", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("dcml: error:")
    assert not (tmp_path / "run" / "last.pt").exists()


def test_dry_run_prints_settings_and_schedule(tiny_folder, tmp_path, capsys):
    assert main(_train_args(tiny_folder, tmp_path / "run", "--dry-run")) == 0
    out = capsys.readouterr().out
    assert "learners: 2" in out and "# schedule" in out and "re-cluster before 1, 2, 3" in out
    assert "train 12 classes / 48 images" in out
    assert not (tmp_path / "run").exists()


def test_evaluate_and_resume_report_missing_checkpoints(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "nothing.pt")]) == 2
    assert "not found" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert main(["evaluate", str(tmp_path / "junk.pt")]) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err
    assert main(["train", "--resume"]) == 2
    assert "--resume needs --out" in capsys.readouterr().err


def test_ctrl_c_says_how_to_resume(tiny_folder, tmp_path, capsys, monkeypatch):
    from dcml.training.trainer import Trainer

    def interrupted(self, plan, progress=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "train_epoch", interrupted)
    assert main(_train_args(tiny_folder, tmp_path / "run")) == 130
    err = capsys.readouterr().err
    assert "interrupted after 0 finished epoch(s); continue with: dcml train --out" in err and "--resume" in err


def test_evaluate_draws_the_worst_queries(tiny_folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_train_args(tiny_folder, out, "--epochs", "1", "--set", "schedule.conquer_epoch=null")) == 0
    grid = tmp_path / "worst.png"
    assert main(["evaluate", str(out), "--grid", str(grid), "--no-progress"]) == 0
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    assert main(["evaluate", str(out), "--grid", str(grid), "--no-progress"]) == 2  # not replaced unasked
    assert "already exists" in capsys.readouterr().err
    assert main(["evaluate", str(out), "--grid", str(grid), "--overwrite", "--no-progress"]) == 0
