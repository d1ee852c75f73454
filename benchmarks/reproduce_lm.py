"""GPT-2 half of the reproduction (paper Fig. 3): perplexity after P-pruning, before and after a short fine-tune.

Default model: the **small GPT-2 trained here, not OpenAI's** (``benchmarks/train_small_gpt2.py``: 4
layers, hidden 256, 8 heads, FFN 1024, real GPT-2 tokenizer, ~1 epoch of PTB train; no OpenAI GPT-2
weights are available offline). ``--model gpt2`` runs the same grid on OpenAI's GPT-2 for a user with
the Hugging Face hub (results go to a separate folder).

Per cell (strategy, FLOPs budget, seed):

1. ``ppkit.pipeline.prune`` the model, calibrated label-free on PTB train (blocks of the model's
   context length, capped at 256);
2. perplexity on PTB valid / test and WikiText-2 valid / test (the local WikiText-2 files are the
   **tokenised** variant with ``<unk>`` and ``@-@``, not the raw one the paper's hub config names), on
   the first ``eval_tokens`` GPT-2 tokens of each split, non-overlapping windows of the context
   length (``ppkit.metrics.perplexity``), full 50,257-token softmax;
3. a short fine-tune on a seeded subset of PTB train blocks (``ppkit.training.finetune``; the paper
   fine-tunes 20 epochs on PTB), then the same four perplexities again.

Recipe ``lm-cpu-v2`` (``--recipe lm-cpu-v2``, issue 20): the 96-block fine-tune was too short to tell
Dual-CP from random, so at 0.5 both fine-tune for one full PTB train epoch, with and without
distillation (``-kd`` cells: ``finetune(teacher=...)``, per-token KL at T = 2, weight 0.5). The dense
cell fine-tunes the dense model for the same epoch: it is the reference the pruned cells are compared
with (the small GPT-2 saw about one epoch, so one more moves it a lot), and, as in the GLUE grid, the
``-kd`` cells' teacher (kept in the cache; refitted when missing). Results in
``benchmarks/results/reproduce_lm_v2/``, table in the v2 section.

One JSON per cell under ``benchmarks/results/reproduce_lm/<model tag>/``, skipped on rerun; weights stay
in the cache (``~/.cache/ppkit-bench``) and are deleted after the cell.

    nice -n 10 python benchmarks/train_small_gpt2.py              # once (~30-40 min)
    python benchmarks/reproduce_lm.py                              # whole grid (resumable)
    python benchmarks/reproduce_lm.py --only dual-cp/0.6/0         # (re)compute one cell
    python benchmarks/reproduce_lm.py --model gpt2                 # OpenAI GPT-2 (needs the hub)
    python benchmarks/reproduce_lm.py --recipe lm-cpu-v2           # one full PTB epoch, +- teacher (~25-35 min a cell)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reproduce import BUDGET_PRIORITY, BUDGETS, CACHE, REPO, SHARED, machine  # noqa: E402
from train_small_gpt2 import NOTE, model_dir  # noqa: E402

PTB = SHARED / "lm" / "ptb"
WT2 = SHARED / "lm" / "wikitext-2"
RESULTS = REPO / "benchmarks" / "results" / "reproduce_lm"
STRATEGIES = ("dense", "dual-cp", "random", "kcm", "worst", "dual-cp-kd", "random-kd")
EVAL_SETS = {"ptb/valid": ("ptb", PTB, "dev"), "ptb/test": ("ptb", PTB, "test"),
             "wikitext-2/valid": ("wikitext-2", WT2, "dev"), "wikitext-2/test": ("wikitext-2", WT2, "test")}

log = logging.getLogger("reproduce_lm")


@dataclass(frozen=True)
class LMRecipe:
    """The CPU recipe for the LM grid, recorded in every cell."""

    name: str = "lm-cpu-v1"
    calibration_samples: int = 256       # blocks of the context length from PTB train
    tokens: int = 200
    lambda_: float = 5.0
    max_context: int = 256               # window for calibration / fine-tuning / perplexity (capped by n_positions)
    eval_tokens: int = 8192              # first N tokens of every eval split
    ft_train_blocks: int | None = 96     # seeded subset of PTB train blocks (None: all; paper: 20 epochs of PTB)
    ft_epochs: int = 1
    ft_batch_size: int = 8
    ft_learning_rate: float = 3e-4
    ft_eval_blocks: int = 8
    finetune_seed: int = 0
    threads: int = 1

    def key(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


RECIPE = LMRecipe()
RECIPE_V2 = LMRecipe(name="lm-cpu-v2", ft_train_blocks=None, ft_eval_blocks=40)
RECIPES = {r.name: r for r in (RECIPE, RECIPE_V2)}
RESULTS_BY_RECIPE = {RECIPE.name: RESULTS, RECIPE_V2.name: REPO / "benchmarks" / "results" / "reproduce_lm_v2"}
V2_CELLS = ("dual-cp/0.5", "random/0.5", "dense/1", "dual-cp-kd/0.5", "random-kd/0.5")


@dataclass(frozen=True)
class LMCell:
    strategy: str
    budget: float
    seed: int = 0

    @property
    def id(self) -> str:
        return f"{self.strategy}/{self.budget:g}/{self.seed}"

    @property
    def slug(self) -> str:
        return f"ptb__{self.strategy}__{self.budget:g}__s{self.seed}"

    @property
    def teacher(self) -> bool:
        """Whether the fine-tune distils the dense model (``-kd`` cells)."""
        return self.strategy.endswith("-kd")

    @classmethod
    def parse(cls, text: str) -> "LMCell":
        parts = text.strip().strip("/").split("/")
        if parts and parts[0] == "ptb":
            parts = parts[1:]
        if len(parts) not in (2, 3) or parts[0] not in STRATEGIES:
            raise SystemExit(f"cell {text!r}: expected STRATEGY/BUDGET[/SEED] with STRATEGY in {', '.join(STRATEGIES)}")
        return cls(parts[0], 1.0 if parts[0] == "dense" else float(parts[1]), int(parts[2]) if len(parts) == 3 else 0)


def result_path(results_dir: Path, tag: str, cell: LMCell) -> Path:
    """Where one cell's JSON lives: one folder per model tag."""
    return results_dir / tag / f"{cell.slug}.json"


