"""fast: the same model as `ref` with its hot loops compiled: Numba on the CPU, CuPy + Numba CUDA on a GPU.

`fast.load_model(path, device="cpu"|"gpu")` returns a model with ref's `forward` and `generate`: config,
loader, processors, masks and sampling are ref's; only the kernels (fast/cpu.py, fast/gpu.py) and the
KV cache differ, and on the CPU a prompt of one sequence runs with the tokens along the columns
(fast/prefill.py) and a cached one-token step runs those kernels from one compiled function
(fast/step.py), in whose loop greedy decoding of one sequence runs its tokens (ref's greedy choice,
compiled); on a GPU a prompt of one sequence runs fused kernels (fast/gpu_prefill.py) and a cached step
is one CUDA graph (fast/gpu_step.py). Results equal ref's to float32 rounding.
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from pathlib import Path

import numpy as np

from ref.config import load_config
from ref.errors import ConfigError
from ref.generate import prepare, select
from ref.model import Model
from ref.weights import load_tensors

from .vectors import prefer_512_bit_vectors

WIDE_VECTORS = prefer_512_bit_vectors()  # before any fast module defines a kernel (fast/vectors.py)
DEVICES = ("cpu", "gpu")


def _generate_arguments(model, args, kwargs) -> dict:
    """A call of Model.generate's arguments -> {name: value}, defaults filled in."""
    call = inspect.signature(Model.generate).bind(model, *args, **kwargs)
    call.apply_defaults()
    return call.arguments


_MEDIA_ARGUMENTS = tuple(k for k in inspect.signature(Model.embed).parameters  # pixel_values ... input_features_mask
                         if k not in ("self", "input_ids", "trace"))


class _StepLogits:
    """The output head of a model whose cached one-token step computes that token's logits itself (the
    CPU's compiled step, the GPU's graph): `_lm_head` stands in for the kernels' lm_head, taking the
    step's logits for the step's own output (its `logits_for`) and the backend's lm_head (`_backend`,
    fast.cpu or fast.gpu, looked up at each call) for anything else."""

    def _lm_head(self, h, table, cap):
        logits = None if self._step is None else self._step.logits_for(h, table, cap)
        return self._backend.lm_head(h, table, cap) if logits is None else logits


class CpuModel(_StepLogits, Model):
    """ref's Model with Numba kernels and a preallocated cache."""

    def __init__(self, *args, **kwargs):
        from . import cpu  # compiles (or loads cached) kernels on first use

        super().__init__(*args, **kwargs)
        self._cpu = self._backend = cpu
        self.kernels = dataclasses.replace(cpu.KERNELS, lm_head=self._lm_head)
        self._cache_type = cpu.RingKVCache
        self._step = None  # fast.step.DecodeStep, built at the first cached step
        self.whole_step = True  # False: decoding steps run ref's layer code with fast's kernels, call by call
        self.token_minor = True  # False: prompts run ref's layer code with fast's kernels (fast/prefill.py)
        self.greedy_loop = True  # False: greedy decoding of one sequence runs ref's loop (see `generate`)
        cpu.keep_freed_memory()

    def new_cache(self, batch: int, max_len: int):
        return self._cache_type(batch, max_len)

    def run_decoder(self, x, positions, key_ok, block, cache=None, trace=None, last_only=False):
        """ref's decoder, except that a cached step of one token runs compiled whole (fast/step.py) and a
        prompt of one sequence runs with the tokens along the columns (fast/prefill.py), its last layer on
        the last token alone where only that one's states are wanted (`last_only`)."""
        from . import prefill

        if self.token_minor and prefill.usable(x, trace):
            return prefill.forward(x, self.decoder_params, self.config, positions, key_ok, block, cache, last_only)
        if self.whole_step and trace is None and cache is not None and self._decode_step().usable(x, cache):
            return self._step(x, positions, key_ok, block, cache)
        return super().run_decoder(x, positions, key_ok, block, cache, trace, last_only)

    def _decode_step(self):
        """The compiled step (fast.step.DecodeStep), built at its first use."""
        if self._step is None:
            from .step import DecodeStep

            self._step = DecodeStep(self.config, self.decoder_params, self.head)
        return self._step

    def generate(self, *args, **kwargs):
        """Model.generate. Greedy decoding of one sequence with a cache, where the compiled step covers the
        model, runs ref's preparation, prefill and first choice, then every later token in the step's
        compiled loop (DecodeStep.greedy): ref's loop spends ~0.3 ms of Python a token on caches that the
        step's weights have just swept (~2 % of a bench token); the tokens are the same (tested)."""
        a, cfg = _generate_arguments(self, args, kwargs), self.config
        if not (self.greedy_loop and self.whole_step and not a["temperature"] and a["use_cache"]
                and np.ndim(a["input_ids"]) == 2 and np.shape(a["input_ids"])[0] == 1 and a["max_new_tokens"] > 1
                and cfg.bidirectional != "all" and self._decode_step().greedy_covers(cfg.suppress_tokens)):
            return super().generate(*args, **kwargs)
        media = {k: a[k] for k in _MEDIA_ARGUMENTS}
        x, positions, key_ok, block, cache = prepare(self, a["input_ids"], a["max_new_tokens"], a["attention_mask"],
                                                     a["mm_token_type_ids"], True, **media)
        h = self.run_decoder(x, positions, key_ok, block, cache, last_only=True)
        first = select(self.kernels.lm_head(h[:, -1:], self.head, cfg.final_logit_softcapping)[:, 0],
                       cfg.suppress_tokens, 0.0, None, None, None)
        return np.array([self._step.greedy(int(first[0]), int(positions[0, -1]) + 1, cache, a["max_new_tokens"],
                                           cfg.eos_token_ids, cfg.suppress_tokens, a["on_token"])], np.int64)

    def compile(self) -> float:
        """Compile (or load from Numba's cache) every kernel now, and choose the prefill's BLAS (its products
        timed: cpu.choose_blas) -> seconds it took."""
        from .prefill import compile_prefill
        from .step import compile_step

        t0 = time.perf_counter()
        self._cpu.compile_kernels()
        self._cpu.choose_blas()
        compile_prefill()
        compile_step()
        return time.perf_counter() - t0


