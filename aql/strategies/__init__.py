"""Selection strategies: one class per file, registered by name (see `base.py` for the protocol).

Adding a strategy: a new file here with a `SelectionStrategy` subclass decorated `@register_strategy`,
and its import below; `aql_v2.selection_strategy` then accepts its `name`, and `aql_v2.strategy_options`
passes its constructor's keyword arguments.
"""

from .base import STRATEGIES, EpochPlan, SelectionStrategy, StrategyContext, build_strategy, register_strategy

# registration: importing a strategy's module registers it
from .none import AllDataStrategy
from .random import RandomStrategy
from .stale import StaleStrategy
from .streaming import StreamingStrategy
from .curriculum import CurriculumStrategy
from .online import OnlineSelection
from .ranked import RankedSelection
from .meta import MetaSelection

__all__ = ["STRATEGIES", "EpochPlan", "SelectionStrategy", "StrategyContext", "build_strategy", "register_strategy",
           "AllDataStrategy", "RandomStrategy", "StaleStrategy", "StreamingStrategy", "CurriculumStrategy",
           "OnlineSelection", "RankedSelection", "MetaSelection"]
