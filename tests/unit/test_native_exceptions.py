"""No compiled coroutine awaits inside an except clause or a finally block.

mypyc 2.4 restores the thread's exception state wrongly for a coroutine that is
suspended inside an except clause and then closed (a task destroyed while pending,
as at a loop's end), and for one suspended in a finally block while an exception
passes through, even when it is cancelled: the error it was handling stays as
``sys.exc_info()`` after the event loop has moved on. Every later exception on that
thread then carries it as its ``__context__`` (tracebacks in the logs chained to a
stale "No space left on device" from a log sink), and it holds that error's frames
in memory. Measured with a four-line module compiled by mypyc; the same source
interpreted leaves nothing behind. So the compiled modules set a variable in the
except clause and await after it."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.unit.test_native_gc import compiled_modules

ROOT = Path(__file__).resolve().parents[2]
SUSPENDS = (ast.Await, ast.AsyncWith, ast.AsyncFor)


def awaits_in_handlers(source: str) -> list[str]:
    """Each await (or async with/for) inside an except clause or finally block, as
    ``line: code``; nested functions are their own frames and are left out."""
    found = []
    for node in ast.walk(ast.parse(source)):
        blocks: list[list[ast.stmt]] = []
        if isinstance(node, ast.ExceptHandler):
            blocks.append(node.body)
        if isinstance(node, ast.Try | ast.TryStar):
            blocks.append(node.finalbody)
        for block in blocks:
            stack: list[ast.AST] = list(block)
            while stack:
                inner = stack.pop()
                if isinstance(inner, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                    continue
                if isinstance(inner, SUSPENDS):
                    found.append(f"{inner.lineno}: {ast.unparse(inner)[:60]}")
                stack.extend(ast.iter_child_nodes(inner))
    return found


def test_the_scan_finds_awaits_in_except_clauses_and_finally_blocks() -> None:
    source = """
async def f():
    try:
        pass
    except OSError:
        await g()
    finally:
        async with h():
            pass
    try:
        pass
    except OSError:
        async def later():
            await g()  # its own frame
        failed = True
    if failed:
        await g()
"""
    assert sorted(awaits_in_handlers(source)) == ["6: await g()", "8: async with h():\n    pass"]


def test_no_compiled_coroutine_awaits_inside_an_except_clause_or_a_finally_block() -> None:
    found = {
        str(path.relative_to(ROOT)): where
        for path in compiled_modules()
        if (where := awaits_in_handlers(path.read_text()))
    }
    assert found == {}
