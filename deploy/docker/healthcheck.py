"""Container health check: exit 0 when the service answers ``GET /readyz`` with 200, else 1.

Used by the images' ``HEALTHCHECK`` (slim images carry no curl). The port is ``$ROBUSTNORM_PORT`` (default
8000); a draining or still-warming replica answers 503 and so reports unhealthy.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def ready(port: int, timeout: float = 2.0) -> bool:
    """Whether ``http://127.0.0.1:{port}/readyz`` answers 200 within ``timeout`` seconds."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


if __name__ == "__main__":
    sys.exit(0 if ready(int(os.environ.get("ROBUSTNORM_PORT", "8000"))) else 1)