def lm_grid(budgets=BUDGETS, strategies=STRATEGIES, seeds=(0,)) -> list[LMCell]:
    cells = [LMCell("dense", 1.0, 0)] if "dense" in strategies else []
    for b in [b for b in BUDGET_PRIORITY if b in budgets] + [b for b in budgets if b not in BUDGET_PRIORITY]:
        for s in ("dual-cp", "random", "kcm", "worst"):
            if s in strategies:
                cells += [LMCell(s, b, seed) for seed in (seeds if s == "random" else (0,))]
    return cells


_IDS: dict[str, Any] = {}


def eval_perplexities(model, tokenizer, recipe: LMRecipe, window: int) -> dict[str, float]:
    from ppkit.data import lm_token_ids
    from ppkit.metrics import perplexity

    out = {}
    for name, (task, data, split) in EVAL_SETS.items():
        if name not in _IDS:
            _IDS[name] = lm_token_ids(task, tokenizer, split, data=data)[:, :recipe.eval_tokens]
        out[name] = perplexity(model, _IDS[name], max_length=window, stride=window, progress=False)
    return out


def run_lm_cell(cell: LMCell, *, model_path: str, tag: str, recipe: LMRecipe = RECIPE, results_dir: Path = RESULTS,
                cache_dir: Path = CACHE, force: bool = False, keep_models: bool = False,
                command: str | None = None) -> tuple[dict, bool]:
    """Prune -> perplexities -> short PTB fine-tune -> perplexities, for one cell; JSON written atomically."""
    import torch

    from ppkit.errors import BudgetError
    from ppkit.training import finetune
    from ppkit.models import load_model, load_tokenizer
    from ppkit.pipeline import prune

    path = result_path(results_dir, tag, cell)
    if path.is_file() and not force:
        res = json.loads(path.read_text(encoding="utf-8"))
        if res.get("recipe_key") != recipe.key():
            log.warning("%s: cached result is from another recipe (stale); use --recompute %s", cell.id, cell.id)
        return res, False
    teacher = (ensure_lm_teacher(model_path, tag, recipe, results_dir, cache_dir, command) if cell.teacher
               else None)

    torch.set_num_threads(recipe.threads)
    work = cache_dir / "reproduce_lm" / tag / f"{cell.slug}-{recipe.key()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    start = time.perf_counter()
    load_before = os.getloadavg()
    tokenizer = load_tokenizer(model_path)
    out: dict[str, Any] = {"cell": cell.id, "task": "ptb", "strategy": cell.strategy, "budget": cell.budget,
                           "seed": cell.seed, "model": tag,
                           "model_note": NOTE if tag == "small-gpt2-here" else "OpenAI GPT-2 from the hub"}
    try:
        if cell.strategy == "dense":
            src = model_path
            out["prune"] = {"flops_ratio": 1.0}
        else:
            try:
                r = prune(model_path, task="ptb", data=PTB, flops=cell.budget, strategy=cell.strategy.removesuffix("-kd"),
                          samples=recipe.calibration_samples, tokens=recipe.tokens, lambda_=recipe.lambda_,
                          seed=cell.seed, compensate="none", out=work / "pruned", plot=False, progress=False,
                          tokenizer=tokenizer,
                          **_calibration_length(model_path, recipe))
            except BudgetError as exc:  # KCM (FFN only) cannot reach low budgets: recorded, not a crash
                out.update({"infeasible": str(exc), "prune": None, "ppl_before_ft": None, "ppl_after_ft": None,
                            "finetune": None})
                return _write(path, out, recipe, start, load_before, command, cell), True
            out["prune"] = {k: r.report[k] for k in ("flops_ratio", "mha_flops_ratio", "ffn_flops_ratio",
                                                     "flops_seq_len", "params_before", "params_after",
                                                     "heads_per_layer", "neurons_per_layer", "samples")}
            out["prune"]["timings_s"] = {k: round(v, 2) for k, v in r.report["timings_s"].items()}
            src = str(work / "pruned")
            del r
        lm = load_model(src, head="causal-lm").eval()
        window = min(recipe.max_context, lm.config.n_positions)
        t = time.perf_counter()
        out["ppl_before_ft"] = eval_perplexities(lm, tokenizer, recipe, window)
        out["eval_seconds"] = time.perf_counter() - t
        del lm
        ft = finetune(src, "ptb", out_dir=work / "finetuned", data=PTB, epochs=recipe.ft_epochs,
                      batch_size=recipe.ft_batch_size, learning_rate=recipe.ft_learning_rate, max_length=window,
                      seed=recipe.finetune_seed, train_limit=recipe.ft_train_blocks, eval_limit=recipe.ft_eval_blocks,
                      progress=False, tokenizer=tokenizer, checkpoint_dir=work / "checkpoints",
                      teacher=str(teacher) if teacher else None)
        if cell.strategy == "dense":  # the -kd cells' teacher
            keep = lm_teacher_dir(tag, recipe, cache_dir)
            shutil.rmtree(keep, ignore_errors=True)
            shutil.copytree(work / "finetuned", keep)
        out["ppl_after_ft"] = eval_perplexities(ft.model.eval(), tokenizer, recipe, window)
        out["finetune"] = {"train_seconds": sum(e.train_seconds for e in ft.epochs), "total_seconds": ft.total_seconds,
                           "train_blocks": ft.settings["train_examples"], "dev_loss": ft.best_metrics.get("loss"),
                           "teacher": ft.settings.get("teacher"), "distill": ft.settings.get("distill")}
        out["window"] = window
    finally:
        if not keep_models:
            shutil.rmtree(work, ignore_errors=True)
    return _write(path, out, recipe, start, load_before, command, cell), True