class GpuModel(_StepLogits, Model):
    """ref's Model with the decoder's weights on the device and GPU kernels. A text-only prompt inside
    forward or a cached generate is embedded on the device (`embed`); other embedding (single tokens, the
    vision/audio embedders) stays on the host and moves to the device once per decoder call (a cached step
    of one token takes it in its one upload of inputs). A prompt of one sequence runs fast/gpu_prefill.py's
    fused pass; a cached step of one token runs as one replayed CUDA graph, output head and greedy choice
    included (fast/gpu_step.py)."""

    def __init__(self, *args, **kwargs):
        from . import gpu

        super().__init__(*args, **kwargs)
        self._gpu = self._backend = gpu
        self.kernels = dataclasses.replace(gpu.KERNELS, lm_head=self._lm_head)
        self._decoder = gpu.to_device(self.params.language_model)
        self._head = self._decoder.embed_tokens.weight if self.config.tie_word_embeddings else \
            gpu.to_device(self.tensors["lm_head.weight"])
        self._step = None  # fast.gpu_step.GpuStep, built at the first cached step
        self.whole_step = True  # False: decoding steps run ref's layer code with the GPU kernels, call by call
        self.speculate = True  # greedy generate of one sequence: each step queued before the last one's token is back
        self.fused_prompt = True  # False: prompts run ref's layer code with the GPU kernels (fast/gpu_prefill.py)
        self._prompt_ok = None  # whether gpu_prefill can take this model's weights, found at the first prompt
        self._greedy = False  # inside such a generate (its cache speculates)
        self._embed_here = False  # inside forward or a cached generate: prompts are embedded on the device

    def generate(self, *args, **kwargs):
        """Model.generate. Greedy decoding of one sequence with whole steps runs each step ahead on the token
        the device chose (fast/gpu_step.py: speculated steps), so the GPU need not wait for the host between
        tokens; the tokens are the same."""
        a = _generate_arguments(self, args, kwargs)
        self._greedy = self.speculate and not a["temperature"] and np.shape(a["input_ids"])[0] == 1
        # a cached generate hands embeddings to the decoder only (without a cache it concatenates them)
        self._embed_here = a["use_cache"] and self.config.bidirectional != "all"
        try:
            return super().generate(*args, **kwargs)
        finally:
            self._greedy = self._embed_here = False

    def forward(self, *args, **kwargs):
        """Model.forward; a text-only prompt is embedded on the device (`embed`)."""
        self._embed_here = True
        try:
            return super().forward(*args, **kwargs)
        finally:
            self._embed_here = False

    __call__ = forward

    def embed(self, input_ids, pixel_values=None, image_position_ids=None, pixel_values_videos=None,
              video_position_ids=None, num_frames_per_video=None, input_features=None, input_features_mask=None,
              trace=None):
        """Model.embed; inside forward and a cached generate, text-only ids of more than one token are embedded
        on the device, where the table is (gpu.embed_tokens): no host gather, no upload of [T, D] floats."""
        if (self._embed_here and trace is None and np.ndim(input_ids) == 2 and np.shape(input_ids)[1] > 1
                and pixel_values is None and pixel_values_videos is None and input_features is None):
            return self._gpu.embed_tokens(input_ids, self._decoder.embed_tokens.weight, self.config)
        return super().embed(input_ids, pixel_values, image_position_ids, pixel_values_videos, video_position_ids,
                             num_frames_per_video, input_features, input_features_mask, trace)

    @property
    def decoder_params(self):
        return self._decoder

    @property
    def head(self):
        return self._head

    def new_cache(self, batch: int, max_len: int):
        from .gpu_step import DeviceRingCache

        cache = DeviceRingCache(batch, max_len)
        cache.speculate = self._greedy
        return cache

    def run_decoder(self, x, positions, key_ok, block, cache=None, trace=None, last_only=False):
        """ref's decoder, except that a cached step of one token of one sequence runs as fast/gpu_step.py's
        captured graph and a prompt of one sequence as fast/gpu_prefill.py's fused pass (both return every
        token's states: `last_only` is ref's, a permission)."""
        from . import gpu_prefill

        if self.fused_prompt and gpu_prefill.usable(x, self.config, trace):
            if self._prompt_ok is None:
                self._prompt_ok = gpu_prefill.weights_ok(self.decoder_params, self.config)
            if self._prompt_ok:
                return gpu_prefill.forward(x, self.decoder_params, self.config, positions, key_ok, block, cache)
        if self.whole_step and trace is None and cache is not None:
            if self._step is None:
                from .gpu_step import GpuStep

                self._step = GpuStep(self.config, self.decoder_params, self.head, self.embed)
            if self._step.usable(x, cache):
                return self._step(x, positions, key_ok, block, cache)
        return super().run_decoder(self._gpu.xp.asarray(x), positions, key_ok, block, cache, trace, last_only)

    def compile(self) -> float:
        """Compile every GPU kernel now (gpu.compile_all), then generate two tokens after a prompt one token
        longer than gpu.GEMV_MAX_M, so that the fused prompt, the graph step's capture and cuBLAS's first
        calls are behind too (on a GPU this costs milliseconds beyond the compiling) -> seconds it took."""
        t0 = time.perf_counter()
        self._gpu.compile_all()
        self.generate(np.full((1, self._gpu.GEMV_MAX_M + 1), self.config.bos_token_id, np.int64), max_new_tokens=2)
        return time.perf_counter() - t0


