"""Every command in README.md and loadtests/README.md runs, as printed, in a test.

The commands are read from the ```sh blocks of the two files, never copied here: a
command added to a covered section is run by its section's test, and a section with
commands that no test covers fails ``test_every_documented_section_is_covered``.
Commands that use the documented ports run inside a private network namespace
(``unshare -n``, see tests/netns_driver.py), where those ports are always free and
only loopback exists. A command that runs for minutes gets an option appended that
shortens it (``-t 3s``, ``--phase-seconds 2``, ``--quick``); nothing else is edited.

The sidecar is installed the way users install it: ``pip install .`` into a fresh
virtual environment (normal dependency resolution, no extras), and ``scripts/demo``
on a fresh copy of the tracked files, so the test tools in this checkout's .venv
cannot hide a missing dependency.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from sidecar.pipeline.auth import hash_key

ROOT = Path(__file__).resolve().parents[2]
DOCS = ("README.md", "loadtests/README.md")
DRIVER = Path(__file__).resolve().parents[1] / "netns_driver.py"
FAKE_MODEL = Path(__file__).resolve().parents[1] / "fake_model_server.py"

pytestmark = pytest.mark.timeout(600)


@dataclass(frozen=True)
class Block:
    doc: str
    section: str
    commands: tuple[str, ...]


def documented_blocks(doc: str) -> list[Block]:
    """The ```sh blocks of a Markdown file, each with its section and its commands
    (a line ending in a backslash continues on the next)."""
    blocks: list[Block] = []
    section = ""
    current: list[str] | None = None
    for line in (ROOT / doc).read_text().splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
        if current is None:
            if line.strip() == "```sh":
                current = []
            continue
        if line.strip() == "```":
            commands: list[str] = []
            for text in current:
                if commands and commands[-1].endswith("\\"):
                    commands[-1] += "\n" + text
                elif text.strip():
                    commands.append(text)
            blocks.append(Block(doc, section, tuple(commands)))
            current = None
        else:
            current.append(line)
    return blocks


def commands_of(doc: str, section: str) -> list[str]:
    found = [c for b in documented_blocks(doc) if b.section == section for c in b.commands]
    assert found, f"{doc} has no commands under '## {section}'"
    return found


# Each section with commands, and the test that runs them.
COVERED = {
    ("README.md", "Two commands"): "test_a_fresh_clone_runs_the_readme_demo_commands",
    ("README.md", "When the model is slow, down or failing"): (
        "test_a_fresh_clone_runs_the_readme_demo_commands"
    ),
    ("README.md", "Shadow traffic"): "test_a_fresh_clone_runs_the_readme_demo_commands",
    ("README.md", "Logs, metrics and drift"): "test_a_fresh_clone_runs_the_readme_demo_commands",
    ("README.md", "In front of your model"): "test_pip_install_then_the_model_server_commands",
    ("README.md", "Deploying"): "test_docker_commands_in_a_clean_venv_as_the_image_user",
    ("loadtests/README.md", "Locust against the demo"): "test_locust_commands_against_the_demo",
    ("loadtests/README.md", "Chaos"): "test_chaos_command_shows_each_phase_as_it_should",
    ("loadtests/README.md", "Side by side"): "test_benchmark_commands_run",
    ("loadtests/README.md", "Without sockets"): "test_the_socketless_benchmark_command_runs",
}


def test_every_documented_section_is_covered() -> None:
    sections = {(b.doc, b.section) for doc in DOCS for b in documented_blocks(doc)}
    assert sections == set(COVERED), (
        f"uncovered: {sections - set(COVERED)}; gone: {set(COVERED) - sections}"
    )
    names = {name for name in COVERED.values()}
    assert names <= set(globals()), names - set(globals())


# -- running plans in a network namespace ----------------------------------------------

needs_netns = pytest.mark.skipif(
    not (hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("unshare")),
    reason="a private network namespace needs root and unshare",
)


