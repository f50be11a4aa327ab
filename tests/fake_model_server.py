"""The demo's iris model (Open Inference Protocol V2) on a port, for documented
commands that point the sidecar at a model server of their own.

    python tests/fake_model_server.py PORT
"""

from __future__ import annotations

import sys

from aiohttp import web

from sidecar.demo.model import build_model_app

if __name__ == "__main__":
    web.run_app(build_model_app(), host="127.0.0.1", port=int(sys.argv[1]), print=None)
