"""Launcher for the distributed fine-tuning test: ``torchrun --nproc_per_node 2 tests/finetune_launch.py
MODEL_DIR DATA_DIR OUT_DIR RESULT_JSON [TEACHER_DIR]``. Every rank calls :func:`ppkit.training.finetune` exactly as a
single process would; each rank writes its own small result file so the test can compare them."""

from __future__ import annotations

import json
import os
import sys

import torch

torch.set_num_threads(1)


def main() -> None:
    from ppkit.training import finetune

    from ppkit.distill import DistillSettings

    model_dir, data_dir, out_dir, result_prefix = sys.argv[1:5]
    teacher = sys.argv[5] if len(sys.argv) > 5 else None
    result = finetune(model_dir, "sst2", data=data_dir, out_dir=out_dir, epochs=2, batch_size=8,
                      learning_rate=1e-3, max_length=32, train_limit=48, eval_limit=24, seed=0, progress=False,
                      teacher=teacher, distill=DistillSettings(hidden_weight=0.5) if teacher else None)
    rank = os.environ.get("RANK", "0")
    with open(f"{result_prefix}.rank{rank}.json", "w", encoding="utf-8") as fh:
        json.dump({**result.to_dict(), "rank": rank,
                   "dist": torch.distributed.is_initialized() and torch.distributed.get_world_size()}, fh)


if __name__ == "__main__":
    main()
