"""Interrupting ``ppkit prune`` / ``ppkit finetune``: exit 130 (SIGINT) or 143 (SIGTERM), the earlier
output intact byte for byte, no temporary directories left.

The signal tests run the real CLI in a separate process on the real all-MiniLM-L6-v2 (400 SST-2
calibration samples, so statistics take many seconds) and signal it once its work has started. The
launcher imports torch / transformers / ppkit first and says ``ready`` on stderr, so "work has
started" does not depend on how long imports take on a loaded machine; after that it calls
:func:`ppkit.cli.app.main`, the console-script function, with the ``prune`` arguments.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_support import MINILM, SST2, build_workspace, cli_env, leftovers, run_cli, tree_digest

LAUNCHER = (
    "import sys, torch, transformers, ppkit.pipeline, ppkit.statistics, ppkit.data, ppkit.registry\n"
    "from ppkit.cli.app import main\n"
    "sys.stderr.write('ppkit-test: ready\\n'); sys.stderr.flush()\n"
    "sys.argv = ['ppkit', *sys.argv[1:]]\n"
    "main()\n"
)
#: seconds between "ready" and the signal: model loading and tokenizing take ~1 s, statistics over
#: 400 samples of MiniLM take 10-30 s on two cores, so the signal lands in the middle of the work
SIGNAL_DELAY_S = 2.5


def previous_output(out: Path) -> dict[str, str]:
    """An earlier result in ``out`` (what --overwrite would replace) and its digest."""
    out.mkdir()
    (out / "config.json").write_text('{"earlier": true}\n', encoding="utf-8")
    (out / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    (out / "notes").mkdir()
    (out / "notes" / "run.txt").write_text("the previous run\n", encoding="utf-8")
    return tree_digest(out)


def interrupt_prune(tmp_path: Path, sig: int, extra: list[str]) -> tuple[int, str, float]:
    out = tmp_path / "out"
    args = ["prune", MINILM, "--task", "sst2", "--data", SST2, "--samples", "400", "--flops", "0.5",
            "--out", out, "--overwrite", "--no-plot", *extra]
    # A shell that starts pytest in the background leaves SIGINT ignored, and children inherit that:
    # give the CLI the default disposition a terminal's foreground process has.
    proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, *map(str, args)], cwd=tmp_path, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        first = proc.stderr.readline()  # blocks until the launcher has imported everything
        assert first.strip() == "ppkit-test: ready", first
        time.sleep(SIGNAL_DELAY_S)
        assert proc.poll() is None, "the run finished before it could be interrupted"
        sent = time.perf_counter()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        return proc.returncode, err, time.perf_counter() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("sig, code, extra", [
    (signal.SIGINT, 130, []),              # Ctrl-C, progress bars on
    (signal.SIGTERM, 143, ["--quiet"]),    # kill / a scheduler stopping the job
])
def test_signal_during_prune_leaves_previous_output_intact(tmp_path, sig, code, extra):
    out = tmp_path / "out"
    before = previous_output(out)
    returncode, err, stop_s = interrupt_prune(tmp_path, sig, extra)
    assert returncode == code, err
    assert "ppkit: interrupted (partial output removed; earlier output untouched)" in err
    assert "Traceback" not in err and "saved" not in err
    assert stop_s < 30, f"took {stop_s:.1f}s to stop after the signal"
    assert tree_digest(out) == before, "the earlier output was changed"
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------- deterministic: interrupted while saving


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return build_workspace(tmp_path_factory.mktemp("interrupt"))


def test_interrupt_while_writing_the_output(ws, tmp_path, capsys, monkeypatch):
    """Ctrl-C after the pruned model is half written into the temporary directory."""
    import ppkit.saving

    out = tmp_path / "out"
    before = previous_output(out)
    real_save = ppkit.saving.save_pruned
    seen = []

    def save_then_interrupt(model, tmp, **kwargs):
        real_save(model, tmp, **kwargs)
        seen.append(sorted(p.name for p in Path(tmp).iterdir()))
        assert leftovers(tmp_path), "the model should be written into a temporary directory beside --out"
        raise KeyboardInterrupt

    monkeypatch.setattr(ppkit.saving, "save_pruned", save_then_interrupt)
    r = run_cli(["prune", ws.bert, "--task", "sst2", "--data", ws.data, "--flops", "0.5", "--strategy", "random",
                 "--samples", "16", "--out", out, "--overwrite", "--no-plot", "-q"], capsys)
    assert seen and "model.safetensors" in seen[0]
    assert r.code == 130, r.text
    assert "ppkit: interrupted" in r.err and "Traceback" not in r.text
    assert tree_digest(out) == before
    assert leftovers(tmp_path) == []


def test_interrupt_during_finetune(ws, tmp_path, capsys, monkeypatch):
    """Ctrl-C in the middle of training: no output, no trainer checkpoints left, earlier output intact."""
    import transformers

    out = tmp_path / "ft"
    before = previous_output(out)
    real_step = transformers.Trainer.training_step
    steps = []

    def step_then_interrupt(self, *args, **kwargs):
        steps.append(1)
        if len(steps) == 3:
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "training_step", step_then_interrupt)
    r = run_cli(["finetune", ws.pruned, "--task", "sst2", "--data", ws.data, "--out", out, "--overwrite",
                 "--epochs", "1", "--batch-size", "4", "--eval-limit", "8", "-q"], capsys)
    assert len(steps) == 3, "training did not reach the interruption"
    assert r.code == 130, r.text
    assert "ppkit: interrupted" in r.err and "Traceback" not in r.text
    assert tree_digest(out) == before
    assert leftovers(tmp_path) == [], "trainer checkpoints or temporary directories were left behind"
