"""Turn ``model.path`` into a checkpoint directory: ``tiny`` means the built-in test model."""

from __future__ import annotations

from pathlib import Path

from splitserve.config import TINY_MODEL


def resolve_model_path(path: str) -> Path:
    if path == TINY_MODEL:
        from splitserve.engine.testing import tiny_model_dir

        return tiny_model_dir()
    resolved = Path(path).expanduser()
    if not resolved.is_dir():
        raise FileNotFoundError(
            f"model.path: {path} is not a directory (fix: an HF checkpoint directory, or 'tiny'; hub names are not "
            "downloaded)"
        )
    return resolved