RESIDENT_SHARE = 0.5  # copy the weights off the memory map when they take at most this share of free memory


def load_model(path: str | Path, device: str = "cpu", resident: bool | None = None, progress: bool = False) -> Model:
    """Like ref.load_model, with fast kernels on `device`. On the CPU, `resident` copies the weights (still
    bf16, bit for bit) out of the checkpoint's memory map into anonymous memory (cpu.resident_copy: faster
    to stream); None decides by size: when they take at most RESIDENT_SHARE of the memory available now
    (cpu.available_memory: the kernel's, or a container's limit where that leaves less).
    A model that does not fit stays mapped, so the kernel can still page it in and out. `progress`: a bar on
    stderr while the copy is made."""
    if device not in DEVICES:
        raise ValueError(f"device {device!r} is not available in fast/ (have: {', '.join(DEVICES)})")
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{path}: not a model directory")
    cfg = load_config(path)
    if device == "gpu":
        try:
            from . import gpu  # noqa: F401
        except ImportError as e:
            raise ValueError(f"device 'gpu' needs CuPy and a CUDA GPU (pip install '.[gpu]'): {e}") from None
        return GpuModel(cfg, load_tensors(path, cfg), path)
    from . import cpu

    tensors = load_tensors(path, cfg)
    if resident is None:
        free = cpu.available_memory()
        resident = free is not None and sum(t.nbytes for t in tensors.values()) <= RESIDENT_SHARE * free
    return CpuModel(cfg, cpu.resident_copy(tensors, progress) if resident else tensors, path)
