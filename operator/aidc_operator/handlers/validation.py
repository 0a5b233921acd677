"""Turning pydantic validation errors into messages that name the field, as kubectl users expect."""

from __future__ import annotations

from pydantic import ValidationError
from pydantic.alias_generators import to_camel


def field_path(loc: tuple[int | str, ...], root: str = "spec") -> str:
    path = root
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{to_camel(part) if '_' in part else part}"
    return path


def describe_validation_error(error: ValidationError, root: str = "spec") -> str:
    """'spec.nodes: Input should be greater than or equal to 1; spec.foo: Extra inputs …'"""
    return "; ".join(f"{field_path(e['loc'], root)}: {e['msg']}" for e in error.errors(include_url=False))
