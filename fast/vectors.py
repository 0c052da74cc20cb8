"""512-bit vectors for fast's compiled kernels on a CPU with AVX-512.

LLVM compiles for Intel's AVX-512 CPUs with 256-bit vectors unless told otherwise: their CPU models carry a
"prefer-256-bit" tuning (Skylake-SP lowered its clock under wide vectors); the Ice Lake server here had it.
On the 2-core Ice Lake host (twenty-ninth session) the kernels whose cost is arithmetic ran faster with
512-bit vectors: the prefill's softmax 20 % and GELU 25 % (0.53 -> 0.42 ms and 2.6 -> 2.0 ms on one core,
alternated processes), the decode step's attention 1.46-1.58 -> 1.18-1.20 ms a token (`--stages`, four
alternated runs); the memory-bound GEMVs did not move beyond the host's noise. So fast asks Numba for the
host's features less that tuning, before Numba compiles anything in this process (its CPU target is set up
once, at the first `@njit` the process meets). Where the user chose NUMBA_CPU_NAME or NUMBA_CPU_FEATURES,
or Numba had already set up its target, nothing changes; NUMBA_CPU_FEATURES set to the host's features
(`numba -s` lists them) keeps LLVM's choice. Numba's on-disk cache keys compiled code by these features,
so kernels compiled either way do not mix. Other Numba code in the same process compiles the same way.
"""

from __future__ import annotations

WIDE = "-prefer-256-bit"  # LLVM's tuning feature, switched off


def wide_features(host: str) -> str | None:
    """Numba's host feature string ("+avx2,+avx512f,-amx-tile,...") -> the same with 512-bit vectors
    preferred, where the host has AVX-512 (foundation); None elsewhere (nothing to change)."""
    return f"{host},{WIDE}" if "+avx512f" in host.split(",") else None


def prefer_512_bit_vectors() -> bool:
    """Set Numba's CPU features to `wide_features` of this host, where that changes anything and Numba
    has not set up its CPU target yet, nor the user chosen a CPU -> whether it did."""
    try:
        from numba.core import config
        from numba.core.codegen import get_host_cpu_features
        from numba.core.registry import cpu_target
    except ImportError:  # the fast extra (numba) is missing; fast.load_model says so
        return False
    if config.CPU_NAME is not None or config.CPU_FEATURES is not None:
        return False
    if "_toplevel_target_context" in vars(cpu_target):  # set up already: features fixed for this process
        return False
    features = wide_features(get_host_cpu_features())
    if features is None:
        return False
    config.CPU_FEATURES = features  # kept by Numba's config reloads while no NUMBA_ variable changes
    return True
