"""Hypothesis draws the same examples on every run by default (derandomize), so CI cannot turn red on a
draw no local run saw, and a failure reproduces anywhere. `HYPOTHESIS_PROFILE=explore` draws fresh
examples each run: use it when changing kernels or processors."""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))
