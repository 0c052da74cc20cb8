"""One cached decoding step of one sequence on the GPU, captured once as a CUDA graph and replayed.

Through ref's layer code a step launched ~25 kernels and CuPy operations per layer, each 15-40 us of Python
and driver time, while the bench model's weights take ~0.08 ms to read on an H200 (fast/PERFORMANCE.md, "On
a GPU"). Here a step is ten launches per layer over buffers allocated once (a GEMV for q/k/v, their norms
and RoPE with the cache write, attention split by keys and its merge, the o GEMV, the residual add with both
norms, a GEMV for gate/up, GELU x up, the down GEMV, the residual add with the next layer's norm), the
output head and a greedy choice of the next token: recorded once per cache by stream capture and replayed
as one CUDA graph for every later step. What changes from step to step is read by the kernels from the
device: the token's embedding (the residual stream's start) or a flag to embed the token the last step
chose, each cache's slot and key count, the layer kinds' masks and the position's RoPE rows, all uploaded
in one copy from page-locked memory; the logits and the chosen token come back the same way. The cache's
side of a step (slots, masks) is the CPU step's (fast.step.StepPlan), computed on the host.

Speculated steps: in greedy decoding of one sequence (GpuModel.generate) each call queues, besides its own
step, the next position's step on the token its graph chose, so the device runs step after step while the
host picks tokens (ref.generate.select) behind it. A call whose embedding is that token's finds its step
queued; any other token (the host decides: sampling, another suppress list) runs the step again on the
same slots, which overwrites the guess, so the results never depend on it.

Under Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1, no CuPy) the same launches run one by one on NumPy
arrays, which is how CI checks the step against ref; capture and replay need a GPU (and CuPy's launches:
with FAST_GPU_LAUNCH=numba the steps also run launch by launch).
"""

from __future__ import annotations

import weakref
from types import SimpleNamespace

import numpy as np

from ref.safetensors_io import Bf16, to_f32

from . import gpu
from .cpu import RingKVCache
from .step import K_EQ_V, N, SHARED, SLOT, StepPlan, _matrices

xp = gpu.xp


class DeviceRingCache(RingKVCache):
    """fast.cpu's preallocated cache (a ring of `window` slots for sliding layers) with K and V on the device;
    slots and flags stay on the host. `speculate`: GpuStep queues each next step ahead on its own greedy
    token (set by GpuModel for greedy decoding of one sequence, whose steps come in order)."""

    xp = gpu.xp
    speculate = False


