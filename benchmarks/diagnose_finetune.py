"""Why do some pruned plans not learn a pair task? A step-level look at the reproduction's fine-tune.

In the reproduction grid (``reproduce.py``) some pruned MiniLM plans end STS-B near Spearman 0 while
others of the same shape reach 0.7. This script takes one task and budget and, per strategy:

1. prunes exactly as the grid does (seed 0, the grid's ``RECIPE``);
2. scores a *frozen* linear probe: ridge regression (regression tasks) or a least-squares classifier
   on the pruned model's final [CLS] vectors of the recipe's train subset, evaluated on the dev
   subset — is the information there before fine-tuning?
3. fine-tunes with the recipe's settings (AdamW, linear warm-up/decay, gradient clipping at 1.0 as the
   Trainer does, same train subset and batch size) in a plain PyTorch loop that evaluates the dev
   subset every ``--every`` steps, recording the dev metric and the spread of the predictions.

    python benchmarks/diagnose_finetune.py                                 # STS-B at 0.6 (writes the JSON)
    python benchmarks/diagnose_finetune.py --task mrpc --strategies dense,dual-cp --out /tmp/mrpc.json

Results go to ``benchmarks/results/finetune_diagnosis.json``; ``make_report.py`` turns them into a
table and a plot in ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reproduce import (CACHE, GLUE, MINILM, PRUNE_ARGS, RECIPE, RESULTS, TASK_DIRS, Recipe, machine,  # noqa: E402
                       prune_as_grid)

OUT = RESULTS.parent / "finetune_diagnosis.json"


def cls_vectors(model, dataset, batch_size: int = 64):
    """Final-layer [CLS] vectors of the encoder under a classification head."""
    import torch

    collate = dataset.collator()
    base = getattr(model, model.base_model_prefix)
    outs = []
    with torch.inference_mode():
        for i in range(0, len(dataset), batch_size):
            batch = collate(dataset.features[i:i + batch_size])
            batch.pop("labels", None)
            outs.append(base(**batch).last_hidden_state[:, 0].float())
    return torch.cat(outs).double()


def frozen_probe(model, train_ds, dev_ds) -> dict[str, float]:
    """Best dev metric of a ridge probe on frozen [CLS] vectors over a small grid of ridge strengths."""
    import torch

    from ppkit.metrics import compute_task_metrics

    spec = train_ds.task
    x_tr, x_dev = cls_vectors(model, train_ds), cls_vectors(model, dev_ds)
    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6
    x_tr, x_dev = (x_tr - mu) / sd, (x_dev - mu) / sd
    y = torch.tensor(train_ds.references, dtype=torch.float64)
    target = (y - y.mean()).unsqueeze(1) if spec.kind == "regression" else \
        torch.nn.functional.one_hot(y.long(), spec.num_labels).double()
    gram, rhs = x_tr.T @ x_tr, x_tr.T @ target
    best: dict[str, float] = {}
    for ridge in (1.0, 10.0, 100.0, 1000.0):
        theta = torch.linalg.solve(gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype), rhs)
        pred = x_dev @ theta
        pred = pred[:, 0].numpy() if spec.kind == "regression" else pred.numpy()
        metrics = compute_task_metrics(spec, pred, dev_ds.references)
        if not best or metrics[spec.main_metric] > best[spec.main_metric]:
            best = {**metrics, "ridge": ridge}
    return best


def trace_finetune(model, train_ds, dev_ds, *, recipe: Recipe, epochs: int, every: int) -> list[dict[str, Any]]:
    """Fine-tune with the recipe's optimiser settings, evaluating ``dev_ds`` every ``every`` steps."""
    import numpy as np
    import torch
    from transformers import get_linear_schedule_with_warmup

    from ppkit.training import predict
    from ppkit.metrics import compute_task_metrics

    seed = recipe.finetune_seed
    torch.manual_seed(seed)
    model.train()
    decay = [p for n, p in model.named_parameters() if not (n.endswith("bias") or "LayerNorm" in n)]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=recipe.learning_rate)
    loader = torch.utils.data.DataLoader(train_ds, batch_size=recipe.batch_size, shuffle=True,
                                         collate_fn=train_ds.collator(),
                                         generator=torch.Generator().manual_seed(seed))
    total = epochs * len(loader)
    sched = get_linear_schedule_with_warmup(opt, round(recipe.warmup_ratio * total), total)
    metric = train_ds.task.main_metric

    def point(step: int, losses: list[float]) -> dict[str, Any]:
        preds = np.asarray(predict(model, dev_ds))
        out = {"step": step, "train_loss": float(np.mean(losses)) if losses else None,
               "dev": compute_task_metrics(train_ds.task, preds, dev_ds.references)[metric]}
        if preds.ndim == 1:
            out["prediction_std"] = float(preds.std())
        else:
            out["majority_share"] = float(np.bincount(preds.argmax(-1)).max() / len(preds))
        return out

    trace, losses, step = [point(0, [])], [], 0
    for _ in range(epochs):
        for batch in loader:
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
            step += 1
            losses.append(loss.item())
            if step % every == 0 or step == total:
                trace.append(point(step, losses))
                losses = []
    return trace


