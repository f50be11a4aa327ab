"""A config compiled for serving: every file it names read and checked, once.

``check-config``, ``run`` and a reload all go through ``load_plan``, so a config that
checks valid is one that starts: the same code reads the schemas, baselines and JWT
keys, and checks that log files can be written, listener ports make sense and
optional extras are installed. Every problem is a ``ConfigIssue`` with its key path.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import orjson

from sidecar.config.baselines import Baseline
from sidecar.config.schema import Config, ConfigError, ConfigIssue, LoadedConfig, load_config
from sidecar.config.schemas import CompiledSchema, SchemaError, load_schema


@dataclass(frozen=True, slots=True)
class Plan:
    """A validated config and everything read from the files it names."""

    loaded: LoadedConfig
    schemas: Mapping[str, CompiledSchema]  # by route name
    baselines: Mapping[str, Baseline | None]  # by route name; None: to be frozen
    jwt_public_key: str | None

    @property
    def config(self) -> Config:
        return self.loaded.config


def load_plan(
    path: str | Path, *, env: Mapping[str, str] | None = None, data: bytes | None = None
) -> Plan:
    """Read, validate and compile a config file (``data``: its bytes, read before).
    Raises ``ConfigError`` listing every problem found (the file's own, then those of
    the files and places it names)."""
    return compile_plan(load_config(path, env=env, data=data))


def compile_plan(loaded: LoadedConfig) -> Plan:
    issues: list[ConfigIssue] = []
    schemas: dict[str, CompiledSchema] = {}
    baselines: dict[str, Baseline | None] = {}
    config = loaded.config
    for index, route in enumerate(config.routes):
        if route.validate_ is not None and route.validate_.schema_file is not None:
            try:
                schemas[route.name] = load_schema(loaded.resolve(route.validate_.schema_file))
            except SchemaError as exc:
                issues.append(ConfigIssue(f"routes[{index}].validate.schema", str(exc)))
        if route.drift is not None:
            where = f"routes[{index}].drift.baseline"
            path = loaded.resolve(route.drift.baseline)
            if path.exists() or route.drift.freeze_after is None:
                try:
                    baselines[route.name] = _read_baseline(path)
                except ValueError as exc:
                    issues.append(ConfigIssue(where, str(exc)))
            else:
                baselines[route.name] = None
                issues += _writable(where, path)
    public_key: str | None = None
    jwt_settings = config.auth.jwt
    if config.auth.enabled and jwt_settings is not None and jwt_settings.public_key is not None:
        try:
            public_key = _read_public_key(jwt_settings.public_key, loaded)
        except ValueError as exc:
            issues.append(ConfigIssue("auth.jwt.public_key", str(exc)))
    issues += _log_issues(loaded)
    issues += _listener_issues(config)
    issues += _extra_issues(config)
    if issues:
        raise ConfigError(str(loaded.path), issues)
    return Plan(loaded, schemas, baselines, public_key)


def _read_baseline(path: Path) -> Baseline:
    try:
        return Baseline.load(path)
    except FileNotFoundError:
        raise ValueError(
            f"no such file: {path} (build one with `sidecar baseline`, "
            "or set freeze_after to freeze one from live traffic)"
        ) from None
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        detail = f"missing {exc}" if isinstance(exc, KeyError) else str(exc).split("\n", 1)[0]
        raise ValueError(f"{path} is not a drift baseline: {detail}") from None


def _read_public_key(value: str, loaded: LoadedConfig) -> str:
    """PEM text in the config, or a file (relative to the config's folder)."""
    if "-----BEGIN" in value:
        text, where = value, "the PEM text"
    else:
        path = loaded.resolve(value)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ValueError(f"cannot read {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ValueError(f"{path} is not a PEM text file") from None
        where = str(path)
    import jwt  # only for configs with JWT keys: it loads cryptography (9 MB)

    try:
        jwt.algorithms.RSAAlgorithm(jwt.algorithms.RSAAlgorithm.SHA256).prepare_key(text)
    except (jwt.InvalidKeyError, ValueError, TypeError) as exc:
        raise ValueError(f"{where} is not an RSA public key in PEM form ({exc})") from None
    return text


def _writable(where: str, path: Path) -> Iterator[ConfigIssue]:
    """A file the sidecar will create or append to: it, or the nearest folder that
    exists on its way, must be writable. Permission bits are not enough (root passes
    every ``os.access`` check, yet cannot write under /proc or /sys): a file is
    opened for appending, as the log does, else a scratch entry is made and removed
    where the file or its first missing folder would go."""
    if path.is_dir():
        yield ConfigIssue(where, f"{path} is a directory, not a file")
        return
    if path.exists():
        if not os.access(path, os.W_OK):
            yield ConfigIssue(where, f"{path} is not writable by this user")
            return
        if not path.is_file():
            return  # a pipe or a device: opened, it could wait for a reader
        try:
            with path.open("ab") as file:  # appends nothing, changes nothing
                file.tell()
        except OSError as exc:
            yield ConfigIssue(where, f"cannot open {path}: {exc.strerror}")
        return
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        yield ConfigIssue(where, f"cannot create {path}: {folder} is not writable by this user")
        return
    try:
        if folder == path.parent:
            handle, scratch = tempfile.mkstemp(prefix=".sidecar-check-", dir=folder)
            os.close(handle)
            os.unlink(scratch)
        else:
            os.rmdir(tempfile.mkdtemp(prefix=".sidecar-check-", dir=folder))
    except OSError as exc:
        yield ConfigIssue(where, f"cannot create {path}: {exc.strerror} (in {folder})")


def _log_issues(loaded: LoadedConfig) -> Iterator[ConfigIssue]:
    logging = loaded.config.logging
    if logging.access_log.enabled and logging.access_log.path != "-":
        yield from _writable("logging.access_log.path", loaded.resolve(logging.access_log.path))
    for name, settings in (
        ("payload_log", logging.payload_log),
        ("shadow_log", logging.shadow_log),
    ):
        if settings is not None:
            yield from _writable(f"logging.{name}.path", loaded.resolve(settings.path))


def _listener_issues(config: Config) -> Iterator[ConfigIssue]:
    listeners = [("listen", config.listen.host, config.listen.port)]
    if config.admin.enabled:
        listeners.append(("admin", config.admin.host, config.admin.port))
    for key, host, port in listeners:
        try:
            socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except (OSError, UnicodeError):
            yield ConfigIssue(f"{key}.host", f"{host!r} is not an address of this machine")
        if 0 < port < 1024 and hasattr(os, "geteuid") and os.geteuid() != 0:
            yield ConfigIssue(
                f"{key}.port", f"port {port} needs root; use 1024 or above (the image uses 8080)"
            )


def _extra_issues(config: Config) -> Iterator[ConfigIssue]:
    if config.shared_state is not None and importlib.util.find_spec("redis") is None:
        yield ConfigIssue(
            "shared_state",
            "needs the redis extra, which is not installed: pip install 'sidecar[redis]'",
        )
