"""ScoreStore(smallest=True): for scores where low means informative (margin, maxprob) the top part is
the exact bottom of the stored scores, never-seen samples still come first, ties go to the lowest
index, and the option is checked, saved and restored."""

import math

import pytest
import torch

from aql.selection import ScoreStore


def _reference_bottom(scores: torch.Tensor, seen: torch.Tensor, k: int) -> list[int]:
    """float64 reference: never-seen first (by index), then ascending score, ties by index."""
    keys = [(0 if not bool(seen[i]) else 1, float(scores[i]) if bool(seen[i]) else 0.0, i) for i in range(scores.shape[0])]
    return sorted(i for *_, i in sorted(keys)[:k])


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_smallest_selects_the_exact_bottom_never_seen_first(seed):
    generator = torch.Generator().manual_seed(seed)
    n = 200
    store = ScoreStore(n, query_budget=0.25, exploration=0.0, smallest=True)
    written = torch.randperm(n, generator=generator)[:170]
    values = torch.randint(-5, 6, (170,), generator=generator).float() / 4  # many ties
    values[:3] = torch.tensor([-0.0, 0.0, math.nan])  # signed zeros; NaN: never seen again
    store.update(written, values)
    seen = torch.zeros(n, dtype=torch.bool)
    seen[written] = True
    seen[written[2]] = False
    table = torch.zeros(n, dtype=torch.float64)
    table[written] = values.double()
    subset = store.next_subset()
    assert subset.indices.tolist() == _reference_bottom(table, seen, 50)
    assert store.scores[written[2]].item() == -math.inf and not store.seen[written[2]]


def test_largest_is_unchanged_and_smallest_reverses_it():
    scores = torch.tensor([0.3, 0.9, 0.1, 0.5])
    high = ScoreStore(4, query_budget=0.5, exploration=0.0)
    low = ScoreStore(4, query_budget=0.5, exploration=0.0, smallest=True)
    for store in (high, low):
        store.update(torch.arange(4), scores)
    assert high.next_subset().indices.tolist() == [1, 3]
    assert low.next_subset().indices.tolist() == [0, 2]
    assert high.unseen_score == math.inf and low.unseen_score == -math.inf


def test_smallest_is_checked_saved_and_restored():
    with pytest.raises(TypeError, match="smallest must be a bool"):
        ScoreStore(4, smallest=1)
    store = ScoreStore(10, smallest=True, exploration=0.0)
    store.update(torch.arange(10), torch.arange(10).float())
    state = store.state_dict()
    assert state["smallest"] is True
    again = ScoreStore(10, smallest=True, exploration=0.0)
    again.load_state_dict(state)
    assert again.next_subset().indices.tolist() == store.next_subset().indices.tolist() == [0, 1]
    with pytest.raises(ValueError, match="smallest must match"):
        ScoreStore(10, exploration=0.0).load_state_dict(state)
