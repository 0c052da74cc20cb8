"""The loader never builds a float32 copy: a ~1.2 GB bf16 checkpoint loads and runs a forward pass with a
peak resident set of at most 1.3x the file (a float32 upcast of the weights alone would be 2x), through ref
and through fast with its weights copied off the memory map (the copy must not hold the file twice)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from ref.config import tiny_hf_dict
from ref.tiny import write_large_bf16_checkpoint


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory):
    # Real vocabulary (262144 x 1024 embedding = 512 MiB) plus 22 layers of ~31 MiB: about 1.2 GB.
    hf = tiny_hf_dict(vocab_size=262144, hidden_size=1024, intermediate_size=4096, num_hidden_layers=22,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=128, global_head_dim=256,
                      sliding_window=16)
    hf["vision_config"].update(mm_embed_dim=1024, output_proj_dims=1024, mm_posemb_size=64)
    hf.update(image_token_id=258880, audio_token_id=258881, video_token_id=258884, boi_token_id=255999,
              eoi_token_id=258882, boa_token_id=256000, eoa_token_index=258883)
    d = write_large_bf16_checkpoint(tmp_path_factory.mktemp("ckpt") / "big", hf)
    assert 1.1e9 < (d / "model.safetensors").stat().st_size < 1.4e9
    return d


def _peak_rss(d, module: str, load: str) -> int:
    """Bytes at the high-water mark of a fresh process that loads the checkpoint at d with `load` and runs a
    41-token forward pass."""
    script = textwrap.dedent(f"""
        import resource, numpy as np, {module}
        m = {load.format(str(d))}
        ids = np.array([[2] + [3 + i for i in range(40)]])
        logits = m.forward(ids)
        assert logits.shape == (1, 41, 262144) and np.isfinite(logits).all()
        try:  # this process's own high-water mark: ru_maxrss also counts the parent's pages before exec
            with open("/proc/self/status") as f:
                print(next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) * 1024)
        except OSError:
            print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1])


def test_bf16_checkpoint_forward_peak_rss_under_1_3x_file(big_checkpoint):
    size = (big_checkpoint / "model.safetensors").stat().st_size
    peak = _peak_rss(big_checkpoint, "ref", "ref.load_model({!r})")
    ratio = peak / size
    print(f"\npeak RSS {peak / 1e9:.3f} GB for a {size / 1e9:.3f} GB bf16 file: {ratio:.3f}x")
    assert ratio <= 1.3


def test_fast_resident_copy_never_holds_the_file_twice(big_checkpoint):
    """fast's copy of the weights off the memory map (cpu.resident_copy) drops each tensor's mapped pages
    once copied: its peak stays within 5 % of the file of the mapped model's (fast's own peak is higher than
    ref's: Numba's runtime and a prefill scratch of up to 256 MB). Keeping the mapped pages adds the file."""
    size = (big_checkpoint / "model.safetensors").stat().st_size
    mapped = _peak_rss(big_checkpoint, "fast", "fast.load_model({!r}, resident=False)")
    copied = _peak_rss(big_checkpoint, "fast", "fast.load_model({!r}, resident=True)")
    print(f"\nfast peak RSS {mapped / 1e9:.3f} GB mapped, {copied / 1e9:.3f} GB copied ({size / 1e9:.3f} GB file)")
    assert copied - mapped <= 0.05 * size