def run_plan(plan: list[dict[str, Any]], work: Path) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    (work / "plan.json").write_text(json.dumps(plan))
    subprocess.run(
        [
            "unshare",
            "-n",
            sys.executable,
            str(DRIVER),
            str(work / "plan.json"),
            str(work / "results.json"),
        ],
        check=True,
        timeout=540,
    )
    results: dict[str, Any] = json.loads((work / "results.json").read_text())
    return results


def tracked_copy(destination: Path) -> Path:
    """A fresh clone's files: what git tracks (and new files not yet committed)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if not source.is_file():
            continue  # deleted in the work tree
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    return destination


def with_path(venv_bin: Path) -> dict[str, str]:
    """A shell where the virtual environment is on PATH, as after `pip install .`."""
    return {"PATH": f"{venv_bin}:{os.environ['PATH']}"}


def step_for(command: str, name: str, cwd: Path, env: dict[str, str]) -> dict[str, Any]:
    """Long-running documented commands start in the background; the rest run."""
    bare = command.split("#", 1)[0].strip()
    if re.search(r"(^|\s)(scripts/demo|sidecar demo)$", bare) or re.search(
        r"\bsidecar run\b", bare
    ):
        return {
            "start": command,
            "name": name,
            "cwd": str(cwd),
            "env": env,
            "wait": "http://127.0.0.1:8080/readyz",
        }
    return {"run": command, "name": name, "cwd": str(cwd), "env": env}


def assert_ran(results: dict[str, Any], name: str) -> dict[str, Any]:
    result = results.get(name)
    assert result is not None, f"{name} never ran: {sorted(results)}"
    assert result.get("rc") == 0, (name, result)
    return result


TRAFFIC = """python3 - <<'EOF'
import json, urllib.request
for i in range(120):
    row = [[5.1, 3.5, 1.4, 0.2], [6.0, 2.9, 4.5, 1.5], [6.9, 3.1, 5.4, 2.1]][i % 3]
    body = json.dumps({"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP32",
                                   "data": row}]}).encode()
    request = urllib.request.Request(
        "http://127.0.0.1:8080/v2/models/iris/infer", data=body,
        headers={"Authorization": "Bearer demo-key", "Content-Type": "application/json",
                 "X-Request-ID": f"demo-{i}"})
    urllib.request.urlopen(request, timeout=10).read()
EOF
# The log writers linger before they write: wait (bounded) for every comparison.
for _ in $(seq 100); do
  [ "$(wc -l < shadow.jsonl)" -ge 120 ] && [ -s payloads.jsonl ] && exit 0
  sleep 0.1
done
exit 1
"""

LABELS = """python3 - <<'EOF'
import json
lines = open("payloads.jsonl").read().splitlines()
with open("labels.csv", "w") as out:
    out.write("request_id,label\\n")
    for line in lines:
        record = json.loads(line)
        out.write(f"{record['request_id']},{record['response']['outputs'][1]['data'][0]}\\n")
