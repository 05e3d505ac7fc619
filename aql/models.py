"""Models for the trainer, built from `config.model` by `build_model`.

Every model maps a batch `x` to 2-D logits `[rows, classes]` whose rows line up with `y.reshape(-1)`:
one row per sample for classification, one per token for language models (so per-token scores come from
one `cross_entropy_with_scores` call, and per-sample scores are their mean over the sample's tokens).
`model.head` is the last layer: `LaplacianUncertainty(model, head=model.head)` keeps its Fisher there.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .errors import require

__all__ = ["MNIST1DCNN", "GPT2LM", "MODEL_REGISTRY", "register_model", "build_model", "count_parameters"]


class MNIST1DCNN(nn.Module):
    """A small 1-D CNN for MNIST-1D: x float [B, 40] -> logits [B, 10].

    Convolutions of the given widths (the first at stride 1, the rest at stride 2, ReLU), global
    average and max pooling concatenated, then a linear head.
    """

    def __init__(self, channels=(32, 32, 32), *, kernel_size: int = 5, input_length: int = 40, num_classes: int = 10, dropout: float = 0.0):
        super().__init__()
        channels = list(channels)
        if not channels or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in channels):
            raise ValueError(f"aql.models.MNIST1DCNN: channels must be a non-empty list of positive ints, got {channels!r}")
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1:
            raise ValueError(f"aql.models.MNIST1DCNN: kernel_size must be a positive int, got {kernel_size!r}")
        layers: list[nn.Module] = []
        width_in = 1
        for i, width in enumerate(channels):
            layers += [nn.Conv1d(width_in, width, kernel_size, stride=1 if i == 0 else 2, padding=kernel_size // 2), nn.ReLU()]
            width_in = width
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(2 * width_in, num_classes)
        self.input_length = input_length
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.input_length:
            raise ValueError(f"aql.models.MNIST1DCNN: x must be [B, {self.input_length}], got shape {tuple(x.shape)}")
        h = self.features(x.unsqueeze(1))
        h = torch.cat([h.mean(dim=2), h.amax(dim=2)], dim=1)
        return self.head(self.dropout(h))


class GPT2LM(nn.Module):
    """GPT-2 (transformers, randomly initialised from a `GPT2Config`) returning flat token logits.

    x int64 [B, T] -> logits [B * T, vocab]; the targets to use are `y.reshape(-1)`.
    """

    def __init__(self, *, n_layers: int = 12, n_heads: int = 12, d_model: int = 768, vocab_size: int = 50257,
                 n_positions: int = 1024, dropout: float = 0.0):
        super().__init__()
        transformers = require("transformers", "data", "model.type: gpt2")
        GPT2Config, GPT2LMHeadModel = transformers.GPT2Config, transformers.GPT2LMHeadModel

        # GPT-2's end-of-text id (50256) only exists in its own vocabulary; use the last id otherwise.
        eos = 50256 if vocab_size > 50256 else vocab_size - 1
        self.config = GPT2Config(n_layer=n_layers, n_head=n_heads, n_embd=d_model, vocab_size=vocab_size, n_positions=n_positions,
                                 resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, bos_token_id=eos, eos_token_id=eos)
        self.transformer = GPT2LMHeadModel(self.config)
        self.head = self.transformer.lm_head  # tied to the token embedding, as in GPT-2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"aql.models.GPT2LM: x must be int64 token ids [B, T], got {x.dtype} {tuple(x.shape)}")
        if x.shape[1] > self.config.n_positions:
            raise ValueError(f"aql.models.GPT2LM: sequence length {x.shape[1]} exceeds n_positions {self.config.n_positions}")
        logits = self.transformer(input_ids=x, use_cache=False).logits
        return logits.reshape(-1, logits.shape[-1])


MODEL_REGISTRY: dict[str, Callable] = {}


def register_model(name: str):
    """Decorator: `@register_model("my_net")` on a function `model_config -> nn.Module`."""
    def decorate(factory):
        MODEL_REGISTRY[name] = factory
        return factory

    return decorate


@register_model("mnist1d_cnn")
def _build_mnist1d_cnn(model_config) -> nn.Module:
    return MNIST1DCNN(model_config.channels, kernel_size=model_config.kernel_size, input_length=model_config.input_length,
                      num_classes=model_config.num_classes, dropout=model_config.dropout)


@register_model("gpt2")
def _build_gpt2(model_config) -> nn.Module:
    return GPT2LM(n_layers=model_config.n_layers, n_heads=model_config.n_heads, d_model=model_config.d_model,
                  vocab_size=model_config.vocab_size, n_positions=model_config.n_positions, dropout=model_config.dropout)


def build_model(model_config) -> nn.Module:
    """The model named by `model_config.type` (see MODEL_REGISTRY)."""
    kind = getattr(model_config, "type", None)
    if kind not in MODEL_REGISTRY:
        raise ValueError(f"aql.models.build_model: model.type must be one of {', '.join(sorted(MODEL_REGISTRY))}, got {kind!r}")
    return MODEL_REGISTRY[kind](model_config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
