"""The main job: single metric vs divide and conquer on the emoji benchmark, side by side.

Both models start from the same pretrained backbone, train with the same preset, budget (epochs)
and seed; only the number of learners differs. The zero-shot row is the pretrained backbone's own
features at the same resolution. All three are evaluated on the test classes under both emoji
protocols (leave-one-out and cross-vendor).
"""

from __future__ import annotations

import time
from pathlib import Path

from dcml.config import load_config
from dcml.errors import UserError
from dcml.io import json_text, write_atomically

PROTOCOLS = ("cross_vendor", "leave_one_out")
#: What a demo writes in its folder (besides one run folder per model, see RUN_NAMES).
RESULT_FILES = ("results.json", "results.md", "curves.png")
RUN_NAMES = ("baseline", "dnc")
TABLE_KS = (1, 2, 4, 8)
DEFAULT_DNC_LEARNERS = 4


def check_demo_folder(out: Path, overwrite: bool) -> None:
    """Refuse a folder holding an earlier demo's files unless ``overwrite``, which clears them (only them)."""
    from dcml.training.checkpoint import remove_stale_temporaries
    from dcml.training.run_files import clear_run_files, existing_run_files

    existing = [out / name for name in RESULT_FILES if (out / name).exists()]
    for name in RUN_NAMES:
        existing += existing_run_files(out / name)
    if existing and not overwrite:
        raise UserError(f"{existing[0]} already exists: {out} holds an earlier demo; choose another --out, "
                        "or pass --overwrite to replace it")
    for path in existing:
        if path.parent == out:
            path.unlink()
    for name in RUN_NAMES:
        clear_run_files(out / name)
        remove_stale_temporaries(out / name)
    remove_stale_temporaries(out)


def run_demo(out: Path, *, quick: bool = False, learners: int = DEFAULT_DNC_LEARNERS, seed: int = 0,
             overrides: list[str] | None = None, progress: bool = True, echo=print, overwrite: bool = False) -> dict:
    """Train K = 1 and K = ``learners`` on emoji; write out/results.json and out/results.md.

    An earlier demo in ``out`` is refused unless ``overwrite``."""
    from dcml.training.quick import QUICK_OVERRIDES
    from dcml.training.trainer import Trainer, prepare_dataset, write_config

    start = time.perf_counter()
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    check_demo_folder(out, overwrite)
    # data.root null: the default emoji cache, built with npm on first use.
    common = [*(QUICK_OVERRIDES if quick else ()), f"seed={seed}", *(overrides or [])]
    configs = {
        "baseline": load_config("emoji", [*common, "clustering.learners=1"]),
        "dnc": load_config("emoji", [*common, f"clustering.learners={learners}"]),
    }
    dataset = prepare_dataset(configs["baseline"])
    shared_inputs: dict = {}  # the frozen units' outputs, computed once for both runs
    results: dict = {}
    runs: dict = {}
    histories: dict = {}
    for name, config in configs.items():
        echo(f"== {name}: K = {config.clustering.learners}, {config.schedule.epochs} epochs")
        trainer = Trainer(config, out / name, progress=progress, echo=echo, dataset=dataset, shared_inputs=shared_inputs)
        if name == "baseline":
            zero_shot_start = time.perf_counter()
            results["zero_shot"] = trainer.evaluate(None, with_nmi=True, space="backbone")
            echo(f"zero-shot evaluated in {time.perf_counter() - zero_shot_start:.0f} s")
        write_config(out / name, config)
        run = trainer.fit()
        results[name] = run["test"]
        runs[name] = {k: run[k] for k in ("selected_epoch", "selection_metric", "selection_score", "seconds", "recluster_share")}
        runs[name]["train_images"] = sum(record["images"] for record in trainer.history)
        histories[f"K = {config.clustering.learners}"] = trainer.history
    image_size = configs["baseline"].data.image_size
    payload = {
        "zero_shot": results["zero_shot"],
        "baseline": results["baseline"],
        "dnc": results["dnc"],
        "learners": learners,
        "seconds": time.perf_counter() - start,
        "quick": quick,
        "image_size": image_size,
        "backbone": configs["baseline"].model.backbone,
        "runs": runs,
    }
    markdown = results_markdown(payload)
    text = json_text(payload, indent=2).encode()
    write_atomically({out / "results.json": lambda s: s.write(text), out / "results.md": lambda s: s.write(markdown.encode())})
    from dcml.plots import plot_training_curves

    metric = configs["baseline"].evaluation.selection_metric
    plot_training_curves(histories, out / "curves.png", metric=metric)
    return payload


def results_markdown(payload: dict) -> str:
    """The side-by-side table (metrics in %) as Markdown."""
    names = {"zero_shot": "zero-shot (pretrained features)", "baseline": "single metric (K = 1)",
             "dnc": f"divide & conquer (K = {payload['learners']})"}
    lines = [
        f"Emoji test classes, {payload['backbone']} at {payload['image_size']} px"
        + (" (--quick budget)" if payload.get("quick") else "") + f"; metrics in %; {payload['seconds']:.0f} s in all.",
        "",
    ]
    for protocol in PROTOCOLS:
        lines.append(f"**{protocol.replace('_', '-')}**")
        lines.append("")
        header = ["model"] + [f"R@{k}" for k in TABLE_KS] + ["MAP@R", "NMI"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" + "---:|" * (len(header) - 1))
        for key, label in names.items():
            metrics = payload[key][protocol]
            cells = [f"{100 * metrics.get(f'recall@{k}', float('nan')):.2f}" for k in TABLE_KS]
            cells += [f"{100 * metrics['map@r']:.2f}", f"{100 * metrics.get('nmi', float('nan')):.2f}"]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    for key in ("baseline", "dnc"):
        run = payload["runs"][key]
        lines.append(f"- {names[key]}: selected epoch {run['selected_epoch']} on validation "
                     f"{run['selection_metric']}; {run['train_images']} training images seen; {run['seconds']:.0f} s")
    return "\n".join(lines) + "\n"
