"""How much faster is ``ppkit finetune --precision bf16`` than fp32 on this CPU?

Runs ``ppkit.finetune`` itself (the Trainer, its sampler, AdamW, autocast) for one short epoch on a
seeded subset of STS-B train (the real all-MiniLM-L6-v2 with a regression head) per model and
precision, in interleaved rounds on one torch thread, so both precisions see the same machine load.
Models: dense; pruned to 0.6 FLOPs by a uniform plan (the step time depends on the shapes, not on which
heads are kept), whose FFN widths are not multiples of anything; and the same plan with FFN widths
rounded to multiples of 64 (``prune --multiple-of 64``). Reports the median training seconds per
optimizer step and the bf16 / fp32 ratio, with the machine (``cpu_bf16_features``: bf16 matmuls
are fast only where the CPU has AMX or AVX-512-BF16). Writes
``benchmarks/results/finetune_precision.json``. The dev metric after a full fine-tune in each
precision is a pair of ``ppkit finetune`` runs (``benchmarks/README.md``, "Mixed precision").

    python benchmarks/finetune_precision.py            # about 6 min on one thread
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SHARED = Path(os.environ.get("PPKIT_SHARED_DATA", HERE.parents[1] / "shared" / "data"))
BATCH = 16


def timed_rounds(args, dirs: dict, stsb: Path, work: Path) -> dict[str, dict[str, list[float]]]:
    """One short fine-tune per model, precision and round: {model: {precision: seconds per optimizer step}}."""
    from ppkit import finetune

    seconds: dict[str, dict[str, list[float]]] = {m: {"fp32": [], "bf16": []} for m in dirs}
    for r in range(args.rounds):
        for name, model_dir in dirs.items():
            for precision in ("fp32", "bf16"):
                result = finetune(model_dir, "stsb", data=stsb, out_dir=work / "ft", overwrite=True, epochs=1,
                                  batch_size=BATCH, train_limit=args.steps * BATCH, eval_limit=BATCH, max_length=128,
                                  min_steps=0, precision=precision, progress=False, threads=args.threads)
                seconds[name][precision].append(result.epochs[0].train_seconds / args.steps)
                print(f"round {r + 1}/{args.rounds} {name} {precision}: {seconds[name][precision][-1] * 1000:.0f} ms/step",
                      file=sys.stderr)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=25, help="optimizer steps per run (batch 16)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "finetune_precision.json")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE))
    from latency import uniform_plan

    from ppkit.adapters import get_adapter
    from ppkit.align import align_plan
    from ppkit.machine import machine_info
    from ppkit.models import load_model, load_tokenizer
    from ppkit.saving import save_pruned
    from ppkit.surgery import prune_model

    torch.set_num_threads(args.threads)
    source = SHARED / "models" / "all-MiniLM-L6-v2"
    stsb = SHARED / "glue" / "STS-B"
    dense = load_model(str(source), head="sequence-classification", num_labels=1)
    tokenizer = load_tokenizer(str(source))
    plan = uniform_plan(dense, 0.6, seq_len=128)
    plans = {"pruned 0.6": plan, "pruned 0.6, FFN widths x64": align_plan(plan, 64, get_adapter(dense).shape(), 128, 0.6)}
    with tempfile.TemporaryDirectory(prefix="ppkit-precision-") as tmp:
        work = Path(tmp)
        dirs = {"dense": source}
        for i, (name, p) in enumerate(plans.items()):
            dirs[name] = work / f"pruned{i}"
            save_pruned(prune_model(copy.deepcopy(dense), p), dirs[name], plan=p, tokenizer=tokenizer)
        seconds = timed_rounds(args, dirs, stsb, work)
    rows = {}
    for name, t in seconds.items():
        fp32, bf16 = statistics.median(t["fp32"]), statistics.median(t["bf16"])
        rows[name] = {"fp32_ms_per_step": fp32 * 1000, "bf16_ms_per_step": bf16 * 1000, "bf16_over_fp32": bf16 / fp32,
                      "seconds_per_step": t}
        print(f"{name:>26}: fp32 {fp32 * 1000:6.0f} ms/step  bf16 {bf16 * 1000:6.0f} ms/step  bf16/fp32 {bf16 / fp32:.2f}")
    result = {
        "command": "python benchmarks/finetune_precision.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_info(), "batch_size": BATCH, "steps": args.steps, "rounds": args.rounds,
        "models": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
