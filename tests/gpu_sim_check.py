"""fast/gpu.py against ref, run in a subprocess with NUMBA_ENABLE_CUDASIM=1 (see test_fast_gpu.py) or on
a real GPU. Tiny shapes: the simulator runs every CUDA thread as a Python thread. Prints one line per check."""

from __future__ import annotations

import gc
import sys
import tempfile

import numpy as np

import fast
import ref
from fast import gpu
from helpers import cached_steps, multimodal_prompt, synthetic_patches
from ref.config import FULL, SLIDING, Rope, from_hf_dict, tiny_hf_dict
from ref.decoder import REF
from ref.generate import select
from ref.layers import attention, rope_cos_sin, rope_inv_freq
from ref.masks import MaskSpec
from ref.safetensors_io import Bf16, f32_to_bf16
from ref.tiny import random_tensors, write_checkpoint
from ref.weights import Params

TOL = 1e-5


def host(a):
    return a if gpu.xp is np else gpu.xp.asnumpy(a)


def check(name, got, want):
    err = float(np.abs(host(got) - want).max() / max(np.abs(want).max(), 1e-30))
    assert err <= TOL, f"{name}: relative error {err:.2e}"
    print(f"ok {name} {err:.1e}")


def decode_steps(model, ids, key_ok, new_ids, split):
    """helpers.cached_steps with the logits [1, V] (host) of each output, taken at once: the graph step's
    output buffer is the next step's too."""
    cap = model.config.final_logit_softcapping
    return cached_steps(model, model.run_decoder, ids, key_ok, np.full(ids.shape, -1), new_ids, split,
                        lambda h: host(model.kernels.lm_head(h[:, -1:], model.head, cap))[:, 0])


def check_step_attention(rng):
    """The decoding step's attention kernels (split by keys, then merged) against ref.layers.attention, for
    key counts below, at and above the chunk count (empty chunks), a mask with holes, and one that hides
    every key (the mean of the values); the cache holds more slots than the n the kernels read. The merge
    runs with WIDE threads as the step launches it (head dims 6: one group of threads; 3: two groups and
    idle threads) and with fewer threads than head dims."""
    H, K, cap, C = 4, 2, 40, gpu.STEP_SPLITS
    for n, visible, Dh, threads in ((2, "holes", 6, gpu.WIDE), (C, "holes", 6, gpu.WIDE), (23, "holes", 6, gpu.WIDE),
                                    (23, "none", 6, gpu.WIDE), (23, "holes", 3, gpu.WIDE), (23, "holes", 6, 4)):
        q = rng.normal(size=(H, Dh)).astype(np.float32)
        keys, values = rng.normal(size=(2, cap, K, Dh)).astype(np.float32)
        mask = (rng.random(cap) < 0.7) if visible == "holes" else np.zeros(cap, bool)
        mask[0] = visible == "holes"
        nums = np.array([0, 0, 5, n], np.int32)  # (slot, key count) of two caches; the second is read (j = 1)
        dev = [gpu.xp.asarray(a) for a in (q, keys, values, mask.astype(np.int32), nums)]
        scratch, part_m, part_l = gpu.xp.zeros((H, cap), np.float32), *gpu.xp.zeros((2, H, C), np.float32)
        part_acc, out = gpu.xp.zeros((H, C, Dh), np.float32), gpu.xp.zeros((H, Dh), np.float32)
        gpu.step_attention_kernel[H * C, gpu.THREADS](*dev[:5], 1, scratch, part_m, part_l, part_acc)
        gpu.merge_splits_kernel[H, threads](part_m, part_l, part_acc, dev[2], dev[4], 1, out)
        want = attention(q[None, None], keys[None, :n], values[None, :n], mask[None, None, :n])[0, 0]
        check(f"step attention n={n} {visible} Dh={Dh} merged by {threads}", out, want)


