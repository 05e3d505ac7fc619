"""Selectors in the design document's vocabulary.

- `ScoreStore`: a per-sample score table written from the training forward, and the next epoch's
  subset (exact top of the scores plus a random exploration share, with importance weights).
- `StreamingAQL`: keeps ~query_budget of a stream of batches in constant memory.
- `CurriculumAQL`: easy-to-hard bands of normalised entropy.
- `MetaLearnedSelector`: a learned keep policy (experimental).
"""

from .curriculum import CurriculumAQL, CurriculumBatch
from .meta_policy import Episode, MetaLearnedSelector, ValidationLossEpisode
from .score_store import ScoreStore, Subset
from .streaming import StreamingAQL, StreamingBatch, StreamingDecision

__all__ = [
    "CurriculumAQL",
    "CurriculumBatch",
    "Episode",
    "MetaLearnedSelector",
    "ScoreStore",
    "StreamingAQL",
    "StreamingBatch",
    "StreamingDecision",
    "Subset",
    "ValidationLossEpisode",
]
