"""fast/gpu.py against ref, run in a subprocess with NUMBA_ENABLE_CUDASIM=1 (see test_fast_gpu.py) or on
a real GPU. Tiny shapes: the simulator runs every CUDA thread as a Python thread. Prints one line per check."""

from __future__ import annotations

import sys
import tempfile

import numpy as np

import fast
import ref
from fast import gpu
from helpers import multimodal_prompt, synthetic_patches
from ref.config import FULL, SLIDING, Rope, from_hf_dict, tiny_hf_dict
from ref.decoder import REF
from ref.layers import rope_cos_sin, rope_inv_freq
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


def main() -> int:
    rng = np.random.default_rng(0)
    table = rng.normal(size=(2, 3)).astype(np.float32)  # gpu._upload: one copy per host object, kept
    first = gpu._upload(table)
    assert gpu._upload(table) is first and gpu._upload(table.copy()) is not first
    assert np.array_equal(host(first), table) and gpu._upload(first) is first
    print("ok upload cache")
    # the GEMV kernel (M <= 8: one word loop, and with In = 80 its four-word steps and their tail), an odd In
    # (the cuBLAS path), and M > 8 (cuBLAS)
    for m, n in ((1, 20), (3, 20), (2, 80), (1, 21), (12, 20)):
        x = rng.normal(size=(m, n)).astype(np.float32)
        w = Bf16(f32_to_bf16(rng.normal(size=(6, n)).astype(np.float32)))
        check(f"matmul M={m} In={n}", gpu.matmul(gpu.xp.asarray(x), gpu.to_device(w)), REF.linear(x, w))
    keep, gpu.UPCAST_FLOATS = gpu.UPCAST_FLOATS, 40  # the cuBLAS path in blocks of two rows (3 blocks)
    check("matmul M=12 in blocks", gpu.matmul(gpu.xp.asarray(x), gpu.to_device(w)), REF.linear(x, w))
    gpu.UPCAST_FLOATS = keep
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
        ga, gb = a.generate(ids, max_new_tokens=3, **kw), b.generate(ids, max_new_tokens=3, **kw)
        assert np.array_equal(ga, gb), (ga, gb)
        print("ok generate", gb.tolist())
    return 0


if __name__ == "__main__":
    sys.exit(main())
