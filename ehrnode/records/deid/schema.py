"""What the engine and the profile loader know of FHIR: every element's type, from the R4B
model classes (``fhir.resources``), so a rule can name an element by path or by data type and
the engine knows the type of whatever it walks."""

from __future__ import annotations

import re
import types
import typing
from dataclasses import dataclass
from functools import cache
from typing import Any

from fhir.resources.R4B import get_fhir_model_class

PRIMITIVES = {
    "String": "string", "Markdown": "markdown", "Code": "code", "Id": "id", "Uri": "uri", "Url": "url",
    "Canonical": "canonical", "Oid": "oid", "Uuid": "uuid", "UuidVersion": "uuid", "Date": "date",
    "DateTime": "dateTime", "Instant": "instant", "Time": "time", "Decimal": "decimal", "Integer": "integer",
    "Integer64": "integer64", "PositiveInt": "positiveInt", "UnsignedInt": "unsignedInt",
    "Base64Binary": "base64Binary", "Xhtml": "xhtml",
}
#: Base classes that end a type's chain of specializations.
_CHAIN_END = frozenset({"Element", "BackboneElement", "DataType", "BackboneType", "Resource", "DomainResource"})
_RESOURCE = get_fhir_model_class("Resource")
_ABSTRACT = frozenset({"Resource", "DomainResource"})


@dataclass(frozen=True, slots=True)
class Element:
    name: str
    kinds: tuple[str, ...]  # its FHIR type, then the types that type specializes (Age, Quantity)
    model: type | None  # the model class of a complex type
    many: bool
    required: bool
    targets: frozenset[str] = frozenset()  # a Reference's allowed target types
    #: A code element's required binding, as the model lists it; ``open_codes`` when the list
    #: is cut short (the value set has more codes than the model names).
    codes: frozenset[str] = frozenset()
    open_codes: bool = False

    @property
    def type(self) -> str:
        return self.kinds[0]


def _describe(annotation: Any) -> tuple[str | type, bool]:
    """(primitive type name or model class, is a list) of a model field's annotation."""
    many = False
    while True:
        origin = typing.get_origin(annotation)
        if origin in (typing.Union, types.UnionType):
            annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
        elif origin is list:
            many, annotation = True, typing.get_args(annotation)[0]
        else:
            break
    if typing.get_origin(annotation) is typing.Annotated:
        for meta in annotation.__metadata__:
            if type(meta).__name__ in PRIMITIVES:
                return PRIMITIVES[type(meta).__name__], many
    if annotation is bool:
        return "boolean", many
    if hasattr(annotation, "get_model_klass"):
        return annotation.get_model_klass(), many
    raise TypeError(f"unrecognized field annotation {annotation!r}")


def _kinds(model: type) -> tuple[str, ...]:
    names = []
    for cls in model.__mro__:
        if cls.__name__ in _CHAIN_END or not hasattr(cls, "model_fields"):
            break
        names.append(cls.__name__)
    return tuple(names) or (model.__name__,)


@cache
def elements(model: type) -> dict[str, Element]:
    """The elements of ``model`` by JSON name."""
    out = {}
    for name, info in model.model_fields.items():  # type: ignore[attr-defined]  # a pydantic model class
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        if not extra.get("element_property"):
            continue
        described, many = _describe(info.annotation)
        alias = info.alias or name
        required = info.is_required() or bool(extra.get("element_required"))
        if isinstance(described, str):
            codes = [c for c in extra.get("enum_values") or () if isinstance(c, str)]
            out[alias] = Element(alias, (described,), None, many, required,
                                 codes=frozenset(c for c in codes if c != "+"), open_codes="+" in codes)
        elif issubclass(described, _RESOURCE):
            out[alias] = Element(alias, ("Resource",), None, many, required)
        else:
            targets = frozenset(extra.get("enum_reference_types") or ())
            out[alias] = Element(alias, _kinds(described), described, many, required, targets)
    return out


@cache
def required_elements(model: type) -> tuple[Element, ...]:
    return tuple(e for e in elements(model).values() if e.required)


@cache
def resource_model(rtype: str) -> type | None:
    if not re.fullmatch(r"[A-Z][A-Za-z]+", rtype) or rtype in _ABSTRACT:
        return None
    try:
        model = get_fhir_model_class(rtype)
    except (ValueError, ImportError):
        return None
    return model if issubclass(model, _RESOURCE) and model.__name__ == rtype else None


@cache
def datatype_model(name: str) -> type | None:
    try:
        model = get_fhir_model_class(name)
    except (ValueError, ImportError):
        return None
    return None if issubclass(model, _RESOURCE) or model.__name__ != name else model


PRIMITIVE_EXTENSION = get_fhir_model_class("FHIRPrimitiveExtension")
DOMAIN_RESOURCE = get_fhir_model_class("DomainResource")


