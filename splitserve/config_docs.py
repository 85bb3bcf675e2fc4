"""docs/config.md, generated from the config models so the reference cannot drift from the code.

python -m splitserve.config_docs > docs/config.md
"""

from __future__ import annotations

import enum
import sys
import types
import typing

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from splitserve.config import SplitserveConfig


def _type_name(annotation: typing.Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in typing.get_args(annotation))
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return " \\| ".join(repr(m.value) for m in annotation)
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _default(field) -> str:
    if field.default is PydanticUndefined:
        return "required" if field.default_factory is None else "(section)"
    value = field.default
    if isinstance(value, enum.Enum):
        value = value.value
    return "null" if value is None else f"`{value}`"


def _nested(annotation: typing.Any) -> type[BaseModel] | None:
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _section(model: type[BaseModel], prefix: str, out: list[str]) -> None:
    rows = []
    nested = []
    for name, field in model.model_fields.items():
        sub = _nested(field.annotation)
        path = f"{prefix}{name}"
        if sub is not None:
            nested.append((path, sub, field.description))
            continue
        rows.append(f"| `{path}` | {_type_name(field.annotation)} | {_default(field)} | {field.description or ''} |")
    if rows:
        out += ["| key | type | default | meaning |", "|---|---|---|---|", *rows, ""]
    for path, sub, description in nested:
        out += [f"## `{path}`", ""]
        if description:
            out += [description, ""]
        doc = (sub.__doc__ or "").strip()
        if doc and not doc.startswith("Usage docs"):
            out += [doc, ""]
        _section(sub, f"{path}.", out)


def render() -> str:
    out = [
        "# Cluster config reference",
        "",
        "Generated from `splitserve/config.py` by `python -m splitserve.config_docs > docs/config.md`; a test",
        "fails when this file is stale. Unknown keys are rejected. Check a file with `splitserve config validate`,",
        "see it with every default filled in with `splitserve config show`.",
        "",
        "## top level",
        "",
    ]
    _section(SplitserveConfig, "", out)
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