def lm_teacher_dir(tag: str, recipe: LMRecipe, cache_dir: Path) -> Path:
    """Where the dense model fine-tuned by ``recipe`` (the "-kd" cells' teacher) is kept."""
    return cache_dir / "reproduce_lm" / tag / f"teacher-{recipe.key()}"


def ensure_lm_teacher(model_path: str, tag: str, recipe: LMRecipe, results_dir: Path, cache_dir: Path,
                      command: str | None = None) -> Path:
    """The dense model fine-tuned by ``recipe``: the dense cell is (re)computed when the cache lacks it,
    e.g. on a fresh machine where its JSON is committed but its weights are not."""
    path = lm_teacher_dir(tag, recipe, cache_dir)
    if not path.is_dir():
        run_lm_cell(LMCell("dense", 1.0), model_path=model_path, tag=tag, recipe=recipe, results_dir=results_dir,
                    cache_dir=cache_dir, force=True, command=command)
    return path


def _write(path: Path, out: dict, recipe: LMRecipe, start: float, load_before, command, cell) -> dict:
    from ppkit.pipeline import versions

    out.update({"recipe": asdict(recipe), "recipe_key": recipe.key(), "wall_seconds": time.perf_counter() - start,
                "loadavg_1m": {"start": load_before[0], "end": os.getloadavg()[0]}, "machine": machine(),
                "versions": versions(), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "command": command or f"python benchmarks/reproduce_lm.py --only {cell.id}"})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return out


