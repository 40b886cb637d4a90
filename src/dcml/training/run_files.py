"""The files of a run folder, and the rule that a new run never mixes its files with another's."""

from __future__ import annotations

from pathlib import Path

from dcml.errors import UserError

#: What a training run writes in its folder. A new run refuses a folder holding any of them
#: (unless --overwrite, which removes those files and nothing else).
RUN_FILES = ("config.yaml", "log.jsonl", "last.pt", "best.pt", "metrics.json")


#: TensorBoard's event files of a run (see dcml.training.logger): the sub-folder and their name pattern.
TENSORBOARD_DIR = "tensorboard"
EVENT_FILES = "events.out.tfevents.*"


def existing_run_files(folder: Path) -> list[Path]:
    folder = Path(folder)
    found = [folder / name for name in RUN_FILES if (folder / name).exists() or (folder / name).is_symlink()]
    events = folder / TENSORBOARD_DIR
    return found + (sorted(events.glob(EVENT_FILES)) if events.is_dir() else [])


def clear_run_files(folder: Path) -> None:
    for path in existing_run_files(folder):
        if path.is_dir() and not path.is_symlink():
            raise UserError(f"{path} is a folder; dcml will not delete it (remove it or choose another --out)")
        path.unlink()


def check_run_folder(out: Path, overwrite: bool) -> None:
    """Refuse an occupied folder for a new run, or clear its run files with ``overwrite``."""
    existing = existing_run_files(out)
    if not existing:
        return
    if not overwrite:
        hint = "pass --resume to continue it, " if (Path(out) / "last.pt").exists() else ""
        raise UserError(f"{existing[0]} already exists: {out} holds files of a run; {hint}choose another --out, "
                        "or pass --overwrite to replace them")
    clear_run_files(out)


def write_config(out_dir: Path, config) -> None:
    """``config.yaml``: the resolved settings of the run, as ``dcml train --preset`` reads them."""
    import yaml

    from dcml.atomic_files import write_atomically

    text = yaml.safe_dump(config.to_dict(), sort_keys=False).encode()
    write_atomically({Path(out_dir) / "config.yaml": lambda stream: stream.write(text)})


def write_log(out_dir: Path, history: list[dict]) -> None:
    """``log.jsonl``: one JSON line per finished epoch."""
    from dcml.atomic_files import json_text, write_atomically

    lines = "".join(json_text(record) + "\n" for record in history).encode()
    write_atomically({Path(out_dir) / "log.jsonl": lambda stream: stream.write(lines)})
