"""Reliability and safety of training runs: checkpoints that cannot run code and that verify, NaN
containment, resume that honours the config, and nothing lost to ordinary operations."""

from __future__ import annotations

import json
import math
import os
import pickle
import signal
import warnings

import pytest
import torch

from aql.config import ConfigError
from aql.data import IndexedTensorDataset
from aql.strategies import STRATEGIES, SelectionStrategy
from aql.trainer import AQLv2Trainer, WarmupCosine
from aql.training.checkpoint import CheckpointError, read_checkpoint, write_checkpoint
from aql.training.trainer import NonFiniteError
from tests.aql.test_trainer import make_config, make_trainer


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    from aql.data import mnist1d_datasets

    train, val, test = mnist1d_datasets(1500, val_fraction=0.1, seed=11, cache_dir=tmp_path_factory.mktemp("mnist1d"))
    return IndexedTensorDataset(train.inputs[:640], train.targets[:640]), val, test


def short(tmp_path, **sections):
    sections.setdefault("training", {})
    sections["training"] = {"epochs": 2, **sections["training"]}
    return make_config(tmp_path, **sections)


def records(trainer):
    return [json.loads(line) for line in trainer.metrics_path.read_text().splitlines()]


# ------------------------------------------------------------------------------ 1. untrusted checkpoints
class _Payload:
    """Unpickling it runs a shell command that creates a file (what an attacker's checkpoint would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_malicious_pickle_is_refused_and_never_runs(mnist, tmp_path):
    marker = tmp_path / "payload_ran"
    config = short(tmp_path / "run")
    make_trainer(config, mnist).fit()
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    for old in (tmp_path / "run").glob("checkpoint.*.pt"):
        old.unlink()
    # a plain pickle / torch.save file in the checkpoint's place: refused before anything is unpickled
    with open(checkpoint, "wb") as handle:
        pickle.dump({"format": 3, "model": _Payload(marker)}, handle)
    with pytest.raises(CheckpointError, match=r"checkpoint .*checkpoint.pt: a plain torch.save/pickle file, not an aql checkpoint"):
        make_trainer(config, mnist).fit(resume=True)
    assert not marker.exists()
    # the same payload inside a well-formed, correctly checksummed aql file: weights_only refuses it
    write_checkpoint({"format": 3, "model": _Payload(marker)}, checkpoint)
    with pytest.raises(CheckpointError, match=r"checkpoint .*checkpoint.pt: refused to unpickle \(UnpicklingError"):
        make_trainer(config, mnist).fit(resume=True)
    assert not marker.exists()


def test_checkpoint_state_loads_with_weights_only(mnist, tmp_path):
    trainer = make_trainer(short(tmp_path, aql_v2={"selection_strategy": "stale"}), mnist)
    trainer.fit()
    state = read_checkpoint(trainer.checkpoint_path)  # weights_only=True inside
    assert state["format"] == 3 and isinstance(state["rng"]["numpy"]["keys"], torch.Tensor)


# ------------------------------------------------------------------------------------- 2. integrity
def _corrupt(path, how, tmp_path):
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "random":
        path.write_bytes(torch.randint(0, 256, (5000,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)).numpy().tobytes())
    elif how == "foreign":
        torch.save(torch.nn.Linear(3, 3).state_dict(), path)
    elif how == "bit-flipped":  # 4 bytes inside the tensor data near the end of the payload
        flipped = bytearray(data)
        for offset in range(len(data) - 3000, len(data) - 2996):
            flipped[offset] ^= 0xFF
        path.write_bytes(bytes(flipped))


MESSAGES = {"truncated": r"truncated \(\d+ of \d+ payload bytes\)", "empty": r"empty \(0 bytes",
            "random": r"not an aql checkpoint \(5000 bytes of unknown content\)",
            "foreign": r"a plain torch.save/pickle file, not an aql checkpoint", "bit-flipped": r"checksum mismatch"}


@pytest.mark.parametrize("how", list(MESSAGES))
def test_a_damaged_checkpoint_is_one_clear_error_and_resume_falls_back(how, mnist, tmp_path):
    config = short(tmp_path)
    trainer = make_trainer(config, mnist)
    trainer.fit()
    newest, older = trainer.checkpoint_path, tmp_path / "checkpoint.1.pt"
    assert read_checkpoint(older)["step"] == trainer.steps_per_epoch and read_checkpoint(newest)["step"] == trainer.step
    _corrupt(newest, how, tmp_path)
    with pytest.raises(CheckpointError, match=MESSAGES[how]) as caught:
        read_checkpoint(newest)
    assert str(newest) in str(caught.value) and "\n" not in str(caught.value)
    # resume: the newest good checkpoint (the end of epoch 1), saying so; the run then finishes epoch 2 again
    resumed = make_trainer(config, mnist, model_seed=1)
    resumed.fit(resume=True)
    resume = [r for r in records(resumed) if r["event"] == "resume"][-1]
    assert resume["checkpoint"] == str(older) and resume["step"] == trainer.steps_per_epoch and resume["skipped_checkpoints"]
    for a, b in zip(trainer.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    # with no good checkpoint left: one line naming the file
    _corrupt(newest, how, tmp_path)
    older.unlink()
    with pytest.raises(CheckpointError, match=f"no usable checkpoint: checkpoint {newest}: " + MESSAGES[how]):
        make_trainer(config, mnist).fit(resume=True)


def test_keep_checkpoints_and_leftover_temporaries(mnist, tmp_path):
    config = short(tmp_path, training={"epochs": 3}, logging={"keep_checkpoints": 2})
    stale = tmp_path / ".checkpoint.pt.tmp999999999"  # a killed write of a process that is gone
    tmp_path.mkdir(exist_ok=True)
    stale.write_bytes(b"half a checkpoint")
    trainer = make_trainer(config, mnist)
    trainer.fit()
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.glob("checkpoint*.pt")) == ["checkpoint.1.pt", "checkpoint.pt"]
    assert read_checkpoint(tmp_path / "checkpoint.1.pt")["epoch"] == 2 and read_checkpoint(trainer.checkpoint_path)["epoch"] == 3


# --------------------------------------------------------------------------------- 3. NaN containment
def _poison(trainer, micro_steps):
    """Micro-steps (0-based) whose inputs become NaN (NaN logits, loss and gradients); records the
    indices each micro-step trained."""
    seen = []
    original = trainer._micro_step

    def poisoned(x, y, index, weight, scale):
        if len(seen) in micro_steps:
            x = torch.full_like(x, float("nan"))
        seen.append(index.clone())
        return original(x, y, index, weight, scale)

    trainer._micro_step = poisoned
    return seen


def _feeds_steps(name):
    return STRATEGIES[name].uses_scores and STRATEGIES[name].after_step is not SelectionStrategy.after_step


@pytest.mark.parametrize("on_device", [False, True], ids=["cpu-skip", "device-skip"])
@pytest.mark.parametrize("strategy", sorted(name for name in STRATEGIES if _feeds_steps(name)))
def test_a_nan_batch_is_skipped_whole(strategy, on_device, mnist, tmp_path, monkeypatch):
    """One micro-batch with NaN logits: the step is skipped (parameters, optimizer, Fisher, after_step),
    counted and warned about; every strategy that reads scores never sees that batch."""
    if on_device:  # the CUDA mechanism (fused AdamW found_inf, Fisher restored, flag read a step later), here on CPU
        monkeypatch.setattr(AQLv2Trainer, "_device_skips_steps", lambda self: True)
    config = make_config(tmp_path, aql_v2={"selection_strategy": strategy}, training={"epochs": 1}, logging={"log_every": 1})
    trainer = make_trainer(config, mnist)
    delivered = []
    after_step = trainer.strategy.after_step
    trainer.strategy.after_step = lambda indices, scores: delivered.append(indices.clone()) or after_step(indices, scores)
    trained = _poison(trainer, {2})
    with pytest.warns(RuntimeWarning, match=r"step 3: non-finite loss or gradient; the step was skipped"):
        result = trainer.fit()
    assert result["nonfinite_steps"] == 1 and result["history"][0]["nonfinite_steps"] == 1
    assert [r["nonfinite_steps"] for r in records(trainer) if r["event"] == "train"] == [0, 0, 1, 0]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert all(torch.isfinite(f).all() for f in trainer.uncertainty.fisher)
    assert all(torch.isfinite(v).all() for s in trainer.optimizer.state.values() for v in s.values())
    poisoned = set(trained[2].tolist())
    assert len(delivered) == len(trained) - 1 and not poisoned & set(torch.cat(delivered).tolist())
    assert math.isfinite(result["train_loss"]) and math.isfinite(result["test_loss"])
    if strategy == "stale":
        store = trainer.strategy.store
        assert not torch.isnan(store.scores).any() and not store.seen[trained[2]].any()
    assert not torch.isnan(read_checkpoint(trainer.checkpoint_path)["model"]["head.weight"]).any()


@pytest.mark.parametrize("on_device", [False, True], ids=["cpu-skip", "device-skip"])
def test_the_skipped_step_leaves_parameters_and_optimizer_bit_equal(on_device, mnist, tmp_path, monkeypatch):
    if on_device:
        monkeypatch.setattr(AQLv2Trainer, "_device_skips_steps", lambda self: True)
    trainer = make_trainer(make_config(tmp_path, training={"epochs": 1}), mnist)
    x, y = mnist[0].inputs[:32], mnist[0].targets[:32]
    trainer._micro_step(x, y, torch.arange(32), None, 1.0)
    trainer._optimizer_step(1)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    moments = [{k: v.clone() for k, v in s.items()} for s in trainer.optimizer.state.values()]
    fisher = [f.clone() for f in trainer.uncertainty.fisher]
    trainer._micro_step(torch.full_like(x, float("nan")), y, torch.arange(32, 64), None, 1.0)
    with pytest.warns(RuntimeWarning, match="skipped"):
        trainer._optimizer_step(1)
        trainer._resolve()
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    assert all(torch.equal(v, s[k]) for m, s in zip(moments, trainer.optimizer.state.values()) for k, v in m.items())
    assert all(torch.equal(a, b) for a, b in zip(fisher, trainer.uncertainty.fisher))
    assert trainer.nonfinite_steps == 1 and trainer.step == 2


def test_non_finite_steps_in_a_row_stop_the_run_and_no_bad_checkpoint_is_written(mnist, tmp_path):
    config = make_config(tmp_path, training={"epochs": 2, "max_nonfinite_steps": 3}, logging={"save_every": 2})
    trainer = make_trainer(config, mnist)
    _poison(trainer, set(range(5, 1000)))
    with pytest.raises(NonFiniteError, match=r"3 optimizer steps in a row \(up to step 8\).*training.max_nonfinite_steps=3"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            trainer.fit()
    state = read_checkpoint(trainer.checkpoint_path)
    assert state["step"] == 6 and all(torch.isfinite(v).all() for v in state["model"].values())
    # parameters that are not finite are never written
    with torch.no_grad():
        next(trainer.model.parameters())[0].fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="non-finite values at step 7; not writing"):
        trainer.save_checkpoint()
    assert read_checkpoint(trainer.checkpoint_path)["step"] == 6


# ------------------------------------------------------------------------------------------- 4. resume
def test_resume_refuses_config_changes_that_make_another_run(mnist, tmp_path):
    make_trainer(short(tmp_path), mnist).fit()
    changed = short(tmp_path, model={"channels": [8, 16]}, aql_v2={"strategy_options": {"unseen_score": 1e9}})
    changed.seed = 6
    with pytest.raises(CheckpointError, match=r"these keys would make a different run: aql_v2.strategy_options: \{\} -> "
                                              r"\{'unseen_score': 1000000000.0\}; model.channels: \[16, 16\] -> \[8, 16\]; seed: 5 -> 6"):
        make_trainer(changed, mnist).fit(resume=True)


def test_resume_applies_more_epochs_and_a_new_learning_rate(mnist, tmp_path):
    finished = make_trainer(short(tmp_path), mnist)
    finished.fit()
    assert finished.scheduler.get_last_lr()[0] == 0.0  # the cosine ended
    config = short(tmp_path, training={"epochs": 3, "learning_rate": 1e-3}, logging={"log_every": 1})
    resumed = make_trainer(config, mnist, model_seed=1)
    lrs = []
    resumed.callbacks.append(lambda t: lrs.append(t.scheduler.get_last_lr()[0]))
    result = resumed.fit(resume=True)
    steps = resumed.steps_per_epoch
    schedule = WarmupCosine(2, 3 * steps)
    assert resumed.total_steps == 3 * steps and result["epochs"] == 3
    assert lrs == [pytest.approx(1e-3 * schedule(s)) for s in range(2 * steps + 1, 3 * steps + 1)] and lrs[0] > 0
    assert result["history"][-1]["samples_backpropagated"] > 0
    moved = [not torch.equal(a, b) for a, b in zip(finished.model.parameters(), resumed.model.parameters())]
    assert any(moved)
    resume = [r for r in records(resumed) if r["event"] == "resume"]
    assert resume[0]["changes"] == {"logging.log_every": [5, 1], "training.epochs": [2, 3], "training.learning_rate": [3e-3, 1e-3]}


# ---------------------------------------------------------------------------------- 5. ordinary operations
@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_stop_at_the_step_end_with_a_checkpoint(signal_name, mnist, tmp_path):
    number = getattr(signal, signal_name)

    class NotHandled(Exception):
        pass

    def guard(signum, frame):  # what the process would do without the trainer's handler: die
        raise NotHandled(signal_name)

    def send(trainer):
        if trainer.step == 4:
            os.kill(os.getpid(), number)

    previous = signal.signal(number, guard)
    try:
        trainer = make_trainer(short(tmp_path), mnist, callbacks=[send])
        with pytest.raises(KeyboardInterrupt, match=f"interrupted \\({signal_name}\\); checkpoint written at step 4"):
            trainer.fit()
        assert signal.getsignal(number) is guard
    finally:
        signal.signal(number, previous)
    assert read_checkpoint(trainer.checkpoint_path)["step"] == 4


def test_a_folder_with_a_run_needs_resume_or_overwrite(mnist, tmp_path):
    config = short(tmp_path)
    make_trainer(config, mnist).fit()
    with pytest.raises(CheckpointError, match=r"already holds a run \(checkpoint.pt, checkpoint.1.pt, metrics.jsonl\); "
                                              r"resume it \(--resume"):
        make_trainer(config, mnist).fit()
    again = make_trainer(config, mnist)
    again.fit(overwrite=True)
    events = [r["event"] for r in records(again)]
    assert events.count("fit") == 1 and events.count("epoch") == 2
    with pytest.raises(ValueError, match="resume and overwrite exclude each other"):
        make_trainer(config, mnist).fit(resume=True, overwrite=True)


@pytest.mark.parametrize("kind", ["dangling-link", "directory"])
def test_an_unwritable_checkpoint_path_fails_at_start_up(kind, mnist, tmp_path):
    path = tmp_path / "checkpoint.pt"
    if kind == "directory":
        path.mkdir(parents=True)
    else:
        path.symlink_to(tmp_path / "gone" / "checkpoint.pt")
    trainer = make_trainer(short(tmp_path), mnist)
    with pytest.raises(CheckpointError, match="a dangling symbolic link" if kind == "dangling-link" else "a directory where"):
        trainer.fit()
    assert trainer.step == 0  # refused before training, not after


def test_a_resumed_run_writes_no_record_twice(mnist, tmp_path):
    config = short(tmp_path, logging={"log_every": 1, "save_every": 4})

    def crash(trainer):
        if trainer.step == 7:
            raise RuntimeError("the machine went away")

    with pytest.raises(RuntimeError, match="went away"):
        make_trainer(config, mnist, callbacks=[crash]).fit()
    resumed = make_trainer(config, mnist)
    resumed.fit(resume=True)
    keys = [(r["event"], r.get("step")) for r in records(resumed) if r["event"] in ("train", "epoch", "eval", "fit")]
    assert len(keys) == len(set(keys)) and [s for e, s in keys if e == "train"] == list(range(1, resumed.step + 1))
    resumed_again = make_trainer(config, mnist)
    resumed_again.fit(resume=True)  # a finished run: nothing trains, the summary is not repeated
    assert [r["event"] for r in records(resumed_again)].count("fit") == 1


# ----------------------------------------------------------------------------- 7. run-time config errors
def test_data_that_does_not_fit_the_model_names_the_config_key(mnist, tmp_path):
    with pytest.raises(ConfigError, match=r"model.num_classes: 5 is too small for the training labels \(largest label 9"):
        make_trainer(make_config(tmp_path, model={"num_classes": 5}), mnist)
    with pytest.raises(ConfigError, match=r"model.input_length: 41 does not fit the data, whose samples have 40 values"):
        make_trainer(make_config(tmp_path, model={"input_length": 41}), mnist)
