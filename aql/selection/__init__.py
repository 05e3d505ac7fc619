"""Selectors in the design document's vocabulary.

- `ScoreStore`: a per-sample score table written from the training forward, and the next epoch's
  subset (exact top of the scores plus a random exploration share, with importance weights).
- `StreamingAQL`: keeps ~query_budget of a stream of batches in constant memory.
- `CurriculumAQL`: easy-to-hard bands of normalised entropy.
- `MetaLearnedSelector`: a learned keep policy (experimental).
"""

from .curriculum import CurriculumAQL, CurriculumBatch
from .meta_policy import Episode, MetaLearnedSelector, ValidationLossEpisode
from .score_store import ScoreStore, SelectedSubset
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
    "SelectedSubset",
    "ValidationLossEpisode",
]


def __getattr__(name: str):
    # `Subset` was renamed so that it no longer shadows torch.utils.data.Subset; the old name still works.
    if name == "Subset":
        import warnings

        warnings.warn("aql.selection.Subset is renamed aql.selection.SelectedSubset (it shadowed torch.utils.data.Subset); "
                      "the old name will be removed", DeprecationWarning, stacklevel=2)
        return SelectedSubset
    raise AttributeError(f"module 'aql.selection' has no attribute {name!r}")
