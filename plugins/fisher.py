"""``fisher``: the Fisher-information mask search of Kwon et al. 2022 ("A Fast Post-Training Pruning
Framework for Transformers"), for a model that already has a task head (a fine-tuned classifier or
QA model, or GPT-2's LM head).

1. **Importance.** Every head and FFN neuron gets a mask variable m = 1 (multiplying its context /
   activation, as the paper's masks do); the diagonal Fisher information of the masks, the sum over
   calibration examples of (dL_i / dm)^2, estimates the loss increase of removing each unit.
2. **Mask search under the FLOPs budget.** Heads and neurons are ranked by importance over the whole
   model; for every number h of kept heads, the most important heads are kept and the remaining budget
   is filled with the most important neurons; the (h, n) that keeps the most total importance wins.
3. **Mask rearrangement.** The diagonal Fisher ignores that two units can do the same work. With the
   per-layer (block-diagonal) Fisher F, removing the units z costs about z^T F z; keeping each layer's
   counts from the search, pairs of one kept and one pruned unit are swapped while a swap lowers that
   cost (the best swap first, up to ``rearrange_steps`` per layer and unit type).

Differences from the paper, on purpose: the calibration data here is unlabeled, so the loss of each
example is taken at a label *sampled from the model's own prediction* (the true Fisher, rather than the
empirical Fisher at the gold label; for regression, the prediction plus unit Gaussian noise); the
paper's mask rearrangement is a greedy best-swap local search (the paper's own solver of that 0/1
problem is not reproduced exactly). The paper's mask tuning (per-unit rescaling by least squares,
layer by layer) is ``--compensate mask-tuning`` (:mod:`ppkit.sequential`), open to every strategy,
beside ppkit's own row refit ``--compensate lstsq-seq``. Per-example gradients, like the paper's, come
from one batched forward and backward pass per calibration batch, each example with its own copy of
the masks (the ``examples`` option caps the examples used).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from ppkit.errors import InputError
from ppkit.flops import count_flops
from ppkit.hookspecs import hookimpl
from ppkit.plan import LayerPlan, PruningPlan
from ppkit.strategy import PruningContext, Strategy


def fisher_scores(model: nn.Module, adapter, batches, *, max_examples: int | None = None,
                  seed: int = 0, blocks: bool = False) -> tuple[np.ndarray, ...]:
    """Diagonal Fisher of the head masks [layers, heads] and neuron masks [layers, ffn_dim] over the
    examples of ``batches``: sum over examples of (dL_i / dm)^2. With ``blocks``, also the per-layer
    Fisher matrices [layers, heads, heads] and [layers, ffn_dim, ffn_dim] (sum of g_i g_i^T).

    Per-example gradients in one batched backward pass: every example gets its own copy of the masks
    (``[batch, layers, units]``), so the gradient of the summed loss with respect to a copy is that
    example's gradient. Each example's label is drawn with a generator seeded by ``seed`` and its
    index, so the scores do not depend on how the examples are batched (or padded)."""
    shape = adapter.shape()
    head_fisher = torch.zeros(shape.num_layers, shape.num_heads, dtype=torch.float64)
    neuron_fisher = torch.zeros(shape.num_layers, shape.ffn_dim, dtype=torch.float64)
    head_blocks = torch.zeros(shape.num_layers, shape.num_heads, shape.num_heads, dtype=torch.float64) if blocks else None
    neuron_blocks = torch.zeros(shape.num_layers, shape.ffn_dim, shape.ffn_dim, dtype=torch.float64) if blocks else None
    current: dict[str, torch.Tensor] = {}

    def hook(kind: str, layer: int):
        def multiply(module, args):
            mask = current[kind][:, layer]
            if kind == "heads":
                mask = mask.repeat_interleave(shape.head_dim, dim=-1)
            return (args[0] * mask[:, None, :].to(args[0].dtype),) + tuple(args[1:])
        return multiply

    handles = []
    for layer in range(shape.num_layers):
        handles.append(adapter.head_context_module(layer).register_forward_pre_hook(hook("heads", layer)))
        handles.append(adapter.ffn_activation_module(layer).register_forward_pre_hook(hook("neurons", layer)))
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for batch in batches:
            take = batch["input_ids"].shape[0] if max_examples is None else min(batch["input_ids"].shape[0], max_examples - seen)
            if take <= 0:
                break
            inputs = {k: v[:take] for k, v in batch.items() if torch.is_tensor(v) and v.dim() == 2}
            real = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"])).bool()
            current["heads"] = torch.ones(take, shape.num_layers, shape.num_heads, requires_grad=True)
            current["neurons"] = torch.ones(take, shape.num_layers, shape.ffn_dim, requires_grad=True)
            loss = _sampled_label_loss(model(**inputs), real, seed, seen)
            heads, neurons = torch.autograd.grad(loss, (current["heads"], current["neurons"]))
            head_fisher += heads.double().pow(2).sum(0)
            neuron_fisher += neurons.double().pow(2).sum(0)
            if blocks:
                head_blocks += torch.einsum("bli,blj->lij", heads.double(), heads.double())
                neuron_blocks += torch.einsum("bli,blj->lij", neurons.double(), neurons.double())
            seen += take
    finally:
        for handle in handles:
            handle.remove()
        current.clear()
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    if blocks:
        return head_fisher.numpy(), neuron_fisher.numpy(), head_blocks.numpy(), neuron_blocks.numpy()
    return head_fisher.numpy(), neuron_fisher.numpy()


def removal_cost(fisher: np.ndarray, pruned: np.ndarray) -> float:
    """z^T F z for the 0/1 vector z of ``pruned`` units: the (second-order) loss increase of removing them."""
    z = pruned.astype(np.float64)
    return float(z @ fisher @ z)


def rearrange_layer(fisher: np.ndarray, kept: Sequence[int], max_steps: int = 200) -> list[int]:
    """Kept units (as many as ``kept``) that lower :func:`removal_cost` by best-first swaps of one kept and
    one pruned unit, starting from ``kept``; returns them sorted."""
    n = fisher.shape[0]
    z = np.ones(n, dtype=bool)
    z[list(kept)] = False
    if z.all() or not z.any():
        return sorted(int(i) for i in kept)
    diag = np.diag(fisher)
    for _ in range(max_steps):
        fz = fisher @ z.astype(np.float64)
        pruned, keep = np.flatnonzero(z), np.flatnonzero(~z)
        # cost change of restoring p and pruning q: 2 (Fz)_q - 2 (Fz)_p + F_pp + F_qq - 2 F_pq
        delta = (2 * fz[keep][None, :] - 2 * fz[pruned][:, None] + diag[pruned][:, None] + diag[keep][None, :]
                 - 2 * fisher[np.ix_(pruned, keep)])
        p, q = np.unravel_index(np.argmin(delta), delta.shape)
        if delta[p, q] >= -1e-12 * max(abs(float(fz @ z)), 1e-30):
            break
        z[pruned[p]], z[keep[q]] = False, True
    return sorted(int(i) for i in np.flatnonzero(~z))


def rearrange(plan: PruningPlan, head_blocks: np.ndarray, neuron_blocks: np.ndarray, max_steps: int = 200) -> PruningPlan:
    """``plan`` with each layer's heads and neurons re-chosen by :func:`rearrange_layer` (same counts)."""
    layers = [LayerPlan(tuple(rearrange_layer(head_blocks[l], keep.heads, max_steps)),
                        tuple(rearrange_layer(neuron_blocks[l], keep.neurons, max_steps)))
              for l, keep in enumerate(plan.layers)]
    before = sum(removal_cost(head_blocks[l], _pruned(k.heads, plan.num_heads)) +
                 removal_cost(neuron_blocks[l], _pruned(k.neurons, plan.ffn_dim)) for l, k in enumerate(plan.layers))
    after = sum(removal_cost(head_blocks[l], _pruned(k.heads, plan.num_heads)) +
                removal_cost(neuron_blocks[l], _pruned(k.neurons, plan.ffn_dim)) for l, k in enumerate(layers))
    return PruningPlan(layers, plan.num_heads, plan.ffn_dim, {**plan.meta, "removal_cost_before_rearrange": before,
                                                              "removal_cost_after_rearrange": after})