def _calibration_length(model_path: str, recipe: LMRecipe) -> dict:
    from transformers import AutoConfig

    n_pos = AutoConfig.from_pretrained(model_path).n_positions
    return {"max_length": min(recipe.max_context, n_pos)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="GPT-2 perplexity after P-pruning (paper Fig. 3); resumable, one JSON per cell.")
    p.add_argument("--model", default=None,
                   help="model dir or hub name; default: the small GPT-2 trained here (train_small_gpt2.py). "
                        "'gpt2' = OpenAI's GPT-2 from the hub")
    p.add_argument("--recipe", choices=sorted(RECIPES), default=RECIPE.name,
                   help="lm-cpu-v1 (default): 96-block fine-tune, every budget; lm-cpu-v2: one full PTB epoch at 0.5, "
                        "Dual-CP and random, with and without the dense model fine-tuned the same way as teacher")
    p.add_argument("--budgets", help="comma list (default 0.9,0.7,0.6,0.5,0.4,0.3)")
    p.add_argument("--strategies", help=f"comma list of {','.join(STRATEGIES)}")
    p.add_argument("--seeds", default="0", help="random-strategy seeds (default 0)")
    p.add_argument("--only", action="append", default=[], metavar="CELL", help="STRATEGY/BUDGET/SEED, recomputed")
    p.add_argument("--recompute", action="append", default=[], metavar="CELL")
    p.add_argument("--deadline", type=float, help="launch no new cell after this many minutes")
    p.add_argument("--list", action="store_true")
    p.add_argument("--results", type=Path, help="results folder (default: the recipe's under benchmarks/results)")
    p.add_argument("--cache", type=Path, default=CACHE,
                   help="work dir for pruned / fine-tuned models, and where train_small_gpt2.py put its model")
    p.add_argument("--keep-models", action="store_true")
    args = p.parse_args(argv)
    recipe = RECIPES[args.recipe]
    args.results = args.results or RESULTS_BY_RECIPE[recipe.name]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    for noisy in ("ppkit", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    if args.model is None:
        model_path, tag = str(model_dir(args.cache)), "small-gpt2-here"
    else:
        model_path = args.model
        tag = "gpt2" if args.model == "gpt2" else Path(args.model).name
    if args.only:
        cells, force = [LMCell.parse(c) for c in args.only], {LMCell.parse(c).id for c in args.only}
    elif recipe is RECIPE_V2:
        cells, force = [LMCell.parse(c) for c in V2_CELLS], {LMCell.parse(c).id for c in args.recompute}
    else:
        csv = lambda s, f=str: [f(x) for x in s.split(",") if x.strip()] if s else None  # noqa: E731
        cells = lm_grid(budgets=csv(args.budgets, float) or BUDGETS, strategies=csv(args.strategies) or STRATEGIES,
                        seeds=tuple(csv(args.seeds, int) or (0,)))
        force = {LMCell.parse(c).id for c in args.recompute}
    if args.list:
        for c in cells:
            f = result_path(args.results, tag, c)
            r = json.loads(f.read_text()) if f.is_file() else None
            print(f"{c.id:20s} {'todo' if r is None else 'infeasible' if r.get('infeasible') else 'done'}")
        return 0
    to_compute = [c for c in cells if c.id in force or not result_path(args.results, tag, c).is_file()]
    if to_compute and tag == "small-gpt2-here" and not (Path(model_path) / "config.json").is_file():
        # Only cells still to compute need the weights: a rerun over cached results works without them.
        raise SystemExit(f"{model_path} not found ({len(to_compute)} cell(s) to compute, e.g. {to_compute[0].id}): "
                         "run `nice -n 10 python benchmarks/train_small_gpt2.py` first")
    command = ("python benchmarks/reproduce_lm.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    t0 = time.perf_counter()
    for i, cell in enumerate(cells, 1):
        if args.deadline is not None and (time.perf_counter() - t0) / 60 > args.deadline:
            log.info("deadline reached: not launching %s and later cells", cell.id)
            break
        res, computed = run_lm_cell(cell, model_path=model_path, tag=tag, recipe=recipe, results_dir=args.results,
                                    cache_dir=args.cache, force=cell.id in force, keep_models=args.keep_models,
                                    command=command)
        if res.get("infeasible"):
            log.info("[%d/%d] %s: infeasible (%s)", i, len(cells), cell.id, res["infeasible"])
            continue
        log.info("[%d/%d] %s %s: PTB test ppl %.1f -> %.1f after ft, flops %.3f (%s)", i, len(cells), cell.id,
                 "computed" if computed else "cached", res["ppl_before_ft"]["ptb/test"], res["ppl_after_ft"]["ptb/test"],
                 res["prune"]["flops_ratio"], f"{res['wall_seconds']:.0f}s" if computed else "skipped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
