"""Uncertainty from a small ensemble of students distilled from the main model (the design
document's Solution 2)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from aql._checks import check_int, check_interval

from .base import UncertaintyEstimator

__all__ = ["EnsembleUncertainty", "shrink_model", "student_overrides", "config_student_factory"]

_WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)


def _resize_input(where: str, name: str, width: int, old_previous: int | None, new_previous: int | None) -> int:
    """New input width of a layer that followed a layer whose output width went old -> new.

    Equal widths map directly; a multiple (a flattened [C, L] feature map, or concatenated poolings)
    keeps the multiple."""
    if old_previous is None:
        return width
    if width % old_previous != 0:
        raise ValueError(f"{where}: cannot shrink {name}: its input width {width} is not a multiple of the previous "
                         f"layer's output width {old_previous}; pass student_factory=")
    return new_previous * (width // old_previous)


def shrink_model(model: nn.Module, factor: int = 4) -> nn.Module:
    """A freshly initialised copy of `model` with every hidden width divided by `factor`.

    Supported: models whose nn.Linear / nn.Conv1d / nn.Conv2d layers are registered in the order data
    flows through them (any nn.Sequential of these layers and activations, pooling, flattening,
    dropout, possibly nested, and chains such as conv features followed by a linear head), with
    BatchNorm1d/2d and 1-D LayerNorm following the width before them. The first layer keeps its input
    width and the last layer its output width; every other output width w becomes max(1, w // factor),
    and a layer fed a flattened or concatenated map of C channels gets (C // factor) times the same
    multiple. Anything else raises ValueError; pass your own `student_factory` then.
    """
    where = "aql.uncertainty.shrink_model"
    # the replacements are built from the model's own modules; it is copied only once they all exist
    # (a model it cannot shrink, e.g. GPT-2's embeddings, is refused without a copy of its weights)
    modules = list(model.named_modules())
    layers = [name for name, module in modules if isinstance(module, _WEIGHT_LAYERS)]
    if not layers:
        raise ValueError(f"{where}: {type(model).__name__} has no nn.Linear / nn.Conv1d / nn.Conv2d layer to shrink; pass student_factory=")
    last = layers[-1]
    old_previous = new_previous = None
    replacements: dict[str, nn.Module] = {}
    for name, module in modules:
        if isinstance(module, _WEIGHT_LAYERS):
            weight = module.weight
            if isinstance(module, nn.Linear):
                width_in, width_out = module.in_features, module.out_features
            else:
                if module.groups != 1:
                    raise ValueError(f"{where}: cannot shrink {name}: grouped convolutions are not supported; pass student_factory=")
                width_in, width_out = module.in_channels, module.out_channels
            new_in = _resize_input(where, name, width_in, old_previous, new_previous)
            new_out = width_out if name == last else max(1, width_out // factor)
            options = dict(bias=module.bias is not None, device=weight.device, dtype=weight.dtype)
            if isinstance(module, nn.Linear):
                replacement = nn.Linear(new_in, new_out, **options)
            else:
                replacement = type(module)(new_in, new_out, module.kernel_size, stride=module.stride, padding=module.padding,
                                           dilation=module.dilation, padding_mode=module.padding_mode, **options)
            replacements[name] = replacement
            old_previous, new_previous = width_out, new_out
        elif isinstance(module, _NORMS):
            if isinstance(module, nn.LayerNorm):
                if len(module.normalized_shape) != 1 or module.normalized_shape[0] != old_previous:
                    raise ValueError(f"{where}: cannot shrink {name}: only a 1-D LayerNorm over the previous layer's width is supported")
                replacements[name] = nn.LayerNorm(new_previous, eps=module.eps, elementwise_affine=module.elementwise_affine)
            else:
                if module.num_features != old_previous:
                    raise ValueError(f"{where}: cannot shrink {name}: {module.num_features} features after a layer of width {old_previous}")
                replacements[name] = type(module)(new_previous, eps=module.eps, momentum=module.momentum, affine=module.affine,
                                                  track_running_stats=module.track_running_stats)
        elif any(True for _ in module.parameters(recurse=False)):
            raise ValueError(f"{where}: cannot shrink {name} ({type(module).__name__}): only Linear, Conv1d, Conv2d, BatchNorm "
                             "and LayerNorm carry parameters here; pass student_factory=")
    if "" in replacements:
        return replacements[""]  # the model is a single layer
    student = copy.deepcopy(model)
    for name, replacement in replacements.items():
        parent_name, _, child = name.rpartition(".")
        setattr(student.get_submodule(parent_name), child, replacement)
    return student


def student_overrides(model_config, factor: int = 4) -> dict[str, Any]:
    """The `model:` keys of a student `factor` times narrower (and shallower) than `model_config`
    (an `aql.config.ModelConfig`): gpt2 keeps its vocabulary and positions and gets
    max(1, n_layers // factor) layers, max(1, n_heads // factor) heads and d_model // factor rounded
    down to a multiple of the heads; mnist1d_cnn gets its channels divided by `factor`."""
    factor = check_int("uncertainty.student_overrides", "factor", factor, low=1)
    if model_config.type == "gpt2":
        heads = max(1, model_config.n_heads // factor)
        width = max(heads, model_config.d_model // factor // heads * heads)
        return {"n_layers": max(1, model_config.n_layers // factor), "n_heads": heads, "d_model": width}
    if model_config.type == "mnist1d_cnn":
        return {"channels": [max(1, c // factor) for c in model_config.channels]}
    raise ValueError(f"aql.uncertainty.student_overrides: no default student for model.type {model_config.type!r}; "
                     "set aql_v2.ensemble_student")


def config_student_factory(model, model_config, student: dict[str, Any] | None = None) -> Callable[[], nn.Module]:
    """The ensemble's student factory for a model built from `model_config` (`aql_v2.ensemble_student`):

    - `student` given (a mapping of `model:` keys, e.g. {"n_layers": 1, "d_model": 64}): students are
      `aql.models.build_model` of `model_config` with those keys replaced;
    - else `shrink_model(model, 4)` when it can shrink the model (plain stacks of Linear / Conv layers);
    - else (e.g. GPT-2, whose embeddings `shrink_model` cannot shrink) the config with
      `student_overrides(model_config)`.

    A student must map the same inputs to logits of the same shape as the main model."""
    import dataclasses

    from aql.models import build_model

    if student:
        if not isinstance(student, dict):
            raise TypeError(f"aql.uncertainty.config_student_factory: student must be a mapping of model: keys, got {type(student).__name__}")
        known = {f.name for f in dataclasses.fields(model_config)} - {"type"}
        unknown = sorted(set(student) - known)
        if unknown:
            raise ValueError(f"aql_v2.ensemble_student: unknown model keys {unknown}; allowed: {sorted(known)}")
        overrides = dict(student)
    else:
        try:
            shrink_model(model, 4)
        except ValueError:
            overrides = student_overrides(model_config)
        else:
            return lambda: shrink_model(model, 4)
    student_config = dataclasses.replace(model_config, **overrides)
    return lambda: build_model(student_config)


class EnsembleUncertainty(UncertaintyEstimator):
    """`n_ensemble` small students distilled from the main model; the score is the disagreement of
    their predictions: the variance over students of softmax(student(x)), summed over classes.

    Distillation (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network"): each
    `train_ensemble(data, targets)` call is one Adam step of every student on
    ``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` (batch mean), with T = `temperature`;
    the T^2 keeps the gradient scale independent of T. `targets` are accepted for the design
    document's signature; the students learn from the main model's soft labels only.

    student_factory: a callable returning a fresh nn.Module (called n_ensemble times); default:
    `shrink_model(main_model, 4)`, the main model with hidden widths divided by 4 and input and output
    widths kept (nn.Sequential of Linear / Conv1d / Conv2d and activations, possibly nested, or a
    model whose layers are registered in data-flow order). The students start from independent random
    initialisations, which is where their disagreement off the training data comes from.
    Cost of a score: n_ensemble student forwards (about n_ensemble / 16 of a main forward for MLPs
    shrunk by 4, since hidden-to-hidden layers shrink by 16).
    """

    name = "EnsembleUncertainty"

    def __init__(self, main_model: nn.Module, n_ensemble: int = 3, student_factory: Callable[[], nn.Module] | None = None,
                 temperature: float = 2.0, lr: float = 1e-3):
        self.main_model = self._check_model("__init__", "main_model", main_model)
        self.n_ensemble = check_int(self._where("__init__"), "n_ensemble", n_ensemble, low=2)
        self.temperature = check_interval(self._where("__init__"), "temperature", temperature, 0.0, math.inf, low_open=True, high_open=True)
        self.lr = check_interval(self._where("__init__"), "lr", lr, 0.0, math.inf, low_open=True, high_open=True)
        if student_factory is not None and not callable(student_factory):
            raise self._fail("__init__", f"student_factory must be callable, got {type(student_factory).__name__}", TypeError)
        factory = student_factory if student_factory is not None else (lambda: shrink_model(main_model, 4))
        parameter = next(main_model.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        self.students = []
        for i in range(self.n_ensemble):
            student = factory()
            if not isinstance(student, nn.Module):
                raise self._fail("__init__", f"student_factory() must return an nn.Module, got {type(student).__name__}", TypeError)
            if any(student is other for other in self.students):
                raise self._fail("__init__", "student_factory() returned the same module twice; it must build a new one per call")
            self.students.append(student.to(device))
        self.optimizer = torch.optim.Adam([p for s in self.students for p in s.parameters()], lr=self.lr)
        self.steps = 0

    def _student_logits(self, method: str, student: nn.Module, data: torch.Tensor) -> torch.Tensor:
        try:
            output = student(data)
        except (RuntimeError, ValueError) as error:
            raise self._fail(method, f"a student failed on data of shape {tuple(data.shape)} ({error}); if it came from "
                             "the default factory, pass a student_factory that fits this model") from error
        return self._logits(method, output).float()

    def distillation_loss(self, data: torch.Tensor) -> torch.Tensor:
        """Mean over students of T^2 * KL(teacher || student) at temperature T on `data` (no update)."""
        data = self._check_data("distillation_loss", data)
        with torch.no_grad():
            teacher = self._logits("distillation_loss", self.main_model(data)).float()
            losses = [self._kl(teacher, self._student_logits("distillation_loss", s, data)) for s in self.students]
        return torch.stack(losses).mean()

    def _kl(self, teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        if student.shape != teacher.shape:
            raise self._fail("train_ensemble", f"students return logits of shape {tuple(student.shape)}, the main model "
                             f"{tuple(teacher.shape)}")
        return F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1), log_target=True,
                        reduction="batchmean") * (t * t)

    def train_ensemble(self, data: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """One distillation step of every student; returns the mean loss before the step (detached)."""
        data = self._check_data("train_ensemble", data)
        if targets is not None and not isinstance(targets, torch.Tensor):
            raise self._fail("train_ensemble", f"targets must be a torch.Tensor or None, got {type(targets).__name__}", TypeError)
        with torch.no_grad():
            teacher = self._logits("train_ensemble", self.main_model(data)).float()
        modes = [s.training for s in self.students]
        for s in self.students:
            s.train()
        try:
            with torch.enable_grad():
                losses = torch.stack([self._kl(teacher, self._student_logits("train_ensemble", s, data)) for s in self.students])
                self.optimizer.zero_grad(set_to_none=True)
                losses.sum().backward()
            self.optimizer.step()
        finally:
            for s, mode in zip(self.students, modes):
                s.train(mode)
        self.steps += 1
        return losses.detach().mean()

    def estimate_uncertainty(self, data: torch.Tensor, *, per_sample: str = "mean") -> torch.Tensor:
        """sum over classes of the variance over students of softmax(student(data)), float32 [N]
        (token rows reduced by `per_sample`)."""
        data = self._check_data("estimate_uncertainty", data)
        per_sample = self._check_per_sample("estimate_uncertainty", per_sample)
        modes = [s.training for s in self.students]
        total = total_squares = None
        try:
            with torch.no_grad():
                for s in self.students:
                    s.eval()
                    probs = torch.softmax(self._student_logits("estimate_uncertainty", s, data), dim=1)
                    if total is None:
                        total, total_squares = probs.clone(), probs * probs
                    else:
                        total.add_(probs)
                        total_squares.addcmul_(probs, probs)
        finally:
            for s, mode in zip(self.students, modes):
                s.train(mode)
        mean = total / self.n_ensemble
        # population variance E[p^2] - E[p]^2, clamped against rounding below zero
        values = (total_squares / self.n_ensemble - mean * mean).clamp_min_(0.0).sum(dim=1)
        return self._per_sample("estimate_uncertainty", values, data.shape[0], per_sample)

    def state_dict(self) -> dict[str, Any]:
        return {"students": [s.state_dict() for s in self.students], "optimizer": self.optimizer.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        students = state.get("students")
        if not isinstance(students, (list, tuple)) or len(students) != self.n_ensemble:
            got = len(students) if isinstance(students, (list, tuple)) else type(students).__name__
            raise self._fail("load_state_dict", f"students must be a list of {self.n_ensemble} state dicts, got {got}")
        for s, saved in zip(self.students, students):
            s.load_state_dict(saved)
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        self.steps = int(state.get("steps", 0))
