"""What the trainer reads from a model's forward: `model_logits(output)`, and how many samples an
evaluation batch holds: `eval_batch_size(...)`.

`model_logits` lets `AQLv2Trainer` train any model, not only those of `aql.models`: a plain tensor, a
Hugging Face `ModelOutput` (`.logits`), a dict with "logits", or a tuple whose first item is the logits
(`return_dict=False`). Logits with more than two dimensions (`[B, T, V]` of a causal LM) are flattened
to `[B * T, V]`, a view when they are contiguous, so that their rows line up with `y.reshape(-1)`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["model_logits", "eval_batch_size", "num_outputs"]


def model_logits(output: Any) -> torch.Tensor:
    """The logits in a model's output, as 2-D `[rows, classes]`.

    Accepts a tensor, an object with a tensor attribute `logits` (Hugging Face `ModelOutput`), a
    mapping with the key "logits", or a tuple / list whose first item is the logits. A tensor of
    more than two dimensions is flattened over its leading dimensions (`[B, T, V]` -> `[B * T, V]`);
    a 0-D or 1-D tensor is returned as it is (the trainer's shape check names it).
    """
    logits = output
    if not isinstance(logits, torch.Tensor):
        if isinstance(logits, Mapping) and "logits" in logits:
            logits = logits["logits"]
        elif hasattr(logits, "logits"):
            logits = logits.logits
        elif isinstance(logits, (tuple, list)) and logits:
            logits = logits[0]
    if not isinstance(logits, torch.Tensor):
        raise TypeError("aql.training.outputs.model_logits: the model must return logits as a tensor, an object with "
                        "`.logits`, a dict with 'logits' or a tuple starting with them, got "
                        f"{type(output).__name__}" + (f" holding {type(logits).__name__}" if logits is not output else ""))
    if logits.dim() > 2:
        logits = logits.flatten(0, -2)
    return logits


def num_outputs(model_config) -> int:
    """Logit columns of the configured model: classes of a classifier, vocabulary of a language model."""
    return model_config.num_classes if model_config.type == "mnist1d_cnn" else model_config.vocab_size


def eval_batch_size(requested: int, *, rows_per_sample: int, outputs: int, memory_mb: float) -> int:
    """Samples per evaluation batch: `requested` when it is positive; when 0 (automatic), the most
    samples whose float32 logits (`samples * rows_per_sample * outputs * 4` bytes) fit in `memory_mb`
    MiB (`training.eval_memory_mb`), at least 1. One sequence of 128 tokens at GPT-2's 50257 outputs takes 24.5 MiB, so 256 MiB
    gives 10 sequences per batch; 512 sequences would need 12.3 GiB for the float32 logits alone."""
    for name, value, low in (("requested", requested, 0), ("rows_per_sample", rows_per_sample, 1), ("outputs", outputs, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"aql.training.outputs.eval_batch_size: {name} must be an int >= {low}, got {value!r}")
    if isinstance(memory_mb, bool) or not isinstance(memory_mb, (int, float)) or not 0 < memory_mb < math.inf:
        raise ValueError(f"aql.training.outputs.eval_batch_size: memory_mb must be a finite number > 0, got {memory_mb!r}")
    if requested:
        return requested
    return max(1, int(memory_mb * 2**20) // (rows_per_sample * outputs * 4))
