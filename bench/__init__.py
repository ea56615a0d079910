"""Benchmark harness for the streaming gateway: `python -m bench` (or `make bench`).

Three processes, pinned apart where the machine allows it:

- `bench.upstream`: a fast OpenAI-compatible server on raw asyncio protocols, so the model side
  is never the bottleneck;
- the service itself (`python -m service`), pointed at that upstream;
- `bench.load`: a load generator that opens the streams, times every arrival and checks the text.

The runner (`bench.__main__`) alternates direct runs (load generator straight to the upstream)
with service runs, reads the service's CPU time and RSS from /proc, and prints a table of
medians over rounds against the targets (`bench.scenarios`). Results land in `bench/results/`.
"""
