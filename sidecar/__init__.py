"""sidecar: a reverse proxy that gives an ML model server what production needs."""

__version__ = "0.1.0"


def compiled() -> bool:
    """Whether the request path runs compiled by mypyc (a wheel built with a C
    compiler), rather than interpreted (SIDECAR_PURE_PYTHON=1, or an editable install
    not built in place: build_native.py)."""
    from sidecar.http import server

    return not server.__file__.endswith(".py")
