"""The shipped nginx.conf and Caddyfile, rendered for a test and run for real; the service and the
admin page as plain subprocesses (module-scoped fixtures share them across tests).

Rendering changes only what a test must: ports (ephemeral), binds (loopback), paths (a temp
prefix), and the values a test shortens (read timeout, shutdown bound, the /metrics allowlist).
Every substitution must match the expected number of times, so a config that drifts breaks the
render instead of silently testing something else.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import tool_required
from tests.process import ROOT, clean_env, free_port

START_S = 20.0  # bound on any process becoming ready


def sub(text: str, pattern: str, repl: str, count: int) -> str:
    """re.sub that insists on exactly `count` matches."""
    new, n = re.subn(pattern, repl, text, flags=re.MULTILINE)
    assert n == count, f"{pattern!r} matched {n} times, expected {count}"
    return new


def wait_until(
    ready: Callable[[], bool], what: str, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Poll `ready()` until it is true, with a deadline; fail early if `proc` died."""
    deadline = time.monotonic() + START_S
    while not ready():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready within {START_S} s")
        time.sleep(0.02)  # bounded poll while a process starts


def listening(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:  # noqa: S310 (loopback test URL)
            return bool(resp.status == 200)
    except OSError:
        return False


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, seconds: float = 10) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            return proc.wait(seconds)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@dataclass
class Process:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextlib.contextmanager
def python_service(
    command: str, env: Mapping[str, str], tmp: Path, port: int | None = None
) -> Iterator[Process]:
    """`python -m service [api|admin]` on a free loopback port, healthy before it is yielded."""
    port = port or free_port()
    port_var = "ADMIN_PORT" if command == "admin" else "PORT"
    log = tmp / f"{command}-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service", command],
            cwd=ROOT,
            env=clean_env({port_var: str(port), **env}),
            stdout=out,
            stderr=out,
        )
    running = Process(proc, port, log)
    try:
        wait_until(lambda: http_ok(running.url + "/health"), f"service {command}", proc)
        yield running
    finally:
        stop(proc)


def self_signed(tmp: Path) -> tuple[Path, Path]:
    """A throwaway certificate for the TLS listeners."""
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "1", "-subj", "/CN=api.example.com", "-keyout", str(key),
         "-out", str(cert)],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return cert, key


# --- nginx ----------------------------------------------------------------------------------


@dataclass
class NginxPorts:
    http: int = field(default_factory=free_port)
    https: int = field(default_factory=free_port)
    api_plain: int = field(default_factory=free_port)  # the API site without TLS, for the probe CLI