def check_argmax(rng):
    """The step's greedy selection on the device (two kernels) against ref.generate.select at temperature 0:
    ties (the first index wins), suppressed ids (never chosen), a NaN (np.argmax picks the first NaN), all
    -inf (index 0)."""
    V = 50
    for case in ("ties", "nan", "all -inf"):
        logits = rng.integers(0, 5, V).astype(np.float32)  # many ties
        if case == "nan":
            logits[[17, 31]] = np.nan
        if case == "all -inf":
            logits[:] = -np.inf
        suppress = (int(np.argmax(logits)), 3)
        mask = np.zeros(V, np.int32)
        mask[list(suppress)] = 1
        part_v, part_i = gpu.xp.zeros(gpu.ARGMAX_BLOCKS, np.float32), gpu.xp.zeros(gpu.ARGMAX_BLOCKS, np.int64)
        token = gpu.xp.zeros(1, np.int32)
        gpu.argmax_parts_kernel[gpu.ARGMAX_BLOCKS, gpu.THREADS](gpu.xp.asarray(logits), gpu.xp.asarray(mask), part_v, part_i)
        gpu.argmax_final_kernel[1, gpu.THREADS](part_v, part_i, token)
        want = int(select(logits[None], suppress, 0.0, None, None, None)[0])
        assert int(host(token)[0]) == want, (case, int(host(token)[0]), want)
        print(f"ok argmax {case} {want}")


def check_graph_step(rng, d, name, steps, layer_code, **text):
    """fast/gpu_prefill.py's prompt pass, then fast/gpu_step.py's step (captured and replayed on a GPU, launch
    by launch here) against ref: the logits after the prompt and after every step, with a sliding window of
    3 (the ring wraps at every step), after a prompt of 20 with left padding prefilled in two chunks (of
    more than GEMV_MAX_M tokens: the simulator takes ~1 s a GEMV); for the first `layer_code` steps the same
    through ref's layer code with the GPU kernels (fused_prompt and whole_step off); then, if `layer_code`,
    whole steps on a cache that speculates (each next step queued on the device's greedy token: with these
    random ids most guesses are wrong and their steps run again)."""
    hf = tiny_hf_dict(vocab_size=64, sliding_window=3, **text)
    hf["vision_config"].update(mm_embed_dim=8, output_proj_dims=8, mm_posemb_size=8)
    hf.update(image_token_id=57, audio_token_id=58, video_token_id=59, boi_token_id=60, eoi_token_id=61,
              boa_token_id=62, eoa_token_index=63)
    write_checkpoint(d, hf, random_tensors(hf, 3, "BF16"))
    peer, model = ref.load_model(d), fast.load_model(d, device="gpu")
    ids, new_ids = rng.integers(3, 56, (1, 20)), rng.integers(3, 56, steps)
    key_ok = np.ones((1, 20), bool)
    key_ok[0, 0] = False
    want, _ = decode_steps(peer, ids, key_ok, new_ids, 10)
    handed = []
    for whole in (True, False) if layer_code else (True,):
        model.whole_step = model.fused_prompt = whole  # the graph step after the fused prompt, or ref's layer code
        got, cache = decode_steps(model, ids, key_ok, new_ids if whole else new_ids[:layer_code], 10)
        if whole:
            handed = [model._step.fresh, len(model._step._bound)]
        del cache
        for i, (g, w) in enumerate(zip(got, want[:len(got)], strict=True)):
            check(f"{'graph step' if whole else 'layer code'} {name} logits {i}", g, w)
    # the step ran (its logits were all handed out), one binding for the cache, which goes with it
    assert model._step.ok and handed == [False, 1], handed
    if layer_code:
        model.whole_step, model.fused_prompt, model._greedy = True, True, True  # as in greedy generate: speculates
        model._step.guesses = [0, 0]
        got, cache = decode_steps(model, ids, key_ok, new_ids, 10)
        model._greedy = False
        assert cache.speculate and model._step.guesses[1] >= 1, model._step.guesses
        del cache
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            check(f"speculated step {name} logits {i}", g, w)
    gc.collect()
    assert len(model._step._bound) == 0


