"""Shared test helpers: tiny model configs built in one place so compiled functions are reused."""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # lets tests load configs/*.py the way the CLIs do
    sys.path.insert(0, ROOT)
