"""The benchmarks' one way to get matplotlib: ``pyplot()`` is ``matplotlib.pyplot`` on the file-only Agg
backend, or None (with a warning) where matplotlib is not installed, so that a benchmark still writes its JSON."""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)


def pyplot() -> Any | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    return plt


def save(figure: Any, path: Any) -> None:
    """Lay ``figure`` out, write it to ``path`` (PNG at 110 dpi) and free it."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
