"""A LightningModule with aql: the callback, its DataLoader, and a training_step that returns its scores.

    +aql = AQLCallback(StaleStrategy(len(train_dataset), query_budget=0.25))
    -trainer = pl.Trainer(max_epochs=8)
    -trainer.fit(module, DataLoader(train_dataset, batch_size=64, shuffle=True))
    +trainer = pl.Trainer(max_epochs=8, callbacks=[aql])
    +trainer.fit(module, aql.dataloader(train_dataset, batch_size=64))   # batches (x, y, index) in the strategy's order

and in the module::

     def training_step(self, batch, batch_idx):
    -    x, y = batch
    -    loss = F.cross_entropy(self(x), y)
    -    return loss
    +    x, y, index = batch
    +    loss, scores = cross_entropy_with_scores(self(x), y)
    +    return {"loss": loss, "scores": scores, "index": index}

`AQLCallback` (aql.integrations.lightning) hands each step's scores to the strategy after its
optimizer step, updates an optional estimator's Fisher EMA at `on_before_optimizer_step`, logs
`aql/overhead_pct` and `aql/data_selected` every epoch, and keeps the strategy's score table in
Lightning's checkpoints. The LR schedule below is sized by `trainer.estimated_stepping_batches`, which
counts the selected samples (the DataLoader's length is the budget's), and is never restarted.

Run: python examples/lightning_module.py [--budget 0.25] [--epochs 8]
Needs: pip install "aql[lightning]"
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.data import TensorDataset

from aql_kernels import cross_entropy_with_scores


def make_data(n: int, dim: int, classes: int, seed: int) -> tuple[TensorDataset, TensorDataset]:
    """Gaussian clusters around random class centres, 30% of them hard (wide); 80/20 split."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 2.0
    y = torch.randint(0, classes, (n,), generator=g)
    spread = torch.where(torch.rand(n, generator=g) < 0.3, 2.5, 0.7).unsqueeze(1)
    x = centres[y] + spread * torch.randn(n, dim, generator=g)
    cut = int(0.8 * n)
    return TensorDataset(x[:cut], y[:cut]), TensorDataset(x[cut:], y[cut:])


def build_module(pl, dim: int, classes: int, lr: float):
    class Classifier(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(dim, 64), nn.ReLU(), nn.Linear(64, classes))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y, index = batch
            loss, scores = cross_entropy_with_scores(self(x), y)
            self.log("train_loss", loss, on_step=False, on_epoch=True)
            return {"loss": loss, "scores": scores, "index": index}

        def validation_step(self, batch, batch_idx):
            x, y = batch
            logits = self(x)
            self.log("val_loss", nn.functional.cross_entropy(logits, y), on_epoch=True)
            self.log("val_accuracy", (logits.argmax(1) == y).float().mean(), on_epoch=True)

        def configure_optimizers(self):
            optimizer = torch.optim.AdamW(self.parameters(), lr=lr)
            total = self.trainer.estimated_stepping_batches  # the selected samples' steps, all epochs
            schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    return Classifier()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--budget", type=float, default=0.25, help="share of the training set each epoch trains on")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--fisher", action="store_true", help="keep a last-layer Laplace estimator's Fisher EMA")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import lightning.pytorch as pl

    from aql.integrations.lightning import AQLCallback
    from aql.strategies import StaleStrategy

    pl.seed_everything(args.seed, verbose=False)
    train_data, val_data = make_data(args.samples, dim=16, classes=5, seed=args.seed)
    module = build_module(pl, 16, 5, args.lr)
    estimator = None
    if args.fisher:
        from aql.uncertainty import LaplacianUncertainty

        estimator = LaplacianUncertainty(module.net, method="diagonal")
    aql = AQLCallback(StaleStrategy(len(train_data), query_budget=args.budget, seed=args.seed), estimator=estimator)
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, callbacks=[aql], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, aql.dataloader(train_data, batch_size=args.batch_size),
                torch.utils.data.DataLoader(val_data, batch_size=256))

    result = {key: float(value) for key, value in trainer.callback_metrics.items()}
    print(f"validation accuracy {result['val_accuracy']:.3f} after {args.epochs} epochs on {100 * result['aql/data_selected']:.0f}% "
          f"of the data each; AQL overhead {result['aql/overhead_pct']:.2f}% of the last epoch's training time")
    return result


if __name__ == "__main__":
    main()
