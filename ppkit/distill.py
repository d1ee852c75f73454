"""Distillation from the dense fine-tuned model while fine-tuning a pruned one (CoFi / TinyBERT style).

The student's loss mixes the task loss with the distance to the teacher's predictions::

    loss = (1 - weight) * task + weight * prediction_loss + hidden_weight * hidden_loss

``prediction_loss`` is the KL divergence between the temperature-softened class distributions
(times T², so its gradient scale does not depend on T) for classification, the same KL per token
over the vocabulary for causal language modelling (averaged over the tokens the LM loss scores),
and the MSE to the teacher's score for regression. ``hidden_loss`` is the mean over layers of the MSE between the
student's and the teacher's hidden states at each layer's output, over non-padding tokens: a pruned
model keeps the teacher's layer count and hidden size, so no projection is needed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ppkit.errors import InputError


#: task kinds a teacher can be distilled on
DISTILLED_KINDS = ("classification", "regression", "lm")


@dataclass(frozen=True)
class DistillSettings:
    """``weight`` of the prediction loss (the task loss gets ``1 - weight``), softmax ``temperature``
    and ``hidden_weight`` of the layer-to-layer hidden-state loss (0 turns it off)."""

    weight: float = 0.5
    temperature: float = 2.0
    hidden_weight: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.weight <= 1:
            raise InputError(f"distillation weight must be in [0, 1], got {self.weight!r}")
        if not self.temperature > 0:
            raise InputError(f"distillation temperature must be positive, got {self.temperature!r}")
        if not self.hidden_weight >= 0:
            raise InputError(f"hidden-state distillation weight must be zero or positive, got {self.hidden_weight!r}")

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def prediction_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str,
                    temperature: float, labels: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher || student) of the softened distributions times T² (classification; for ``kind="lm"``
    per next-token distribution, averaged over the positions whose next label is not -100), or the
    MSE between the scores (regression)."""
    if kind == "regression":
        return nn.functional.mse_loss(student_logits.float(), teacher_logits.float())
    if kind == "lm":
        # position i predicts token i + 1, as in the causal-LM loss: the last position has no target
        student_logits, teacher_logits = student_logits[:, :-1], teacher_logits[:, :-1]
        if labels is not None:
            keep = labels[:, 1:] != -100
            student_logits, teacher_logits = student_logits[keep], teacher_logits[keep]  # [tokens, vocab]
        else:
            student_logits, teacher_logits = student_logits.flatten(0, 1), teacher_logits.flatten(0, 1)
    t = temperature
    log_p_student = nn.functional.log_softmax(student_logits.float() / t, dim=-1)
    log_p_teacher = nn.functional.log_softmax(teacher_logits.float() / t, dim=-1)
    return nn.functional.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean") * t * t


def hidden_loss(student_states: tuple[torch.Tensor, ...], teacher_states: tuple[torch.Tensor, ...],
                attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over layer outputs (the embeddings left out) of the per-token MSE over non-padding tokens."""
    if len(student_states) != len(teacher_states):
        raise InputError(f"the student has {len(student_states) - 1} layers and the teacher "
                         f"{len(teacher_states) - 1}: hidden-state distillation needs the same layer count")
    losses = []
    for s, t in zip(student_states[1:], teacher_states[1:]):
        err = (s.float() - t.float()).pow(2).mean(dim=-1)  # [batch, seq]
        if attention_mask is not None:
            mask = attention_mask.to(err.dtype)
            losses.append((err * mask).sum() / mask.sum().clamp(min=1.0))
        else:
            losses.append(err.mean())
    return torch.stack(losses).mean()


def load_teacher(teacher: str | Path | nn.Module, student: nn.Module, spec: Any, allow_pickle: bool) -> nn.Module:
    """The teacher in eval mode without gradients, checked against the student (same outputs, and the
    same hidden size and layer count)."""
    if spec.kind not in DISTILLED_KINDS:
        raise InputError(f"--teacher distils sentence classification / regression and causal language modelling; "
                         f"task {spec.name} is {spec.kind}")
    from ppkit.models import load_model

    lm = spec.kind == "lm"
    if isinstance(teacher, nn.Module):
        model = teacher
    elif lm:  # a language model's head is its (tied) embedding: any dense causal LM directory is a teacher
        model = load_model(str(teacher), head="causal-lm", allow_pickle=allow_pickle)
    else:
        model = load_model(str(teacher), head="sequence-classification", num_labels=spec.num_labels,
                           allow_pickle=allow_pickle)
        if not _has_trained_head(Path(str(teacher))):
            raise InputError(f"teacher {teacher} has no fine-tuned classifier head: fine-tune the dense model first "
                             f"(ppkit finetune DENSE --task {spec.name} ...) and pass that directory")
    for attr in ("vocab_size" if lm else "num_labels", "hidden_size", "num_hidden_layers"):
        if getattr(model.config, attr, None) != getattr(student.config, attr, None):
            raise InputError(f"teacher and student differ in {attr} ({getattr(model.config, attr, None)} vs "
                             f"{getattr(student.config, attr, None)}): distil from the dense model the student was pruned from")
    model.eval().requires_grad_(False)
    return model


def _has_trained_head(path: Path) -> bool:
    from ppkit.models import saved_head

    head = saved_head(path)
    return head is None or head == "sequence-classification"  # None: a hub name, trusted


def distillation_trainer(trainer_cls: type, teacher: nn.Module, settings: DistillSettings, kind: str) -> type:
    """A subclass of the transformers ``Trainer`` whose training loss distils ``teacher`` (evaluation
    keeps the plain task loss)."""

    class DistillationTrainer(trainer_cls):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if not model.training:
                return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)
            want_hidden = settings.hidden_weight > 0
            outputs = model(**inputs, output_hidden_states=want_hidden)
            device = outputs.logits.device
            if next(teacher.parameters()).device != device:
                teacher.to(device)
            features = {k: v for k, v in inputs.items() if k != "labels"}
            with torch.no_grad(), self.accelerator.autocast():  # the student's precision (accelerate wraps only its forward)
                target = teacher(**features, output_hidden_states=want_hidden)
            loss = (1 - settings.weight) * outputs.loss + settings.weight * prediction_loss(
                outputs.logits, target.logits, kind, settings.temperature, inputs.get("labels"))
            if want_hidden:
                loss = loss + settings.hidden_weight * hidden_loss(outputs.hidden_states, target.hidden_states,
                                                                   inputs.get("attention_mask"))
            return (loss, outputs) if return_outputs else loss

    return DistillationTrainer
