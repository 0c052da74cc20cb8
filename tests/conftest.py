"""Hypothesis draws the same examples on every run by default (derandomize), so CI cannot turn red on a
draw no local run saw, and a failure reproduces anywhere. `HYPOTHESIS_PROFILE=explore` draws fresh
examples each run: use it when changing kernels or processors.

For the same reason the suite pins fast's prefill BLAS to numpy's OpenBLAS (FAST_BLAS, unless set): fast
otherwise picks OpenBLAS or MKL by timing both (fast.cpu.choose_blas), and a pick by timing can differ
between two runs on one machine. tests/test_fast_blas.py runs MKL's path explicitly (its products, whole
prompts against ref) and the choice itself with the variable unset."""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))
os.environ.setdefault("FAST_BLAS", "openblas")
