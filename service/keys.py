"""Every web.AppKey and web.RequestKey of the application, and nothing else."""

from __future__ import annotations

from aiohttp import web

from . import logs
from .config import Settings
from .health import ReadinessProbe
from .metrics import Metrics
from .relay import LiveStreams
from .upstream import Upstream

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
LIVE = web.AppKey("live", LiveStreams)
UPSTREAM = web.AppKey("upstream", Upstream)
READINESS = web.AppKey("readiness", ReadinessProbe)

REQUEST_ID = logs.REQUEST_ID
ARRIVED = logs.ARRIVED
