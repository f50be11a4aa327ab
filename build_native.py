"""Compile the request path to C with mypyc: the same typed Python, about a third less
CPU per request (mypyc is part of mypy; black and mypy itself ship compiled by it).

The wheel build (hatch_build.py) compiles into the wheel; for development and the
tests, ``python build_native.py --inplace`` puts the extension modules beside their
sources (an extension module is imported before the .py of the same name), and a
stamp records what they were built from, so a stale build is noticed:

    python build_native.py --inplace   # compile beside the sources
    python build_native.py --ensure    # the same, unless a current build is there (scripts/test)
    python build_native.py --check     # exit 1 if a source changed since (conftest)
    python build_native.py --clean     # back to pure Python

SIDECAR_PURE_PYTHON=1 builds a pure-Python wheel, for a machine without a C compiler.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
# The modules a request runs through. The rest (config loading, the admin listener,
# offline tools; and drift's parsing, fallbacks and log processors, which run in the
# background or only on failures) runs off the request path: compiling it would
# gain little and make `pip install .` slower (it must stay under a minute on a
# 2-core machine; these four took a fifth of the C compile).
MODULES = (
    "sidecar/http/transport.py",
    "sidecar/http/messages.py",
    "sidecar/http/server.py",
    "sidecar/http/client.py",
    "sidecar/pipeline/auth.py",
    "sidecar/pipeline/context.py",
    "sidecar/pipeline/forwarding.py",
    "sidecar/pipeline/guard.py",
    "sidecar/pipeline/identity.py",
    "sidecar/pipeline/ratelimit.py",
    "sidecar/pipeline/relay.py",
    "sidecar/pipeline/routing.py",
    "sidecar/pipeline/stages.py",
    "sidecar/pipeline/validation.py",
    "sidecar/upstream/breaker.py",
    "sidecar/upstream/retry.py",
    "sidecar/upstream/upstreams.py",
    "sidecar/telemetry/metrics.py",
    "sidecar/telemetry/logwriter.py",
    "sidecar/control/live.py",
    "sidecar/config/jsontext.py",
)
GROUP = "sidecar_native"  # the shared library the modules' code lives in
STAMP = ROOT / "build" / "native-stamp"
# mypy's view while compiling: only the standard library's types, third-party packages
# taken as Any, so a wheel built in an isolated environment (none of the runtime
# dependencies installed) compiles the same code as a build in the project's venv.
MYPY_CONFIG = """\
[mypy]
python_version = 3.11
no_site_packages = True
ignore_missing_imports = True
"""
_BUILD = """\
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from setuptools import setup
from setuptools._distutils import ccompiler
from mypyc.build import mypycify


def _compile_in_parallel(self, sources, output_dir=None, macros=None, include_dirs=None,
                         debug=0, extra_preargs=None, extra_postargs=None, depends=None):
    # build_ext --parallel compiles extensions side by side, but the modules share one
    # extension, whose C files it compiles one after another: here, one per CPU.
    macros, objects, extra_postargs, pp_opts, build = self._setup_compile(
        output_dir, macros, include_dirs, sources, depends, extra_postargs)
    cc_args = self._get_cc_args(pp_opts, debug, extra_preargs)

    def one(obj):
        src, ext = build[obj]
        self._compile(obj, src, ext, cc_args, extra_postargs, pp_opts)

    # The largest files first, so no CPU is left alone with a long one at the end.
    todo = sorted((obj for obj in objects if obj in build),
                  key=lambda obj: os.path.getsize(build[obj][0]), reverse=True)
    with ThreadPoolExecutor(len(os.sched_getaffinity(0))) as pool:
        list(pool.map(one, todo))
    return objects



if all(hasattr(ccompiler.CCompiler, name)
       for name in ("_setup_compile", "_get_cc_args", "_compile")):
    ccompiler.CCompiler.compile = _compile_in_parallel