def render_nginx(
    prefix: Path,
    *,
    api_port: int,
    admin_port: int,
    ports: NginxPorts,
    cert: tuple[Path, Path],
    read_timeout: str = "2s",
    shutdown_timeout: str = "1s",
    metrics_allow: tuple[str, ...] = ("127.0.0.1",),
    source: str | None = None,
) -> Path:
    """The shipped nginx.conf (or `source`) with test ports, loopback binds and temp paths."""
    text = source if source is not None else (ROOT / "nginx.conf").read_text()
    text = sub(text, r"^user .*;\n", "", 1)
    text = sub(text, r"^error_log \S+", f"error_log {prefix}/error.log", 1)
    text = sub(text, r"access_log /var/log/nginx/access.log", f"access_log {prefix}/access.log", 1)
    text = sub(
        text, r"worker_shutdown_timeout \S+;", f"worker_shutdown_timeout {shutdown_timeout};", 1
    )
    temp = "".join(
        f"    {kind}_temp_path {prefix}/{kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    text = sub(text, r"^http \{\n", "http {\n" + temp, 1)
    text = sub(text, r"^[ \t]*listen \[::\]:\d+.*\n", "", 3)
    text = sub(text, r"listen 80;", f"listen 127.0.0.1:{ports.http};", 1)
    text = sub(text, r"listen 443 ssl http2;", f"listen 127.0.0.1:{ports.https} ssl http2;", 2)
    # The API site also on plain HTTP (its own port), so `python -m service probe` needs no
    # certificate options; the TLS listener is what the other tests read through.
    text = sub(
        text,
        r"(listen \S+ ssl http2;[^\n]*\n)(\s+server_name api\.example\.com;)",
        rf"\1        listen 127.0.0.1:{ports.api_plain};\n\2",
        1,
    )
    text = sub(text, r"server 127\.0\.0\.1:3301;", f"server 127.0.0.1:{api_port};", 1)
    text = sub(text, r"server 127\.0\.0\.1:3300;", f"server 127.0.0.1:{admin_port};", 1)
    text = sub(text, r"/etc/letsencrypt/live/[^/]+/fullchain\.pem", str(cert[0]), 2)
    text = sub(text, r"/etc/letsencrypt/live/[^/]+/privkey\.pem", str(cert[1]), 2)
    text = sub(text, r"root /var/www/acme;", f"root {prefix}/acme;", 1)
    text = sub(text, r"proxy_read_timeout \S+;", f"proxy_read_timeout {read_timeout};", 2)
    allow = "".join(f"allow {a};\n            " for a in metrics_allow)
    text = sub(text, r"(?:allow \S+;\n\s*)+deny all;", allow + "deny all;", 1)
    prefix.mkdir(parents=True, exist_ok=True)
    shutil.copy("/etc/nginx/mime.types", prefix / "mime.types")
    conf = prefix / "nginx.conf"
    conf.write_text(text)
    return conf


def nginx_command(conf: Path, *extra: str) -> list[str]:
    prefix = conf.parent
    return ["nginx", "-p", f"{prefix}/", "-c", str(conf), "-e", "stderr",
            "-g", f"daemon off; pid {prefix}/nginx.pid;", *extra]  # fmt: skip


def nginx_check(conf: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        nginx_command(conf, "-t"), capture_output=True, text=True, timeout=30, check=False
    )


@contextlib.contextmanager
def nginx(conf: Path, ports: NginxPorts) -> Iterator[subprocess.Popen[bytes]]:
    if shutil.which("nginx") is None:
        tool_required("nginx")
    checked = nginx_check(conf)
    assert checked.returncode == 0, checked.stderr
    with (conf.parent / "stderr.log").open("wb") as out:
        proc = subprocess.Popen(nginx_command(conf), stdout=out, stderr=out)
    try:
        wait_until(
            lambda: all(listening(p) for p in (ports.http, ports.https, ports.api_plain)),
            "nginx",
            proc,
        )
        yield proc
    finally:
        stop(proc, signal.SIGTERM)


# --- Caddy ----------------------------------------------------------------------------------

CADDY_TEST_GLOBALS = "\tadmin off\n\tauto_https off\n\tdefault_bind 127.0.0.1\n"


def render_caddy(directory: Path, *, grace: str = "1s", source: str | None = None) -> Path:
    """The shipped Caddyfile (or `source`) with the global options a test run needs: no admin
    endpoint, no certificates, loopback binds, a short grace period."""
    text = source if source is not None else (ROOT / "Caddyfile").read_text()
    text = sub(text, r"^\{\n", "{\n" + CADDY_TEST_GLOBALS, 1)
    text = sub(text, r"grace_period \S+", f"grace_period {grace}", 1)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "Caddyfile"
    path.write_text(text)
    return path


def caddy_env(
    directory: Path,
    *,
    api_port: int,
    admin_port: int,
    site_port: int,
    admin_site_port: int,
    read_timeout: str = "2s",
    metrics_allow: str = "127.0.0.1/32",
) -> dict[str, str]:
    home = directory / "home"
    home.mkdir(parents=True, exist_ok=True)
    return {
        **{k: v for k, v in os.environ.items() if k in ("PATH", "LANG")},
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home),
        "XDG_DATA_HOME": str(home),
        "API_SITE": f"http://127.0.0.1:{site_port}",
        "ADMIN_SITE": f"http://127.0.0.1:{admin_site_port}",
        "API_UPSTREAM": f"127.0.0.1:{api_port}",
        "ADMIN_UPSTREAM": f"127.0.0.1:{admin_port}",
        "PROXY_READ_TIMEOUT": read_timeout,
        "METRICS_ALLOW": metrics_allow,
    }


def caddy_validate(path: Path, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["caddy", "validate", "--config", str(path), "--adapter", "caddyfile"],
        env=dict(env), capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


@contextlib.contextmanager
def caddy(
    path: Path, env: Mapping[str, str], ports: tuple[int, ...]
) -> Iterator[subprocess.Popen[bytes]]:
    if shutil.which("caddy") is None:
        tool_required("caddy")
    checked = caddy_validate(path, env)
    assert checked.returncode == 0, checked.stderr[-2000:]
    with (path.parent / "caddy.log").open("wb") as out:
        proc = subprocess.Popen(
            ["caddy", "run", "--config", str(path), "--adapter", "caddyfile"],
            env=dict(env), stdout=out, stderr=out,
        )  # fmt: skip
    try:
        wait_until(lambda: all(listening(p) for p in ports), "caddy", proc)
        yield proc
    finally:
        stop(proc, signal.SIGTERM)
