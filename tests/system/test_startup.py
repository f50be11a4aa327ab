"""Valid means it will start: check-config checks what run needs, and run (or demo)
turns every start-up failure into one line naming the problem and its key, exit 2."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from sidecar.pipeline.auth import hash_key
from tests.conftest import LOOPBACK, base_config, closed_port, run_cli

cli = run_cli


def write_config(tmp_path: Path, config: dict[str, Any], name: str = "sidecar.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


def assert_one_line_each(result: subprocess.CompletedProcess[str], *expected: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == len(expected), result.stderr
    for line, text in zip(lines, expected, strict=True):
        assert text in line, (line, text)
    assert "Traceback" not in result.stderr + result.stdout
    assert "Unclosed" not in result.stderr + result.stdout


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_a_busy_port_is_one_line_naming_the_key(tmp_path: Path, busy_port: int) -> None:
    config = base_config(f"http://{LOOPBACK}:{closed_port()}")
    config["listen"]["port"] = busy_port
    result = cli("run", "--config", str(write_config(tmp_path, config)))
    assert result.returncode == 2
    assert_one_line_each(
        result, f"listen.port: cannot listen on {LOOPBACK}:{busy_port}: address already in use"
    )


def test_a_busy_admin_port_is_named_too(tmp_path: Path, busy_port: int) -> None:
    config = base_config(f"http://{LOOPBACK}:{closed_port()}")
    config["admin"]["port"] = busy_port
    result = cli("run", "--config", str(write_config(tmp_path, config)))
    assert result.returncode == 2
    assert_one_line_each(result, f"admin.port: cannot listen on {LOOPBACK}:{busy_port}")


def test_the_demo_on_a_busy_port_names_its_flag(tmp_path: Path, busy_port: int) -> None:
    free = ["--model-port", "0", "--shadow-port", "0", "--admin-port", "0"]
    result = cli("demo", "--port", str(busy_port), *free, "--log-dir", str(tmp_path))
    assert result.returncode == 2
    assert_one_line_each(result, f"--port: cannot listen on 127.0.0.1:{busy_port}")


def test_an_admin_port_taken_by_a_wildcard_listener_is_a_config_error() -> None:
    from sidecar.config.schema import ConfigError, parse_config

    text = yaml.safe_dump(
        {
            **base_config("http://127.0.0.1:1"),
            "listen": {"host": "0.0.0.0", "port": 8080},
            "admin": {"host": "127.0.0.1", "port": 8080},
        }
    )
    with pytest.raises(ConfigError) as caught:
        parse_config(text, source="t", env={})
    assert [str(i) for i in caught.value.issues] == [
        "admin.port: the admin listener needs a port of its own"
    ]


def broken_file_configs(tmp_path: Path) -> dict[str, tuple[dict[str, Any], str]]:
    """Configs whose text is valid but that name a file or place that is not."""
    upstream = f"http://{LOOPBACK}:{closed_port()}"
    not_a_folder = tmp_path / "plain-file"
    not_a_folder.write_text("x")
    (tmp_path / "bad-baseline.json").write_text('{"histograms": ')
    (tmp_path / "not-a-key.pem").write_text("-----BEGIN PUBLIC KEY-----\nnope\n")

    jwt = base_config(upstream)
    jwt["auth"] = {"enabled": True, "jwt": {"algorithms": ["RS256"], "public_key": "absent.pem"}}
    bad_key = base_config(upstream)
    bad_key["auth"] = {
        "enabled": True,
        "jwt": {"algorithms": ["RS256"], "public_key": "not-a-key.pem"},
    }
    baseline = base_config(upstream)
    baseline["routes"][0]["drift"] = {"baseline": "bad-baseline.json"}
    access = base_config(upstream)
    access["logging"] = {"access_log": {"path": str(not_a_folder / "access.jsonl")}}
    payload = base_config(upstream)
    payload["logging"] = {"payload_log": {"path": str(tmp_path)}}  # a folder, not a file
    host = base_config(upstream)
    host["listen"]["host"] = "no-such-host.invalid"
    # Root passes every permission check, yet cannot write there: check-config
    # passed and run failed.
    under_proc = base_config(upstream)
    under_proc["logging"] = {"access_log": {"path": "/proc/sidecar-logs/access.jsonl"}}
    proc_file = base_config(upstream)
    proc_file["logging"] = {"payload_log": {"path": "/proc/version"}}
    under_sys = base_config(upstream)
    under_sys["routes"][0]["drift"] = {"baseline": "/sys/baseline.json", "freeze_after": 100}
    return {
        "missing jwt key": (jwt, "auth.jwt.public_key: cannot read"),
        "not a key": (bad_key, "auth.jwt.public_key:"),
        "malformed baseline": (baseline, "routes[0].drift.baseline:"),
        "log under a file": (access, "logging.access_log.path: cannot create"),
        "log is a folder": (payload, "logging.payload_log.path:"),
        "unknown host": (host, "listen.host: 'no-such-host.invalid' is not an address"),
        "log under /proc": (under_proc, "logging.access_log.path: cannot"),
        "log is a /proc file": (proc_file, "logging.payload_log.path: "),
        "baseline to freeze under /sys": (under_sys, "routes[0].drift.baseline: cannot"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing jwt key",
        "not a key",
        "malformed baseline",
        "log under a file",
        "log is a folder",
        "unknown host",
        "log under /proc",
        "log is a /proc file",
        "baseline to freeze under /sys",
    ],
)
def test_check_config_finds_what_would_stop_run(tmp_path: Path, case: str) -> None:
    config, expected = broken_file_configs(tmp_path)[case]
    path = write_config(tmp_path, config)
    checked = cli("check-config", str(path))
    assert checked.returncode == 1
    assert expected in checked.stderr
    assert "Traceback" not in checked.stderr
    ran = cli("run", "--config", str(path))
    assert ran.returncode == 2
    assert_one_line_each(ran, expected)


def test_a_reader_that_leaves_early_gets_no_traceback(tmp_path: Path) -> None:
    """`sidecar check-config FILE | head`: a reader gone before the effective config
    is printed ended the command in a BrokenPipeError traceback. It now ends quietly,
    with the status of a tool that SIGPIPE stopped (128 + 13)."""
    path = write_config(tmp_path, base_config(f"http://{LOOPBACK}:{closed_port()}"))
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has left before a byte is written
    try:
        done = subprocess.run(
            [sys.executable, "-m", "sidecar", "check-config", str(path)],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)
    assert done.stderr == ""
    assert done.returncode == 141


def test_hash_key_ignores_the_line_ending_of_a_piped_key() -> None:
    for line in ("s3cret\n", "s3cret\r\n"):
        result = cli("hash-key", stdin=line)
        assert result.stdout.strip() == hash_key("s3cret"), repr(line)


def test_baseline_without_its_payload_file_is_one_line(tmp_path: Path) -> None:
    config = base_config("http://127.0.0.1:1")
    config["routes"][0]["drift"] = {"baseline": "b.json", "freeze_after": 100}
    path = write_config(tmp_path, config)
    result = cli(
        "baseline",
        "--config",
        str(path),
        "--route",
        "all",
        "--payloads",
        "absent.jsonl",
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert_one_line_each(result, "sidecar baseline: absent.jsonl: No such file or directory")


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        (b"[1]", "p.jsonl line 2: not a JSON object"),
        (b'{"route": "all", "status": 200}', "p.jsonl line 2: no request or response"),
        (b"{bad", "p.jsonl line 2: not JSON"),
    ],
)
def test_baseline_names_a_payload_record_of_another_shape_in_one_line(
    tmp_path: Path, line: bytes, problem: str
) -> None:
    # A line that was not a JSON object, or a record without its bodies, ended the
    # command with a Python traceback; a line that was not JSON was not named.
    config = base_config("http://127.0.0.1:1")
    config["routes"][0]["drift"] = {"protocol": "v1", "baseline": "b.json"}
    good = {"route": "all", "status": 200, "request": {}, "response": {"predictions": [1]}}
    (tmp_path / "p.jsonl").write_bytes(orjson.dumps(good) + b"\n" + line + b"\n")
    path = write_config(tmp_path, config)
    result = cli(
        "baseline", "--config", str(path), "--route", "all", "--payloads", "p.jsonl", cwd=tmp_path
    )
    assert result.returncode == 1
    assert_one_line_each(result, f"sidecar baseline: {problem}")
    assert not (tmp_path / "b.json").exists()


def test_baseline_never_overwrites_a_file_unasked(tmp_path: Path) -> None:
    config = base_config("http://127.0.0.1:1")
    config["routes"][0]["drift"] = {"baseline": "b.json"}
    (tmp_path / "b.json").write_text("keep me")
    (tmp_path / "p.jsonl").write_text("")
    path = write_config(tmp_path, config)
    result = cli(
        "baseline", "--config", str(path), "--route", "all", "--payloads", "p.jsonl", cwd=tmp_path
    )
    assert result.returncode == 1
    assert "exists; pass --out FILE, or --force" in result.stderr
    assert (tmp_path / "b.json").read_text() == "keep me"


def test_join_labels_with_a_wrong_output_says_so_and_fails(tmp_path: Path) -> None:
    record = {
        "timestamp": "2026-11-01T10:00:00Z",
        "request_id": "r1",
        "route": "infer",
        "status": 200,
        "request": {},
        "response": {"outputs": [{"name": "label", "data": [1]}]},
    }
    (tmp_path / "p.jsonl").write_bytes(orjson.dumps(record) + b"\n")
    (tmp_path / "l.csv").write_text("request_id,label\nr1,1\n")
    args = ["join-labels", "--payloads", "p.jsonl", "--labels", "l.csv"]
    wrong = cli(*args, "--output", "no-such-output", cwd=tmp_path)
    assert wrong.returncode == 1
    assert "no prediction could be read from the 1 labelled record(s)" in wrong.stderr
    right = cli(*args, "--output", "label", cwd=tmp_path)
    assert right.returncode == 0, right.stderr
    assert "infer" in right.stdout
    assert "1.0" in right.stdout


@pytest.mark.parametrize(
    ("payloads", "labels", "problem"),
    [
        (
            b'{"request_id": "r1"}\n[1]\n',
            "request_id,label\nr1,1\n",
            "p.jsonl line 2: not a JSON object",
        ),
        (b'{"request_id": ["r1"]}\n', "request_id,label\nr1,1\n", None),
        (b"", '{"request_id": "r1", "label": 1}\n[1]\n', "l.jsonl line 2: not a JSON object"),
        (b"", '{"request_id": "r1", "label": 1}\n{"label": 2}\n', "l.jsonl line 2: needs"),
        (b"", "request_id,label\nr1,1\nr2\n", "l.jsonl line 3: no label"),
    ],
)
def test_join_labels_names_a_record_of_another_shape_in_one_line(
    tmp_path: Path, payloads: bytes, labels: str, problem: str | None
) -> None:
    # Records that were not JSON objects, a CSV row without its label, or a request id
    # that was not a string ended the command with a Python traceback; a label line
    # without its request id was reported as "'request_id'".
    (tmp_path / "p.jsonl").write_bytes(payloads)
    (tmp_path / "l.jsonl").write_text(labels)
    result = cli("join-labels", "--payloads", "p.jsonl", "--labels", "l.jsonl", cwd=tmp_path)
    if problem is None:
        assert result.returncode == 0, result.stderr
        assert "payload records without a label: 1" in result.stdout
    else:
        assert result.returncode == 1
        assert_one_line_each(result, f"sidecar join-labels: {problem}")