def _pruned(kept: Sequence[int], size: int) -> np.ndarray:
    z = np.ones(size, dtype=bool)
    z[list(kept)] = False
    return z


def _generator(seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + index)


def _sampled_label_loss(out, real: torch.Tensor, seed: int, first: int) -> torch.Tensor:
    """Sum over the batch of -log p(y_i | x_i), y_i sampled from the model's own predictive distribution
    (each example ``first + i`` with its own generator); padding positions take no part."""
    rows = range(real.shape[0])
    if getattr(out, "start_logits", None) is not None:  # extractive QA: a start and an end position
        return sum(_categorical_nll(logits[i][real[i]], _generator(seed, first + i))
                   for logits in (out.start_logits, out.end_logits) for i in rows)
    logits = getattr(out, "logits", None)
    if logits is None:
        raise InputError("fisher needs a model with a task head (a fine-tuned classifier or QA model, or GPT-2's "
                         "LM head): prune a fine-tuned checkpoint")
    if logits.dim() == 3:  # language model: a token per real position, predicting the next one
        return sum(_categorical_nll(logits[i][real[i]][:-1], _generator(seed, first + i)) for i in rows)
    if logits.shape[-1] == 1:  # regression: a Gaussian of unit variance around the prediction
        noise = torch.stack([torch.randn(1, generator=_generator(seed, first + i)) for i in rows])
        return 0.5 * ((logits - (logits.detach() + noise)) ** 2).sum()
    return sum(_categorical_nll(logits[i], _generator(seed, first + i)) for i in rows)


