"""Train a *small GPT-2 here* on PTB train, on CPU, so the GPT-2 half of the reproduction has real weights.

There are no OpenAI GPT-2 weights in ``../shared/data`` (see its README), so this script trains a
**small GPT-2 trained here, not OpenAI's**: ``GPT2LMHeadModel`` with 4 layers, hidden 256, 8 heads,
FFN 1024, 256 positions and the real GPT-2 tokenizer (``../shared/data/tokenizers/gpt2``, 50,257
tokens, tied input/output embeddings), trained from a seeded random init on
``../shared/data/lm/ptb/train.txt``. Everything derived from it says so: the saved ``config.json``
carries ``ppkit_note``, the directory is named ``small-gpt2-ptb-trained-here`` and holds
``TRAINED_HERE.md``.

CPU cost is dominated by the 50,257-way softmax, while PTB (10k-word vocabulary) uses only ~10k GPT-2
token ids. So the first ``--restricted-frac`` of the steps compute the softmax over the token ids that
occur in PTB train only (exact cross-entropy over that sub-vocabulary; ~4x cheaper); the remaining steps
use the full 50,257-way softmax, which also pushes down the logits of the ids PTB never uses. All
reported perplexities (here and in ``reproduce_lm.py``) use the full vocabulary.

Resumable: a checkpoint (model, optimiser, scheduler, data order position, RNG) is written atomically
every ``--ckpt-every`` steps under the cache directory (outside the repo; default
``~/.cache/ppkit-bench``, or ``$PPKIT_BENCH_CACHE``); rerunning continues from it, and a finished run is
skipped. The training log (loss curve, validation perplexity, wall time, settings) is written to
``benchmarks/results/small_gpt2_train.json`` (small JSON; the weights are never written into the repo).

    nice -n 10 python benchmarks/train_small_gpt2.py            # ~30-40 min on 1 free core
    python benchmarks/train_small_gpt2.py --steps 4 --quick     # smoke run into a separate cache dir
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PPKIT_SHARED_DATA", REPO.parent / "shared" / "data"))
TOKENIZER = SHARED / "tokenizers" / "gpt2"
PTB = SHARED / "lm" / "ptb"
CACHE = Path(os.environ.get("PPKIT_BENCH_CACHE", Path.home() / ".cache" / "ppkit-bench"))
RESULTS = REPO / "benchmarks" / "results"
NOTE = ("small GPT-2 trained here by ppkit benchmarks/train_small_gpt2.py on PTB train "
        "(4 layers, hidden 256), NOT OpenAI's GPT-2")
LM_CHUNK_LINES = 1000


def model_dir(cache: Path = CACHE, tag: str = "") -> Path:
    """Where the final trained model lives (outside the repo)."""
    return cache / f"small-gpt2-ptb-trained-here{tag}" / "final"


def tokenize_lines(tokenizer, path: Path) -> list[int]:
    """All tokens of a text file as one stream, tokenized per 1000-line chunk (as ppkit.data does)."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    ids: list[int] = []
    for c in range(0, len(lines), LM_CHUNK_LINES):
        ids.extend(tokenizer("".join(lines[c:c + LM_CHUNK_LINES]), verbose=False)["input_ids"])
    return ids


