"""The C reference relay: the system nginx with the shipped `nginx.conf`'s relay rules, in front of
the bench upstream, so every scenario can be measured through nginx beside the service.

1. The rules are taken from the shipped file, not rewritten: the API site's server-level `proxy_*`
   directives (HTTP/1.1 upstream, `Connection ""` for keep-alive, the forwarded headers), the body
   of its API location block (`location ~ ^/(?:api|v1)/`) (`proxy_buffering off`, timeouts,
   ...), the `keepalive` of its `upstream ai_api` block, `client_max_body_size`, and the
   http-level `sendfile`, `tcp_nopush`, `keepalive_timeout` and `server_tokens`. Every extraction
   must match exactly as often as expected, so a shipped config that drifts breaks the bench
   instead of measuring something else.
2. What the bench changes: the location is `/v1/` (the load generator speaks the upstream's own
   protocol to nginx, as in its `direct` runs), plain HTTP on an ephemeral 127.0.0.1 port (the
   service is measured without TLS too), one worker process (pinned by the runner to the service's
   CPU), a temp prefix for every path, `access_log off` (the service runs at `LOG_LEVEL=warning`,
   with no line per request either), and `worker_connections` / `worker_rlimit_nofile` raised
   when a scenario needs more than the shipped 16,384 connections.
3. nginx's CPU and memory are those of its master and workers together (`/proc/<pid>/task/<pid>/
   children`); CPU from `/proc/<pid>/task/*/schedstat` (nanoseconds), since nginx's cost in a
   short run is a few of `/proc/<pid>/stat`'s 10 ms ticks.
"""

from __future__ import annotations

import contextlib
import re
import shutil
from pathlib import Path

from .procs import ROOT, cpu_seconds_fine, memory_kb

SHIPPED = ROOT / "nginx.conf"
UPSTREAM_NAME = "bench_upstream"


def _one(pattern: str, text: str, what: str, flags: int = re.MULTILINE) -> re.Match[str]:
    found = list(re.finditer(pattern, text, flags))
    if len(found) != 1:
        raise RuntimeError(f"nginx.conf: {what} matched {len(found)} times, expected once")
    return found[0]


def _block(text: str, opener: re.Match[str]) -> str:
    """The text inside the braces whose `{` ends `opener`'s match (nested braces counted)."""
    depth, i = 1, opener.end()
    start = i
    while depth and i < len(text):  # bounded by the text's length
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
        i += 1
    if depth:
        raise RuntimeError("nginx.conf: unbalanced braces")
    return text[start : i - 1]


def _directives(body: str) -> list[str]:
    """The simple directives (`name args;`) at the top level of a block body, comments dropped."""
    lines: list[str] = []
    depth = 0
    for raw in body.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if depth == 0 and line.endswith(";") and "{" not in line:
            lines.append(line)
        depth += line.count("{") - line.count("}")
    return lines


def relay_rules(source: str) -> dict[str, list[str]]:
    """The shipped config's relay rules (design note 1): `http`, `server`, `location` directives
    and the upstream's `keepalive`."""
    upstream = _block(source, _one(r"^\s*upstream ai_api \{", source, "upstream ai_api"))
    keepalive = [d for d in _directives(upstream) if d.startswith("keepalive ")]
    if len(keepalive) != 1:
        raise RuntimeError("nginx.conf: upstream ai_api has no single keepalive line")
    api_server = None
    for opener in re.finditer(r"^\s*server \{", source, re.MULTILINE):
        body = _block(source, opener)
        if re.search(r"^\s*server_name api\.example\.com;", body, re.MULTILINE):
            if api_server is not None:
                raise RuntimeError("nginx.conf: two servers named api.example.com")
            api_server = body
    if api_server is None:
        raise RuntimeError("nginx.conf: no server named api.example.com")
    server = [
        d for d in _directives(api_server) if d.startswith(("proxy_", "client_max_body_size "))
    ]
    if not any(d.startswith("proxy_http_version") for d in server):
        raise RuntimeError("nginx.conf: the API server sets no proxy_http_version")
    api_location = r"^\s*location ~ \^/\(\?:api\|v1\)/ \{"
    location = _block(api_server, _one(api_location, api_server, "the API location"))
    rules = _directives(location)
    passes = [d for d in rules if d.startswith("proxy_pass ")]
    if passes != ["proxy_pass http://ai_api;"]:
        raise RuntimeError(f"nginx.conf: the API location proxies with {passes}")
    if "proxy_buffering off;" not in rules:
        raise RuntimeError("nginx.conf: the API location does not turn proxy_buffering off")
    rules = [f"proxy_pass http://{UPSTREAM_NAME};" if d in passes else d for d in rules]
    http_body = _block(source, _one(r"^http \{", source, "http block"))
    http = [
        d
        for d in _directives(http_body)
        if d.split()[0] in ("server_tokens", "sendfile", "tcp_nopush", "keepalive_timeout")
    ]
    events = _block(source, _one(r"^events \{", source, "events block"))
    connections = [d for d in _directives(events) if d.startswith("worker_connections ")]
    return {
        "http": http,
        "server": server,
        "location": rules,
        "keepalive": keepalive,
        "worker_connections": connections,
    }


