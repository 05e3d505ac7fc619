"""aql: adaptive query-based learning on top of aql_kernels.

Light at import: the trainer, data and model modules load torch-heavy dependencies only when used.
"""

__version__ = "0.1.0"  # `python -m aql --version`; equal to pyproject.toml's (a test checks)

from .config import Config, ConfigError, load_config  # noqa: E402
from .errors import AQLError  # noqa: E402

__all__ = ["Config", "ConfigError", "AQLError", "load_config", "AQLv2Trainer", "build_model", "build_datasets", "__version__"]


def __getattr__(name):
    if name == "AQLv2Trainer":
        from .trainer import AQLv2Trainer

        return AQLv2Trainer
    if name == "build_model":
        from .models import build_model

        return build_model
    if name == "build_datasets":
        from .data import build_datasets

        return build_datasets
    raise AttributeError(f"module 'aql' has no attribute {name!r}")
