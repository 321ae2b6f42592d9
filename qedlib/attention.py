"""Variable-length ("varlen") attention for padding-free and packed SFT without flash-attn.

Padding-free batches and packed rows put several examples into one row. transformers' sdpa path then
builds a block-diagonal T x T mask and pays for attention across the whole row: O(T^2) for a row of
T tokens, although only the sum of L_i^2 over its examples is needed. flash-attn's varlen kernels
avoid that on GPUs; on CPUs (and GPUs without flash-attn) this module gives the same behaviour with
PyTorch's own kernels: one causal `scaled_dot_product_attention` call per example in the row.

Register it once (importing `qedlib.stages.sft` does) and load models with
`attn_implementation="qed_varlen_sdpa"`. Batches with an ordinary padding mask, or decoding with a
KV cache, fall back to plain masked sdpa, so a model loaded this way stays correct for any input.
"""
from __future__ import annotations

NAME = "qed_varlen_sdpa"


def _segments(cu_seq_lens, position_ids, length: int) -> list[int] | None:
    """Example boundaries [0, ..., length] of a single packed row, or None when the row holds one example."""
    if cu_seq_lens is not None:
        # every layer gets the same tensor: read it to the host once per forward, not once per layer
        bounds = getattr(cu_seq_lens, "_qed_bounds", None)
        if bounds is None:
            bounds = [int(x) for x in cu_seq_lens.tolist()]
            cu_seq_lens._qed_bounds = bounds
    elif position_ids is not None and position_ids.shape[0] == 1:
        starts = (position_ids[0] == 0).nonzero().flatten().tolist()
        if not starts or starts[0] != 0:
            starts = [0, *starts]
        bounds = [*starts, length]
    else:
        return None
    if len(bounds) <= 2 or bounds[-1] != length:
        return None
    return bounds


def varlen_sdpa_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                        is_causal=None, **kwargs):
    """transformers attention function: per-example causal sdpa in packed rows, masked sdpa otherwise.

    query: (batch, heads, q_len, dim); key/value: (batch, kv_heads, kv_len, dim).
    Returns (batch, q_len, heads, dim) like transformers' own sdpa function.
    """
    import torch  # heavy: torch loads only when a model runs
    import torch.nn.functional as F  # heavy: torch loads only when a model runs
    from transformers.integrations.sdpa_attention import sdpa_attention_forward  # heavy: transformers loads torch

    batch, _, q_len, _ = query.shape
    simple = attention_mask is None and batch == 1 and key.shape[2] == q_len
    bounds = _segments(kwargs.get("cu_seq_lens_q"), kwargs.get("position_ids"), q_len) if simple else None
    if bounds is None:
        if attention_mask is not None and attention_mask.ndim == 2:  # (batch, kv_len) padding mask -> 4D causal
            kv_len = key.shape[2]
            causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
            attention_mask = causal[None, None] & attention_mask[:, None, None, :].bool()
            # a query row with nothing to attend to (left padding) would give NaN; its output is never used
            attention_mask = attention_mask | ~attention_mask.any(-1, keepdim=True)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal if attention_mask is None else False)
    gqa = query.shape[1] != key.shape[1]
    p = dropout if module.training else 0.0
    outs = [F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], dropout_p=p,
                                           is_causal=True, scale=scaling, enable_gqa=gqa)
            for s, e in zip(bounds[:-1], bounds[1:])]
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


def register() -> str:
    """Make NAME a valid `attn_implementation` (idempotent); returns NAME."""
    from transformers import AttentionInterface  # heavy: transformers loads torch
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask  # heavy: transformers loads torch
    AttentionInterface.register(NAME, varlen_sdpa_forward)
    # like flash attention: no 4D mask is built; a 2D padding mask (if any) is passed through as is
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, flash_attention_mask)
    return NAME