config, target, *args = sys.argv[1:]
modules = [line for line in sys.stdin.read().split() if line]
setup(
    name="sidecar-native",
    ext_modules=mypycify(
        ["--config-file", config, *modules], group_name=%r, target_dir=target, multi_file=True,
        opt_level="1", debug_level="0"  # -O2: 1-2 per cent fewer instructions, half again the build
    ),
    script_args=["build_ext", *args],
)
"""


def source_digest() -> str:
    """What a build is made of: the settings, which modules, and every source."""
    settings = "\0".join([MYPY_CONFIG, _BUILD, _mypy_version(), *MODULES])
    digest = hashlib.sha256(settings.encode())
    # Every module is type-checked with the ones it imports: a change to any of the
    # package's sources may change the code generated for the compiled ones.
    for path in sorted((ROOT / "sidecar").rglob("*.py")):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _mypy_version() -> str:
    """The compiler is part of what a build is made of (none installed: no build)."""
    try:
        return importlib.metadata.version("mypy")
    except importlib.metadata.PackageNotFoundError:
        return "none"


def compile_modules(target: Path) -> list[Path]:
    """Run mypyc and setuptools' build_ext in a child process, in a scratch directory
    (so no setuptools reads this project's pyproject.toml); the files made go under
    ``target`` as they lie in a wheel. Returns them, relative to ``target``."""
    with tempfile.TemporaryDirectory(prefix="sidecar-native-") as scratch:
        work = Path(scratch)
        (work / "mypy.ini").write_text(MYPY_CONFIG)
        jobs = str(len(os.sched_getaffinity(0)))
        built = subprocess.run(
            [
                sys.executable,
                "-c",
                _BUILD % GROUP,
                str(work / "mypy.ini"),
                str(work / "c"),
                "--build-lib",
                str(work / "lib"),
                "--build-temp",
                str(work / "temp"),
                "--parallel",
                jobs,
            ],
            input="\n".join(str(ROOT / module) for module in MODULES),
            text=True,
            cwd=work,
            check=False,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        if built.returncode != 0:
            # mypyc's type errors and the compiler's are in what it printed.
            raise SystemExit(f"{built.stdout}\nmypyc failed to compile the sidecar (above)")
        traverses, doubled = scan_traverses(work / "c")
        if not traverses:  # never seen with mypy 2.4; a later one may write them otherwise
            print("build_native: no tp_traverse found in mypyc's C; not scanned", file=sys.stderr)
        if doubled:
            raise SystemExit(
                "mypyc generated a garbage-collector traverse that visits an attribute "
                f"twice ({', '.join(doubled)}): the collector would free objects still in "
                "use. Is an attribute a base class declares annotated again in a subclass?"
            )
        made = sorted(p.relative_to(work / "lib") for p in (work / "lib").rglob("*.so"))
        for path in made:
            (target / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(work / "lib" / path, target / path)
    return made


_TRAVERSE = re.compile(r"^(\w+)_traverse\(.*?\)\n\{\n(.*?)^\}", re.M | re.S)
_VISIT = re.compile(r"Py_VISIT\(self->(\w+)\);")


def scan_traverses(generated: Path) -> tuple[int, list[str]]:
    """How many ``tp_traverse`` functions mypyc generated, and ``Class.field`` for each
    attribute that one of them visits more than once. Each visit stands for one
    reference the object holds: a second one makes the collector think a reference
    from outside is the object's own, and free what that outside reference keeps
    alive (mypyc 2.4 does it when a subclass annotates an attribute that its base
    declares)."""
    found: list[str] = []
    traverses = 0
    for source in sorted(generated.rglob("*.c")):
        for match in _TRAVERSE.finditer(source.read_text()):
            traverses += 1
            fields = _VISIT.findall(match.group(2))
            found += sorted({f"{match.group(1)}.{f}" for f in fields if fields.count(f) > 1})
    return traverses, found


def built_in_place() -> list[Path]:
    return sorted([*ROOT.glob(f"{GROUP}__mypyc*"), *(ROOT / "sidecar").rglob("*.so")])


def clean() -> None:
    for path in built_in_place():
        path.unlink()
    STAMP.unlink(missing_ok=True)


def build_in_place() -> None:
    clean()
    digest = source_digest()
    compile_modules(ROOT)
    STAMP.parent.mkdir(exist_ok=True)
    STAMP.write_text(digest + "\n")


def stale() -> str | None:
    """Why the in-place build does not match the sources, or None (none, or current)."""
    if not built_in_place():
        return None  # pure Python: nothing to go stale
    if not STAMP.exists() or STAMP.read_text().strip() != source_digest():
        return "the sources changed since the compiled modules were built"
    return None


def main(argv: list[str]) -> int:
    if argv == ["--inplace"]:
        build_in_place()
        return 0
    if argv == ["--ensure"]:  # a current build, made now if there is none
        if not (built_in_place() and stale() is None):
            build_in_place()
        return 0
    if argv == ["--clean"]:
        clean()
        return 0
    if argv == ["--check"]:
        reason = stale()
        if reason:
            print(f"{reason}: run `python build_native.py --inplace` (or --clean)")
            return 1
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
