"""The ``sidecar`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from sidecar import __version__
from sidecar.config import ConfigError, load_config, render_effective


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sidecar",
        description="A reverse proxy that gives an ML model server what production needs.",
    )
    parser.add_argument("--version", action="version", version=f"sidecar {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="serve with a config file")
    run.add_argument("--config", required=True, metavar="PATH", help="the deployment's YAML file")

    check = commands.add_parser(
        "check-config", help="validate a config; print it with secrets redacted (exit 1 on errors)"
    )
    check.add_argument("path", metavar="PATH")

    demo = commands.add_parser("demo", help="run a demo model server with the sidecar in front")
    demo.add_argument("--port", type=int, default=8080, help="the sidecar's port (8080)")
    demo.add_argument("--model-port", type=int, default=8081, help="the demo model's port (8081)")
    demo.add_argument("--shadow-port", type=int, default=8082, help="the candidate's port (8082)")
    demo.add_argument("--admin-port", type=int, default=9901, help="the admin port (9901)")
    return parser


def _check_config(path: str) -> int:
    try:
        loaded = load_config(path)
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return 1
    print(f"# {path}: configuration is valid (sha256 {loaded.sha256})")
    print(render_effective(loaded.config), end="")
    return 0


def _run(path: str) -> int:
    from sidecar.logs import configure_logging
    from sidecar.server import run_event_loop, serve

    try:
        loaded = load_config(path)
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return 1
    configure_logging(loaded.config.logging.level)
    run_event_loop(serve(loaded))
    return 0


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
        return _run(args.config)
    if args.command == "demo":
        return _demo(args)
    raise AssertionError(f"unhandled command {args.command}")  # argparse prevents this
