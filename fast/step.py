"""One cached decoding step of one sequence, compiled whole (as gpt-fast compiles its decode step).

A decode step is 1 token through every layer: per layer about 20 kernel calls and 30 small numpy operations
of ref's layer code, each costing a few microseconds of Python and dispatch. On the bench model that was
~0.6-0.9 ms of an 8 ms token, time in which memory sits idle. Here one compiled function runs ref.decoder's
steps 1-5 for every layer by calling fast.cpu's kernels in ref's order, so the result is the unfused path's
bit for bit (tested): the same kernels on the same arrays. Its threads run the whole step as one team,
meeting at a spin barrier between stages (fast/team.py) rather than starting a parallel loop per stage:
right after a stage has streamed megabytes of weights through the caches, a loop's start and join cost
~10 us, ~40 times a token. The cache's side (each layer's slot for the token, and which held keys it may
see: fast.maskrule's pair rule, which mirrors ref's layer_mask and which the GPU kernels use too) is a
second compiled call; RoPE tables come from ref's rope_cos_sin, filled ahead for 64 positions at a time.
Greedy decoding of one sequence (the model's generate) runs its tokens after the prefill's in a loop of its
own (`DecodeStep.greedy`): the token's embedding and the greedy choice, which ref's loop computes in ~20
numpy operations at ~10-40 us each on the caches a step has just swept, are compiled calls too. Anything
else (batches, prompts, float32/float16 weights, attention biases, traces) takes ref's layer code with
fast's kernels, as before.

Numba's on-disk cache checks only this file's date: after editing fast/cpu.py, fast/maskrule.py or
fast/team.py, delete fast/__pycache__/step.*.nb[ic], or this file's functions keep the code they were
compiled with (the tests, which compare the step with the layer code bit for bit, would show it).
"""

from __future__ import annotations

import weakref

import numba as nb
import numpy as np
from numba.typed import List

from ref.layers import rope_cos_sin, rope_inv_freq
from ref.safetensors_io import Bf16, to_f32

from . import cpu, maskrule, team

# Columns of the per-layer table (int64 [L, 10]).
KIND, ROPE, DH, H, K, MODE, SRC, N, SLOT, INTER = range(10)
OWN, K_EQ_V, SHARED = 0, 1, 2  # MODE: own q/k/v projections; V from k_proj; K/V of an earlier layer
PROJECTIONS = (3, 2, 1)  # by MODE: the matrices of a layer's q/k/v GEMV (q, k, v; q, k; q)
Q, KP, VP, O, GATE, UP, DOWN = range(7)  # a layer's matrices in `mats`, at 7 * layer + these
IN_LN, Q_NORM, K_NORM, V_NORM, POST_ATTN, PRE_FF, POST_FF = range(7)  # its norms, at 7 * layer + these


# ---- the compiled step --------------------------------------------------------------------------

@nb.njit(cache=True)
def _norm(x, w, eps):
    """x [R, N] -> rms_norm rows, a new array."""
    out = np.empty_like(x)
    cpu._rms_norm(x, w, eps, out)
    return out


@nb.njit(cache=True)
def _add(x, y):
    """x += y elementwise (float32, as numpy's x + y). x, y [1, N]."""
    for i in range(x.shape[1]):
        x[0, i] = x[0, i] + y[0, i]


@nb.njit(cache=True)
def _key_chunk(hq, dh, n, threads):
    """Keys per split-key attention program for one query of hq heads over n keys, as
    fast.cpu.decode_attention picks them: split over the threads when the work pays for them."""
    return cpu.split_keys(n, threads) if hq * n * dh > cpu.PARALLEL_ATTENTION_WORK else n


# Numba segfaults when a cached function calls a parallel one and is later loaded from its cache
# (numba issue #8578), so the step's parallel loop is a prange loop of its own (over the team's members),
# which call fast.cpu's per-program kernels; `parallel` is limited to it (no implicit parallel array
# expressions).
PRANGE_ONLY = {"prange": True, "comprehension": False, "reduction": False, "inplace_binop": False,
               "setitem": False, "numpy": False, "stencil": False, "fusion": False}


