"""Iris-like traffic for the demo, load tests and drift: realistic rows, optionally shifted.

python -m sidecar.demo.traffic baseline OUT   writes the demo's drift baseline
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

import orjson

from sidecar.analytics.drift import build_baseline
from sidecar.config.baselines import Baseline
from sidecar.config.schema import bundled_config_dir, load_config
from sidecar.demo.model import production_model, v2_response

# Per-class means and standard deviations of the classic iris measurements (cm).
_CLASSES = (
    ((5.01, 3.43, 1.46, 0.25), (0.35, 0.38, 0.17, 0.11)),
    ((5.94, 2.77, 4.26, 1.33), (0.52, 0.31, 0.47, 0.20)),
    ((6.59, 2.97, 5.55, 2.03), (0.64, 0.32, 0.55, 0.27)),
)


def iris_row(rng: random.Random, shift: float = 0.0) -> list[float]:
    """One flower; ``shift`` (cm) is added to the petal measurements to fake drift."""
    means, stds = _CLASSES[rng.randrange(3)]
    row = [max(0.1, rng.gauss(m, s)) for m, s in zip(means, stds, strict=True)]
    row[2] += shift
    row[3] += shift / 2
    return [round(v, 1) for v in row]


def v2_request(row: list[float]) -> dict[str, Any]:
    return {"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP32", "data": row}]}


def v2_request_bytes(row: list[float]) -> bytes:
    return orjson.dumps(v2_request(row))


def demo_baseline(samples: int = 3000, seed: int = 7) -> Baseline:
    """The bundled baseline of the demo's infer route, rebuilt deterministically."""
    loaded = load_config(bundled_config_dir() / "demo.yaml", env={})
    route = next(r for r in loaded.config.routes if r.name == "infer")
    assert route.drift is not None
    rng = random.Random(seed)
    model = production_model()
    pairs = []
    for _ in range(samples):
        row = iris_row(rng)
        pairs.append((v2_request(row), v2_response(model, [row])))
    return build_baseline(route.drift, pairs)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "baseline":
        print(__doc__, file=sys.stderr)
        return 2
    Path(argv[1]).write_bytes(demo_baseline().to_json("infer"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