EOF
"""


@needs_netns
def test_a_fresh_clone_runs_the_readme_demo_commands(tmp_path: Path) -> None:
    """scripts/demo on a fresh copy of the tracked files, then the README's curl, its
    chaos commands, and its shadow-report, join-labels and baseline commands."""
    clone = tracked_copy(tmp_path / "clone")
    two = commands_of("README.md", "Two commands")
    assert [c.split("#", 1)[0].strip() for c in two[:2]] == ["scripts/demo", "scripts/test"]
    # scripts/test is what CI runs: .ci/run ends by running exactly it.
    assert (ROOT / ".ci" / "run").read_text().rstrip().endswith("exec scripts/test")
    # The install scripts/demo does first needs the network, which the namespace has
    # not: run it here (`--help` stops the demo right after), then the command itself.
    setup = subprocess.run(
        ["scripts/demo", "--help"],
        cwd=clone,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert setup.returncode == 0, setup.stdout[-2000:] + setup.stderr[-3000:]
    venv = with_path(clone / ".venv" / "bin")
    plan: list[dict[str, Any]] = [step_for(two[0], "demo", clone, {})]
    for index, command in enumerate(two[2:]):
        plan.append(step_for(command, f"two-{index}", clone, {}))
    failing = commands_of("README.md", "When the model is slow, down or failing")
    plan += [step_for(c, f"failing-{i}", clone, {}) for i, c in enumerate(failing)]
    # The log commands run in the demo's log folder, which its banner names.
    log_dir = (
        "$(sed -n 's/^  logs *\\(\\/[^ ]*\\)\\/ .*/\\1/p' "
        + str(tmp_path / "run" / "demo.log")
        + ")"
    )
    plan.append({"run": f"cd {log_dir} && " + TRAFFIC, "name": "traffic"})
    plan.append({"run": f"cd {log_dir} && " + LABELS, "name": "labels"})
    fixture = tmp_path / "my-model"
    shutil.copytree(clone / "config", fixture)
    shutil.copy(fixture / "demo.yaml", fixture / "my-model.yaml")
    plan.append({"run": f"cd {log_dir} && cp -r {fixture}/. .", "name": "my-model"})
    for section in ("Shadow traffic", "Logs, metrics and drift"):
        for index, command in enumerate(commands_of("README.md", section)):
            plan.append(
                {"run": f"cd {log_dir} && {command}", "name": f"{section}-{index}", "env": venv}
            )
    plan.append({"stop": "demo"})
    results = run_plan(plan, tmp_path / "run")

    demo = results["demo"]
    assert demo["ready"], demo
    assert demo["rc"] == 0, demo["log"][-3000:]
    curl = assert_ran(results, "two-0")["stdout"]
    assert curl.startswith("HTTP/1.1 200 OK"), curl
    body = orjson.loads(curl.split("\r\n\r\n", 1)[1])
    assert body["model_name"] == "iris"
    assert body["outputs"][1]["data"] == [0]
    for index in range(1, len(two) - 2):
        assert '"mode"' in assert_ran(results, f"two-{index}")["stdout"]
    assert "X-Sidecar-Fallback: rule-virginica" in assert_ran(results, "failing-1")["stdout"]
    assert "sidecar_circuit_state" in assert_ran(results, "failing-2")["stdout"]
    assert_ran(results, "traffic")
    assert "shadow comparisons:" in assert_ran(results, "Shadow traffic-0")["stdout"]
    joined = assert_ran(results, "Logs, metrics and drift-0")["stdout"]
    assert "accuracy" in joined
    assert "1.0" in joined  # the labels are the model's own answers
    built = assert_ran(results, "Logs, metrics and drift-1")["stdout"]
    assert built.startswith("wrote baseline.json:"), built


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A fresh copy of the source and a fresh venv where the README's `pip install .`
    ran: normal dependency resolution, no extras."""
    work = tmp_path_factory.mktemp("installed")
    source = tracked_copy(work / "src")
    subprocess.run([sys.executable, "-m", "venv", str(work / "venv")], check=True, timeout=120)
    venv_bin = work / "venv" / "bin"
    command = commands_of("README.md", "In front of your model")[0]
    assert command == "pip install ."
    done = subprocess.run(
        ["bash", "-c", command],
        cwd=source,
        env={**os.environ, **with_path(venv_bin)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # The wheel pip built runs the request path compiled (build_native.py), with only
    # the runtime dependencies installed (outside the source tree, which would shadow it).
    compiled = subprocess.run(
        [str(venv_bin / "python"), "-c", "import sidecar; print(sidecar.compiled())"],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert compiled.stdout.strip() == "True", compiled.stdout + compiled.stderr
    return source, venv_bin


CURL_INFER = (
    'curl -s -i -H \'Content-Type: application/json\' {auth} -d \'{{"inputs":[{{"name":"input-0",'
    '"shape":[1,4],"datatype":"FP32","data":[5.1,3.5,1.4,0.2]}}]}}\' '
    "http://127.0.0.1:8080/v2/models/iris/infer"
)


@needs_netns
def test_pip_install_then_the_model_server_commands(
    installed: tuple[Path, Path], tmp_path: Path
) -> None:
    """After `pip install .` (no extras): sidecar init, check-config and run in front
    of a V2 model server; config/minimal.yaml; the example config; and sidecar demo
    with the README's curl."""
    source, venv_bin = installed
    env = with_path(venv_bin)
    python = str(venv_bin / "python")
    commands = commands_of("README.md", "In front of your model")
    assert commands[0] == "pip install ."  # run by the fixture, outside the namespace
    example_env = {
        **env,
        "MODEL_TOKEN": "t",
        "JWT_SECRET": "s" * 40,
        "RANKING_SERVICE_KEY_DIGEST": hash_key("ranking-key"),
        "SIDECAR_LOG_DIR": str(tmp_path / "logs"),
    }
    shared_state = tmp_path / "shared.yaml"
    minimal = yaml.safe_load((source / "config" / "minimal.yaml").read_text())
    shared_state.write_text(
        yaml.safe_dump({**minimal, "shared_state": {"redis_url": "redis://127.0.0.1:6379/0"}})
    )
    plan: list[dict[str, Any]] = [
        {
            "start": f"{python} {FAKE_MODEL} 8000",
            "name": "model-8000",
            "env": env,
            "wait": "http://127.0.0.1:8000/v2/health/ready",
        },
    ]
    for index, command in enumerate(commands[1:]):
        step = step_for(command, f"doc-{index}", source, env)
        plan.append(step)
        if "start" in step:
            plan.append({"run": CURL_INFER.format(auth=""), "name": f"doc-{index}-through"})
            plan.append({"stop": f"doc-{index}", "signal": "SIGTERM"})
    plan += [
        {
            "start": f"{python} {FAKE_MODEL} {port}",
            "name": f"model-{port}",
            "env": env,
            "wait": f"http://127.0.0.1:{port}/v2/health/ready",
        }
        for port in (8081, 8082, 8083)
    ]
    plan += [
        {
            "start": "sidecar run --config config/sidecar.example.yaml",
            "name": "example",
            "cwd": str(source),
            "env": example_env,
            "wait": "http://127.0.0.1:8080/readyz",
        },
        {"run": CURL_INFER.format(auth="-H 'X-API-Key: ranking-key'"), "name": "example-through"},
        {"stop": "example", "signal": "SIGTERM"},
        {"run": f"sidecar check-config {shared_state}", "name": "needs-redis", "env": env},
        {
            "start": "sidecar demo --model-port 18081 --shadow-port 18082",
            "name": "demo",
            "env": env,
            "wait": "http://127.0.0.1:8080/readyz",
        },
        {"run": commands_of("README.md", "Two commands")[2], "name": "demo-curl"},
        {"stop": "demo"},
    ]
    results = run_plan(plan, tmp_path / "run")

    starts = [s["name"] for s in plan if "start" in s and s["name"].startswith("doc-")]
    assert len(starts) == 2  # `sidecar run --config my-model.yaml` and minimal.yaml
    for name in [s["name"] for s in plan if "run" in s and s["name"].startswith("doc-")]:
        assert_ran(results, name)
    for name in starts:
        assert results[name]["ready"], results[name]
        through = assert_ran(results, f"{name}-through")["stdout"]
        assert through.startswith("HTTP/1.1 200 OK"), through
        assert results[name]["rc"] == 0, results[name]["log"][-3000:]  # SIGTERM: drained
    assert "configuration is valid" in assert_ran(results, "doc-1")["stdout"]
    assert results["example"]["ready"], results["example"]
    assert assert_ran(results, "example-through")["stdout"].startswith("HTTP/1.1 200 OK")
    needs_redis = results["needs-redis"]
    assert needs_redis["rc"] == 1
    assert "shared_state: needs the redis extra" in needs_redis["stderr"]
    assert "pip install 'sidecar[redis]'" in needs_redis["stderr"]
    demo_curl = assert_ran(results, "demo-curl")["stdout"]
    assert demo_curl.startswith("HTTP/1.1 200 OK"), demo_curl
    assert '"outputs"' in demo_curl


@needs_netns
def test_locust_commands_against_the_demo(tmp_path: Path) -> None:
    commands = commands_of("loadtests/README.md", "Locust against the demo")
    assert len(commands) == 4
    plan: list[dict[str, Any]] = [
        {
            "start": ".venv/bin/sidecar demo --log-dir " + str(tmp_path / "logs"),
            "name": "demo",
            "cwd": str(ROOT),
            "wait": "http://127.0.0.1:8080/readyz",
        },
    ]
    for index, command in enumerate(commands):
        # Only the run time is shortened: the last -t wins.
        shortened = command.split("#", 1)[0].rstrip() + " -t 3s --only-summary"
        plan.append({"run": shortened, "name": f"locust-{index}", "cwd": str(ROOT), "timeout": 60})
    plan.append({"stop": "demo"})
    results = run_plan(plan, tmp_path / "run")
    for index in range(len(commands)):
        result = assert_ran(results, f"locust-{index}")  # --exit-code-on-error 1: no failure
        summary = re.search(r"Aggregated\s+(\d+)\s+(\d+)\(", result["stdout"] + result["stderr"])
        assert summary is not None, result
        assert int(summary.group(1)) > 0, summary.group(0)
        assert int(summary.group(2)) == 0, summary.group(0)


def test_chaos_command_shows_each_phase_as_it_should(tmp_path: Path) -> None:
    """Model answers when it is up, fallbacks (only) while it fails or hangs, nothing
    but 200s throughout, and every phase counted on its own."""
    (command,) = commands_of("loadtests/README.md", "Chaos")
    out = tmp_path / "chaos.json"
    done = subprocess.run(
        ["bash", "-c", f"{command} --phase-seconds 2 --json {out}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = orjson.loads(out.read_bytes())
    assert report["problems"] == []
    phases = {p["phase"]: p for p in report["phases"]}
    assert list(phases) == ["ok", "fail", "hang", "slow", "ok again"]
    for name in ("ok", "ok again"):
        assert phases[name]["model"] > 0, name
    for name in ("fail", "hang"):
        assert phases[name]["model"] == 0, name
        assert phases[name]["fallback"] == phases[name]["requests"] > 0, name
    for phase in phases.values():
        assert set(phase["outcomes"]) <= {"model", "fallback"}, phase


def test_benchmark_commands_run(tmp_path: Path) -> None:
    """Each benchmark command as printed, with --quick: every suite starts its
    contenders, loads them and reports; compare's JSON has every row."""
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    (tmp_path / "loadtests").symlink_to(ROOT / "loadtests")
    commands = commands_of("loadtests/README.md", "Side by side")
    assert len(commands) == 8
    for command in commands:
        done = subprocess.run(
            ["bash", "-c", command.split("#", 1)[0].rstrip() + " --quick"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
        assert done.returncode == 0, (command, done.stdout[-2000:], done.stderr[-3000:])
        suite = re.search(r"--suite (\w+)", command)
        assert suite is not None, command
        assert f"== {suite.group(1)}" in done.stdout, done.stdout[-2000:]  # its report
    report = orjson.loads((tmp_path / "bench-results.json").read_bytes())
    rows = report["compare"]["rows"]
    closed_loop = {
        (r["contender"], r["concurrency"]) for r in rows if "open loop" not in r["contender"]
    }
    for name in ("minimal-proxy", "sidecar-passthrough", "sidecar-full"):
        for level in (1, 16, 64):
            assert (name, level) in closed_loop, name
        assert (f"{name} (20ms model)", 256) in closed_loop
    for row in rows:
        assert row["rps"] > 0, row
        if row["concurrency"] in (1, 16) and "open loop" not in row["contender"]:
            assert row["errors"] == 0, row
    sidecar = [r for r in rows if r["contender"] == "sidecar-passthrough"]
    assert all(r["cpu_us_per_request"] > 0 and r["peak_rss_mb"] > 0 for r in sidecar)
    assert "c=16 sidecar-passthrough / minimal rps" in report["compare"]["ratios"]


def test_the_socketless_benchmark_command_runs(tmp_path: Path) -> None:
    """loadtests/plane.py as printed, with --quick: every contender is timed and the
    ratios to the raw floor are printed."""
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    (tmp_path / "loadtests").symlink_to(ROOT / "loadtests")
    (command,) = commands_of("loadtests/README.md", "Without sockets")
    done = subprocess.run(
        ["bash", "-c", command + " --quick"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
    timed = dict(re.findall(r"^(\S+)\s+([\d.]+) us/request$", done.stdout, re.M))
    assert set(timed) == {"raw-floor", "http-layers", "passthrough", "full"}, done.stdout
    assert all(float(value) > 0 for value in timed.values())
    for name in ("http-layers", "passthrough", "full"):
        assert f"{name} / raw-floor: " in done.stdout


# -- Docker, without an engine ---------------------------------------------------------


def dockerfile() -> dict[str, Any]:
    """The Dockerfile's instructions that decide how the container runs."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    spec: dict[str, Any] = {"env": {}, "copies": []}
    for line in text.splitlines():
        word, _, rest = line.strip().partition(" ")
        if word == "ENV":
            for pair in re.findall(r"(\w+)=(\S+)", rest):
                spec["env"][pair[0]] = pair[1]
        elif word == "USER":
            spec["user"] = rest.strip()
        elif word in ("ENTRYPOINT", "CMD"):
            spec[word.lower()] = json.loads(rest)
        elif word == "HEALTHCHECK":
            spec["healthcheck"] = json.loads(rest.split("CMD", 1)[1])
        elif word == "COPY":
            spec["copies"].append(rest.split())
        elif word == "RUN":
            spec.setdefault("runs", []).append(rest)
        elif word == "EXPOSE":
            spec["expose"] = [int(p) for p in rest.split()]
    return spec


def docker_run_options(command: str) -> dict[str, Any]:
    words = [w for w in command.replace("\\\n", " ").split() if w]
    assert words[:2] == ["docker", "run"], command
    options: dict[str, Any] = {"env": {}, "volumes": [], "ports": [], "hosts": []}
    index = 2
    while index < len(words):
        word = words[index]
        if word == "-e":
            key, _, value = words[index + 1].partition("=")
            options["env"][key] = value
            index += 2
        elif word == "-v":
            options["volumes"].append(words[index + 1].strip('"').split(":"))
            index += 2
        elif word == "-p":
            options["ports"].append(words[index + 1])
            index += 2
        elif word.startswith("--add-host="):
            options["hosts"].append(word.split("=", 1)[1])
            index += 1
        elif word == "--rm":
            index += 1
        else:
            options["image"] = word
            index += 1
    return options


@needs_netns
def test_docker_commands_in_a_clean_venv_as_the_image_user() -> None:
    """The README's `docker run`, emulated: the image's install in a clean venv, its
    ENV, the mounted config folder, the user it runs as, its entry command, its
    HEALTHCHECK; the model on the host reached as host.docker.internal."""
    spec = dockerfile()
    build, run = commands_of("README.md", "Deploying")
    assert build == "docker build -t sidecar ."
    options = docker_run_options(run)
    assert options["image"] == "sidecar"
    uid = spec["user"].split(":")[0]
    assert uid not in ("0", "root")
    assert any(
        "/var/log/sidecar" in r and f"chown {spec['user']} /var/log/sidecar" in r
        for r in spec["runs"]
    ), "the image user must be able to write its log folder"
    run = next(r for r in spec["runs"] if "pip install" in r)
    steps = [step.strip() for step in run.split("&&")]
    install = next(step for step in steps if "pip install" in step)
    # This machine has a C compiler already; the image installs one for the build only.
    compiler = next(i for i, step in enumerate(steps) if step.startswith("apt-get install"))
    purge = next(i for i, step in enumerate(steps) if step.startswith("apt-get purge"))
    assert compiler < steps.index(install) < purge
    assert "gcc" in steps[compiler]
    assert "gcc" in steps[purge]
    # A folder the image's user can read (pytest's own tmp folders are root-only).
    work = Path(tempfile.mkdtemp(prefix="sidecar-image-", dir="/tmp"))
    try:
        work.chmod(0o755)
        source = tracked_copy(work / "src")
        # The image's user must be able to run the interpreter itself: a system one,
        # not one installed under root's home.
        python = shutil.which("python3.11", path="/usr/local/bin:/usr/bin") or sys.executable
        subprocess.run([python, "-m", "venv", str(work / "venv")], check=True, timeout=120)
        done = subprocess.run(
            ["bash", "-c", install],
            cwd=source,
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, **with_path(work / "venv" / "bin")},
            check=False,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        # The container's file system: what COPY put there, then the mounts.
        root = work / "container"
        for source_path, target in (c for c in spec["copies"] if c[-1].startswith("/etc")):
            (root / target.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source / source_path, root / target.lstrip("/"))
        for host, target, *_ in options["volumes"]:
            mounted = root / target.lstrip("/")
            shutil.rmtree(mounted, ignore_errors=True)
            shutil.copytree(source / host.replace("$PWD/", ""), mounted)
        subprocess.run(["chmod", "-R", "a+rX", str(work)], check=True, timeout=60)

        def container_path(value: str) -> str:
            return str(root / value.lstrip("/")) if value.startswith("/etc/") else value

        env = {k: container_path(v) for k, v in {**spec["env"], **options["env"]}.items()}
        for host in options["hosts"]:
            name, _, gateway = host.partition(":")
            assert gateway == "host-gateway"
            env = {k: v.replace(name, "127.0.0.1") for k, v in env.items()}
        env["PATH"] = f"{work / 'venv' / 'bin'}:/usr/bin:/bin"
        env["HOME"] = "/nonexistent"
        as_user = f"setpriv --reuid {uid} --regid {spec['user'].split(':')[1]} --clear-groups "
        entry = " ".join(spec["entrypoint"] + spec["cmd"])
        (host_port, container_port) = options["ports"][0].split(":")
        assert host_port == container_port == str(spec["expose"][0])
        plan: list[dict[str, Any]] = [
            {
                "start": f"{work / 'venv' / 'bin' / 'python'} {FAKE_MODEL} 8000",
                "name": "model",
                "wait": "http://127.0.0.1:8000/v2/health/ready",
            },
            {
                "start": as_user + entry,
                "name": "container",
                "env": env,
                "cwd": "/",
                "wait": f"http://127.0.0.1:{container_port}/readyz",
            },
            {"run": CURL_INFER.format(auth=""), "name": "through"},
            {"run": as_user + " ".join(spec["healthcheck"]), "name": "healthcheck", "env": env},
            {"stop": "container", "signal": "SIGTERM"},
        ]
        results = run_plan(plan, work / "run")
        assert results["container"]["ready"], results["container"]
        assert assert_ran(results, "through")["stdout"].startswith("HTTP/1.1 200 OK")
        assert_ran(results, "healthcheck")
        assert results["container"]["rc"] == 0, results["container"]["log"][-3000:]
        assert '"compiled":true' in results["container"]["log"], "the image's wheel compiles"
    finally:
        shutil.rmtree(work, ignore_errors=True)
