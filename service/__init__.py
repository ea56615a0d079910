"""An AI streaming gateway: OpenAI-compatible answers relayed to browsers as Server-Sent Events."""
