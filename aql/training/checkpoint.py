"""What a checkpoint needs besides the objects' own state dicts: the RNG states of every library, seeding,
and the checkpoint file itself.

The file (format 3) is a header line and a payload::

    AQL-CHECKPOINT\n{"format": 3, "bytes": <payload length>, "sha256": "<hex>"}\n<payload: torch.save bytes>

`read_checkpoint` checks the header, the length and the SHA-256 of the payload before anything is
unpickled, then loads the payload with `torch.load(weights_only=True)`: a checkpoint holds tensors and
plain Python values only (the numpy and python RNG states are stored as tensors and ints), so a file
whose pickle would run code is refused, never executed. Every way a file can be wrong (empty,
truncated, damaged, another program's file, an unsafe pickle) is a `CheckpointError` whose one-line
message names the file and what is wrong.

Writes are atomic (a temporary file in the same folder, fsync, then `os.replace`): a crash never leaves
half a checkpoint, only a temporary file that `remove_stale_temporaries` deletes on the next start.
`write_checkpoint(..., keep=K)` keeps the last K checkpoints: `checkpoint.pt` (the newest),
`checkpoint.1.pt`, ..., `checkpoint.<K-1>.pt`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["CHECKPOINT_FORMAT", "CheckpointError", "seed_everything", "rng_states", "set_rng_states", "write_checkpoint",
           "read_checkpoint", "checkpoint_files", "remove_stale_temporaries", "atomic_torch_save"]

#: version of `AQLv2Trainer.state_dict()` and of the file around it; 2: the selection state is the
#: strategy's own state_dict; 3: a checksummed file, RNG states as tensors (loads with weights_only=True)
CHECKPOINT_FORMAT = 3

_MAGIC = b"AQL-CHECKPOINT\n"
_HEADER_LIMIT = 4096  # the header line is ~100 bytes; anything longer is not ours


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used (or a run folder that cannot take one); the message is one
    line naming the file and what is wrong."""


