"""The base of every API model, and CEL rules declared once for both sides.

A :class:`Rule` carries a CEL expression for the CRD's ``x-kubernetes-validations`` and,
where the rule needs no old object, the same check in Python, so the pydantic model and
the API server refuse the same objects with the same message. Transition rules (those
that read ``oldSelf``) can only run on the server and carry no Python check.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Self

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    model_validator,
)
from pydantic.alias_generators import to_camel, to_snake
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema

JsonDict = dict[str, Any]


@dataclass(frozen=True)
class Rule:
    cel: str
    message: str
    check: Callable[[Any], bool] | None = None
    field_path: str | None = None

    def schema(self) -> dict[str, str]:
        out = {"rule": self.cel, "message": self.message}
        if self.field_path:
            out["fieldPath"] = self.field_path
        return out


def one_of(first: str, second: str, message: str) -> Rule:
    """Exactly one of two optional fields (wire names) is set."""
    a, b = to_snake(first), to_snake(second)
    return Rule(
        f"has(self.{first}) != has(self.{second})",
        message,
        lambda obj: (getattr(obj, a) is None) != (getattr(obj, b) is None),
    )


def _add_rules(schema: JsonDict, cls: type[BaseModel]) -> None:
    rules: tuple[Rule, ...] = getattr(cls, "__rules__", ())
    if rules:
        schema["x-kubernetes-validations"] = [dict(r.schema()) for r in rules]


class ApiModel(BaseModel):
    """camelCase on the wire, unknown fields refused, attribute docstrings as docs."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_attribute_docstrings=True,
        validate_default=True,
        json_schema_extra=_add_rules,
    )
    __rules__: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _check_rules(self) -> Any:
        for rule in type(self).__rules__:
            if rule.check is not None and not rule.check(self):
                raise ValueError(rule.message)
        return self

    @classmethod
    def from_wire(cls, data: Any) -> Self:
        """Parse an object as the API server or a config file holds it: camelCase names
        only, as the server accepts (Python names stay usable in code)."""
        return cls.model_validate(data, by_alias=True, by_name=False)

    @classmethod
    def load(cls, path: Path) -> Self:
        """Read a YAML file (a config the operator rendered, or one written by hand).
        Raises yaml.YAMLError for a file that is not YAML, ValidationError for one that
        is not this model."""
        try:
            # Bytes, so that YAML's reader decodes them: text that is not UTF-8 is then a
            # YAMLError too, not a UnicodeDecodeError the caller does not expect.
            data = yaml.safe_load(path.read_bytes())
        except RecursionError:
            # PyYAML composes nested nodes recursively: a few thousand brackets exhaust
            # the stack.
            raise yaml.YAMLError("nested too deeply") from None
        return cls.from_wire(data)

    def to_wire(self) -> dict[str, Any]:
        """The object as the API server stores it: camelCase, defaults filled, unset
        optional fields left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


@dataclass(frozen=True)
class Matches:
    """String constraint checked by one regular expression on both sides (RE2 and Python
    agree on the simple patterns used here). The server checks an OpenAPI ``pattern``,
    or with ``cel`` a CEL rule that answers with ``message``; CEL costs budget per
    string, so it is kept for the fields whose refusal a person reads most.

    Use as ``Annotated[str, Matches(...)]``."""

    pattern: str
    message: str
    max_length: int
    min_length: int | None = None
    cel: bool = False

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        compiled = re.compile(self.pattern)

        def check(value: str) -> str:
            if not compiled.fullmatch(value):
                raise ValueError(self.message)
            return value

        inner = core_schema.str_schema(min_length=self.min_length, max_length=self.max_length)
        return core_schema.no_info_after_validator_function(check, inner)

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        out = handler(schema)
        if self.cel:
            rule = Rule(f"self.matches(r'{self.pattern}')", self.message)
            out["x-kubernetes-validations"] = [rule.schema()]
        else:
            out["pattern"] = self.pattern
        return out


@dataclass(frozen=True)
class ListType:
    """How the server merges a list under server-side apply: a ``set`` of unique scalars,
    or a ``map`` of objects unique by ``keys`` (wire names). The server refuses duplicates
    in both, so the model does too. Use as ``Annotated[list[T], ListType(...)]``."""

    kind: str
    keys: tuple[str, ...] = ()

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        attrs = [to_snake(k) for k in self.keys]

        def check(items: list[Any]) -> list[Any]:
            seen: set[Any] = set()
            for item in items:
                key = tuple(getattr(item, a) for a in attrs) if attrs else item
                if key in seen:
                    raise ValueError(f"duplicate value {key!r}: entries must be unique")
                seen.add(key)
            return items

        return core_schema.no_info_after_validator_function(check, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        out = handler(schema)
        out["x-kubernetes-list-type"] = self.kind
        if self.keys:
            out["x-kubernetes-list-map-keys"] = list(self.keys)
        return out


def list_map(*keys: str) -> ListType:
    return ListType("map", keys)


SET = ListType("set")
