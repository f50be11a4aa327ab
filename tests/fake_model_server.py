"""The demo's iris model (Open Inference Protocol V2) on a port, for documented
commands that point the sidecar at a model server of their own.

    python tests/fake_model_server.py PORT
"""

from __future__ import annotations

import asyncio
import sys

from sidecar.demo.model import serve

if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1])))
