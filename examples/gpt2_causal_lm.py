"""A GPT-2 causal-LM training loop with per-sequence scores and data selection (runs offline).

The model is built from a `GPT2Config` (no download); the default data are generated token sequences
(a random Markov chain over the vocabulary, variable lengths, right-padded with label -100), so the
example runs anywhere in seconds. `--text FILE --tokenizer NAME` trains on a local text file with a
tokenizer from the local Hugging Face cache instead (`local_files_only`: still no download).

What aql adds to the loop:

- `WithIndices(dataset)`: each batch carries its samples' dataset indices;
- `SelectionSampler(strategy)`: each epoch the DataLoader draws the strategy's selection
  (`StaleStrategy`: never-seen sequences first, then the highest stored scores, `query_budget` of the
  data); the LR schedule is sized for `strategy.samples_per_epoch` sequences per epoch and runs on
  across epochs;
- `cross_entropy_with_scores(logits, labels, shift=True, per_sample="mean")`: the causal-LM loss (labels[:, 1:]
  against logits[:, :-1], padding ignored; the logits are not copied) and, from the same pass, each
  sequence's mean token statistics (loss, entropy, EL2N, ...);
- `strategy.after_step(index, scores)` after the optimizer step, `strategy.end_epoch({})` after each epoch.

Run: python examples/gpt2_causal_lm.py [--budget 0.25] [--epochs 4]
     python examples/gpt2_causal_lm.py --text my_corpus.txt --tokenizer gpt2 --n-layer 2 --n-embd 128
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from aql.sampling import SelectionSampler, WithIndices
from aql.strategies import StaleStrategy
from aql.training.schedule import WarmupCosine
from aql_kernels import cross_entropy_with_scores

IGNORE = -100


def generated_tokens(n: int, length: int, vocab: int, seed: int) -> TensorDataset:
    """(input_ids, labels) [n, length]: Markov-chain sequences of length//4 .. length tokens, right-padded
    (input 0, label -100). Each token has 3 likely successors, so a model can learn the chain."""
    g = torch.Generator().manual_seed(seed)
    successors = torch.randint(1, vocab, (vocab, 3), generator=g)
    ids = torch.zeros(n, length, dtype=torch.long)
    ids[:, 0] = torch.randint(1, vocab, (n,), generator=g)
    for t in range(1, length):
        choice = successors[ids[:, t - 1], torch.randint(0, 3, (n,), generator=g)]
        noise = torch.randint(1, vocab, (n,), generator=g)
        ids[:, t] = torch.where(torch.rand(n, generator=g) < 0.1, noise, choice)
    lengths = torch.randint(max(2, length // 4), length + 1, (n,), generator=g)
    padding = torch.arange(length) >= lengths.unsqueeze(1)
    labels = ids.masked_fill(padding, IGNORE)
    return TensorDataset(ids.masked_fill(padding, 0), labels)


def text_tokens(path: str, tokenizer_name: str, length: int) -> tuple[TensorDataset, int]:
    """Blocks of `length` tokens of a local text file, with a tokenizer from the local cache."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_name, local_files_only=True)
    with open(path, encoding="utf-8") as f:
        ids = torch.tensor(tokenizer(f.read())["input_ids"], dtype=torch.long)
    blocks = ids[: ids.numel() // length * length].view(-1, length)
    if blocks.shape[0] < 2:
        raise SystemExit(f"{path}: {ids.numel()} tokens make fewer than two blocks of {length}; use a longer text or --length")
    return TensorDataset(blocks, blocks.clone()), len(tokenizer)


def evaluate(model, data: TensorDataset, batch_size: int) -> float:
    """Mean next-token loss over the valid targets of `data`."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in DataLoader(data, batch_size=batch_size):
            logits = model(input_ids=ids, attention_mask=(labels != IGNORE).long()).logits
            total += F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE, reduction="sum").item()
            count += int((labels[:, 1:] != IGNORE).sum())
    model.train()
    return total / max(count, 1)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=512, help="generated sequences (without --text)")
    parser.add_argument("--length", type=int, default=32, help="tokens per sequence")
    parser.add_argument("--vocab", type=int, default=128, help="vocabulary of the generated data")
    parser.add_argument("--text", default=None, help="a local text file to train on instead of generated data")
    parser.add_argument("--tokenizer", default="gpt2", help="with --text: a tokenizer name or folder in the local cache")
    parser.add_argument("--n-layer", type=int, default=1)
    parser.add_argument("--n-embd", type=int, default=64)
    parser.add_argument("--budget", type=float, default=0.25, help="share of the training sequences each epoch trains on")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(args.seed)
    if args.text is None:
        data, vocab = generated_tokens(args.samples, args.length, args.vocab, args.seed), args.vocab
    else:
        data, vocab = text_tokens(args.text, args.tokenizer, args.length)
    cut = max(1, int(0.9 * len(data)))
    train_data, val_data = TensorDataset(*data[:cut]), TensorDataset(*data[cut:])
    config = GPT2Config(vocab_size=vocab, n_positions=args.length, n_embd=args.n_embd, n_layer=args.n_layer,
                        n_head=max(1, args.n_embd // 32), bos_token_id=vocab - 1, eos_token_id=vocab - 1)
    model = GPT2LMHeadModel(config)

    strategy = StaleStrategy(len(train_data), query_budget=args.budget, seed=args.seed)
    sampler = SelectionSampler(strategy)
    loader = DataLoader(WithIndices(train_data), batch_size=args.batch_size, sampler=sampler)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    steps = args.epochs * math.ceil(strategy.samples_per_epoch / args.batch_size)  # the subset's steps, not the data's
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(steps // 10, steps))

    val_before = evaluate(model, val_data, args.batch_size)
    trained = 0
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        for ids, labels, index in loader:
            logits = model(input_ids=ids, attention_mask=(labels != IGNORE).long()).logits
            loss, scores = cross_entropy_with_scores(logits, labels, shift=True, per_sample="mean")
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            strategy.after_step(index, scores)  # each sequence's mean token loss goes to its row of the table
            trained += index.numel()
        strategy.end_epoch({})
        print(f"epoch {epoch}: {len(sampler)} of {len(train_data)} sequences, last batch loss {loss.item():.3f}")

    val_after = evaluate(model, val_data, args.batch_size)
    result = {"val_loss_before": val_before, "val_loss": val_after, "val_perplexity": math.exp(val_after),
              "sequences_trained": trained, "data_selected": trained / (args.epochs * len(train_data))}
    print(f"validation loss {val_before:.3f} -> {val_after:.3f} (perplexity {result['val_perplexity']:.1f}) after "
          f"{trained} sequences ({100 * result['data_selected']:.0f}% of {args.epochs} full epochs)")
    return result


if __name__ == "__main__":
    main()