@nb.njit(parallel=PRANGE_ONLY, cache=True)
def _layers(x, table, mats, norms, scalars, keys, values, masks, cos, sin, eps, threads, final_norm, out, head, cap,
            logits):
    """x [1, D] float32 <- every layer's output for one token (ref.decoder steps 1-5 per layer); out [1, D]
    <- x after the final norm (weight final_norm [D]); logits [1, V] <- out @ head^T soft-capped at cap (0:
    not capped), as cpu.lm_head, where V > 0 (head [V, D] bf16 bits) -> int64 [threads]: each member's role
    (fast.team).
    table [L, 10] (columns KIND..INTER), mats: 7 bf16 matrices per layer (Q..DOWN, see `_matrices`),
    norms: 7 float32 norm weights per layer (IN_LN..POST_FF; V_NORM is ones: v's norm has no scale), scalars
    [L] layer_scalar, keys/values: one [cap, K, Dh] cache per layer that has its own K/V (row SRC of the
    table), masks [kinds, cap] bool, cos/sin [ropes, max Dh] for this token's position, threads: the
    thread count (nb.get_num_threads(), passed in: calling it here would keep Numba from caching this).
    The threads run the whole step as one team (`_member`), meeting at fast.team's barrier between stages;
    here only the buffers they share are made, sized for the largest layer."""
    P = A = 0  # q/k/v outputs; attention programs x heads
    M = 1
    for i in range(table.shape[0]):
        t = table[i]
        C = -(-t[N] // _key_chunk(t[H], t[DH], t[N], threads))
        P = max(P, (t[H] + 2 * t[K]) * t[DH])
        A = max(A, C * t[H])
        M = max(M, C * t[H] * t[DH], 2 * t[INTER])
    proj, part_m, part_l, big = np.empty(P, np.float32), np.empty(A, np.float32), np.empty(A, np.float32), \
        np.empty(M, np.float32)
    o, d = np.empty((1, x.shape[1]), np.float32), np.empty((1, x.shape[1]), np.float32)
    counter, roles = np.zeros(1, np.int64), np.zeros(threads, np.int64)
    claims = np.zeros(CLAIM_STRIDE * (4 * table.shape[0] + 1), np.int64)  # one per GEMV stage, a line apart
    for tid in nb.prange(threads):
        role = team.meet(counter, threads, team.PATIENCE)
        roles[tid] = role
        if role != team.OUT:  # a solo member works as member 0 of 1
            solo = role == team.SOLO
            me, members = np.int64(0 if solo else tid), np.int64(1 if solo else threads)
            _member(me, members, counter, claims, x, table, mats, norms, scalars, keys, values, masks, cos, sin,
                    eps, threads, final_norm, out, head, cap, logits, proj, part_m, part_l, big, o, d)
    return roles


CLAIM_STRIDE = 8  # int64s between two stages' claim counters: one 64-byte line each


@nb.njit(cache=True)
def _programs(x, pairs, ws, first, col, n, out, tid, members, claims, stage):
    """Member tid's programs 0..n-1 of a GEMV stage (cpu._gemv_program; first, col, pairs from
    cpu._gemv_layout): a fixed share of the first 7/8, then the rest one at a time from the stage's claim
    counter (claims[CLAIM_STRIDE * stage]), so that a member the host slows down does not keep the others
    waiting at the barrier."""
    fixed = n - n // 8
    lo, hi = team.share(fixed, tid, members)
    for pid in range(lo, hi):
        cpu._gemv_program(x, pairs, ws, first, col, pid, out)
    pid = fixed + team.fetch_add(claims, CLAIM_STRIDE * stage, 1)
    while pid < n:
        cpu._gemv_program(x, pairs, ws, first, col, pid, out)
        pid = fixed + team.fetch_add(claims, CLAIM_STRIDE * stage, 1)


@nb.njit(cache=True)
def _member(tid, members, counter, claims, x0, table, mats, norms, scalars, keys, values, masks, cos, sin, eps,
            threads, final_norm, out, head, cap, logits, proj_buf, m_buf, l_buf, big, o, d):
    """Member tid of `members` runs the step: its share of each stage's programs (GEMV rows: `_programs`;
    attention's key chunks: fast.team.share) into the shared buffers, a barrier (fast.team.wait), then the
    small steps between (norms, RoPE, the chunks' merge, GELU) on its own copy of the residual stream, as
    every member does, so the members agree bit for bit without another barrier. Member 0 writes the
    cache's new key row, the last member its value row (then a barrier), member 0 `out` and x0 [1, D] at
    the end; then the head's rows and each member soft-caps its share of them. claims: `_programs`'
    counters. proj_buf, m_buf, l_buf, big: flat float32 buffers that each stage views in its shape (q/k/v;
    the chunks' max and sum; their values, then gate/up), o, d [1, D]: the o and down projections. The
    numbers are the per-stage loops' (the kernels and their split into programs are the same; `threads`
    sets attention's chunks whatever the team's size)."""
    x = x0.copy()
    gen = 1  # the barriers passed so far (fast.team.meet was the first)
    for i in range(table.shape[0]):
        t = table[i]
        dh, hq, kv, mode, src, n = t[DH], t[H], t[K], t[MODE], t[SRC], t[N]
        w = 7 * i
        nq, nk = hq * dh, kv * dh
        h = _norm(x, norms[7 * i + IN_LN], eps)  # 1
        ws = (mats[w + Q], mats[w + KP], mats[w + VP])  # 2
        count = PROJECTIONS[mode]
        first, col, pairs = cpu._gemv_layout(h, ws, count)
        proj = proj_buf[:col[count]].reshape(1, col[count])
        _programs(h, pairs, ws, first, col, first[count], proj, tid, members, claims, 4 * i)
        gen = team.wait(counter, members, gen)
        c, s = cos[t[ROPE]:t[ROPE] + 1, :dh], sin[t[ROPE]:t[ROPE] + 1, :dh]
        q = np.empty((1, 1, hq, dh), np.float32)
        cpu._rope(_norm(proj[:, :nq].copy().reshape(hq, dh), norms[7 * i + Q_NORM], eps).reshape(1, hq, dh),
                  c, s, q[0])
        if mode != SHARED:  # k_eq_v: v is k's projection, taken before k_norm and RoPE
            kraw = proj[:, nq:nq + nk].copy().reshape(kv, dh)
            slot = t[SLOT]
            if tid == 0:
                cpu._rope(_norm(kraw, norms[7 * i + K_NORM], eps).reshape(1, kv, dh), c, s,
                          keys[src][slot:slot + 1])
            if tid == members - 1:
                vraw = kraw if mode == K_EQ_V else proj[:, nq + nk:].copy().reshape(kv, dh)
                values[src][slot] = _norm(vraw, norms[7 * i + V_NORM], eps)
            gen = team.wait(counter, members, gen)
        chunk = _key_chunk(hq, dh, n, threads)  # attention over the first n slots, split by keys
        C = -(-n // chunk)
        part_m, part_l = m_buf[:C * hq].reshape(1, C, 1, hq), l_buf[:C * hq].reshape(1, C, 1, hq)
        part_acc = big[:C * hq * dh].reshape(1, C, 1, hq, dh)
        k4, v4 = keys[src][:n].reshape(1, n, kv, dh), values[src][:n].reshape(1, n, kv, dh)
        m3 = masks[t[KIND]][:n].reshape(1, 1, n)
        lo, hi = team.share(C, tid, members)
        for pid in range(lo, hi):
            cpu._decode_program(q, k4, v4, m3, chunk, part_m, part_l, part_acc, pid)
        gen = team.wait(counter, members, gen)
        a = np.empty((1, 1, hq, dh), np.float32)
        cpu._combine(v4, part_m, part_l, part_acc, a)
        ws = (mats[w + O], mats[w + O], mats[w + O])
        a2 = a.reshape(1, nq)
        first, col, pairs = cpu._gemv_layout(a2, ws, 1)
        _programs(a2, pairs, ws, first, col, first[1], o, tid, members, claims, 4 * i + 1)
        gen = team.wait(counter, members, gen)
        _add(x, _norm(o, norms[7 * i + POST_ATTN], eps))  # 3
        h = _norm(x, norms[7 * i + PRE_FF], eps)  # 4
        inter = t[INTER]
        ws = (mats[w + GATE], mats[w + UP], mats[w + UP])
        first, col, pairs = cpu._gemv_layout(h, ws, 2)
        gu = big[:2 * inter].reshape(1, 2 * inter)  # the chunks' values are merged by now (a barrier since)
        _programs(h, pairs, ws, first, col, first[2], gu, tid, members, claims, 4 * i + 2)
        gen = team.wait(counter, members, gen)
        g, u = gu[:, :inter].copy(), gu[:, inter:].copy()
        cpu._gelu_mul(g, u)
        ws = (mats[w + DOWN], mats[w + DOWN], mats[w + DOWN])
        first, col, pairs = cpu._gemv_layout(g, ws, 1)
        _programs(g, pairs, ws, first, col, first[1], d, tid, members, claims, 4 * i + 3)
        gen = team.wait(counter, members, gen)
        _add(x, _norm(d, norms[7 * i + POST_FF], eps))
        x *= scalars[i]  # 5
    hn = _norm(x, final_norm, eps)
    if tid == 0:
        out[:] = hn
        x0[:] = x
    V = logits.shape[1]
    if V:
        ws = (head, head, head)
        first, col, pairs = cpu._gemv_layout(hn, ws, 1)
        _programs(hn, pairs, ws, first, col, first[1], logits, tid, members, claims, 4 * table.shape[0])
        team.wait(counter, members, gen)
        if cap > 0:
            lo, hi = team.share(V, tid, members)
            cpu._softcap(logits.reshape(-1)[lo:hi], cap)


@nb.njit(cache=True)
def _bookkeeping(slots, q, own, table, kind_cache, modes, window, key_ok, block):
    """The cache's side of token q's step, in one call. Token q takes its slot in every layer that keeps
    K/V (own [J]: their layer numbers; slots: their slot tables, `cpu.claim_slot`): table's SLOT column
    <- each one's slot, N <- for every layer the keys its source holds now. -> masks [kinds, most keys]:
    for each layer kind, which held keys q may see, by the slots of that kind's cache (kind_cache: its
    place in own) and the kind's mode (maskrule.visible, as ref.masks.layer_mask), padding keys never
    (key_ok, block [1, max_len]: the cache's flags and vision-block ids of every token)."""
    n = np.empty(len(own), np.int64)
    for j in range(len(own)):
        table[own[j], SLOT], n[j] = cpu.claim_slot(slots[j], q)
    for i in range(table.shape[0]):
        table[i, N] = n[table[i, SRC]]
    masks = np.zeros((len(kind_cache), n.max()), np.bool_)
    for c in range(len(kind_cache)):
        held = slots[kind_cache[c]]  # once: each read of a typed list's item costs ~60 ns
        for s in range(n[kind_cache[c]]):
            k = held[s]
            masks[c, s] = key_ok[0, k] and maskrule.visible(modes[c], q - k, window, block[0, q], block[0, k])
    return masks


@nb.njit(cache=True)
def _embed_token(token, table, placeholders, pad, scale, x):
    """x [1, D] <- the embedding of one token id, as ref.embedders.embed_inputs: row `token` of table (bf16
    bits [V, D]) as float32 times scale (float32 sqrt(D)); a placeholder id (placeholders int64 [k]: image,
    audio, video) takes pad's row."""
    for p in placeholders:
        if token == p:
            token = pad
    for i in range(x.shape[1]):
        x[0, i] = cpu.bf16(table[token, i]) * scale


NEG_INF_KEY = cpu._order_key(np.float32(-np.inf).view(np.int32))  # -inf's order key: a suppressed id's


@nb.njit(inline="always")
def _choice_key(bits, suppressed):
    """A logit's int32 bits (not a NaN's) -> the int32 that orders it as ref's selection does: -0 equal to
    +0, a suppressed id's value -inf."""
    b = bits if bits != np.int32(-(1 << 31)) else np.int32(0)
    return NEG_INF_KEY if suppressed else cpu._order_key(b)


CHOICE_BLOCK = 64  # logits per block of `_choose`'s maxima


@nb.njit(inline="always")
def _top_key(bits, suppressed):
    """The largest `_choice_key` of bits int32 [n], suppressed bool [n] (NEG_INF_KEY where n is 0). Over a
    slice, LLVM vectorises this loop; over an index range with a bound from min() it did not (46 us)."""
    top = NEG_INF_KEY
    for i in range(bits.shape[0]):
        k = _choice_key(bits[i], suppressed[i])
        top = k if k > top else top
    return top


@nb.njit(cache=True)
def _choose(logits, suppressed):
    """logits float32 [V], suppressed bool [V] -> the greedy choice, as ref.generate.select at temperature 0:
    numpy's argmax of the logits with the suppressed ids set to -inf, which takes the first NaN where one is
    left and else the first of equal maxima (id 0 where all are -inf, suppressed or not). Compares integer
    order keys (`_choice_key`): the maximum of each CHOICE_BLOCK keys (vectorised), then the first index
    of the first block that holds the largest. 32768 logits: 10 us warm where one float loop took 42; after
    a bench step, 44 against 66 (medians, 10 alternated generations)."""
    V = logits.shape[0]
    nans = 0
    for i in range(V):
        nans += logits[i] != logits[i]
    if nans:  # rare: a second pass finds the first one left
        for i in range(V):
            if logits[i] != logits[i] and not suppressed[i]:
                return i
    bits = logits.view(np.int32)
    best, first = NEG_INF_KEY, 0
    for b in range(0, V, CHOICE_BLOCK):
        top = _top_key(bits[b:b + CHOICE_BLOCK], suppressed[b:b + CHOICE_BLOCK])
        if top > best:
            best, first = top, b
    for i in range(first, min(first + CHOICE_BLOCK, V)):
        if _choice_key(bits[i], suppressed[i]) == best:
            return i
    return 0


# ---- the Python side ----------------------------------------------------------------------------

ROPE_ROWS = 64  # decoding positions whose RoPE tables one call of ref's rope_cos_sin fills ahead


def _matrices(p, mode: int) -> list:
    """A layer's 7 projections in `mats` order (Q..DOWN); where the mode has none (a KV-shared layer's
    k/v, a k_eq_v layer's v) another of its matrices stands in, never read: each GEMV runs over the first
    1, 2 or 3 matrices of its triple."""
    a = p.self_attn
    k = a.q_proj if mode == SHARED else a.k_proj
    v = a.q_proj if mode == SHARED else k if mode == K_EQ_V else a.v_proj
    return [a.q_proj, k, v, a.o_proj, p.mlp.gate_proj, p.mlp.up_proj, p.mlp.down_proj]


def _f32(w, n: int) -> np.ndarray:
    """A norm weight (or None: ones) -> float32 [n], upcast exactly."""
    return np.ones(n, np.float32) if w is None else np.ascontiguousarray(to_f32(w), np.float32).reshape(n)


class StepPlan:
    """What a decoding step of one model needs besides its weights, shared by the CPU step (DecodeStep) and
    the GPU's (fast.gpu_step): the per-layer table, the layer kinds and RoPE variants, the cache's side of
    each step (`bookkeeping`) and the RoPE rows (`rope_rows`)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self._slot_lists = weakref.WeakKeyDictionary()  # cache -> its slot tables as a typed list
        self._rope = (-ROPE_ROWS, None, None)  # (first position, cos, sin) of the RoPE rows (`rope_rows`)
        self.modes_by_layer = [SHARED if cfg.kv_shared(i) else K_EQ_V if s.k_eq_v else OWN
                               for i, s in enumerate(cfg.layers)]
        self.kinds = sorted({s.kind for s in cfg.layers})
        self.ropes = sorted({(s.rope, s.head_dim) for s in cfg.layers}, key=repr)
        self.own = [i for i in range(cfg.num_layers) if not cfg.kv_shared(i)]
        self.table = np.zeros((cfg.num_layers, 10), np.int64)
        for i, spec in enumerate(cfg.layers):
            self.table[i, [KIND, ROPE, DH, H, K, MODE, SRC, INTER]] = (
                self.kinds.index(spec.kind), self.ropes.index((spec.rope, spec.head_dim)), spec.head_dim,
                cfg.num_attention_heads, spec.num_kv_heads, self.modes_by_layer[i], self.own.index(spec.kv_source),
                spec.intermediate_size)
        self.own_rows = np.array(self.own, np.int64)
        # per layer kind: its mask mode, and the cache (place in own) whose slots its layers attend over (any
        # of its own layers: they hold the same tokens)
        self.modes = np.array([maskrule.mode_of(cfg, kind) for kind in self.kinds], np.int64)
        self.kind_cache = np.array([max(j for j, i in enumerate(self.own) if cfg.layers[i].kind == kind)
                                    for kind in self.kinds], np.int64)
        self.inv_freq = [rope_inv_freq(r, d) for r, d in self.ropes]
        self.head_dim = max(s.head_dim for s in cfg.layers)

    def bookkeeping(self, cache, key_ok, block) -> tuple[int, np.ndarray, np.ndarray]:
        """Record the step's token in the cache (a RingKVCache after its prefill) -> (its index, this step's
        table: SLOT and N filled, masks [kinds, most keys] bool), by `_bookkeeping`."""
        start = cache.append_tokens(key_ok, block)
        slots = self._slot_lists.get(cache)
        if slots is None:  # the slot arrays are fixed once the prefill allocated them; they go with the cache
            slots = self._slot_lists[cache] = List([cache.slots[i] for i in self.own])
        table = self.table.copy()  # this step's key counts and slots (the step keeps no state of its own)
        masks = _bookkeeping(slots, start, self.own_rows, table, self.kind_cache, self.modes, self.cfg.window,
                             cache.key_ok, cache.block)
        return start, table, masks

    def rope_rows(self, p: int) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin [ropes, max Dh] of RoPE position p: rows of tables that ref's rope_cos_sin fills for
        ROPE_ROWS positions at a time (elementwise, so each row equals a call for its position alone)."""
        first, cos, sin = self._rope
        if not first <= p < first + ROPE_ROWS:
            first = p
            cos, sin = np.zeros((2, ROPE_ROWS, len(self.ropes), self.head_dim), np.float32)
            for r, inv in enumerate(self.inv_freq):
                c, s = rope_cos_sin(np.arange(p, p + ROPE_ROWS)[None], inv)
                cos[:, r, :inv.size * 2], sin[:, r, :inv.size * 2] = c[0], s[0]
            self._rope = first, cos, sin
        return cos[p - first], sin[p - first]


class DecodeStep(StepPlan):
    """The compiled step for one model: its weights gathered into typed lists once. Call with
    (x [1, 1, D], positions [1, 1], key_ok, block [1, 1], a RingKVCache after its prefill) -> final-normed
    hidden states [1, 1, D], as ref.decoder.decoder_forward; `usable` says whether it applies. Given the
    model's output table `head` (bf16), the step computes the token's soft-capped logits too, on the same
    team of threads, and hands them to the model's lm_head (`logits_for`)."""

    def __init__(self, cfg, params, head=None):
        super().__init__(cfg)
        self._kv_lists = weakref.WeakKeyDictionary()  # cache -> its K and V arrays as typed lists (`_lists`)
        self._last = None  # (the last call's output, its logits), until `logits_for` hands them out
        self.head = head if isinstance(head, Bf16) else None
        self.head_bits = cpu._read_only(head.bits if self.head is not None else
                                        np.zeros((0, cfg.hidden_size), np.uint16))
        table = params.embed_tokens.weight  # the embedding, for greedy decoding's compiled loop (`greedy`)
        self.table_bits = cpu._read_only(table.bits) if isinstance(table, Bf16) else None  # one Numba type
        self.placeholders = np.array([cfg.image_token_id, cfg.audio_token_id, cfg.video_token_id], np.int64)
        self.scale = np.float32(cfg.hidden_size**0.5)
        self.cap = np.float32(cfg.final_logit_softcapping or 0)
        self.eps = np.float32(cfg.rms_norm_eps)
        layer_mats = [_matrices(params.layers[i], mode) for i, mode in enumerate(self.modes_by_layer)]
        self.ok = (not cfg.attention_bias and all(s.head_dim % 2 == 0 for s in cfg.layers)
                   and all(isinstance(m.weight, Bf16) for ms in layer_mats for m in ms))
        if not self.ok:
            return
        mats, norms = List(), List()
        D = cfg.hidden_size
        for i, spec in enumerate(cfg.layers):
            p, a = params.layers[i], params.layers[i].self_attn
            for m in layer_mats[i]:
                mats.append(cpu._read_only(m.weight.bits))
            for w, n in [(p.input_layernorm.weight, D), (a.q_norm.weight, spec.head_dim),
                         (None if self.modes_by_layer[i] == SHARED else a.k_norm.weight, spec.head_dim),
                         (None, spec.head_dim), (p.post_attention_layernorm.weight, D),
                         (p.pre_feedforward_layernorm.weight, D), (p.post_feedforward_layernorm.weight, D)]:
                norms.append(_f32(w, n))
        self.mats, self.norms = mats, norms
        self.final_norm = _f32(params.norm.weight, D)
        self.scalars = np.array([to_f32(params.layers[i].layer_scalar).reshape(-1)[0] for i in range(cfg.num_layers)],
                                np.float32)

    def _lists(self, cache) -> tuple:
        """The cache's per-layer K and V arrays as Numba typed lists, built once per cache (its arrays are
        fixed once the prefill allocated them); they go when the cache goes."""
        lists = self._kv_lists.get(cache)
        if lists is None:
            lists = self._kv_lists[cache] = (List([cache.keys[i][0] for i in self.own]),
                                             List([cache.values[i][0] for i in self.own]))
        return lists

    def usable(self, x: np.ndarray, cache) -> bool:
        """One token of one sequence, after a prefill filled every layer's cache (known, without a look at
        every layer, for a cache that a step already took: `_lists`)."""
        return (self.ok and x.shape[:2] == (1, 1) and isinstance(cache, cpu.RingKVCache)
                and cache.length > 0 and (cache in self._kv_lists or all(i in cache.keys for i in self.own)))

    def __call__(self, x, positions, key_ok, block, cache) -> np.ndarray:
        h = np.ascontiguousarray(x, np.float32).reshape(1, -1).copy()
        out = np.empty_like(h)
        logits = np.empty((1, self.head_bits.shape[0]), np.float32)
        self._run(h, int(np.asarray(positions).reshape(-1)[0]), key_ok, block, cache, out, logits)
        self._last = (out, logits) if self.head is not None else None
        return out.reshape(1, 1, -1)

    def _run(self, h, position: int, key_ok, block, cache, out, logits) -> None:
        """One step: h [1, D] float32 the token's embedding (overwritten), at `position`; key_ok, block [1, 1]
        -> out [1, D] the final-normed hidden state, logits [1, V] where the step has the head."""
        _, table, masks = self.bookkeeping(cache, key_ok, block)
        keys, values = self._lists(cache)
        cos, sin = self.rope_rows(position)
        if cpu._BLAS_RAN[0]:
            cpu.park_blas_threads()
        _layers(h, table, self.mats, self.norms, self.scalars, keys, values, masks, cos, sin, self.eps,
                cpu.thread_count(), self.final_norm, out, self.head_bits, self.cap, logits)

    def greedy_covers(self, suppress: tuple) -> bool:
        """Whether `greedy` can decode this model with these suppressed ids: the step runs it and has the
        head, a bf16 embedding at least as long as the head with a row for the pad id (a placeholder's), and
        every suppressed id is an id of the head (else ref's loop, whose selection or embedding raises for
        an id past the end where `_embed_token` would read past it)."""
        V = self.head_bits.shape[0]
        return (self.ok and self.head is not None and self.table_bits is not None
                and self.table_bits.shape[0] >= V and 0 <= self.cfg.pad_token_id < self.table_bits.shape[0]
                and all(0 <= t < V for t in suppress))

    def greedy(self, token: int, position: int, cache, count: int, eos: tuple, suppress: tuple,
               on_token=None) -> list[int]:
        """Greedy decoding of one sequence after its prefill (a model's generate; `greedy_covers`): token, the
        prefill's choice, at `position`, then a step per token that embeds it, runs the layers and the head
        and chooses the next (`_embed_token`, `_layers`, `_choose`: three compiled calls and the cache's
        side), until an eos id or `count` tokens -> the tokens, the first included. on_token(ids int64 [1])
        sees each, as in ref.generate, whose loop costs ~0.3 ms more Python a token on cold caches."""
        held = np.zeros(self.head_bits.shape[0], np.bool_)
        held[list(suppress)] = True
        ones, none = np.ones((1, 1), np.bool_), np.full((1, 1), -1, np.int64)
        h = np.empty((1, self.cfg.hidden_size), np.float32)
        out, logits = np.empty_like(h), np.empty((1, held.size), np.float32)
        tokens = [token]
        while True:
            if on_token is not None:
                on_token(np.array([token], np.int64))
            if token in eos or len(tokens) == count:
                return tokens
            _embed_token(token, self.table_bits, self.placeholders, self.cfg.pad_token_id, self.scale, h)
            self._run(h, position, ones, none, cache, out, logits)
            token = _choose(logits[0], held)
            tokens.append(token)
            position += 1

    def logits_for(self, h, table, cap):
        """The logits [1, 1, V] of the last call's token, if h [1, 1, D] is that call's output (the same
        memory), table the head and cap the soft-capping the step ran with, and they were not handed out
        yet; else None (the caller computes them)."""
        if self._last is None:
            return None
        out, logits = self._last
        # h's memory is out's: a view of it of out's shape with element strides. (Reading a data address
        # through ctypes or __array_interface__ costs 35-40 us here: Python runs on cold caches after a step.)
        if not (table is self.head and cap == self.cfg.final_logit_softcapping and h.base is out
                and h.shape == (1, 1, out.size) and h.strides[2] == out.itemsize):
            return None
        self._last = None
        return logits.reshape(1, 1, -1)


def compile_step() -> None:
    """Compile the step's functions (or load them from Numba's cache) with the types a model passes, on a
    one-layer model of 4-wide tensors, so that the first decoded token does not pay for it."""
    w = np.full((4, 4), 0x3F80, np.uint16)
    w.flags.writeable = False
    table = np.zeros((1, 10), np.int64)
    table[0, [DH, H, K, MODE, N, INTER]] = (4, 1, 1, OWN, 1, 4)
    kv = np.zeros((2, 1, 4), np.float32)
    _bookkeeping(List([np.full(2, -1, np.int64)]), 0, np.zeros(1, np.int64), table.copy(), np.zeros(1, np.int64),
                 np.zeros(1, np.int64), 2, np.ones((1, 2), np.bool_), np.full((1, 2), -1, np.int64))
    _layers(np.ones((1, 4), np.float32), table, List([w] * 7), List([np.ones(4, np.float32)] * 7),
            np.ones(1, np.float32), List([kv]), List([kv.copy()]), np.ones((1, 2), bool),
            np.ones((1, 4), np.float32), np.zeros((1, 4), np.float32), np.float32(1e-6), nb.get_num_threads(),
            np.ones(4, np.float32), np.empty((1, 4), np.float32), w, np.float32(30), np.empty((1, 4), np.float32))
    _embed_token(0, w, np.zeros(3, np.int64), 0, np.float32(2), np.empty((1, 4), np.float32))
    _choose(np.zeros(4, np.float32), np.zeros(4, np.bool_))