def seed_everything(seed: int) -> None:
    """Seeds python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_states() -> dict[str, Any]:
    """The RNG states of torch (and CUDA), numpy and python as tensors and plain values."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    version, words, gauss_next = random.getstate()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "python": {"version": int(version), "words": torch.tensor(words, dtype=torch.int64), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    numpy = states["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["position"], numpy["has_gauss"],
                         numpy["cached_gaussian"]))
    python = states["python"]
    random.setstate((python["version"], tuple(int(w) for w in python["words"].tolist()), python["gauss_next"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def _older(path: Path, i: int) -> Path:
    """checkpoint.pt -> checkpoint.<i>.pt (i >= 1); i == 0 is the path itself."""
    return path if i == 0 else path.with_name(f"{path.stem}.{i}{path.suffix}")


def checkpoint_files(path: str | os.PathLike) -> list[Path]:
    """The checkpoints of a run whose newest is `path`, newest first: `path`, then `<stem>.1<suffix>`,
    `<stem>.2<suffix>`, ... (those that exist)."""
    path = Path(path)
    found = []
    for candidate in path.parent.glob(f"{path.stem}.*{path.suffix}") if path.parent.is_dir() else ():
        middle = candidate.name[len(path.stem) + 1:len(candidate.name) - len(path.suffix)]
        if middle.isdigit() and int(middle) >= 1:
            found.append((int(middle), candidate))
    return ([path] if path.exists() or path.is_symlink() else []) + [p for _, p in sorted(found)]


def _fsync_directory(directory: Path) -> None:
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _write_atomically(data: bytes, path: Path, keep: int = 1) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary(path)
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        for old in checkpoint_files(path)[max(1, keep):]:  # beyond what is kept (keep lowered since)
            if old != path:
                old.unlink(missing_ok=True)
        for i in range(keep - 1, 0, -1):  # checkpoint.<i-1> -> checkpoint.<i>: the newest K-1 stay
            if _older(path, i - 1).is_file():
                os.replace(_older(path, i - 1), _older(path, i))
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    _fsync_directory(path.parent)


def write_checkpoint(state: dict[str, Any], path: str | os.PathLike, *, keep: int = 1) -> Path:
    """Writes `state` (tensors and plain values) to `path` in the checksummed format, atomically;
    the previous `keep - 1` checkpoints move to `<stem>.1<suffix>`, ... and older ones are deleted."""
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"aql.training.write_checkpoint: keep must be an int >= 1, got {keep!r}")
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    header = json.dumps({"format": CHECKPOINT_FORMAT, "bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()})
    _write_atomically(_MAGIC + header.encode("ascii") + b"\n" + payload, path, keep)
    return path


def atomic_torch_save(obj, path: Path) -> None:
    """A plain `torch.save` written atomically (no checksum): for files that are not checkpoints."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    _write_atomically(buffer.getvalue(), Path(path))


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The state dict stored at `path`, verified (header, length, SHA-256) before it is unpickled, and
    unpickled with `torch.load(weights_only=True)`; a `CheckpointError` naming the file otherwise."""
    path = Path(path)
    where = f"checkpoint {path}"
    if path.is_symlink() and not path.exists():
        raise CheckpointError(f"{where}: a dangling symbolic link (to {os.readlink(path)})")
    if path.is_dir():
        raise CheckpointError(f"{where}: a directory, not a checkpoint file")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{where}: no such file") from None
    except OSError as error:
        raise CheckpointError(f"{where}: cannot be read ({_first_line(error)})") from None
    if not data:
        raise CheckpointError(f"{where}: empty (0 bytes; a write was cut short)")
    if not data.startswith(_MAGIC):
        if data.startswith(b"PK\x03\x04") or data[:1] == b"\x80":
            raise CheckpointError(f"{where}: a plain torch.save/pickle file, not an aql checkpoint (format {CHECKPOINT_FORMAT}); "
                                  "it was written by another program or an older aql and is not unpickled")
        raise CheckpointError(f"{where}: not an aql checkpoint ({len(data)} bytes of unknown content)")
    end = data.find(b"\n", len(_MAGIC), len(_MAGIC) + _HEADER_LIMIT)
    try:
        header = json.loads(data[len(_MAGIC):end].decode("ascii")) if end > 0 else None
        size, digest, version = int(header["bytes"]), str(header["sha256"]), header["format"]
    except (ValueError, TypeError, KeyError, UnicodeDecodeError):
        raise CheckpointError(f"{where}: damaged header (the first line after the aql marker is not the expected JSON)") from None
    if version != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{where}: checkpoint format {version!r}, this aql reads format {CHECKPOINT_FORMAT}; "
                              "resume it with the aql version that wrote it")
    payload = data[end + 1:]
    if len(payload) < size:
        raise CheckpointError(f"{where}: truncated ({len(payload)} of {size} payload bytes)")
    if len(payload) > size:
        raise CheckpointError(f"{where}: {len(payload) - size} bytes more than the header records ({size})")
    actual = hashlib.sha256(payload).hexdigest()
    if actual != digest:
        raise CheckpointError(f"{where}: checksum mismatch (payload SHA-256 {actual[:16]}..., header {digest[:16]}...): "
                              "the file was damaged or altered after it was written")
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - whatever the unpickler refuses, the answer is one line
        raise CheckpointError(f"{where}: refused to unpickle ({_first_line(error)}); a checkpoint holds only tensors and "
                              "plain values") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{where}: the payload is not a format-{CHECKPOINT_FORMAT} trainer state (got {got!r})")
    return state


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Deletes the temporary files that a killed write of `path` (or of its older copies) left behind
    (`.<name>.tmp<pid>` of a process that no longer runs); returns what it deleted."""
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    for candidate in path.parent.glob(f".{path.stem}*{path.suffix}.tmp*"):
        pid_text = candidate.name.rpartition(".tmp")[2]
        if pid_text.isdigit() and int(pid_text) != os.getpid() and _process_alive(int(pid_text)):
            continue  # another live process is writing it
        candidate.unlink(missing_ok=True)
        removed.append(candidate)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True