def render(prefix: Path, *, port: int, upstream_port: int, connections: int, nofile: int) -> Path:
    """The bench's nginx config under `prefix` (design note 2); returns its path. `connections`
    is what the scenario needs, `nofile` the descriptor limit the worker may ask for."""
    rules = relay_rules(SHIPPED.read_text())
    shipped_conns = int(rules["worker_connections"][0].split()[1].rstrip(";"))
    conns = max(shipped_conns, connections)
    prefix.mkdir(parents=True, exist_ok=True)
    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / kind).mkdir(exist_ok=True)
    temp = "".join(
        f"    {kind}_temp_path {prefix}/{kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )

    def indent(lines: list[str], n: int) -> str:
        return "".join(" " * n + line + "\n" for line in lines)

    text = (
        "# Rendered by bench/nginx.py from the shipped nginx.conf's relay rules.\n"
        "worker_processes 1;\n"
        f"worker_rlimit_nofile {nofile};\n"
        f"error_log {prefix}/error.log warn;\n"
        f"events {{\n    worker_connections {conns};\n}}\n"
        "http {\n"
        f"{temp}"
        "    default_type application/octet-stream;\n"
        "    access_log off;\n"
        f"{indent(rules['http'], 4)}"
        f"    upstream {UPSTREAM_NAME} {{\n"
        f"        server 127.0.0.1:{upstream_port};\n"
        f"{indent(rules['keepalive'], 8)}"
        "    }\n"
        "    server {\n"
        f"        listen 127.0.0.1:{port};\n"
        f"{indent(rules['server'], 8)}"
        "        location /v1/ {\n"
        f"{indent(rules['location'], 12)}"
        "        }\n"
        "    }\n"
        "}\n"
    )
    conf = prefix / "nginx.conf"
    conf.write_text(text)
    return conf


def command(conf: Path) -> list[str]:
    """nginx in the foreground with its pid file under the prefix; raises when nginx is missing."""
    binary = shutil.which("nginx")
    if binary is None:
        raise RuntimeError("nginx not found (scripts/ensure-tools.sh installs it)")
    prefix = conf.parent
    return [binary, "-p", f"{prefix}/", "-c", str(conf), "-e", "stderr",
            "-g", f"daemon off; pid {prefix}/nginx.pid;"]  # fmt: skip


def family(pid: int) -> list[int]:
    """The master and its children (the workers)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [pid, *(int(p) for p in f.read().split())]
    except OSError:
        return [pid]


def cpu_of(pid: int) -> float:
    """CPU seconds of the master and workers (design note 3)."""
    total = 0.0
    for p in family(pid):
        with contextlib.suppress(OSError):  # a worker that just exited
            total += cpu_seconds_fine(p)
    return total


def rss_of(pid: int) -> dict[str, int]:
    total = {"VmRSS": 0, "VmHWM": 0}
    for p in family(pid):
        try:
            mem = memory_kb(p)
        except OSError:
            continue
        for key in total:
            total[key] += mem.get(key, 0)
    return total