def diagnose(task: str, budget: float, strategy: str, *, epochs: int, every: int, eval_limit: int, work: Path,
             recipe: Recipe = RECIPE, model_path: Path = MINILM) -> dict[str, Any]:
    """One strategy's row: its plan's shape, the frozen probe and the fine-tuning trace."""
    import torch

    from ppkit.data import load_task_dataset
    from ppkit.models import load_model, load_tokenizer
    from ppkit.tasks import get_task

    spec = get_task(task)
    data = GLUE / TASK_DIRS[task]
    source = str(model_path)
    row: dict[str, Any] = {"strategy": strategy, "budget": 1.0 if strategy == "dense" else budget}
    if strategy != "dense":
        res = prune_as_grid(model_path, task, strategy, budget, 0, recipe, work / strategy)
        row["heads_per_layer"] = res.report["heads_per_layer"]
        row["neurons_per_layer"] = res.report["neurons_per_layer"]
        source = str(work / strategy)
        del res
    torch.manual_seed(recipe.finetune_seed)  # the fresh head, as finetune() seeds it
    model = load_model(source, head="sequence-classification", num_labels=spec.num_labels)
    tokenizer = load_tokenizer(source)
    train_ds = load_task_dataset(spec, tokenizer, "train", data=data, max_length=recipe.max_length[task],
                                 limit=recipe.train_limit[task], limit_seed=recipe.finetune_seed)
    dev_ds = load_task_dataset(spec, tokenizer, "dev", data=data, max_length=recipe.max_length[task],
                               limit=eval_limit)
    start = time.perf_counter()
    row["frozen_probe"] = frozen_probe(model, train_ds, dev_ds)
    row["trace"] = trace_finetune(model, train_ds, dev_ds, recipe=recipe, epochs=epochs, every=every)
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def spec_metric(task: str) -> str:
    from ppkit.tasks import get_task

    return get_task(task).main_metric


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="stsb", choices=list(TASK_DIRS))
    p.add_argument("--budget", type=float, default=0.6)
    p.add_argument("--strategies", default="dense,dual-cp,worst,kcm,random",
                   help="comma list of dense and the grid's strategies")
    p.add_argument("--epochs", type=int, default=None, help="default: the recipe's for the task")
    p.add_argument("--every", type=int, default=25, help="evaluate the dev subset every N steps")
    p.add_argument("--eval-limit", type=int, default=500, help="first N dev examples")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(RECIPE.threads)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [s for s in strategies if s != "dense" and s not in PRUNE_ARGS]
    if unknown:
        p.error(f"unknown strategies: {', '.join(unknown)}")
    epochs = args.epochs or RECIPE.epochs[args.task]
    work = CACHE / "diagnose"
    rows = []
    try:
        for s in strategies:
            print(f"{args.task} {s} {args.budget:g} ...", flush=True)
            rows.append(diagnose(args.task, args.budget, s, epochs=epochs, every=args.every,
                                 eval_limit=args.eval_limit, work=work))
            last = rows[-1]["trace"][-1]
            print(f"  frozen probe {rows[-1]['frozen_probe'][spec_metric(args.task)]:.3f}  dev after {last['step']} steps: {last['dev']:.3f}",
                  flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = {"task": args.task, "metric": spec_metric(args.task), "budget": args.budget, "epochs": epochs, "every": args.every,
           "eval_examples": args.eval_limit, "recipe": RECIPE.to_dict(), "machine": machine(),
           "command": "python benchmarks/diagnose_finetune.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
