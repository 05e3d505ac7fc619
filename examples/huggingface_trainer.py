"""`transformers.Trainer` with aql: the change is the class and a strategy (runs offline).

    -trainer = Trainer(model=model, args=args, train_dataset=train_dataset)
    +strategy = StaleStrategy(len(train_dataset), query_budget=0.25, device=args.device)
    +trainer = AQLTrainer(model=model, args=args, train_dataset=train_dataset, strategy=strategy)
     trainer.train()

`AQLTrainer` (aql.integrations.huggingface) computes the Trainer's own loss with the fused kernel
(per-sequence scores of the same pass written to the strategy's table by dataset index), trains each
epoch on the strategy's selection under one LR schedule, updates the Fisher EMA of an optional
estimator at `on_pre_optimizer_step`, and adds `aql_overhead_pct` and `aql_data_selected` to the
Trainer's logs. The model here is a tiny GPT-2 built from `GPT2Config` and the data generated token
sequences (dicts of input_ids / attention_mask / labels, as a tokenized `datasets.Dataset` would give).

Run: python examples/huggingface_trainer.py [--budget 0.25] [--epochs 4] [--output-dir DIR]
Needs: pip install "aql[huggingface]"
"""

from __future__ import annotations

import argparse
import tempfile

import torch


def generated_sequences(n: int, length: int, vocab: int, seed: int) -> list[dict]:
    """Token sequences from a random Markov chain (3 likely successors per token), 1/4 to full length,
    right-padded (input 0, attention 0, label -100)."""
    g = torch.Generator().manual_seed(seed)
    successors = torch.randint(1, vocab, (vocab, 3), generator=g)
    items = []
    for _ in range(n):
        ids = torch.zeros(length, dtype=torch.long)
        ids[0] = torch.randint(1, vocab, (), generator=g)
        for t in range(1, length):
            ids[t] = successors[ids[t - 1], torch.randint(0, 3, (), generator=g)]
        size = int(torch.randint(max(2, length // 4), length + 1, (), generator=g))
        mask = (torch.arange(length) < size).long()
        items.append({"input_ids": ids * mask, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return items


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=128)
    parser.add_argument("--budget", type=float, default=0.25, help="share of the training set each epoch trains on")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--fisher", action="store_true", help="keep a last-layer Laplace estimator's Fisher EMA")
    parser.add_argument("--output-dir", default=None, help="checkpoints and logs (default: a temporary folder)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

    from aql.integrations.huggingface import AQLTrainer
    from aql.strategies import StaleStrategy

    torch.manual_seed(args.seed)
    config = GPT2Config(vocab_size=args.vocab, n_positions=args.length, n_embd=64, n_layer=1, n_head=2,
                        bos_token_id=args.vocab - 1, eos_token_id=args.vocab - 1)
    model = GPT2LMHeadModel(config)
    train_dataset = generated_sequences(args.samples, args.length, args.vocab, args.seed)
    eval_dataset = generated_sequences(max(16, args.samples // 8), args.length, args.vocab, args.seed)  # the same chain

    with tempfile.TemporaryDirectory() as scratch:
        training_args = TrainingArguments(
            output_dir=args.output_dir or scratch, num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
            learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=2, logging_steps=2, save_strategy="no",
            report_to=[], use_cpu=not torch.cuda.is_available(), disable_tqdm=True, seed=args.seed)
        strategy = StaleStrategy(len(train_dataset), query_budget=args.budget, seed=args.seed, device=training_args.device)
        estimator = None
        if args.fisher:
            from aql.uncertainty import LaplacianUncertainty

            estimator = LaplacianUncertainty(model, method="diagonal")
        trainer = AQLTrainer(model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                             strategy=strategy, estimator=estimator)
        before = trainer.evaluate()["eval_loss"]
        trainer.train()
        after = trainer.evaluate()["eval_loss"]

    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    summary = next(entry for entry in trainer.state.log_history if "train_runtime" in entry)
    result = {"eval_loss_before": before, "eval_loss": after, "steps": trainer.state.global_step,
              "data_selected": logs[-1]["aql_data_selected"], "overhead_pct": summary["aql_overhead_pct"]}
    for entry in logs:
        print({key: round(value, 4) for key, value in entry.items() if key in ("step", "loss", "learning_rate", "aql_overhead_pct",
                                                                                "aql_data_selected")})
    print(f"eval loss {before:.3f} -> {after:.3f}; {trainer.state.global_step} optimizer steps on "
          f"{100 * result['data_selected']:.0f}% of the data per epoch; AQL overhead {result['overhead_pct']:.2f}% of the training time")
    return result


if __name__ == "__main__":
    main()
