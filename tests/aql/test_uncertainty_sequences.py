"""Estimators on sequence models: token scores reduced per sequence (mean / sum / none) equal the
row scores of the same model with flattened logits; Hugging Face outputs (`.logits`) are read; the
ensemble's students for GPT-2 come from the config (`aql_v2.ensemble_student`) instead of an error."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from aql.config import ConfigError, config_from_dict
from aql.models import build_model
from aql.uncertainty import (EnsembleUncertainty, LaplacianUncertainty, MCDropoutUncertainty, config_student_factory,
                             shrink_model, student_overrides)

B, T, V = 5, 7, 11


class Output:
    """A Hugging Face-style model output: the logits under `.logits`."""

    def __init__(self, logits):
        self.logits = logits


class TokenModel(nn.Module):
    """ids [B, T] -> logits [B, T, V] (as an Output when `hf`), or flattened [B * T, V] (`flat`)."""

    def __init__(self, *, hf: bool = False, flat: bool = False):
        super().__init__()
        self.embed = nn.Embedding(V, 16)
        self.hidden = nn.Linear(16, 16)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(16, V)
        self.hf, self.flat = hf, flat

    def forward(self, ids):
        logits = self.head(self.dropout(torch.relu(self.hidden(self.embed(ids)))))
        if self.flat:
            return logits.reshape(-1, V)
        return Output(logits) if self.hf else logits


def _pair():
    torch.manual_seed(0)
    hf = TokenModel(hf=True)
    flat = TokenModel(flat=True)
    flat.load_state_dict(hf.state_dict())
    return hf, flat


def _estimators(model):
    student = lambda: TokenModel(hf=model.hf, flat=model.flat)  # noqa: E731
    torch.manual_seed(1)
    return {
        "laplace_entropy": LaplacianUncertainty(model, head=model.head, score="entropy"),
        "laplace": LaplacianUncertainty(model, head=model.head, method="prior"),
        "mc_dropout": MCDropoutUncertainty(model, n_samples=4),
        "ensemble": EnsembleUncertainty(model, n_ensemble=2, student_factory=student),
    }


@pytest.mark.parametrize("name", ["laplace_entropy", "laplace", "mc_dropout", "ensemble"])
def test_token_scores_reduce_per_sequence_and_match_flat_rows(name):
    hf, flat = _pair()
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(2))
    estimators_hf, estimators_flat = _estimators(hf), _estimators(flat)
    if name == "ensemble":  # the same students on both sides
        for s_hf, s_flat in zip(estimators_hf[name].students, estimators_flat[name].students):
            s_flat.load_state_dict(s_hf.state_dict())

    def run(estimator, **kwargs):
        torch.manual_seed(3)  # the same dropout masks for MC dropout
        return estimator.estimate_uncertainty(ids, **kwargs)

    tokens = run(estimators_hf[name], per_sample="none")
    assert tokens.shape == (B, T) and tokens.dtype == torch.float32
    flat_tokens = run(estimators_flat[name], per_sample="none")
    torch.testing.assert_close(flat_tokens, tokens, rtol=1e-5, atol=1e-6)
    mean = run(estimators_hf[name])
    assert mean.shape == (B,)
    torch.testing.assert_close(mean.double(), tokens.double().mean(dim=1), rtol=1e-5, atol=1e-6)
    total = run(estimators_hf[name], per_sample="sum")
    torch.testing.assert_close(total.double(), tokens.double().sum(dim=1), rtol=1e-5, atol=1e-5)
    # and the per-token values are the estimator's scores of each position on its own (T = 1 sequences)
    single = torch.stack([run(estimators_hf[name], per_sample="none")[:, t] for t in range(T)], dim=1)
    torch.testing.assert_close(single, tokens)


def test_token_entropy_equals_a_float64_reference():
    hf, _ = _pair()
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(4))
    estimator = LaplacianUncertainty(hf, head=hf.head, score="entropy")
    hf.eval()
    with torch.no_grad():
        logits = hf(ids).logits.double()
    reference = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean(dim=1)
    torch.testing.assert_close(estimator.estimate_uncertainty(ids).double(), reference, rtol=1e-5, atol=1e-6)


def test_bad_per_sample_and_mismatched_rows_are_refused():
    hf, _ = _pair()
    estimator = MCDropoutUncertainty(hf, n_samples=2)
    with pytest.raises(ValueError, match="per_sample must be one of"):
        estimator.estimate_uncertainty(torch.zeros(2, 3, dtype=torch.long), per_sample="max")

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.dropout = nn.Dropout(0.5)

        def forward(self, x):
            return self.dropout(torch.ones(x.shape[0] * 2 + 1, 3))

    with pytest.raises(ValueError, match="multiple of it"):
        MCDropoutUncertainty(Odd(), n_samples=2).estimate_uncertainty(torch.zeros(4, 2))
    with pytest.raises(TypeError, match="must return logits"):
        EnsembleUncertainty(nn.Linear(2, 2), student_factory=_NoLogits).estimate_uncertainty(torch.zeros(2, 2))


class _NoLogits(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return "not logits"


def _gpt2_config(**aql_v2):
    return config_from_dict({
        "model": {"type": "gpt2", "n_layers": 2, "n_heads": 4, "d_model": 32, "vocab_size": 50, "n_positions": 16},
        "data": {"name": "wikitext103", "seq_len": 8},
        "aql_v2": {"uncertainty_method": "ensemble", **aql_v2},
    })


def test_gpt2_students_come_from_the_config_not_an_error():
    config = _gpt2_config()
    torch.manual_seed(0)
    model = build_model(config.model)
    with pytest.raises(ValueError, match="student_factory"):
        shrink_model(model)
    assert student_overrides(config.model) == {"n_layers": 1, "n_heads": 1, "d_model": 8}
    estimator = EnsembleUncertainty(model, n_ensemble=2, student_factory=config_student_factory(model, config.model))
    student = estimator.students[0]
    assert student.config.n_layer == 1 and student.config.n_embd == 8 and student.config.vocab_size == 50
    ids = torch.randint(0, 50, (3, 8))
    loss = estimator.train_ensemble(ids)
    assert torch.isfinite(loss)
    scores = estimator.estimate_uncertainty(ids)
    assert scores.shape == (3,) and torch.isfinite(scores).all() and (scores >= 0).all()

    explicit = config_student_factory(model, config.model, {"n_layers": 1, "d_model": 16, "n_heads": 2})()
    assert explicit.config.n_embd == 16 and explicit.config.n_head == 2
    # a model shrink_model can shrink keeps the shrunk copy
    cnn_config = config_from_dict({"model": {"type": "mnist1d_cnn", "channels": [16, 16]}, "data": {"name": "mnist1d"}})
    cnn = build_model(cnn_config.model)
    assert sum(p.numel() for p in config_student_factory(cnn, cnn_config.model)().parameters()) == \
        sum(p.numel() for p in shrink_model(cnn).parameters())


def test_ensemble_student_config_keys_are_checked():
    with pytest.raises(ConfigError, match="unknown model keys"):
        _gpt2_config(ensemble_student={"n_layerz": 1})
    with pytest.raises(ConfigError, match="mapping"):
        _gpt2_config(ensemble_student=[1])
    assert _gpt2_config(ensemble_student={"n_layers": 1}).aql_v2.ensemble_student == {"n_layers": 1}
