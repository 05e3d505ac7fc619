"""Selection strategies: one class per file, registered by name (see `base.py` for the protocol)."""

from .base import STRATEGIES, EpochPlan, SelectionStrategy, StrategyContext, build_strategy, register_strategy

__all__ = ["STRATEGIES", "EpochPlan", "SelectionStrategy", "StrategyContext", "build_strategy", "register_strategy"]
