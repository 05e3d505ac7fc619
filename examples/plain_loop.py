"""A plain PyTorch training loop with aql: the fused loss, a score per sample, and each epoch's subset.

The change to an existing loop is a few lines (the whole loop is `train` below)::

     dataset = TensorDataset(x, y)
    +store = ScoreStore(len(dataset), query_budget=0.2)        # one score per sample, the next epoch's subset
     for epoch in range(epochs):
    -    loader = DataLoader(dataset, batch_size=64, shuffle=True)
    -    for x, y in loader:
    +    subset = store.next_subset()                          # top scores + a random exploration share
    +    loader = DataLoader(WithIndices(dataset), batch_size=64, sampler=SubsetRandomSampler(subset.indices.tolist()))
    +    for x, y, index in loader:                            # WithIndices: each sample's dataset index comes along
             logits = model(x)
    -        loss = F.cross_entropy(logits, y)
    +        loss, scores = cross_entropy_with_scores(logits, y)   # same loss, plus softmax statistics of the same pass
             loss.backward()
             optimizer.step()
             optimizer.zero_grad()
    +        store.update(index, scores.loss)                  # no host synchronisation

`ScoreStore.next_subset()` returns `query_budget * N` samples: never-seen samples first, then the highest
stored scores, plus an `exploration` share drawn at random. The same selection as a strategy object
(`aql.strategies.StaleStrategy`, with `aql.sampling.SelectionSampler` for a DataLoader and a state_dict
for checkpoints) is what the bundled trainer and the framework integrations drive.

Run: python examples/plain_loop.py [--budget 0.2] [--epochs 8]  (generated data, a few seconds on a CPU)
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader, SubsetRandomSampler, TensorDataset

from aql.sampling import WithIndices
from aql.selection import ScoreStore
from aql_kernels import cross_entropy_with_scores


def make_data(n: int, dim: int, classes: int, seed: int) -> tuple[TensorDataset, TensorDataset]:
    """Gaussian clusters around random class centres, with a share of hard (overlapping) samples; 80/20 split."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 2.0
    y = torch.randint(0, classes, (n,), generator=g)
    spread = torch.where(torch.rand(n, generator=g) < 0.3, 2.5, 0.7).unsqueeze(1)  # 30% hard samples
    x = centres[y] + spread * torch.randn(n, dim, generator=g)
    cut = int(0.8 * n)
    return TensorDataset(x[:cut], y[:cut]), TensorDataset(x[cut:], y[cut:])


def accuracy(model: nn.Module, data: TensorDataset) -> float:
    x, y = data.tensors
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def train(model, dataset, *, budget: float, epochs: int, batch_size: int, lr: float, seed: int) -> dict:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    store = ScoreStore(len(dataset), query_budget=budget, seed=seed)
    indexed = WithIndices(dataset)
    generator = torch.Generator().manual_seed(seed)
    trained = 0
    for _ in range(epochs):
        subset = store.next_subset()
        loader = DataLoader(indexed, batch_size=batch_size, sampler=SubsetRandomSampler(subset.indices.tolist(), generator=generator))
        for x, y, index in loader:
            logits = model(x)
            loss, scores = cross_entropy_with_scores(logits, y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            store.update(index, scores.loss)
            trained += index.numel()
    return {"samples_trained": trained, "data_selected": trained / (epochs * len(dataset)), "final_loss": loss.item()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--budget", type=float, default=0.2, help="share of the training set each epoch trains on")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    train_data, test_data = make_data(args.samples, dim=16, classes=5, seed=args.seed)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 5))
    result = train(model, train_data, budget=args.budget, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    result["test_accuracy"] = accuracy(model, test_data)
    print(f"trained on {result['samples_trained']} samples ({100 * result['data_selected']:.0f}% of {args.epochs} full epochs); "
          f"test accuracy {result['test_accuracy']:.3f}")
    return result


if __name__ == "__main__":
    main()
