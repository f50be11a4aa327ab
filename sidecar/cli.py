"""The ``sidecar`` command.

Exit codes: 0 done; 1 a command's input is wrong (``check-config`` found errors, a
file to read is missing); 2 ``run`` or ``demo`` could not start (each reason on one
line, naming its config key or flag: never a traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import sidecar
from sidecar import __version__
from sidecar.config.schema import (
    ConfigError,
    LoadedConfig,
    default_config_path,
    render_effective,
)

EXIT_INPUT = 1
EXIT_CANNOT_START = 2


def _workers(value: str) -> int:
    """``--workers N`` or ``auto`` (the CPUs this container may use)."""
    if value == "auto":
        from sidecar.control.workers import available_cpus

        return available_cpus()
    try:
        count = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError("a number of workers, or 'auto'") from None
    if count < 1:
        raise argparse.ArgumentTypeError("at least 1")
    return count


def _seconds(value: str) -> float:
    """``--timeout``: a finite number of seconds above zero (the socket refuses others)."""
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError("a number of seconds") from None
    if not 0 < seconds < 1e9:  # NaN fails too
        raise argparse.ArgumentTypeError("more than 0 seconds, and finite")
    return seconds


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sidecar",
        description="A reverse proxy that gives an ML model server what production needs.",
    )
    parser.add_argument("--version", action="version", version=f"sidecar {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="serve with a config file")
    run.add_argument(
        "--config",
        metavar="PATH",
        help="the deployment's YAML file "
        "(default: $SIDECAR_CONFIG, else /etc/sidecar/sidecar.yaml)",
    )
    run.add_argument(
        "--workers",
        type=_workers,
        default=1,
        metavar="N",
        help="worker processes sharing the port (SO_REUSEPORT): a number, or 'auto' for "
        "one per CPU this container may use (its cgroup quota); default 1",
    )
    # Set by the supervisor for its workers: the ports it reserved.
    run.add_argument("--worker-port", type=int, help=argparse.SUPPRESS)
    run.add_argument("--worker-admin-port", type=int, help=argparse.SUPPRESS)
    run.add_argument("--supervisor-pid", type=int, help=argparse.SUPPRESS)
    # The supervisor's copy of the config in service, read instead of the file (which
    # may have changed since, and is read again on reload).
    run.add_argument("--config-in-service", type=Path, help=argparse.SUPPRESS)

    check = commands.add_parser(
        "check-config",
        help="validate a config and everything it names; print it with secrets redacted "
        "(exit 1 on errors)",
    )
    check.add_argument("path", metavar="PATH")

    init = commands.add_parser(
        "init", help="write a commented starting config for a model server, checked on the spot"
    )
    init.add_argument("--upstream", required=True, metavar="URL", help="the model server's URL")
    init.add_argument(
        "--protocol",
        choices=["v2", "openai", "plain"],
        default="plain",
        help="v2: Open Inference Protocol (Triton, MLServer, KServe); openai: vLLM, "
        "llama.cpp and other OpenAI-style servers; plain: any JSON API (default)",
    )
    init.add_argument("--health-path", help="the model server's readiness path")
    init.add_argument("--port", type=int, default=8080, help="the sidecar's port (8080)")
    init.add_argument("--out", default="sidecar.yaml", help="where to write (sidecar.yaml)")
    init.add_argument("--force", action="store_true", help="overwrite an existing file")

    demo = commands.add_parser("demo", help="run a demo model server with the sidecar in front")
    demo.add_argument("--port", type=int, default=8080, help="the sidecar's port (8080)")
    demo.add_argument("--model-port", type=int, default=8081, help="the demo model's port (8081)")
    demo.add_argument("--shadow-port", type=int, default=8082, help="the candidate's port (8082)")
    demo.add_argument("--admin-port", type=int, default=9901, help="the admin port (9901)")
    demo.add_argument(
        "--log-dir", help="where the payload and shadow logs go (default: a new temporary folder)"
    )

    health = commands.add_parser(
        "healthcheck",
        help="exit 0 when the sidecar on this machine answers /livez (for a container "
        "HEALTHCHECK); the port comes from the config",
    )
    health.add_argument("--config", metavar="PATH", help="as for run")
    health.add_argument("--timeout", type=_seconds, default=2.0, help="seconds (2)")

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
    baseline.add_argument("--force", action="store_true", help="overwrite an existing file")

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


def _fail(command: str, message: str, code: int = EXIT_INPUT) -> int:
    print(f"sidecar {command}: {message}", file=sys.stderr)
    return code


def _cannot_start(command: str, exc: ConfigError) -> int:
    """One line per reason, each naming its key (or flag); exit 2."""
    for issue in exc.issues:
        where = "" if exc.source == f"sidecar {command}" else f"{exc.source}: "
        print(f"sidecar {command}: cannot start: {where}{issue}", file=sys.stderr)
    return EXIT_CANNOT_START


def _hash_key(args: argparse.Namespace) -> int:
    from sidecar.pipeline.auth import hash_key, new_key

    if args.generate:
        key = new_key()
        print(f"key:    {key}")
        print(f"digest: {hash_key(key)}")
        return 0
    # A line from a pipe or a Windows editor ends in "\r\n": neither is part of the key.
    key = args.key if args.key is not None else sys.stdin.readline().rstrip("\r\n")
    if not key:
        return _fail("hash-key", "no key given")
    print(hash_key(key))
    return 0


def _baseline(args: argparse.Namespace) -> int:
    from sidecar.analytics.drift import build_baseline, payload_pairs
    from sidecar.config.schema import load_config

    try:
        loaded = load_config(args.config)
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return EXIT_INPUT
    route = next((r for r in loaded.config.routes if r.name == args.route), None)
    if route is None or route.drift is None:
        return _fail("baseline", f"route {args.route!r} has no drift settings")
    out = Path(args.out) if args.out else loaded.resolve(route.drift.baseline)
    if out.exists() and not args.force:
        return _fail("baseline", f"{out} exists; pass --out FILE, or --force to replace it")
    try:
        with Path(args.payloads).open("rb") as lines:
            pairs = payload_pairs(lines, route.name, args.payloads)
            baseline = build_baseline(route.drift, pairs)
        out.write_bytes(baseline.to_json(route.name))
    except OSError as exc:
        return _fail("baseline", f"{exc.filename}: {exc.strerror}")
    except ValueError as exc:
        return _fail("baseline", str(exc).split("\n", 1)[0])
    signals = ", ".join(sorted(baseline.histograms))
    print(f"wrote {out}: {baseline.samples} responses; signals: {signals}")
    return 0


def _shadow_report(args: argparse.Namespace) -> int:
    import orjson

    from sidecar.tools.shadow_report import build_report, render_html, render_text

    try:
        with Path(args.file).open("rb") as lines:
            report = build_report(lines)
    except OSError as exc:
        return _fail("shadow-report", f"{exc.filename}: {exc.strerror}")
    except ValueError as exc:
        return _fail("shadow-report", f"{args.file}: {exc}")
    if args.json:
        print(orjson.dumps(report.summary()).decode())
    else:
        print(render_text(report), end="")
    if args.html:
        Path(args.html).write_text(render_html(report), encoding="utf-8")
    return 0


def _join_labels(args: argparse.Namespace) -> int:
    import orjson

    from sidecar.analytics.predictions import PredictionReader
    from sidecar.tools.labels import join, read_labels

    try:
        reader = PredictionReader.build(args.protocol, args.output, args.json_path)
        labels = read_labels(Path(args.labels))
        with Path(args.payloads).open("rb") as lines:
            report = join(lines, labels, reader, args.payloads)
    except OSError as exc:
        return _fail("join-labels", f"{exc.filename}: {exc.strerror}")
    except (ValueError, KeyError) as exc:
        return _fail("join-labels", str(exc))
    unreadable = report.unreadable
    if unreadable and not any(g.joined for g in report.groups.values()):
        return _fail(
            "join-labels",
            f"no prediction could be read from the {unreadable} labelled record(s): "
            "check --protocol, --output and --json-path against the logged responses",
        )
    rows = report.rows()
    if args.json:
        payload = {"rows": rows, "unlabelled": report.unlabelled, "unreadable": unreadable}
        print(orjson.dumps(payload).decode())
        return 0
    metric = "mae rmse" if report.regression else "accuracy"
    print(f"{'day':<10}  {'route':<16}  {'joined':>7}  {metric}")
    for row in rows:
        values = f"{row['mae']}  {row['rmse']}" if report.regression else f"{row['accuracy']}"
        print(f"{row['day']:<10}  {row['route']:<16}  {row['joined']:>7}  {values}")
    print(f"payload records without a label: {report.unlabelled}")
    if unreadable:
        print(f"labelled records whose prediction could not be read: {unreadable}")
    return 0


def _check_config(path: str) -> int:
    from sidecar.config.plan import load_plan

    try:
        plan = load_plan(path)
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return EXIT_INPUT
    print(f"# {path}: configuration is valid (sha256 {plan.loaded.sha256})")
    print(render_effective(plan.config), end="")
    return 0


def _run(args: argparse.Namespace) -> int:
    from sidecar.config.plan import load_plan
    from sidecar.control.server import run_event_loop, serve
    from sidecar.telemetry.logs import configure_logging

    path = args.config or default_config_path()
    try:
        data = args.config_in_service.read_bytes() if args.config_in_service else None
    except OSError as exc:  # the supervisor's folder is gone: it is stopping
        print(f"sidecar run: cannot start: the config in service: {exc.strerror}", file=sys.stderr)
        return EXIT_CANNOT_START
    try:
        plan = load_plan(path, data=data)
    except ConfigError as exc:
        return _cannot_start("run", exc)
    if args.workers > 1 and args.worker_port is None:
        from sidecar.control.workers import Supervisor

        try:
            supervisor = Supervisor(plan.loaded, args.workers)
        except ConfigError as exc:
            return _cannot_start("run", exc)
        return supervisor.run()
    configure_logging(plan.config.logging.level)
    try:
        if args.worker_port is not None:
            loaded = with_ports(plan.loaded, args.worker_port, args.worker_admin_port or 0)
            plan = dataclasses.replace(plan, loaded=loaded)
            run_event_loop(serve(plan, reuse_port=True, supervisor=args.supervisor_pid))
        else:
            run_event_loop(serve(plan))
    except ConfigError as exc:
        return _cannot_start("run", exc)
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
    from sidecar.control.server import run_event_loop
    from sidecar.demo.runner import DemoPorts, demo_log_dir, run_demo
    from sidecar.telemetry.logs import configure_logging

    configure_logging("info")
    ports = DemoPorts(args.port, args.model_port, args.shadow_port, args.admin_port)
    try:
        run_event_loop(run_demo(ports, demo_log_dir(args.log_dir)))
    except ConfigError as exc:
        return _cannot_start("demo", exc)
    return 0


def _init(args: argparse.Namespace) -> int:
    from sidecar.tools.starter import write_starting_config

    out = Path(args.out)
    if out.exists() and not args.force:
        return _fail("init", f"{out} exists; pass --force to replace it, or --out FILE")
    try:
        text = write_starting_config(
            out,
            upstream=args.upstream,
            protocol=args.protocol,
            port=args.port,
            health_path=args.health_path,
        )
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return EXIT_INPUT
    except OSError as exc:
        return _fail("init", f"{exc.filename}: {exc.strerror}")
    import yaml

    # Read the names as YAML reads them: a line's own comment is no part of its name.
    routes = [str(route["name"]) for route in yaml.safe_load(text)["routes"]]
    print(f"wrote {out} (valid; routes: {', '.join(routes)})")
    print(f"next: sidecar run --config {out}")
    return 0


def _healthcheck(args: argparse.Namespace) -> int:
    from sidecar.tools.healthcheck import check_livez

    problem = check_livez(args.config or default_config_path(), args.timeout)
    if problem is not None:
        return _fail("healthcheck", problem)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    stale = sidecar.stale_build()
    if stale:  # the compiled modules would run instead of the edited sources
        print(
            f"sidecar: {stale}: run `python build_native.py --inplace` (or --clean)",
            file=sys.stderr,
        )
        return 2
    handlers = {
        "check-config": lambda: _check_config(args.path),
        "run": lambda: _run(args),
        "demo": lambda: _demo(args),
        "init": lambda: _init(args),
        "healthcheck": lambda: _healthcheck(args),
        "hash-key": lambda: _hash_key(args),
        "baseline": lambda: _baseline(args),
        "shadow-report": lambda: _shadow_report(args),
        "join-labels": lambda: _join_labels(args),
    }
    try:
        return handlers[args.command]()
    except BrokenPipeError:
        # The reader left early (`sidecar check-config FILE | head`): what it wanted
        # was printed. Quietly, as a tool killed by SIGPIPE would be, not a traceback;
        # stdout goes to /dev/null so the interpreter's last flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
