"""Entry point that `torchrun` starts in the search tests (not a test module itself).

    torchrun --nproc_per_node 2 torchrun_worker.py cli LOG ARGS...    # `dcml ARGS...` with the tiny test backbone

Each rank writes the paths it embedded to LOG/rank{RANK}.txt, one a line, so a test can see that the
ranks shared the work.

The tiny backbone the test run was trained with is registered by tests/training/conftest.py, which a
plain `python -m dcml` would not import.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, as pytest puts it
os.environ.setdefault("OMP_NUM_THREADS", "1")

import training.conftest  # noqa: E402, F401  (registers the tiny backbone)

if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    mode, log, *rest = sys.argv[1:]
    if mode != "cli":
        raise SystemExit(f"unknown mode {mode}")
    from dcml.cli import main
    from dcml.inference import TrainedModel

    embed = TrainedModel.embed_paths_tolerant

    def logged(self, paths, sink=None):
        with open(Path(log) / f"rank{os.environ.get('RANK', '0')}.txt", "a") as stream:
            stream.writelines(f"{path}\n" for path in paths)
        return embed(self, paths, sink=sink)

    TrainedModel.embed_paths_tolerant = logged
    sys.exit(main(rest))