def atomic_save(obj, path: Path) -> None:
    import torch

    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=280, help="optimizer steps (default 280 = ~1 epoch of PTB)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--block", type=int, default=256, help="tokens per training block (= n_positions)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--restricted-frac", type=float, default=0.9,
                   help="fraction of steps with the softmax restricted to PTB's token ids (then full vocab)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ckpt-every", type=int, default=10)
    p.add_argument("--val-blocks", type=int, default=40, help="PTB valid blocks for the progress perplexity")
    p.add_argument("--cache", type=Path, default=CACHE)
    p.add_argument("--quick", action="store_true", help="smoke run: separate cache dir, no results JSON")
    args = p.parse_args(argv)

    import numpy as np
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    torch.set_num_threads(args.threads)
    tag = "-quick" if args.quick else ""
    root = args.cache / f"small-gpt2-ptb-trained-here{tag}"
    final = root / "final"
    ckpt_path = root / "ckpt.pt"
    log_path = root / "train_log.json"
    root.mkdir(parents=True, exist_ok=True)
    if (final / "config.json").is_file():
        print(f"already trained: {final} (delete it to retrain)", file=sys.stderr)
        return 0

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    t0 = time.perf_counter()
    train_ids = tokenize_lines(tokenizer, PTB / "train.txt")
    valid_ids = tokenize_lines(tokenizer, PTB / "valid.txt")
    n_blocks = len(train_ids) // args.block
    train = torch.tensor(train_ids[:n_blocks * args.block], dtype=torch.long).view(n_blocks, args.block)
    nv = min(args.val_blocks, len(valid_ids) // args.block)
    valid = torch.tensor(valid_ids[:nv * args.block], dtype=torch.long).view(nv, args.block)
    used = torch.tensor(sorted(set(train_ids)), dtype=torch.long)  # sub-vocabulary of the restricted phase
    remap = torch.full((tokenizer.vocab_size if len(tokenizer) <= tokenizer.vocab_size else len(tokenizer),), -1,
                       dtype=torch.long)
    remap[used] = torch.arange(len(used))
    print(f"PTB train: {len(train_ids)} GPT-2 tokens, {n_blocks} blocks of {args.block}, {len(used)} distinct ids "
          f"(tokenized in {time.perf_counter() - t0:.0f}s)", file=sys.stderr)

    torch.manual_seed(args.seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=args.block, n_embd=args.hidden, n_layer=args.layers,
                        n_head=args.heads, n_inner=4 * args.hidden, bos_token_id=tokenizer.eos_token_id,
                        eos_token_id=tokenizer.eos_token_id)
    config.ppkit_note = NOTE
    model = GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        frac = (step - args.warmup) / max(1, args.steps - args.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(n_blocks)
    step, pos, epoch, log = 0, 0, 0, {"loss": [], "valid_ppl": [], "wall_s": 0.0}
    if ckpt_path.is_file():
        state = torch.load(ckpt_path, weights_only=False)
        if state["args"]["steps"] != args.steps or state["args"]["seed"] != args.seed:
            print("checkpoint is from other settings; delete it or use the same --steps/--seed", file=sys.stderr)
            return 2
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        step, pos, epoch, order, log = state["step"], state["pos"], state["epoch"], state["order"], state["log"]
        torch.set_rng_state(state["torch_rng"])
        print(f"resumed at step {step}", file=sys.stderr)

    @torch.no_grad()
    def valid_ppl() -> float:
        model.eval()
        nll, n = 0.0, 0
        for i in range(0, nv, 8):
            out = model(valid[i:i + 8], labels=valid[i:i + 8])
            k = valid[i:i + 8, 1:].numel()
            nll, n = nll + float(out.loss) * k, n + k
        model.train()
        return math.exp(nll / n)

    n_restricted = int(round(args.restricted_frac * args.steps))
    model.train()
    seg_start = time.perf_counter()
    while step < args.steps:
        if pos + args.batch_size > n_blocks:
            epoch, pos = epoch + 1, 0
            order = np.random.default_rng(args.seed + epoch).permutation(n_blocks)
        x = train[torch.as_tensor(order[pos:pos + args.batch_size])]
        pos += args.batch_size
        if step < n_restricted:
            hidden = model.transformer(input_ids=x).last_hidden_state[:, :-1]
            logits = hidden @ model.lm_head.weight[used].T
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, len(used)), remap[x[:, 1:]].reshape(-1))
        else:
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        log["loss"].append([step, float(loss), "restricted" if step <= n_restricted else "full"])
        if step % args.ckpt_every == 0 or step == args.steps:
            if step % (args.ckpt_every * 5) == 0 or step == args.steps:
                log["valid_ppl"].append([step, valid_ppl()])
            log["wall_s"] += time.perf_counter() - seg_start
            seg_start = time.perf_counter()
            atomic_save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                         "step": step, "pos": pos, "epoch": epoch, "order": order, "log": log,
                         "torch_rng": torch.get_rng_state(), "args": vars(args) | {"cache": str(args.cache)}},
                        ckpt_path)
            vp = f", valid ppl {log['valid_ppl'][-1][1]:.1f}" if log["valid_ppl"] else ""
            print(f"step {step}/{args.steps} loss {float(loss):.3f}{vp} ({log['wall_s'] / 60:.1f} min)",
                  file=sys.stderr, flush=True)

    # The final model: plain transformers format plus the label, written atomically.
    tmp = root / "final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.eval()
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "TRAINED_HERE.md").write_text(
        f"# {NOTE}\n\nTrained by `benchmarks/train_small_gpt2.py` (seed {args.seed}, {args.steps} steps of "
        f"{args.batch_size}x{args.block} tokens) on `../shared/data/lm/ptb/train.txt` with the real GPT-2 tokenizer.\n"
        "It is a benchmark stand-in for GPT-2 (no OpenAI weights are available offline). Do not publish it as GPT-2.\n",
        encoding="utf-8")
    os.replace(tmp, final)
    record = {
        "what": NOTE,
        "model_dir": str(final),
        "config": {"n_layer": args.layers, "n_embd": args.hidden, "n_head": args.heads, "n_inner": 4 * args.hidden,
                   "n_positions": args.block, "vocab_size": len(tokenizer),
                   "params": sum(p.numel() for p in model.parameters())},
        "training": {"steps": args.steps, "batch_size": args.batch_size, "block": args.block, "lr": args.lr,
                     "warmup": args.warmup, "schedule": "linear warm-up, cosine to 0.1x", "optimizer": "AdamW(0.9, 0.95), wd 0.01, clip 1.0",
                     "restricted_softmax_steps": n_restricted, "restricted_vocab": len(used),
                     "tokens_seen": args.steps * args.batch_size * args.block, "ptb_train_tokens": len(train_ids),
                     "epochs": args.steps * args.batch_size / n_blocks, "seed": args.seed, "threads": args.threads},
        "valid_ppl_progress": log["valid_ppl"],
        "valid_ppl_blocks": nv,
        "loss_curve": log["loss"][::5] + ([log["loss"][-1]] if len(log["loss"]) % 5 != 1 else []),
        "wall_minutes": log["wall_s"] / 60,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count()},
        "versions": {"torch": torch.__version__, "python": platform.python_version(),
                     "transformers": __import__("transformers").__version__},
        "command": "python benchmarks/train_small_gpt2.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    if not args.quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "small_gpt2_train.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    log_path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"saved {final}: valid ppl (first {nv} blocks) {log['valid_ppl'][-1][1]:.1f}, "
          f"{log['wall_s'] / 60:.1f} min", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
