"""Per-client limits and who the client is, as one capability (README, Limits and access).

- `core`: the pure arithmetic (sliding request log, token bucket, leases) and the in-process
  backend, `MemoryLimiter`; the `Limiter` protocol both backends answer.
- `redis_backend`: the same limits in Redis (Lua), shared by several instances.
- `accounts`: the shell the app holds, `Limits`: admission with the outage policy, one `Account`
  per admitted stream and the upkeep task that charges and renews them.
- `access`: API keys and client addresses (pure), which name whose limits a request counts against.

Dependencies run `accounts` -> `redis_backend` -> `core`; nothing here imports the stream layer.
"""
