"""Helpers for the tests that drive the real ``ppkit`` CLI (bad input, interruption, determinism).

``run_cli`` calls :func:`ppkit.cli.app.main` in-process (the console-script function itself, so
argument parsing, error formatting and exit codes are the real ones) and returns the exit code and
what was printed; ``run_cli_subprocess`` runs ``python -m ppkit.cli.app`` to prove the console
behaviour. ``build_workspace`` writes the tiny model directories the tests point the CLI at.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from conftest import SHARED, make_tiny_bert, make_tiny_gpt2

MINILM = SHARED / "models" / "all-MiniLM-L6-v2"
SST2 = SHARED / "glue" / "SST-2"
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
REPO = Path(__file__).resolve().parents[1]


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err

    def error_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.startswith("error:")]


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    return exc.code if isinstance(exc.code, int) else 1


def run_cli(args: list, capsys) -> CliResult:
    """Run ``ppkit ARGS`` in-process through the console-script function; capture stdout/stderr."""
    from ppkit.cli.app import main

    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = _exit_code(exc)
    out, err = capsys.readouterr()
    return CliResult(code, ANSI.sub("", out), ANSI.sub("", err))


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NO_COLOR": "1",
                "COLUMNS": "200", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def run_cli_subprocess(args: list, cwd: Path | None = None, timeout: float = 120, **env: str) -> CliResult:
    """Run ``python -m ppkit.cli.app ARGS`` as a separate process (what a user's shell sees)."""
    proc = subprocess.run(
        [sys.executable, "-m", "ppkit.cli.app", *map(str, args)], cwd=cwd, env=cli_env(**env),
        capture_output=True, text=True, timeout=timeout,
    )
    return CliResult(proc.returncode, ANSI.sub("", proc.stdout), ANSI.sub("", proc.stderr))


def leftovers(parent: Path) -> list[str]:
    """Temporary / backup directories an atomic write may leave beside its target."""
    if not parent.is_dir():
        return []
    markers = (".tmp-", ".old-", "ppkit-checkpoints")
    return sorted(p.name for p in parent.iterdir()
                  if p.name.startswith(".") and (any(m in p.name for m in markers) or p.name.endswith(".tmp")))


def tree_digest(path: Path) -> dict[str, str]:
    """sha256 of every file under ``path`` (relative name -> hex digest), to prove it is untouched."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def assert_user_error(result: CliResult, fragment: str, out: Path | None = None) -> str:
    """Exit code 2, exactly one ``error:`` line containing ``fragment``, no traceback, nothing written."""
    assert "Traceback" not in result.text, result.text
    assert result.code == 2, f"exit code {result.code}, expected 2:\n{result.text}"
    lines = result.error_lines()
    assert len(lines) == 1, f"expected one 'error:' line, got:\n{result.err}"
    assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    assert "internal error" not in result.err
    if out is not None:
        assert not out.exists(), f"{out} was created by a failing run"
        assert leftovers(out.parent) == [], leftovers(out.parent)
    return lines[0]


def assert_usage_error(result: CliResult, fragment: str, out: Path | None = None) -> str:
    """click's usage errors: exit 2, an ``Error:`` line naming the option, no traceback, nothing written."""
    assert "Traceback" not in result.text, result.text
    assert result.code == 2, f"exit code {result.code}, expected 2:\n{result.text}"
    lines = [line for line in result.err.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and fragment in lines[0], result.err
    if out is not None:
        assert not out.exists()
        assert leftovers(out.parent) == []
    return lines[0]


@dataclass
class Workspace:
    root: Path
    bert: Path          # tiny random BERT with the real MiniLM tokenizer (vocab 30522, 64 positions)
    data: Path          # 48 SST-2 training rows
    gpt2: Path          # tiny random GPT-2 (other architecture)
    bert_vocab120: Path  # tiny random BERT with another vocabulary
    t5: Path            # an unsupported architecture
    pickled: Path       # tiny BERT whose only weights are pytorch_model.bin
    not_model: Path     # a directory with files but no config.json
    pruned: Path        # a ppkit-pruned copy of ``bert`` (random strategy, 50% FLOPs)


def build_workspace(root: Path) -> Workspace:
    """Write the tiny model directories (a few MB, about two seconds)."""
    import torch
    from transformers import AutoTokenizer, T5Config, T5Model

    import ppkit

    root.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(MINILM)

    bert = root / "tiny-bert"
    make_tiny_bert("BertModel", vocab_size=tokenizer.vocab_size).save_pretrained(bert)
    tokenizer.save_pretrained(bert)

    rows = (SST2 / "train.tsv").read_text(encoding="utf-8").splitlines()[:49]
    data = root / "sst2-small.tsv"
    data.write_text("\n".join(rows) + "\n", encoding="utf-8")

    gpt2 = root / "tiny-gpt2"
    make_tiny_gpt2("GPT2Model").save_pretrained(gpt2)
    bert120 = root / "tiny-bert-vocab120"
    make_tiny_bert("BertModel").save_pretrained(bert120)

    t5 = root / "tiny-t5"
    torch.manual_seed(0)
    T5Model(T5Config(vocab_size=100, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)).save_pretrained(t5)

    pickled = root / "pickled-bert"
    pickled.mkdir()
    model = make_tiny_bert("BertModel", vocab_size=tokenizer.vocab_size)
    model.config.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    tokenizer.save_pretrained(pickled)

    not_model = root / "not-a-model"
    not_model.mkdir()
    (not_model / "README.md").write_text("just notes\n", encoding="utf-8")

    pruned = root / "tiny-bert-pruned"
    ppkit.prune(str(bert), task="sst2", data=str(data), flops=0.5, strategy="random", samples=16, out=str(pruned),
                plot=False, progress=False)
    return Workspace(root, bert, data, gpt2, bert120, t5, pickled, not_model, pruned)


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
