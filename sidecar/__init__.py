"""sidecar: a reverse proxy that gives an ML model server what production needs."""

__version__ = "0.1.0"


def compiled() -> bool:
    """Whether the request path runs compiled by mypyc (a wheel built with a C
    compiler), rather than interpreted (SIDECAR_PURE_PYTHON=1, or an editable install
    not built in place: build_native.py)."""
    from sidecar.http import server

    return not server.__file__.endswith(".py")


def stale_build() -> str | None:
    """Why modules compiled in place (a source checkout, ``build_native.py
    --inplace``) are older than the sources beside them, which they would shadow; None
    for an installed wheel, for sources never compiled and for a current build."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "build_native.py"
    if not script.exists():
        return None  # installed: a wheel's modules were built from its own sources
    spec = importlib.util.spec_from_file_location("build_native", script)
    if spec is None or spec.loader is None:
        return None
    native = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(native)
    reason: str | None = native.stale()
    return reason
