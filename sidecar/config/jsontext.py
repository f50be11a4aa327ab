"""Facts about JSON text that its parsed form has lost: here, a key named twice in one
object. Both the validation of a request and the fallback cache's key need it (a
parser keeps one copy, a model's may keep the other)."""

from __future__ import annotations

from typing import Any


def _key_count(text: bytes) -> int:
    """Object keys in valid JSON text: strings followed by a colon. Escapes pair up
    left to right, so dropping escaped backslashes, then escaped quotes, leaves
    quotes that strictly open and close strings; every other part is outside one.
    Each outside part is marked, its whitespace dropped, and a mark followed by a
    colon is a key: bytes methods in C, no Python loop over the parts."""
    unescaped = text.replace(b"\\\\", b"").replace(b'\\"', b"")
    outside = b"\x00" + b"\x00".join(unescaped.split(b'"')[2::2])
    return outside.translate(None, b" \t\r\n").count(b"\x00:")


def _keys_in(document: Any) -> int:
    """Object keys in a parsed document: each object's own, once per name. Only
    objects and arrays are visited (a tensor's numbers are skipped, not walked).
    Two isinstance calls, not one with a tuple: compiled, each is a type check, and
    the tuple's form a generic call."""
    count = 0
    pending: list[Any] = (
        [document] if isinstance(document, dict) or isinstance(document, list) else []  # noqa: SIM101
    )
    while pending:
        node = pending.pop()
        children: Any = node
        if isinstance(node, dict):
            count += len(node)
            children = node.values()
        for child in children:
            if isinstance(child, dict) or isinstance(child, list):  # noqa: SIM101
                pending.append(child)
    return count


def repeats_a_key(body: bytes, document: Any) -> bool:
    """True when valid JSON ``body`` names a key twice in one object. The parser kept
    one copy, a model's parser may keep the other (RapidJSON in Triton keeps the
    first): what was validated would not be what the model reads. The parsed
    document has each key once; fewer keys there than in the text means a repeat.

    Outside strings a colon only ever follows a key, so the text's colons are its
    keys plus any inside strings: when the document has as many keys as the text has
    colons, none repeats, and one count in C answers for most bodies. (A repeat takes
    two keys, so two colons.)"""
    colons = body.count(b":")
    if colons < 2:
        return False
    keys = _keys_in(document)
    if colons == keys:
        return False
    return _key_count(body) != keys
