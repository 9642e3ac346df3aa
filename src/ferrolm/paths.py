"""Where ferrolm keeps its files: FERROLM_HOME, default ~/.cache/ferrolm."""

from __future__ import annotations

import os
from pathlib import Path


def ferrolm_home() -> Path:
    home = os.environ.get("FERROLM_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "ferrolm")
    return Path(home)
