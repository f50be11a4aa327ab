"""JSON Schemas of request bodies, read and compiled once (when a config is compiled):
a fast validator for every request, a thorough one to list what failed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fastjsonschema
import jsonschema
import orjson


class SchemaError(Exception):
    """A schema file that cannot be read or compiled."""


@dataclass(frozen=True, slots=True)
class CompiledSchema:
    fast: Callable[[Any], Any]
    thorough: jsonschema.protocols.Validator


def load_schema(path: Path) -> CompiledSchema:
    try:
        document = orjson.loads(path.read_bytes())
    except OSError as exc:
        raise SchemaError(f"cannot read {path}: {exc.strerror}") from None
    except orjson.JSONDecodeError as exc:
        raise SchemaError(f"{path} is not JSON: {exc}") from None
    try:
        validator_class = jsonschema.validators.validator_for(document)
        validator_class.check_schema(document)
        fast = fastjsonschema.compile(document)
    except (jsonschema.SchemaError, fastjsonschema.JsonSchemaDefinitionException) as exc:
        message = getattr(exc, "message", str(exc))
        raise SchemaError(f"{path} is not a valid JSON Schema: {message}") from None
    return CompiledSchema(fast, validator_class(document))
