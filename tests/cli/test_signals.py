"""SIGTERM ends any command with one line and exit code 143, its atomic writes cleaned up."""

from __future__ import annotations

import os
import signal

import numpy as np

from dcml import atomic_files
from dcml.cli import main


def test_sigterm_during_a_write_leaves_no_temporary_and_says_so(tmp_path, monkeypatch, capsys):
    np.save(tmp_path / "E.npy", np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32))
    np.save(tmp_path / "L.npy", np.repeat(np.arange(5), 4))
    original = atomic_files.write_atomically

    def killed_mid_write(writers):
        def write_then_die(stream, write):
            write(stream)
            os.kill(os.getpid(), signal.SIGTERM)

        return original({path: (lambda stream, w=write: write_then_die(stream, w)) for path, write in writers.items()})

    import dcml.plots

    monkeypatch.setattr(dcml.plots, "write_atomically", killed_mid_write)

    code = main(["metrics", "--embeddings", str(tmp_path / "E.npy"), "--labels", str(tmp_path / "L.npy"), "--no-nmi",
                 "--plot", str(tmp_path / "curve.png")])
    err = capsys.readouterr().err
    assert code == 143 and "stopped by SIGTERM" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["E.npy", "L.npy"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler lives only as long as the command