def main() -> int:
    rng = np.random.default_rng(0)
    table = rng.normal(size=(2, 3)).astype(np.float32)  # gpu._upload: one copy per host object, kept
    first = gpu._upload(table)
    assert gpu._upload(table) is first and gpu._upload(table.copy()) is not first
    assert np.array_equal(host(first), table) and gpu._upload(first) is first
    print("ok upload cache")
    # the GEMV kernel (M <= 8: one word loop, and with In = 80 its four-word steps and their tail), an odd In
    # (the cuBLAS path)
    for m, n in ((1, 20), (3, 20), (2, 80), (1, 21)):
        x = rng.normal(size=(m, n)).astype(np.float32)
        w = Bf16(f32_to_bf16(rng.normal(size=(6, n)).astype(np.float32)))
        check(f"matmul M={m} In={n}", gpu.matmul(gpu.xp.asarray(x), gpu.to_device(w)), REF.linear(x, w))
    # M > 8, both prompt products: x as three bf16 summands (exact: checked bit for bit first, magnitudes
    # 2^-90 to 2^90) through one GEMM, and the weights upcast; each whole and in blocks
    x = (rng.uniform(1, 2, (12, 20)) * rng.choice([-1, 1], (12, 20)) * 2.0 ** rng.integers(-90, 90, (12, 20))).astype(np.float32)
    parts = host(gpu.split_rows(gpu.xp.asarray(x))).astype(np.uint32) << 16
    total = parts[0].view(np.float32).astype(np.float64) + parts[1].view(np.float32) + parts[2].view(np.float32)
    assert np.array_equal(total, x), "split_rows: the three bf16 do not sum to x"
    print("ok split_rows exact")
    x = rng.normal(size=(12, 20)).astype(np.float32)
    w = Bf16(f32_to_bf16(rng.normal(size=(6, 20)).astype(np.float32)))
    for mode in ("split", "f32"):
        keep = gpu.GEMM, gpu.UPCAST_FLOATS
        gpu.GEMM = mode
        check(f"matmul M=12 {mode}", gpu.matmul(gpu.xp.asarray(x), gpu.to_device(w)), REF.linear(x, w))
        gpu.UPCAST_FLOATS = 40  # split: blocks of two rows of x (6 blocks); f32: of two rows of w (3 blocks)
        check(f"matmul M=12 {mode} in blocks", gpu.matmul(gpu.xp.asarray(x), gpu.to_device(w)), REF.linear(x, w))
        gpu.GEMM, gpu.UPCAST_FLOATS = keep
    x = rng.normal(0, 2, (5, 13)).astype(np.float32)
    w = rng.uniform(0.5, 1.5, 13).astype(np.float32)
    check("rms_norm", gpu.rms_norm(gpu.xp.asarray(x), gpu.xp.asarray(w)), REF.rms_norm(x, w))
    check("rms_norm no scale", gpu.rms_norm(gpu.xp.asarray(x)), REF.rms_norm(x, None))
    x = rng.normal(size=(2, 3, 4, 10)).astype(np.float32)  # [B, T, N, Dh]
    for fraction in (1.0, 0.25):  # partial rotary: the unrotated pairs have cos 1, sin 0
        cos, sin = rope_cos_sin(rng.integers(0, 50, (2, 3)), rope_inv_freq(Rope(1e4, fraction), 10))
        check(f"apply_rope {fraction}", gpu.apply_rope(gpu.xp.asarray(x), cos, sin), REF.apply_rope(x, cos, sin))
    h = rng.normal(size=(1, 3, 20)).astype(np.float32)
    mlp = Params({n: Params(weight=Bf16(f32_to_bf16(rng.normal(0, 0.3, shape).astype(np.float32))))
                  for n, shape in (("gate_proj", (12, 20)), ("up_proj", (12, 20)), ("down_proj", (20, 12)))})
    check("mlp (gelu x up kernel)", gpu.mlp(gpu.xp.asarray(h), gpu.to_device(mlp)), REF.mlp(h, mlp))
    for bidir in ("vision", None, "all"):
        for kind in (FULL, SLIDING):
            cfg = from_hf_dict(tiny_hf_dict(sliding_window=3, use_bidirectional_attention=bidir))
            t, past = 4, 3
            q = rng.normal(size=(2, t, 4, 5)).astype(np.float32)
            k, v = rng.normal(size=(2, 2, past + t, 2, 5)).astype(np.float32)
            key_ok = np.ones((2, past + t), bool)
            key_ok[1, :4] = False
            block = np.full((2, past + t), -1)
            block[:, 2:5] = 0
            spec = MaskSpec(cfg, kind, np.arange(past, past + t), np.arange(past + t), key_ok, block[:, past:], block)
            want = REF.attention(q, k, v, spec)  # some rows see no key (padding): the mean of the values
            check(f"attention {bidir}/{kind}", gpu.block_attention(q, k, v, spec), want)
            check(f"query attention {bidir}/{kind}", gpu.query_attention(q, k, v, spec), want)
            check(f"dense attention {bidir}/{kind}", gpu.dense_attention(*map(gpu.xp.asarray, (q, k, v)), spec), want)

    check_step_attention(rng)
    check_argmax(rng)
    with tempfile.TemporaryDirectory() as d:  # k_eq_v global layers, a KV-shared layer, GQA; fused GEMVs
        check_graph_step(rng, d, "shared", 3, 2, hidden_size=16, intermediate_size=24, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, global_head_dim=8,
                         layer_types=["sliding_attention", "full_attention", "full_attention"], num_kv_shared_layers=1)
    with tempfile.TemporaryDirectory() as d:  # k of 6 rows: q, k and v one GEMV launch each
        check_graph_step(rng, d, "unfused", 2, 0, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=6, global_head_dim=6,
                         attention_k_eq_v=False)
    hf = tiny_hf_dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=8, global_head_dim=8, sliding_window=3)
    hf["vision_config"].update(mm_embed_dim=8, output_proj_dims=8, mm_posemb_size=8)
    hf.update(image_token_id=57, audio_token_id=58, video_token_id=59, boi_token_id=60, eoi_token_id=61,
              boa_token_id=62, eoa_token_index=63)
    with tempfile.TemporaryDirectory() as d:
        write_checkpoint(d, hf, random_tensors(hf, 2, "BF16"))
        a, b = ref.load_model(d), fast.load_model(d, device="gpu")
        print(f"ok compile {b.compile():.1f} s")  # what ref.run --device gpu calls before the first question
        ids, types = multimodal_prompt(a.config, rng, n_text=2, image_tokens=[2])
        pv, pos = synthetic_patches(rng, 1, 70, [(1, 2)])
        kw = dict(pixel_values=pv, image_position_ids=pos, mm_token_type_ids=types)
        check("model forward", b.forward(ids, **kw), a.forward(ids, **kw))
        # a text-only prompt is embedded on the device, placeholder ids as pad (ref's embed_inputs)
        text = np.concatenate([ids[:, :3], [[57, 58, 59]], rng.integers(3, 56, (1, 6))], axis=1)
        check("embed on the device", gpu.embed_tokens(text, b._decoder.embed_tokens.weight, b.config), a.embed(text))
        check("model forward text", b(text), a(text))
        b._step.guesses = [0, 0]
        ga, gb = a.generate(ids, max_new_tokens=4, **kw), b.generate(ids, max_new_tokens=4, **kw)
        assert np.array_equal(ga, gb), (ga, gb)
        assert b._step.guesses == [2, 0], b._step.guesses  # steps 2 and 3 were queued on the right token
        print("ok generate", gb.tolist())
    return 0


if __name__ == "__main__":
    sys.exit(main())
