"""The compiled connections tell the garbage collector the truth about what they hold.

mypyc 2.4 visits an attribute twice in a class's traverse function when the class
annotates it again after a base class declared it (``self._transport: T = None`` in a
subclass of FlowControlled). Each visit cancels one reference during a collection, so
the extra one cancels a reference from outside: the event loop's own hold on an open
transport, or a list that survived an earlier collection. A young connection and its
transport then look like garbage, and the collector clears them while they are in use
(the pool fuzz test met it as an upstream whose attributes had vanished)."""

from __future__ import annotations

import ast
import gc
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import sidecar
from sidecar.http.client import Pool, UpstreamConnection
from sidecar.http.server import HttpConnection, HttpServer, Limits
from sidecar.http.transport import FlowControlled
from tests.fake_transport import FakeTransport

ROOT = Path(__file__).resolve().parents[2]


def load_build_native() -> Any:
    spec = importlib.util.spec_from_file_location("build_native", ROOT / "build_native.py")
    assert spec is not None
    assert spec.loader is not None
    build_native = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_native)
    return build_native


def compiled_modules() -> list[Path]:
    return [ROOT / path for path in load_build_native().MODULES]


class Transport(FakeTransport):
    """Holding its protocol, as real transports do."""

    protocol: Any = None


def upstream_connection() -> FlowControlled:
    return UpstreamConnection(Pool("127.0.0.1", 9))


def server_connection() -> FlowControlled:
    async def handle(request: Any) -> Any:
        raise AssertionError("no request is made")

    def refuse(*args: Any) -> Any:
        raise AssertionError("no request is made")

    return HttpConnection(HttpServer(handle, refuse, Limits()))


# Interpreted, CPython's own traverse functions are right: these would pass untested.
compiled_only = pytest.mark.skipif(not sidecar.compiled(), reason="the sources run interpreted")


@compiled_only
@pytest.mark.parametrize("make", [upstream_connection, server_connection])
async def test_a_connection_shows_the_collector_its_transport_once(
    make: Callable[[], FlowControlled],
) -> None:
    connection = make()  # in a coroutine: HttpServer takes the running loop
    transport = Transport()
    connection.connection_made(transport)  # type: ignore[attr-defined]
    assert [held is transport for held in gc.get_referents(connection)].count(True) == 1


@compiled_only
async def test_a_collection_leaves_an_upstream_connection_in_use_alone() -> None:
    loop_holds: list[Transport] = []  # as the event loop holds an open transport
    gc.collect()  # the holder is old now: a young collection counts it as outside
    gc.disable()  # no collection of its own may promote the pair before the one below
    try:
        connection = UpstreamConnection(Pool("127.0.0.1", 9))
        transport = Transport()
        transport.protocol = connection
        connection.connection_made(transport)  # type: ignore[arg-type]
        loop_holds.append(transport)
        del connection, transport
        gc.collect(0)
    finally:
        gc.enable()
    transport = loop_holds[0]
    assert isinstance(transport.protocol, UpstreamConnection), "the collector cleared it"
    assert transport.protocol._transport is transport


def annotated_attributes(cls: ast.ClassDef) -> set[str]:
    names = set()
    for node in ast.walk(cls):
        if isinstance(node, ast.AnnAssign):
            target = node.target
            if isinstance(target, ast.Name) and node in cls.body:
                names.add(target.id)
            elif (
                isinstance(target, ast.Attribute)
                and isinstance(target.value, ast.Name)
                and target.value.id == "self"
            ):
                names.add(target.attr)
    return names


def test_no_compiled_class_annotates_again_what_a_base_declares() -> None:
    """The cause above, for every class mypyc compiles: annotate an attribute where it
    is first declared, only there."""
    classes: dict[str, tuple[set[str], list[str]]] = {}
    for path in compiled_modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = [b.id for b in node.bases if isinstance(b, ast.Name)]
                classes[node.name] = (annotated_attributes(node), bases)
    assert "UpstreamConnection" in classes
    assert "FlowControlled" in classes

    def ancestors(name: str) -> list[str]:
        found = []
        for base in classes[name][1]:
            if base in classes:
                found += [base, *ancestors(base)]
        return found

    again = [
        f"{name}.{attribute} (declared by {base})"
        for name, (attributes, _) in classes.items()
        for base in ancestors(name)
        for attribute in sorted(attributes & classes[base][0])
    ]
    assert not again, ", ".join(again)


_GENERATED = """\
static int
Base_traverse(m___BaseObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->__t);
    int rv = 0;
    return rv;
}

static int
Sub_traverse(m___SubObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->__t);
%s    Py_VISIT(self->_x);
    int rv = 0;
    return rv;
}
"""


def test_the_build_refuses_a_traverse_that_visits_an_attribute_twice(tmp_path: Path) -> None:
    """Every build scans the C that mypyc generated (as it generates it for the bug
    above), whatever the cause of a doubled visit."""
    build_native = load_build_native()
    (tmp_path / "__native.c").write_text(_GENERATED % "    Py_VISIT(self->__t);\n")
    assert build_native.scan_traverses(tmp_path) == (2, ["Sub.__t"])
    (tmp_path / "__native.c").write_text(_GENERATED % "")
    assert build_native.scan_traverses(tmp_path) == (2, [])
