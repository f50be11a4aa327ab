"""JSON Schemas of request bodies, read and compiled once (when a config is compiled).

jsonschema-rs (Rust) checks a valid document in about a microsecond, where
fastjsonschema's generated Python took six; one validator also lists what failed,
so the check and the listing can never disagree. The draft follows ``$schema``
(2020-12 without one); ``format`` asserts as each draft says (drafts 4, 6 and 7 do,
2019-09 and later only annotate).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jsonschema_rs
import orjson


class SchemaError(Exception):
    """A schema file that cannot be read or compiled."""


@dataclass(frozen=True, slots=True)
class CompiledSchema:
    validator: jsonschema_rs.Validator


def load_schema(path: Path) -> CompiledSchema:
    try:
        document = orjson.loads(path.read_bytes())
    except OSError as exc:
        raise SchemaError(f"cannot read {path}: {exc.strerror}") from None
    except orjson.JSONDecodeError as exc:
        raise SchemaError(f"{path} is not JSON: {exc}") from None
    try:
        # Checks the schema against its draft's meta-schema, and resolves its $refs.
        validator = jsonschema_rs.validator_for(document)
    except (jsonschema_rs.ValidationError, jsonschema_rs.ReferencingError, ValueError) as exc:
        message = str(exc).split("\n", 1)[0]
        raise SchemaError(f"{path} is not a valid JSON Schema: {message}") from None
    return CompiledSchema(validator)
