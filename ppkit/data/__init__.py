"""Task data: read a split (hub or local file), tokenize it, and cut it into calibration batches.

Two sources: the Hugging Face hub through ``datasets.load_dataset`` (the normal path for users with a
network), or ``data=PATH`` — a GLUE-style directory (``train.tsv`` / ``dev.tsv``, ``dev_matched.tsv``
for MNLI; ``train.txt`` / ``valid.txt`` / ``test.txt`` for LM corpora; ``train-v1.1.json`` /
``dev-v1.1.json`` for SQuAD; a parent GLUE directory holding ``SST-2/`` etc. works too) or a single
``.tsv`` / ``.csv`` / ``.json`` / ``.jsonl`` / ``.txt`` file, which then serves as whatever split is
asked for. Local files are parsed here (not by ``datasets``) so that every problem becomes a
:class:`~ppkit.errors.DataError` naming the file, the line and the fix. GLUE TSVs are read with quote
handling off (``csv.QUOTE_NONE``: sentences contain unbalanced ``"``) and a BOM is stripped (MRPC).

Every split is first turned into canonical rows: ``text_a`` / ``text_b`` / ``label`` (GLUE),
``id`` / ``question`` / ``context`` / ``answers`` (SQuAD), or lines of text (LM).

Calibration (:func:`calibration_batches`) follows the reference implementation: the train split,
labels dropped, a seeded random sample of ``samples`` rows (all rows, in order, with a warning when
the split is smaller), batches of 32 padded per batch. LM text is tokenized in chunks of 1000 lines and
cut into blocks of ``max_length`` tokens (512 by default, remainder of each chunk dropped). SQuAD rows
become question+context features (``only_second`` truncation, stride 128), so samples are features.

**Local WikiText-2 without ``train.txt``** (the shared copy has only valid/test): asking for the train
split raises a DataError that says to pass ``--data DIR/valid.txt`` explicitly. ppkit does not fall
back to the validation text silently, because that text is also the evaluation text.

The package splits the work: :mod:`.reading` (hub and local files), :mod:`.parsing` (canonical rows),
:mod:`.encoding` (tokenized datasets for training and evaluation), :mod:`.calibration` (the statistics
pass's batches) and :mod:`.squad` (answer post-processing).
"""

from .calibration import CalibrationData, calibration_batches
from .encoding import (
    LM_CHUNK_LINES,
    QA_STRIDE,
    PadCollator,
    TaskDataset,
    check_max_length,
    lm_token_ids,
    load_task_dataset,
    pad_token_id,
    task_max_length,
)
from .reading import SPLITS, RawSplit, load_split
from .squad import postprocess_qa

__all__ = [
    "CalibrationData",
    "LM_CHUNK_LINES",
    "PadCollator",
    "QA_STRIDE",
    "RawSplit",
    "SPLITS",
    "TaskDataset",
    "calibration_batches",
    "check_max_length",
    "lm_token_ids",
    "load_split",
    "load_task_dataset",
    "pad_token_id",
    "postprocess_qa",
    "task_max_length",
]
