"""JSON Schemas of request bodies, read and compiled once (when a config is compiled):
a fast validator for every request, a thorough one to list what failed.

jsonschema-rs (Rust) answers yes or no for a valid document in about a microsecond,
where fastjsonschema's generated Python took six. It builds every error before
giving the first, so listing what failed stays with jsonschema, whose errors come
one at a time: a body with a million failing items costs what twenty do. Both
read the draft from ``$schema`` (2020-12 without one), and both take ``format`` as
an annotation, so they agree on what fails.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jsonschema
import jsonschema_rs
import orjson


class SchemaError(Exception):
    """A schema file that cannot be read or compiled."""


@dataclass(frozen=True, slots=True)
class CompiledSchema:
    fast: jsonschema_rs.Validator
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
        fast = jsonschema_rs.validator_for(document, validate_formats=False)
    except jsonschema.SchemaError as exc:
        raise SchemaError(f"{path} is not a valid JSON Schema: {exc.message}") from None
    except (jsonschema_rs.ReferencingError, ValueError) as exc:  # ValidationError is one
        message = str(exc).split("\n", 1)[0]
        raise SchemaError(f"{path} is not a valid JSON Schema: {message}") from None
    return CompiledSchema(fast, validator_class(document))
