"""`python -m service probe URL`: does the path to the service stream, or buffer?"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    print("probe: not built yet", file=sys.stderr)
    return 2