def _categorical_nll(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    logp = torch.log_softmax(logits.float(), dim=-1)
    target = torch.multinomial(logp.detach().exp().reshape(-1, logp.shape[-1]), 1, generator=generator).reshape(logp.shape[:-1])
    return -logp.gather(-1, target.unsqueeze(-1)).sum()


def search_masks(head_scores: np.ndarray, neuron_scores: np.ndarray, shape, seq_len: float, budget: float) -> PruningPlan:
    """Kwon et al.'s search: for every number of kept heads (most important first), fill the rest of the
    FLOPs budget with the most important neurons; keep the split with the most total importance."""
    L, H, N = shape.num_layers, shape.num_heads, shape.ffn_dim
    head_order = np.argsort(-head_scores.ravel(), kind="stable")
    neuron_order = np.argsort(-neuron_scores.ravel(), kind="stable")
    head_gain = np.concatenate([[0.0], np.cumsum(head_scores.ravel()[head_order])])
    neuron_gain = np.concatenate([[0.0], np.cumsum(neuron_scores.ravel()[neuron_order])])

    def ratio(h: int, n: int) -> float:
        per_head = np.bincount(head_order[:h] // H, minlength=L)
        per_neuron = np.bincount(neuron_order[:n] // N, minlength=L)
        return count_flops(shape, per_head.tolist(), per_neuron.tolist(), seq_len).ratio

    best = None
    for h in range(L * H + 1):
        if ratio(h, 0) > budget * (1 + 1e-9):
            break  # more heads only cost more
        lo, hi = 0, L * N
        while lo < hi:  # the most neurons that still fit
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if ratio(h, mid) <= budget * (1 + 1e-9) else (lo, mid - 1)
        kept = head_gain[h] + neuron_gain[lo]
        if best is None or kept > best[0]:
            best = (kept, h, lo)
    if best is None:
        raise InputError(f"no plan fits a FLOPs budget of {budget:g}")
    _, h, n = best
    heads = [sorted(int(i % H) for i in head_order[:h] if i // H == layer) for layer in range(L)]
    neurons = [sorted(int(i % N) for i in neuron_order[:n] if i // N == layer) for layer in range(L)]
    return PruningPlan([LayerPlan(tuple(a), tuple(b)) for a, b in zip(heads, neurons)], H, N,
                       {"strategy": "fisher", "kept_importance": float(best[0]),
                        "total_importance": float(head_gain[-1] + neuron_gain[-1]), "budget": budget,
                        "flops_seq_len": seq_len})


def prune(ctx: PruningContext) -> PruningPlan:
    """Fisher importance on the calibration examples, the FLOPs-constrained mask search, then the
    per-layer mask rearrangement (``rearrange_steps=0`` turns it off)."""
    examples = ctx.option("examples", None, cast=lambda v: None if v is None else int(v))
    steps = ctx.option("rearrange_steps", 200, cast=int)
    if steps < 0:
        raise InputError(f"fisher: rearrange_steps must be >= 0, got {steps}")
    if ctx.model is None or ctx.batches is None:
        raise InputError("fisher needs the model and the calibration batches")
    scores = fisher_scores(ctx.model, ctx.adapter, ctx.batches, max_examples=examples, seed=ctx.seed, blocks=steps > 0)
    plan = search_masks(scores[0], scores[1], ctx.shape, ctx.seq_len, ctx.flops_budget)
    if steps > 0:
        plan = rearrange(plan, scores[2], scores[3], steps)
    plan.meta.update({"seed": ctx.seed, "examples": examples, "labels": "sampled from the model's predictions",
                      "rearrange_steps": steps})
    return plan


STRATEGY = Strategy(
    name="fisher",
    description="Kwon et al. 2022: Fisher information of head / neuron masks (labels sampled from the model), "
                "FLOPs-constrained mask search; needs a task head",
    prune=prune,
    needs=frozenset({"batches"}),
    options={"examples": "cap on the calibration examples used (default: all)",
             "rearrange_steps": "swaps per layer and unit type in the mask rearrangement (default 200; 0: off)"},
)


@hookimpl
def ppkit_strategies() -> list[Strategy]:
    return [STRATEGY]
