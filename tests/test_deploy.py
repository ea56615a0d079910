"""deploy/: the deploy script's health-check step against a real running pair (and with either one
down), and the systemd units checked by `systemd-analyze verify` once pointed at this checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import tool_required
from tests.process import ROOT, free_port
from tests.proxies import Process, python_service

DEPLOY = ROOT / "deploy"


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Process, Process]]:
    tmp = tmp_path_factory.mktemp("pair")
    with python_service("api", {}, tmp) as api, python_service("admin", {}, tmp) as admin:
        yield api, admin


def health_check(port: int, admin_port: int) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": os.environ["PATH"],
        "ENV_FILE": "/nonexistent",
        "PORT": str(port),
        "ADMIN_PORT": str(admin_port),
        "HEALTH_RETRIES": "3",
        "HEALTH_DELAY_S": "0.1",
    }
    return subprocess.run(
        ["bash", str(DEPLOY / "deploy.sh"), "check"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_health_checks_pass_against_a_running_pair(pair: tuple[Process, Process]) -> None:
    api, admin = pair
    done = health_check(api.port, admin.port)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines()[-1] == (
        f"deploy: healthy: admin on {admin.port}, api on {api.port}"
    )


@pytest.mark.parametrize("down", ["admin", "api"])
def test_health_checks_fail_naming_the_one_that_is_down(
    pair: tuple[Process, Process], down: str
) -> None:
    api, admin = pair
    nothing = free_port()
    done = health_check(
        nothing if down == "api" else api.port, nothing if down == "admin" else admin.port
    )
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert lines[-1] == f"deploy: health checks failed: {down}"
    failed = [line for line in lines if line.startswith("deploy: FAILED: ")]
    assert len(failed) == 1
    assert failed[0].startswith(
        f"deploy: FAILED: {down}: GET http://127.0.0.1:{nothing}/health after 3 tries"
    )


def test_the_deploy_script_refuses_an_unknown_step() -> None:
    done = subprocess.run(
        ["bash", str(DEPLOY / "deploy.sh"), "launch"],
        env={"PATH": os.environ["PATH"], "ENV_FILE": "/nonexistent"},
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 2


@pytest.mark.parametrize("unit", ["ai-stream-api@.service", "ai-stream-admin.service"])
def test_systemd_units_verify(tmp_path: Path, unit: str) -> None:
    if shutil.which("systemd-analyze") is None:
        tool_required("systemd-analyze")
    text = (DEPLOY / unit).read_text()
    assert "ExecStart=/srv/ai-stream-gateway/.venv/bin/python -m service " in text
    rendered = (
        text.replace("/srv/ai-stream-gateway", str(ROOT))
        .replace("User=aistream", "User=root")
        .replace("Group=aistream", "Group=root")
    )
    name = unit.replace("@.", "@3301.")
    (tmp_path / name).write_text(rendered)
    done = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / name)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"{tmp_path}" not in done.stderr, done.stderr  # no unknown keys or bad values
    if unit.startswith("ai-stream-api"):
        stop_s = int(text.split("TimeoutStopSec=", 1)[1].split()[0])
        assert stop_s > 25 + 10  # SHUTDOWN_DRAIN_S (25) plus aiohttp's margin


def test_the_ci_example_tests_deploys_and_checks() -> None:
    text = (DEPLOY / "ci-deploy.example.yml").read_text()
    assert 'CI: "true"' in text
    assert "make test" in text
    assert "deploy/deploy.sh all" in text
    assert "deploy/deploy.sh check" in text
    assert "python -m service probe" in text
    for name in ("deploy.sh", "ai-stream-api@.service", "ai-stream-admin.service"):
        assert (DEPLOY / name).read_text().count("Must match") == 1, name
