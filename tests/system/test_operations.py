"""Operator-facing commands and settings: sidecar init, --workers auto, sidecar
healthcheck, and who may reload the config over HTTP."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest
import yaml

from sidecar.config.plan import load_plan
from sidecar.control.workers import available_cpus
from sidecar.pipeline.auth import hash_key
from tests.conftest import LOOPBACK, FakeModel, StartSidecar, base_config, closed_port, run_cli

cli = run_cli


@pytest.mark.parametrize(
    ("protocol", "health", "routes"),
    [
        ("v2", "/v2/health/ready", ["infer", "metadata"]),
        ("openai", "/health", ["chat", "models"]),
        ("plain", "/health", ["all"]),
    ],
)
def test_init_writes_a_config_that_loads(
    tmp_path: Path, protocol: str, health: str, routes: list[str]
) -> None:
    result = cli(
        "init", "--upstream", "http://127.0.0.1:8000", "--protocol", protocol, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert f"wrote sidecar.yaml (valid; routes: {', '.join(routes)})\n" in result.stdout
    plan = load_plan(tmp_path / "sidecar.yaml", env={})
    assert plan.config.upstreams["model"].url == "http://127.0.0.1:8000"
    assert plan.config.upstreams["model"].health.path == health
    assert [r.name for r in plan.config.routes] == routes
    text = (tmp_path / "sidecar.yaml").read_text()
    assert text.count("#") >= 10  # commented, for a person to read and change
    assert list(tmp_path.iterdir()) == [tmp_path / "sidecar.yaml"]  # no staging file left


def test_init_refuses_a_bad_url_and_an_existing_file(tmp_path: Path) -> None:
    bad = cli("init", "--upstream", "http://127.0.0.1:8000/v2", cwd=tmp_path)
    assert bad.returncode == 1
    assert "upstreams.model.url: must be an origin only" in bad.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written
    (tmp_path / "sidecar.yaml").write_text("mine")
    again = cli("init", "--upstream", "http://127.0.0.1:8000", cwd=tmp_path)
    assert again.returncode == 1
    assert "exists" in again.stderr
    assert (tmp_path / "sidecar.yaml").read_text() == "mine"


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"cpu.max": "max 100000\n"}, None),  # no quota: the CPUs we may run on
        ({"cpu.max": "100000 100000\n"}, 1),
        ({"cpu.max": "150000 100000\n"}, 2),  # 1.5 CPUs: two workers, not one
        ({"cpu.max": "50000 100000\n"}, 1),  # never fewer than one
        ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2),  # v1
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ],
)
def test_workers_auto_follows_the_cgroup_quota(
    tmp_path: Path, files: dict[str, str], expected: int | None
) -> None:

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    allowed = len(os.sched_getaffinity(0))
    assert available_cpus(tmp_path) == min(allowed, expected or allowed)


def test_healthcheck_follows_the_configured_port(tmp_path: Path) -> None:
    config = base_config(f"http://{LOOPBACK}:{closed_port()}")
    config["listen"] = {"host": "0.0.0.0", "port": closed_port()}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    result = cli("healthcheck", "--config", str(path), "--timeout", "1")
    assert result.returncode == 1
    assert f"http://127.0.0.1:{config['listen']['port']}/livez" in result.stderr


@pytest.mark.parametrize("timeout", ["-1", "0", "nan", "1e400"])
def test_healthcheck_refuses_a_timeout_that_is_not_a_time_in_one_line(
    tmp_path: Path, timeout: str
) -> None:
    # A negative or infinite --timeout ended in a Python traceback from the socket.
    config = base_config(f"http://{LOOPBACK}:{closed_port()}")
    config["listen"] = {"host": LOOPBACK, "port": closed_port()}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    result = cli("healthcheck", "--config", str(path), "--timeout", timeout)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "--timeout" in result.stderr.strip().splitlines()[-1]


async def test_healthcheck_passes_against_a_running_sidecar(
    fake_model: FakeModel, start_sidecar: StartSidecar, tmp_path: Path
) -> None:
    sidecar = await start_sidecar(base_config(fake_model.url))
    config = base_config(fake_model.url)
    config["listen"]["port"] = sidecar.running.main_port
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", "healthcheck", "--config", str(path)
    )
    assert await process.wait() == 0


ADMIN_KEY, USER_KEY = "admin-key", "user-key"


def keyed_config(upstream: str, reload: str) -> dict[str, object]:
    config = base_config(upstream)
    config["admin"]["reload"] = reload
    config["auth"] = {
        "enabled": True,
        "api_keys": [
            {"name": "operator", "digest": hash_key(ADMIN_KEY), "scopes": ["admin"]},
            {"name": "client", "digest": hash_key(USER_KEY)},
        ],
    }
    return config


async def test_reload_needs_an_admin_key_where_others_can_reach_it(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    # "credential" is what "auto" means on any address but loopback.
    sidecar = await start_sidecar(keyed_config(fake_model.url, "credential"))
    reload = sidecar.admin_url + "/-/reload"
    async with sidecar.session.post(reload) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"]["type"] == "unauthorized"
    async with sidecar.session.post(reload, headers={"X-API-Key": USER_KEY}) as resp:
        assert resp.status == 403
    async with sidecar.session.post(reload, headers={"X-API-Key": ADMIN_KEY}) as resp:
        assert resp.status == 200
        assert (await resp.json())["result"] == "ok"


async def test_reload_on_a_loopback_admin_listener_is_open_and_off_means_sighup_only(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    open_one = await start_sidecar(keyed_config(fake_model.url, "auto"))  # 127.0.0.1
    async with open_one.session.post(open_one.admin_url + "/-/reload") as resp:
        assert resp.status == 200
    off = await start_sidecar(keyed_config(fake_model.url, "off"))
    async with off.session.post(
        off.admin_url + "/-/reload", headers={"X-API-Key": ADMIN_KEY}
    ) as resp:
        assert resp.status in (404, 405)


def test_auto_reload_is_open_only_on_loopback() -> None:
    from sidecar.config.schema import AdminListener

    assert AdminListener(host="127.0.0.1").reload_open_to_all
    assert AdminListener(host="::1").reload_open_to_all
    assert AdminListener(host="localhost").reload_open_to_all
    assert not AdminListener(host="0.0.0.0").reload_open_to_all
    assert not AdminListener(host="10.1.2.3").reload_open_to_all
    assert AdminListener(host="10.1.2.3", reload="open").reload_open_to_all
    assert not AdminListener(host="127.0.0.1", reload="credential").reload_open_to_all
