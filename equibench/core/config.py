"""Typed, validated option sets (pydantic): train and evaluate settings, sweep configs, suite files.

Every config is a frozen pydantic model with ``extra="forbid"`` and strict types (no ``"3"`` for
3, no ``true`` for 1; an int is accepted where a float is expected; YAML/JSON lists become
tuples). A validation error becomes ONE line naming the option, what it must be and what was
given (``UserError``: the CLI prints it and exits with code 2).
"""
from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from .errors import UserError, closest

C = TypeVar("C", bound="Config")


class Config(BaseModel):
    """Base of every option set: frozen, strict, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _lists_to_tuples(cls, data: Any) -> Any:
        """YAML and JSON have lists, the models hold tuples (hashable, immutable)."""
        if isinstance(data, dict):
            return {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return data

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (tuples as lists)."""
        return self.model_dump(mode="json")


def one_line(err: ValidationError, what: str, cls: type[BaseModel] | None = None) -> str:
    """The first error of ``err`` as one readable line about option set ``what`` (model ``cls``)."""
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e.get("loc", ()))
    msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
    msg = msg.replace("a valid tuple", "a list").replace("a valid dictionary", "a mapping")
    if not loc:  # a check across options
        return msg
    if e.get("type") == "extra_forbidden":
        known = ", ".join(sorted(cls.model_fields)) if cls is not None else ""
        hint = closest(loc, cls.model_fields) if cls is not None else ""
        return f"unknown {what} option {loc!r}{hint}" + (f" (known: {known})" if known else "")
    if e.get("type") == "missing":
        return f"{what} option {loc!r} is required"
    given = e.get("input")
    given = list(given) if isinstance(given, tuple) else given
    return f"{what} option {loc!r}: {msg}, got {given!r}"


def config_from_dict(cls: type[C], d: Any, what: str) -> C:
    """``cls`` validated from the mapping ``d``; any problem is a one-line ``UserError``."""
    if not isinstance(d, dict):
        raise UserError(f"{what} options must be a mapping, got {d!r}")
    try:
        return cls.model_validate(d)
    except ValidationError as err:
        raise UserError(one_line(err, what, cls)) from None
