"""The ``sidecar`` command."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

from sidecar import __version__
from sidecar.config import ConfigError, LoadedConfig, load_config, render_effective


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sidecar",
        description="A reverse proxy that gives an ML model server what production needs.",
    )
    parser.add_argument("--version", action="version", version=f"sidecar {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="serve with a config file")
    run.add_argument("--config", required=True, metavar="PATH", help="the deployment's YAML file")
    run.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="worker processes sharing the port (SO_REUSEPORT); default 1",
    )
    # Set by the supervisor for its workers: the ports it reserved.
    run.add_argument("--worker-port", type=int, help=argparse.SUPPRESS)
    run.add_argument("--worker-admin-port", type=int, help=argparse.SUPPRESS)

    check = commands.add_parser(
        "check-config", help="validate a config; print it with secrets redacted (exit 1 on errors)"
    )
    check.add_argument("path", metavar="PATH")

    demo = commands.add_parser("demo", help="run a demo model server with the sidecar in front")
    demo.add_argument("--port", type=int, default=8080, help="the sidecar's port (8080)")
    demo.add_argument("--model-port", type=int, default=8081, help="the demo model's port (8081)")
    demo.add_argument("--shadow-port", type=int, default=8082, help="the candidate's port (8082)")
    demo.add_argument("--admin-port", type=int, default=9901, help="the admin port (9901)")

    hash_key = commands.add_parser(
        "hash-key", help="print the digest of an API key, to store in the config"
    )
    hash_key.add_argument("key", nargs="?", help="the key (default: read one line from stdin)")
    hash_key.add_argument("--generate", action="store_true", help="make a new random key")

    baseline = commands.add_parser(
        "baseline", help="build a drift baseline for a route from a payload log"
    )
    baseline.add_argument("--config", required=True, metavar="PATH")
    baseline.add_argument("--route", required=True, help="the route whose drift settings apply")
    baseline.add_argument("--payloads", required=True, metavar="FILE", help="a payload log")
    baseline.add_argument("--out", metavar="FILE", help="default: the route's drift.baseline")

    report = commands.add_parser(
        "shadow-report", help="summarise a shadow comparison log (agreement, latency, diffs)"
    )
    report.add_argument("file", metavar="FILE", help="the shadow comparison log (JSON lines)")
    report.add_argument("--html", metavar="OUT", help="also write a self-contained HTML page")
    report.add_argument("--json", action="store_true", help="print JSON instead of text")

    labels = commands.add_parser(
        "join-labels", help="join a payload log with ground-truth labels: accuracy or error"
    )
    labels.add_argument("--payloads", required=True, metavar="FILE")
    labels.add_argument("--labels", required=True, metavar="FILE", help="CSV or JSON lines")
    labels.add_argument("--protocol", default="v2", choices=["v2", "v1", "openai", "json_path"])
    labels.add_argument("--output", help="V2: the output tensor holding the prediction")
    labels.add_argument("--json-path", help="with --protocol json_path: where the prediction is")
    labels.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def _hash_key(args: argparse.Namespace) -> int:
    from sidecar.auth import hash_key, new_key

    if args.generate:
        key = new_key()
        print(f"key:    {key}")
        print(f"digest: {hash_key(key)}")
        return 0
    key = args.key if args.key is not None else sys.stdin.readline().rstrip("\n")
    if not key:
        print("sidecar hash-key: no key given", file=sys.stderr)
        return 1
    print(hash_key(key))
    return 0


def _baseline(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sidecar.drift import build_baseline, payload_pairs

    try:
        loaded = load_config(args.config)
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return 1
    route = next((r for r in loaded.config.routes if r.name == args.route), None)
    if route is None or route.drift is None:
        print(f"sidecar baseline: route {args.route!r} has no drift settings", file=sys.stderr)
        return 1
    with Path(args.payloads).open("rb") as lines:
        try:
            baseline = build_baseline(route.drift, payload_pairs(lines, route.name))
        except ValueError as exc:
            print(f"sidecar baseline: {exc}", file=sys.stderr)
            return 1
    out = Path(args.out) if args.out else loaded.resolve(route.drift.baseline)
    out.write_bytes(baseline.to_json(route.name))
    signals = ", ".join(sorted(baseline.histograms))
    print(f"wrote {out}: {baseline.samples} responses; signals: {signals}")
    return 0


def _shadow_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    import orjson

    from sidecar.shadow_report import build_report, render_html, render_text

    try:
        with Path(args.file).open("rb") as lines:
            report = build_report(lines)
    except (OSError, ValueError) as exc:
        print(f"sidecar shadow-report: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(orjson.dumps(report.summary()).decode())
    else:
        print(render_text(report), end="")
    if args.html:
        Path(args.html).write_text(render_html(report), encoding="utf-8")
    return 0


def _join_labels(args: argparse.Namespace) -> int:
    from pathlib import Path

    import orjson

    from sidecar.labels import join, read_labels
    from sidecar.predictions import PredictionReader

    try:
        reader = PredictionReader.build(args.protocol, args.output, args.json_path)
        labels = read_labels(Path(args.labels))
        with Path(args.payloads).open("rb") as lines:
            report = join(lines, labels, reader)
    except (OSError, ValueError, KeyError) as exc:
        print(f"sidecar join-labels: {exc}", file=sys.stderr)
        return 1
    rows = report.rows()
    if args.json:
        print(orjson.dumps({"rows": rows, "unlabelled": report.unlabelled}).decode())
        return 0
    metric = "mae rmse" if report.regression else "accuracy"
    print(f"{'day':<10}  {'route':<16}  {'joined':>7}  {metric}")
    for row in rows:
        values = f"{row['mae']}  {row['rmse']}" if report.regression else f"{row['accuracy']}"
        print(f"{row['day']:<10}  {row['route']:<16}  {row['joined']:>7}  {values}")
    print(f"payload records without a label: {report.unlabelled}")
    return 0


def _check_config(path: str) -> int:
    try:
        loaded = load_config(path)
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return 1
    print(f"# {path}: configuration is valid (sha256 {loaded.sha256})")
    print(render_effective(loaded.config), end="")
    return 0


def _run(args: argparse.Namespace) -> int:
    from sidecar.logs import configure_logging
    from sidecar.server import run_event_loop, serve

    try:
        loaded = load_config(args.config)
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return 1
    if args.workers < 1:
        print("sidecar run: --workers must be at least 1", file=sys.stderr)
        return 1
    if args.workers > 1:
        from sidecar.workers import Supervisor

        return Supervisor(loaded, args.workers).run()
    configure_logging(loaded.config.logging.level)
    if args.worker_port is not None:
        loaded = with_ports(loaded, args.worker_port, args.worker_admin_port or 0)
        run_event_loop(serve(loaded, reuse_port=True, worker=True))
    else:
        run_event_loop(serve(loaded))
    return 0


def with_ports(loaded: LoadedConfig, port: int, admin_port: int) -> LoadedConfig:
    """The config with the listener ports a worker supervisor reserved."""
    config = loaded.config
    updated = config.model_copy(
        update={
            "listen": config.listen.model_copy(update={"port": port}),
            "admin": config.admin.model_copy(update={"port": admin_port}),
        }
    )
    return dataclasses.replace(loaded, config=updated)


def _demo(args: argparse.Namespace) -> int:
    from sidecar.demo.runner import DemoPorts, run_demo
    from sidecar.logs import configure_logging
    from sidecar.server import run_event_loop

    configure_logging("info")
    ports = DemoPorts(args.port, args.model_port, args.shadow_port, args.admin_port)
    try:
        run_event_loop(run_demo(ports))
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"sidecar demo: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check-config":
        return _check_config(args.path)
    if args.command == "run":
        return _run(args)
    if args.command == "demo":
        return _demo(args)
    if args.command == "hash-key":
        return _hash_key(args)
    if args.command == "baseline":
        return _baseline(args)
    if args.command == "shadow-report":
        return _shadow_report(args)
    if args.command == "join-labels":
        return _join_labels(args)
    raise AssertionError(f"unhandled command {args.command}")  # argparse prevents this
