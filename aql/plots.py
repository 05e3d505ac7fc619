"""The one place that loads matplotlib (headless) and writes figures: atomically, so that a crash never
leaves a half-written PNG behind."""

from __future__ import annotations

import os
from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed); imported on first use only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(figure, path: str | os.PathLike, *, dpi: int = 120) -> Path:
    """Writes `figure` as a PNG at `path` (temporary file, then rename) and closes it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    figure.tight_layout()
    figure.savefig(temporary, dpi=dpi, format="png")
    pyplot().close(figure)
    os.replace(temporary, path)
    return path
