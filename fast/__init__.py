"""fast: the same model as `ref` with its hot loops rewritten (Numba on the CPU, CuPy on the GPU).

Not built yet: this package is a placeholder so that the layout and the install are fixed. Until the
kernels land it exposes nothing, rather than a pretend backend that would only call `ref`.
"""
