"""Token selection and the decoding loop (HF's `generate` with greedy search or sampling).

Prefill runs the prompt once and fills a KV cache; each step then runs only the new token. With
`use_cache=False` every step recomputes the whole sequence instead: the definition the cache must
reproduce token for token (tested). A fully bidirectional model (`use_bidirectional_attention="all"`)
always recomputes, since there a new token changes what earlier tokens see.
"""

from __future__ import annotations

import numpy as np


def select(logits: np.ndarray, suppress: tuple[int, ...], temperature: float, top_k: int | None,
           top_p: float | None, rng: np.random.Generator) -> np.ndarray:
    """logits [B, V] -> next ids [B]. Suppressed ids can never win. temperature 0 = greedy (argmax,
    first index on ties); else temperature, then top-k, then top-p (nucleus), then a draw."""
    logits = logits.astype(np.float32, copy=True)
    if suppress:
        logits[:, list(suppress)] = -np.inf
    if not temperature:
        return logits.argmax(axis=-1)
    logits /= np.float32(temperature)
    if top_k:
        kth = np.sort(logits, axis=-1)[:, -min(top_k, logits.shape[-1])][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-probs, axis=-1, kind="stable")
        sorted_p = np.take_along_axis(probs, order, axis=-1)
        before = np.cumsum(sorted_p, axis=-1) - sorted_p  # mass of the more likely tokens
        drop = np.zeros_like(probs, bool)
        np.put_along_axis(drop, order, before >= top_p, axis=-1)
        probs = np.where(drop, 0.0, probs)
        probs /= probs.sum(axis=-1, keepdims=True)
    return np.array([rng.choice(len(p), p=p.astype(np.float64) / p.sum(dtype=np.float64)) for p in probs])


def prepare(model, input_ids, max_new_tokens: int, attention_mask=None, mm_token_type_ids=None,
            use_cache: bool = True, **media) -> tuple:
    """What generation's first step takes: input_ids [B, T] (+ media as for `Model.forward`) -> (x [B, T, D]
    the prompt's embeddings, positions, key_ok, block [B, T], a KV cache for T + max_new_tokens tokens, or
    None without use_cache). RoPE positions count real tokens only (cumsum of attention_mask - 1), as HF's
    generate. A fully bidirectional model gets no cache (the module's docstring says why)."""
    cfg = model.config
    ids = np.asarray(input_ids, np.int64)
    B, T = ids.shape
    model.check_length(T + max_new_tokens)
    key_ok = np.ones((B, T), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    positions = np.where(key_ok, np.cumsum(key_ok, axis=1) - 1, 0)
    cache = model.new_cache(B, T + max_new_tokens) if use_cache and cfg.bidirectional != "all" else None
    return model.embed(ids, **media), positions, key_ok, model.blocks(mm_token_type_ids, ids.shape), cache


def generate(model, input_ids, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, seed: int | None = None, attention_mask=None, mm_token_type_ids=None,
             use_cache: bool = True, on_token=None, **media) -> np.ndarray:
    """input_ids [B, T] (+ media as for `Model.forward`) -> new token ids [B, <= max_new_tokens].

    Stops when every row has produced an eos id; rows that finish early are filled with pad.
    `on_token(ids [B])`, if given, is called with each step's tokens (for streaming).
    """
    cfg = model.config
    x, positions, key_ok, block, cache = prepare(model, input_ids, max_new_tokens, attention_mask,
                                                 mm_token_type_ids, use_cache, **media)
    B = x.shape[0]
    rng = np.random.default_rng(seed)
    eos = np.array(cfg.eos_token_ids, np.int64)
    done = np.zeros(B, bool)
    out = []
    for step in range(max_new_tokens):
        h = model.run_decoder(x, positions, key_ok, block, cache, last_only=True)
        logits = model.kernels.lm_head(h[:, -1:], model.head, cfg.final_logit_softcapping)[:, 0]
        nxt = select(logits, cfg.suppress_tokens, temperature, top_k, top_p, rng)
        nxt = np.where(done, cfg.pad_token_id, nxt)
        out.append(nxt)
        if on_token is not None:
            on_token(nxt)
        done |= (nxt[:, None] == eos).any(axis=1)
        if done.all() or step == max_new_tokens - 1:
            break
        new_pos = positions[:, -1:] + 1
        new_x = model.embed(nxt[:, None])
        new_block = np.full((B, 1), -1, np.int64)
        if cache is not None:
            x, positions, key_ok, block = new_x, new_pos, np.ones((B, 1), bool), new_block
        else:  # recompute everything: the prompt's soft tokens stay where they were
            x = np.concatenate([x, new_x], axis=1)
            positions = np.concatenate([positions, new_pos], axis=1)
            key_ok = np.concatenate([key_ok, np.ones((B, 1), bool)], axis=1)
            block = np.concatenate([block, new_block], axis=1)
    return np.stack(out, axis=1) if out else np.zeros((B, 0), np.int64)
