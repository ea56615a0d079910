"""Every web.AppKey and web.RequestKey of the application, and nothing else."""

from __future__ import annotations

from aiohttp import web

from . import logs
from .chat.turns import Chats
from .config import Settings
from .health import ReadinessProbe
from .limits.access import Access
from .limits.accounts import Limits
from .limits.core import Admission
from .metrics import Metrics
from .relay import Generations, SharedStreams
from .upstream import Upstream

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
LIVE = web.AppKey("live", Generations)  # the generations and the MAX_STREAMS slots
UPSTREAM = web.AppKey("upstream", Upstream)
READINESS = web.AppKey("readiness", ReadinessProbe)
ACCESS = web.AppKey("access", Access)
LIMITS = web.AppKey("limits", Limits)
CHATS = web.AppKey("chats", Chats)
# Streams of other instances (through Redis), asked before a stream route's 404; absent = none.
SHARED_STREAMS = web.AppKey("shared_streams", SharedStreams)

REQUEST_ID = logs.REQUEST_ID
ARRIVED = logs.ARRIVED
KEY_ID = web.RequestKey("key_id", str)  # the accepted API key's id, when keys are required
ADMISSION = web.RequestKey("admission", Admission)  # what the limiter said: quota headers
