"""What dcml promises about files and faults, through `dcml train` / `dcml evaluate`: loading never
runs code, nothing is overwritten unasked, a resume is exact or refused, SIGTERM costs at most a
batch, divergence is named. The trainer-level stop tests are in tests/training/test_stopping.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dcml.cli import main
from dcml.training import checkpoint as ckpt
from dcml.training.trainer import Trainer

from training.conftest import tiny_overrides, write_folder_dataset

WORKER = Path(__file__).parents[1] / "training" / "ddp_worker.py"  # its "cli" mode knows the tiny backbone


def _train_args(root, out, *extra):
    args = ["train", "--preset", "emoji", "--out", str(out), "--no-progress"]
    for override in tiny_overrides(root):
        args += ["--set", override]
    return args + list(extra)


@pytest.fixture(scope="module")
def finished_run(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(_train_args(tiny_folder, out, "--epochs", "2", "--set", "schedule.conquer_epoch=1")) == 0
    return out


class _RunsCode:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _crafted(path: Path, marker: Path, base: dict | None = None) -> Path:
    payload = dict(base or {"format_version": ckpt.FORMAT_VERSION, "config": {}, "model": {}})
    payload["payload"] = _RunsCode(marker)
    torch.save(payload, path)
    return path


# ---------------------------------------------------------------------------- loading runs no code
def test_a_crafted_checkpoint_runs_nothing_anywhere_dcml_reads_one(finished_run, tmp_path, capsys):
    marker = tmp_path / "marker"
    crafted = _crafted(tmp_path / "best.pt", marker)
    assert main(["evaluate", str(crafted)]) == 2
    assert main(["evaluate", str(tmp_path)]) == 2  # a folder: its best.pt
    assert "could run code" in capsys.readouterr().err
    # A genuine last.pt beside a crafted best.pt: resuming reads best.pt too.
    run = tmp_path / "run"
    run.mkdir()
    (run / ckpt.LAST).write_bytes((finished_run / ckpt.LAST).read_bytes())
    (run / "config.yaml").write_bytes((finished_run / "config.yaml").read_bytes())
    _crafted(run / ckpt.BEST, marker)
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 2
    _crafted(run / ckpt.LAST, marker)
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 2
    assert main(["upgrade-checkpoint", str(run / ckpt.LAST)]) == 2
    assert not marker.exists()


def test_every_checkpoint_dcml_writes_loads_with_weights_only(finished_run):
    for name in (ckpt.LAST, ckpt.BEST):
        payload = torch.load(finished_run / name, map_location="cpu", weights_only=True)
        assert payload["format_version"] == ckpt.FORMAT_VERSION


def test_format_versions_are_checked(finished_run, tmp_path, capsys):
    payload = torch.load(finished_run / ckpt.BEST, weights_only=True)
    torch.save({**payload, "format_version": 99}, tmp_path / "future.pt")
    assert main(["evaluate", str(tmp_path / "future.pt")]) == 2
    assert "newer dcml (checkpoint format 99" in capsys.readouterr().err
    torch.save({**payload, "format_version": "2"}, tmp_path / "odd.pt")
    assert main(["evaluate", str(tmp_path / "odd.pt")]) == 2
    assert "not a dcml checkpoint" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 100)
    assert main(["evaluate", str(tmp_path / "junk.pt")]) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err
    truncated = (finished_run / ckpt.BEST).read_bytes()
    (tmp_path / "truncated.pt").write_bytes(truncated[: len(truncated) // 2])
    assert main(["evaluate", str(tmp_path / "truncated.pt")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def _format_one(source: Path, destination: Path) -> None:
    """A checkpoint as dcml 0.1 wrote it: numpy RNG state and cluster arrays pickled as numpy objects."""
    payload = torch.load(source, weights_only=True)
    payload["format_version"] = 1
    if "rng" in payload:
        rng = payload["rng"]
        payload["rng"] = {"torch": rng["torch"], "numpy": np.random.get_state(), "python": __import__("random").getstate()}
        payload["clustering"] = {key: (value.numpy() if isinstance(value, torch.Tensor) else value)
                                 for key, value in payload["clustering"].items()}
    torch.save(payload, destination)


def test_format_one_is_refused_with_the_fix_and_converts(finished_run, tmp_path, capsys):
    run = tmp_path / "old"
    run.mkdir()
    for name in (ckpt.BEST, ckpt.LAST):
        _format_one(finished_run / name, run / name)
    assert main(["evaluate", str(run)]) == 2
    err = capsys.readouterr().err
    assert "dcml upgrade-checkpoint" in err and err.count("\n") == 1
    assert main(["upgrade-checkpoint", str(run)]) == 0
    assert capsys.readouterr().out.count("converted") == 2
    assert sorted(p.name for p in run.iterdir()) == ["best.pt", "best.v1.pt", "last.pt", "last.v1.pt"]
    converted = ckpt.load_checkpoint(run / ckpt.LAST, resumable=True)
    assert isinstance(converted["clustering"]["assignment"], torch.Tensor)
    assert main(["evaluate", str(run), "--json", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["epoch"] == json.loads((finished_run / "metrics.json").read_text())["selected_epoch"]
    assert main(["upgrade-checkpoint", str(run / ckpt.BEST)]) == 2  # its .v1 copy exists: nothing replaced


# ---------------------------------------------------------------------------- nothing overwritten
@pytest.mark.parametrize("existing", [("best.pt", "metrics.json"), ("config.yaml",), ("log.jsonl",)])
def test_a_new_run_refuses_a_folder_with_run_files(tiny_folder, tmp_path, capsys, existing):
    out = tmp_path / "run"
    out.mkdir()
    for name in existing:
        (out / name).write_text("the user's own file")
    (out / "notes.txt").write_text("mine")
    assert main(_train_args(tiny_folder, out, "--epochs", "1", "--set", "schedule.conquer_epoch=null")) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err
    for name in existing:
        assert (out / name).read_text() == "the user's own file"
    # --overwrite replaces the run files only.
    assert main(_train_args(tiny_folder, out, "--epochs", "1", "--set", "schedule.conquer_epoch=null", "--overwrite")) == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "metrics.json").read_text())["epochs"] == 1


def test_out_dot_keeps_a_users_config(tiny_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("config.yaml").write_text("mine: true\n")
    assert main(_train_args(tiny_folder, Path("."), "--epochs", "1")) == 2
    assert Path("config.yaml").read_text() == "mine: true\n"


# ---------------------------------------------------------------------------- resume right or refused
def _copy_run(source: Path, destination: Path) -> Path:
    import shutil

    shutil.copytree(source, destination)
    return destination


def test_resume_without_best_pt_is_refused(finished_run, tmp_path, capsys):
    run = _copy_run(finished_run, tmp_path / "run")
    (run / ckpt.BEST).unlink()
    metrics = (run / "metrics.json").read_text()
    assert main(["train", "--out", str(run), "--resume", "--epochs", "3", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "best.pt is missing" in err and err.count("\n") == 1
    assert (run / "metrics.json").read_text() == metrics


def test_resume_with_another_runs_best_pt_is_refused(finished_run, tiny_folder, tmp_path, capsys):
    run = _copy_run(finished_run, tmp_path / "run")
    payload = torch.load(run / ckpt.BEST, weights_only=True)
    payload["epoch"] = payload["epoch"] + 5
    torch.save(payload, run / ckpt.BEST)
    assert main(["train", "--out", str(run), "--resume", "--epochs", "3", "--no-progress"]) == 2
    assert "different runs" in capsys.readouterr().err


@pytest.mark.parametrize("flags, field", [
    (["--learners", "4"], "clustering.learners"),
    (["--seed", "5"], "seed"),
    (["--set", "model.embedding_dim=32"], "model.embedding_dim"),
    (["--quick"], "data.image_size"),
])
def test_resume_refuses_settings_that_change_the_run(finished_run, tmp_path, capsys, flags, field):
    run = _copy_run(finished_run, tmp_path / "run")
    before = (run / ckpt.LAST).read_bytes()
    assert main(["train", "--out", str(run), "--resume", "--no-progress", *flags]) == 2
    err = capsys.readouterr().err
    assert f"but {field} would change" in err and err.count("\n") == 1
    assert (run / ckpt.LAST).read_bytes() == before


def test_resume_with_the_original_command_and_a_moved_dataset(finished_run, tiny_folder, tmp_path, capsys):
    run = _copy_run(finished_run, tmp_path / "run")
    moved = tmp_path / "moved"
    os.symlink(tiny_folder, moved)  # another path to the same images
    args = _train_args(tiny_folder, run, "--epochs", "3", "--set", "schedule.conquer_epoch=1", "--resume",
                       "--data-root", str(moved))
    assert main(args) == 0
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in log] == [0, 1, 2]


def test_resume_on_other_data_is_refused(finished_run, tmp_path, capsys):
    run = _copy_run(finished_run, tmp_path / "run")
    other = write_folder_dataset(tmp_path / "other", {"train": 13, "val": 4, "test": 6}, seed=3)
    assert main(["train", "--out", str(run), "--resume", "--epochs", "3", "--data-root", str(other), "--no-progress"]) == 2
    assert "not the one this run trained on" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["drop_optimizer", "bad_shape", "bad_clustering"])
def test_a_malformed_last_pt_is_one_line(finished_run, tmp_path, capsys, damage):
    run = _copy_run(finished_run, tmp_path / "run")
    payload = torch.load(run / ckpt.LAST, weights_only=True)
    if damage == "drop_optimizer":
        del payload["optimizer"]
    elif damage == "bad_shape":
        name = next(iter(payload["model"]))
        payload["model"][name] = torch.zeros(3, 3, 3)
    else:
        payload["clustering"] = {"assignment": torch.zeros(2)}
    torch.save(payload, run / ckpt.LAST)
    assert main(["train", "--out", str(run), "--resume", "--epochs", "3", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dcml: error:") and err.count("\n") == 1


def test_evaluate_needs_no_pretrained_weights_file(tiny_folder, tmp_path, capsys):
    weights = tmp_path / "weights.pt"
    from dcml.models.backbones import create_backbone

    torch.save(create_backbone("tiny_test_cnn", pretrained=False).state_dict(), weights)
    out = tmp_path / "run"
    assert main(_train_args(tiny_folder, out, "--epochs", "1", "--set", "schedule.conquer_epoch=null",
                            "--weights", str(weights))) == 0
    capsys.readouterr()
    weights.unlink()
    assert main(["evaluate", str(out), "--json", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"] == json.loads((out / "metrics.json").read_text())["test"]


# ---------------------------------------------------------------------------- preemption
def _dcml(*args, **kwargs):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2] / "src"), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(WORKER), "cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.mark.slow
def test_sigterm_then_resume_equals_the_uninterrupted_run(tiny_folder, tmp_path):
    settings = [f"--set={item}" for item in tiny_overrides(tiny_folder)]
    budget = ["--epochs", "4", "--set", "sampler.batches_per_epoch=30"]
    full = _dcml("train", "--preset", "emoji", "--no-progress", "--out", str(tmp_path / "full"), *settings, *budget)
    assert full.wait(timeout=300) == 0, full.stderr.read()
    cut_dir = tmp_path / "cut"
    cut = _dcml("train", "--preset", "emoji", "--no-progress", "--out", str(cut_dir), *settings, *budget)
    deadline = time.monotonic() + 120
    while not (cut_dir / ckpt.LAST).exists() and time.monotonic() < deadline and cut.poll() is None:
        time.sleep(0.05)  # the first epoch is done: the next signal lands in epoch 2
    time.sleep(0.3)
    cut.send_signal(signal.SIGTERM)
    assert cut.wait(timeout=120) == 143
    err = cut.stderr.read()
    assert "stopped by SIGTERM" in err and "--resume" in err and "Traceback" not in err
    assert not [p for p in cut_dir.iterdir() if p.name.endswith(".tmp")]
    resumed = _dcml("train", "--out", str(cut_dir), "--resume", "--no-progress")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    full_metrics = json.loads((tmp_path / "full" / "metrics.json").read_text())
    cut_metrics = json.loads((cut_dir / "metrics.json").read_text())
    for key in ("selected_epoch", "selection_score", "test", "val"):
        assert cut_metrics[key] == full_metrics[key], key


def test_a_stale_temporary_is_removed_at_the_next_start(finished_run, tmp_path):
    run = _copy_run(finished_run, tmp_path / "run")
    stale = run / f".last.pt.{2**22 + 12345}.0123abcd.tmp"  # a pid that is not running
    stale.write_bytes(b"half a checkpoint")
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 0
    assert not stale.exists()


# ---------------------------------------------------------------------------- divergence
def test_a_non_finite_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(tiny_folder, tmp_path, monkeypatch, capsys,
                                                                                   batch_counter):
    original = Trainer.objective

    def objective(self, plan, raw, labels, learner):
        loss = original(self, plan, raw, labels, learner)
        return loss * float("nan") if plan.epoch == 1 and batch_counter() == 3 else loss

    monkeypatch.setattr(Trainer, "objective", objective)
    out = tmp_path / "run"
    good = {}
    original_save = Trainer.save_last

    def remember(self, next_epoch, progress=None):
        original_save(self, next_epoch, progress)
        good["bytes"] = (out / ckpt.LAST).read_bytes()

    monkeypatch.setattr(Trainer, "save_last", remember)
    assert main(_train_args(tiny_folder, out)) == 2
    err = capsys.readouterr().err
    assert "loss was not finite at epoch 2, batch 4" in err and "learning rate" in err and err.count("\n") == 1
    assert (out / ckpt.LAST).read_bytes() == good["bytes"]
    assert ckpt.load_checkpoint(out / ckpt.LAST)["next_epoch"] == 1
    assert not (out / "metrics.json").exists()



def test_the_image_pixel_limit_reaches_training(tiny_folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_train_args(tiny_folder, out, "--set", "data.max_image_pixels=100")) == 2
    err = capsys.readouterr().err
    assert "over the limit of 100" in err and err.count("\n") == 1


def test_demo_refuses_an_earlier_demo(tmp_path, capsys):
    out = tmp_path / "demo"
    (out / "dnc").mkdir(parents=True)
    (out / "dnc" / "best.pt").write_bytes(b"an earlier demo's model")
    assert main(["demo", "--out", str(out), "--quick"]) == 2
    err = capsys.readouterr().err
    assert "best.pt already exists" in err and "--overwrite" in err
    assert (out / "dnc" / "best.pt").read_bytes() == b"an earlier demo's model"


def test_tensorboard_gets_every_epochs_figures(tiny_folder, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    per_learner_beta = ("--set", "loss.name=margin", "--set", "loss.settings.beta_mode=learner")  # tagged beta_0, beta_1
    assert main(_train_args(tiny_folder, out, "--epochs", "2", "--set", "schedule.conquer_epoch=1", *per_learner_beta)) == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/all", "loss/learner_0", "loss/learner_1", "lr/backbone", "loss_parameters/beta_0", "clusters/images_0",
            "val/leave_one_out/recall@1", "speed/images_per_second"} <= tags, tags
    losses = [event.value for event in events.Scalars("loss/all")]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert losses == pytest.approx([record["loss"] for record in log])
    assert main(_train_args(tiny_folder, tmp_path / "quiet", "--epochs", "1", "--set", "schedule.conquer_epoch=null",
                            "--no-tensorboard")) == 0
    assert not (tmp_path / "quiet" / "tensorboard").exists()