class GpuStep(StepPlan):
    """The captured step for one model. Call with (x [1, 1, D], positions [1, 1], key_ok, block [1, 1], a
    DeviceRingCache after its prefill) -> final-normed hidden states [1, 1, D] (a device buffer that the next
    step overwrites); the logits of that token are already computed (`logits_for`). `usable` says whether
    the step applies."""

    def __init__(self, cfg, params, head, embed):
        super().__init__(cfg)
        self.fresh = False  # the last step's logits were not handed out yet
        self.embed = embed  # ids [1, 1] -> the embedding [1, 1, D] on the host (GpuModel.embed)
        self.current = None  # the last step's run (`_enqueue`): where its logits and token arrive
        self.guesses = [0, 0]  # speculated steps whose token was right, wrong
        layer_mats = [[m.weight for m in _matrices(params.layers[i], mode)]
                      for i, mode in enumerate(self.modes_by_layer)]
        self.ok = (not cfg.attention_bias and all(s.head_dim % 2 == 0 for s in cfg.layers)
                   and all(isinstance(w, Bf16) and w.bits.shape[1] % 4 == 0 for w in sum(layer_mats, [head])))
        if not self.ok:
            return
        D, H = cfg.hidden_size, cfg.num_attention_heads
        self.layers = []
        for i, spec in enumerate(cfg.layers):
            p, a, mode = params.layers[i], params.layers[i].self_attn, self.modes_by_layer[i]
            q, k, v, o, gate, up, down = layer_mats[i]
            dh, kv = spec.head_dim, spec.num_kv_heads
            qkv = [q] if mode == SHARED else [q, k] if mode == K_EQ_V else [q, k, v]
            self.layers.append(SimpleNamespace(
                qkv=qkv, o=o, gate_up=[gate, up], down=down, dh=dh, kv=kv, heads=H, src=self.own.index(spec.kv_source),
                kind=self.kinds.index(spec.kind), rope=self.ropes.index((spec.rope, dh)), inter=spec.intermediate_size,
                blocks=H + (0 if mode == SHARED else 2 * kv), v_at=(H + (0 if mode == K_EQ_V else kv)) * dh,
                width=sum(w.bits.shape[0] for w in qkv),
                in_ln=gpu.vector(p.input_layernorm.weight, D), q_norm=gpu.vector(a.q_norm.weight, dh),
                k_norm=gpu.vector(None if mode == SHARED else a.k_norm.weight, dh),
                post_attn=gpu.vector(p.post_attention_layernorm.weight, D),
                pre_ff=gpu.vector(p.pre_feedforward_layernorm.weight, D),
                post_ff=gpu.vector(p.post_feedforward_layernorm.weight, D),
                scalar=np.float32(float(to_f32(p.layer_scalar).reshape(-1)[0]))))
        self.final_norm = gpu.vector(params.norm.weight, D)
        self.head = head
        f32 = lambda n: xp.zeros(n, xp.float32)  # noqa: E731
        self.h, self.y = f32(D), f32(D)  # normed input, sublayer output (the residual stream is per cache: `_bind`)
        self.proj = f32(max(L.width for L in self.layers))
        self.q = f32(H * self.head_dim)
        self.att = f32(H * self.head_dim)
        self.gu = f32(2 * max(L.inter for L in self.layers))
        C = gpu.STEP_SPLITS  # attention's key chunks per head: partial max, sum and weighted values
        self.part_m, self.part_l, self.part_acc = f32(H * C).reshape(H, C), f32(H * C).reshape(H, C), f32(H * C * self.head_dim)
        V = head.bits.shape[0]
        self.logits = f32(V)
        # greedy selection on the device (what a speculated step takes as its token): ref.generate.select's
        # suppressed ids, the blocks' partial maxima, the chosen id; the embedding table and its scale
        suppress = np.zeros(V, np.int32)
        suppress[[t for t in cfg.suppress_tokens if t < V]] = 1
        self.suppress = xp.asarray(suppress)
        self.arg_v, self.arg_i = f32(gpu.ARGMAX_BLOCKS), xp.zeros(gpu.ARGMAX_BLOCKS, xp.int64)
        self.token = xp.zeros(1, xp.int32)
        self.embed_table = params.embed_tokens.weight.bits
        # what each run copies back, in two page-locked buffers used in turn (`_enqueue`)
        self.logits_host = [self._host_buffer(V, np.float32) for _ in range(2)]
        self.token_host = [self._host_buffer(1, np.int32) for _ in range(2)]
        self.out_turn = 0
        # Numba's own launcher (FAST_GPU_LAUNCH=numba) queues on its default stream, which a capture on this
        # stream would not record: steps then run launch by launch, as under the simulator
        self.stream = xp.cuda.Stream(non_blocking=True) if xp is not np and gpu.LAUNCH == "cupy" else None
        self._bound = weakref.WeakKeyDictionary()  # cache -> its input buffers, scratch and graph (`_bind`)

    def _host_buffer(self, n: int, dtype) -> np.ndarray:
        """A host array [n] that the device copies to and from asynchronously, without staging (page-locked
        memory on a GPU; a copy to or from pageable memory goes through a driver buffer and blocks)."""
        if xp is np:
            return np.zeros(n, dtype)
        return np.frombuffer(xp.cuda.alloc_pinned_memory(n * np.dtype(dtype).itemsize), dtype, n)

    def usable(self, x, cache) -> bool:
        """One token of one sequence, after a prefill filled every layer's cache."""
        return (self.ok and x.shape[:2] == (1, 1) and isinstance(cache, DeviceRingCache)
                and cache.length > 0 and all(i in cache.keys for i in self.own))

    def _bind(self, cache) -> SimpleNamespace:
        """A cache's step inputs (two int32 buffers on the host, used in turn, and one device copy; views:
        nums [2 J + 1] = each cache's (slot, key count), then 1 if the step takes its token from the device
        (the last step's greedy choice) else 0; masks [kinds, cap] 0/1, cos/sin [ropes, max Dh] and x [D]
        as float32: the token's embedding, on the device the residual stream the step updates in place),
        the attention scratch and the graph, made at its first step (its K/V arrays are fixed once the
        prefill made them)."""
        b = self._bound.get(cache)
        if b is not None:
            return b
        cap = max(cache.keys[i].shape[1] for i in self.own)
        J, R, Dh = len(self.own), len(self.ropes), self.head_dim
        sizes = [2 * J + 1, len(self.kinds) * cap, R * Dh, R * Dh, self.cfg.hidden_size]
        edges = np.cumsum([0] + sizes)
        dev = xp.zeros(edges[-1], xp.int32)

        def views(a):
            return (a[edges[0]:edges[1]], a[edges[1]:edges[2]].reshape(-1, cap),
                    a[edges[2]:edges[3]].view(np.float32).reshape(R, Dh), a[edges[3]:edges[4]].view(np.float32).reshape(R, Dh),
                    a[edges[4]:edges[5]].view(np.float32))

        hosts = [self._host_buffer(edges[-1], np.int32) for _ in range(2)]
        b = SimpleNamespace(hosts=hosts, host_views=[views(h) for h in hosts], dev=dev, d=views(dev), graph=None,
                            turn=0, copied=[None, None], spec=None,
                            keys=[cache.keys[i][0] for i in self.own], values=[cache.values[i][0] for i in self.own],
                            scratch=xp.zeros((self.cfg.num_attention_heads, cap), xp.float32))
        self._bound[cache] = b
        return b

    def _launch(self, b) -> None:
        """Every launch of a step, in order, on the current stream: what the graph records."""
        T, eps, D = gpu.THREADS, np.float32(self.cfg.rms_norm_eps), self.cfg.hidden_size
        row = lambda a, n: a[:n].reshape(1, n)  # noqa: E731 - a buffer's first n values as a [1, n] operand
        nums, masks, cos, sin, x = b.d
        gpu.embed_token_kernel[-(-D // T), T](nums, 2 * len(self.own), self.token, self.embed_table,
                                              np.float32(D ** 0.5), *gpu.embedding_ids(self.cfg), x)
        h2, y2 = self.h.reshape(1, D), self.y.reshape(1, D)
        gpu.rms_norm_kernel[1, gpu.WIDE](x.reshape(1, D), self.layers[0].in_ln, eps, h2)
        for i, L in enumerate(self.layers):
            gpu.gemv(h2, L.qkv, row(self.proj, L.width))
            H, dh = L.heads, L.dh
            q, att = self.q[:H * dh].reshape(H, dh), self.att[:H * dh].reshape(H, dh)
            keys, values = b.keys[L.src], b.values[L.src]
            gpu.head_prep_kernel[L.blocks, T](self.proj[:L.width], L.q_norm, L.k_norm, cos[L.rope, :dh], sin[L.rope, :dh],
                                              H, L.kv, L.v_at, nums, L.src, eps, q, keys, values)
            acc = self.part_acc[:H * gpu.STEP_SPLITS * dh].reshape(H, gpu.STEP_SPLITS, dh)
            gpu.step_attention_kernel[H * gpu.STEP_SPLITS, T](q, keys, values, masks[L.kind], nums, L.src, b.scratch,
                                                              self.part_m, self.part_l, acc)
            gpu.merge_splits_kernel[H, gpu.WIDE](self.part_m, self.part_l, acc, values, nums, L.src, att)
            gpu.gemv(row(self.att, H * dh), [L.o], y2)
            gpu.residual_norm_kernel[1, gpu.WIDE](x, self.y, L.post_attn, np.float32(1.0), L.pre_ff, eps, self.h)
            gpu.gemv(h2, L.gate_up, row(self.gu, 2 * L.inter))
            g, u = self.gu[:L.inter], self.gu[L.inter:2 * L.inter]
            gpu.gelu_mul_kernel[min(-(-L.inter // T), 4096), T](g, u, g)
            gpu.gemv(row(g, L.inter), [L.down], y2)
            nxt = self.layers[i + 1].in_ln if i + 1 < len(self.layers) else self.final_norm
            gpu.residual_norm_kernel[1, gpu.WIDE](x, self.y, L.post_ff, L.scalar, nxt, eps, self.h)
        gpu.gemv(h2, [self.head], self.logits.reshape(1, -1))
        cap = self.cfg.final_logit_softcapping
        if cap is not None:  # as ref's lm_head: cap * tanh(logits / cap), in place
            xp.divide(self.logits, np.float32(cap), out=self.logits)
            xp.tanh(self.logits, out=self.logits)
            xp.multiply(self.logits, np.float32(cap), out=self.logits)
        gpu.argmax_parts_kernel[gpu.ARGMAX_BLOCKS, T](self.logits, self.suppress, self.arg_v, self.arg_i)
        gpu.argmax_final_kernel[1, T](self.arg_v, self.arg_i, self.token)

    def __call__(self, x, positions, key_ok, block, cache):
        """x [1, 1, D]: the token's embedding, on the host (GpuModel.embed's) or the device. With
        cache.speculate, the step for the next position is queued before this returns, on the token this
        step chooses greedily on the device: when the next call brings that token's embedding, its step is
        already running; another token runs that step again (same slots: it overwrites the guess)."""
        b = self._bind(cache)
        q = int(np.asarray(positions).reshape(-1)[0])
        x = (x if isinstance(x, np.ndarray) else xp.asnumpy(x)).reshape(-1)
        spec, b.spec = b.spec, None
        if spec is not None:
            if not (spec.position == q and np.all(key_ok) and np.all(np.asarray(block) == -1)):
                raise RuntimeError(f"a speculating cache was stepped at position {q}; its queued step is for "
                                   f"{spec.position}: decode its tokens in order")
            run = spec.run
            right = np.array_equal(x, self._embedding(spec.source))
            self.guesses[0 if right else 1] += 1
            if not right:  # not the device's greedy token: the step again, on x
                run = self._enqueue(b, spec.table, spec.masks, q, x)
        else:
            _, table, masks = self.bookkeeping(cache, key_ok, block)
            run = self._enqueue(b, table, masks, q, x)
        if cache.speculate and cache.length < cache.max_len:
            _, table, masks = self.bookkeeping(cache, np.ones((1, 1), bool), np.full((1, 1), -1))
            b.spec = SimpleNamespace(position=q + 1, table=table, masks=masks, source=run,
                                     run=self._enqueue(b, table, masks, q + 1, None))
        self.current, self.fresh = run, True
        return self.h.reshape(1, 1, -1)

    def _embedding(self, run) -> np.ndarray:
        """The embedding [D] (host) of the token a run chose on the device."""
        if run.done is not None:
            run.done.synchronize()
        return self.embed(self.token_host[run.slot].astype(np.int64).reshape(1, 1)).reshape(-1)

    def _enqueue(self, b, table, masks, q: int, x) -> SimpleNamespace:
        """Queue one step at position q (slots and key counts from table, masks [kinds, n]) on the embedding x
        [D] (host), or with x None on the token the previous run chose -> the run: `done`, an event after its
        logits and token reach page-locked buffer `slot` (None when it ran launch by launch, already done)."""
        k, b.turn = b.turn, 1 - b.turn
        if b.copied[k] is not None:
            b.copied[k].synchronize()  # this input buffer's last upload has left it
        nums, mask_rows, cos, sin, embedding = b.host_views[k]
        J = len(self.own)
        nums[0:2 * J:2], nums[1:2 * J:2], nums[2 * J] = table[self.own, SLOT], table[self.own, N], int(x is None)
        if x is not None:
            embedding[:] = x
        mask_rows[:, :masks.shape[1]] = masks  # kernels read slots < n only: what lies past them does not matter
        cos[:], sin[:] = self.rope_rows(q)
        r, self.out_turn = self.out_turn, 1 - self.out_turn
        if self.stream is None:  # launch by launch
            b.dev[:] = xp.asarray(b.hosts[k])
            self._launch(b)
            self.logits_host[r][:] = self.logits if xp is np else xp.asnumpy(self.logits)
            self.token_host[r][:] = self.token if xp is np else xp.asnumpy(self.token)
            return SimpleNamespace(done=None, slot=r)
        # the step's stream is non-blocking: it waits for the work queued before it (the prefill's K/V) and
        # the stream that queued it waits for the step
        caller = xp.cuda.get_current_stream()
        self.stream.wait_event(caller.record())
        with self.stream:
            b.dev.set(b.hosts[k], self.stream)  # the step's inputs and the embedding: one copy
            b.copied[k] = self.stream.record()
            if b.graph is None:  # this cache's first step runs launch by launch, then is recorded
                self._launch(b)
                self.stream.begin_capture()
                self._launch(b)
                b.graph = self.stream.end_capture()
            else:
                b.graph.launch(self.stream)
            self.logits.get(self.stream, out=self.logits_host[r], blocking=False)
            self.token.get(self.stream, out=self.token_host[r], blocking=False)
            done = self.stream.record()
        caller.wait_event(done)
        return SimpleNamespace(done=done, slot=r)

    def logits_for(self, h, table, cap):
        """The logits [1, 1, V] (host) of the last step's token, if h is that step's output, table the head and
        cap the softcapping it ran with and they were not handed out yet; else None."""
        if not (self.fresh and table is self.head and cap == self.cfg.final_logit_softcapping
                and h.shape == (1, 1, self.h.size) and gpu._pointer(h) == gpu._pointer(self.h)):
            return None
        self.fresh = False
        if self.current.done is not None:
            self.current.done.synchronize()
        return self.logits_host[self.current.slot].reshape(1, 1, -1).copy()
