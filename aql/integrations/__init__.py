"""Adapters that drop aql into existing training code, over the same strategies and score tables
(`aql.strategies`, `aql.selection.ScoreStore`) that the bundled trainer uses:

- `aql.integrations.huggingface`: `AQLTrainer` (a `transformers.Trainer`) and `AQLTrainerMixin`;
  needs the `huggingface` extra (`pip install "aql[huggingface]"`).
- `aql.integrations.lightning`: `AQLCallback` (a Lightning `Callback`); needs the `lightning` extra
  (`pip install "aql[lightning]"`).

A plain PyTorch loop needs no adapter: see `examples/plain_loop.py`. Importing this package imports
neither framework; importing an adapter without its extra raises an ImportError that names the
`pip install` command.
"""

# nothing is imported here: `from aql.integrations import huggingface` imports the one adapter asked for
__all__: list[str] = []
