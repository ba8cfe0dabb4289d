"""The Llama model, its caches, and HATA's sparse decode attention.

One file tells the whole model: configuration (`ModelArgs`, `HataArgs`), the layers (RMSNorm, RoPE, attention,
SwiGLU MLP), the caches (`KVCache`, `HashCache`), and checkpoint loading (GGUF, Hugging Face, Meta) through one
name-mapping table. Prefill is dense causal attention; a decode step of a sparse layer (layer >= n_dense) is HATA
(Gong et al., ACL 2025, arXiv 2506.02572, Sec. 3): hash the new key into the hash cache, hash the query, score the
whole cache by Hamming distance, keep the top-K positions per KV head, and attend only to them. (A K that covers
the cache is dense attention; the oracle and Quest selectors replace the hash scoring, for comparison.)

Positions are per sequence: sequence b of a batch holds its tokens at cache positions 0 .. len_b - 1, so prompts
of different lengths are right-padded for prefill and then decode at their own positions (no left padding, no
position offsets). A padded slot at position p >= len_b is overwritten when the sequence reaches p, and no query
ever sees a key at a position later than its own.

Internally Q and K use the Hugging Face "half-split" RoPE layout; GGUF and Meta checkpoints store Q/K rows in
Meta's interleaved layout and are un-permuted on load. Hash projections act on post-RoPE keys in this layout.
"""
import contextlib
import fnmatch
import glob
import json
import math
import numbers
import os
import re
import struct
import sys
import zipfile
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.backends.cuda import SDPAParams, can_use_cudnn_attention

from hata_kernels import (cache_write, hamming_score, hamming_topk, hash_encode, hash_encode_step, select_topk,
                          sparse_decode_attention)
from tokenizer import file_head, open_gguf, read_json  # open_gguf: the reader the tokenizer parsed, if it read a GGUF


# --------------------------------------------------------------------------------------------------------------
# Configuration

ROPE_SCALING = {"default": [], "linear": ["factor"],  # the keys each kind of RoPE scaling needs
                "llama3": ["factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"]}


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    vocab_size: int = 128256
    ffn_dim: int = 14336
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: dict | None = None  # None, {"type": "linear", "factor"}, or {"type": "llama3", "factor",
    #                                   "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
    max_seq_len: int = 8192  # the context length the model was trained for (the defaults: Llama 3 8B)
    tie_embeddings: bool = False
    head_dim: int = 0  # 0 means dim // n_heads
    # the checkpoint's own name of a field, for errors (config.json's max_position_embeddings for max_seq_len)
    names: dict | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        key = lambda k: (self.names or {}).get(k, k)
        sizes = "dim n_layers n_heads n_kv_heads vocab_size ffn_dim max_seq_len".split()
        num = lambda v, kind: isinstance(v, kind) and not isinstance(v, bool)  # JSON's true is no number here
        if bad := {key(k): v for k in sizes if not num(v := getattr(self, k), numbers.Integral) or not 1 <= v < 2**31}:
            raise ValueError(f"the model's sizes must be whole numbers in [1, 2^31), got {bad}")
        if not isinstance(self.tie_embeddings, bool):  # JSON's "false" is a string, and true in Python
            raise ValueError(f"{key('tie_embeddings')} must be true or false, got {self.tie_embeddings!r}")
        scaling = self.rope_scaling or {"type": "default"}
        if (kind := scaling.get("type")) not in ROPE_SCALING:  # (config.json's "rope_type" is read by hf_args)
            raise ValueError(f"unsupported RoPE scaling {kind!r}, the 'type' of {scaling} (supported: "
                             f"{', '.join(ROPE_SCALING)})")
        if missing := sorted(set(ROPE_SCALING[kind]) - set(scaling)):
            raise ValueError(f"{kind} RoPE scaling needs {', '.join(missing)}")
        reals = dict(norm_eps=self.norm_eps, rope_theta=self.rope_theta, **{k: scaling[k] for k in ROPE_SCALING[kind]})
        if bad := {key(k): v for k, v in reals.items() if not num(v, numbers.Real) or not 0 < v <= sys.float_info.max}:
            raise ValueError(f"the model's {', '.join(bad)} must be finite numbers > 0, got {bad}")
        # as floats: torch takes a whole number as int64, which 1e30 written as one overflows
        self.norm_eps, self.rope_theta = float(self.norm_eps), float(self.rope_theta)
        if self.rope_scaling:
            self.rope_scaling = {**scaling, **{k: float(scaling[k]) for k in ROPE_SCALING[kind]}}
        if kind == "llama3" and not scaling["low_freq_factor"] < scaling["high_freq_factor"]:  # else the bands invert
            raise ValueError(f"llama3 RoPE scaling needs {key('low_freq_factor')} < {key('high_freq_factor')}, got "
                             f"{scaling}")
        derived = f" ({key('dim')} // {key('n_heads')})" * (self.head_dim == 0)  # (then the file has no key for it)
        name = "head_dim" if derived else key("head_dim")
        if self.head_dim == 0:
            self.head_dim = self.dim // self.n_heads
        if not num(self.head_dim, numbers.Integral) or not 2 <= self.head_dim < 2 ** 31 or self.head_dim % 2:
            raise ValueError(f"{name} must be an even whole number in [2, 2^31), got {self.head_dim!r}{derived}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"{key('n_heads')}={self.n_heads} is not a multiple of {key('n_kv_heads')}="
                             f"{self.n_kv_heads}")

    @classmethod
    def read(cls, where, names, **fields):
        """ModelArgs(**fields) from the file `where`, its errors naming the file and its keys (`names`)."""
        try:
            return cls(**fields, names=names)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    def describe(self):
        """The architecture in one line; hash-projection files record it to refuse another model's projections."""
        return (f"llama dim={self.dim} n_layers={self.n_layers} n_heads={self.n_heads} "
                f"n_kv_heads={self.n_kv_heads} head_dim={self.head_dim}")


PRESETS = {
    "tiny": ModelArgs(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=512, ffn_dim=160,
                      rope_theta=10000.0, max_seq_len=1024),
    "smollm2-135m": ModelArgs(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152, ffn_dim=1536,
                              rope_theta=100000.0, max_seq_len=8192, tie_embeddings=True),
    "llama-2-7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, vocab_size=32000, ffn_dim=11008,
                            rope_theta=10000.0, max_seq_len=4096),
    "llama-3.1-8b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, ffn_dim=14336,
                              rope_theta=500000.0, max_seq_len=131072,
                              rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}

SELECTORS = ("hash", "oracle", "quest")
QUEST_PAGE = 16  # tokens per page of the Quest selector


def check_rbit(rbit, name="rbit"):  # the one rule for HataArgs and every script's --rbit: 1024 bits (128 bytes) at most
    if not 0 < rbit <= 1024 or rbit % 32:
        raise ValueError(f"{name} must be a multiple of 32 (whole int32 code words) in [32, 1024], got {rbit}")


@dataclass
class HataArgs:
    """How sparse decode layers pick their tokens. A model built with `hata=None` is dense everywhere."""
    rbit: int = 128  # hash bits R per code
    budget: float = 2048  # K: a token count (int >= 1) or a fraction of the cache capacity in (0, 1)
    n_dense: int = 2  # the first n_dense layers always decode densely
    n_sink: int = 0  # the first n_sink positions are always selected (within K; engine.py refuses sink + recent > K)
    n_recent: int = 0  # the last n_recent positions are always selected (they count toward K)
    use_norm: bool = False  # score = (G - 2 ham / R) * ||k|| (HATA's released scripts) instead of plain ham
    selector: str = "hash"  # "hash" (HATA); "oracle": the exact top-K by attention probability; "quest": pages
    hash_weights: str | None = None  # safetensors file of trained projections; None = seeded random (LSH)

    def __post_init__(self):
        ints = {k: getattr(self, k) for k in ("rbit", "n_dense", "n_sink", "n_recent")}
        if bad := {k: v for k, v in ints.items() if not isinstance(v, int) or isinstance(v, bool)}:
            raise TypeError(f"{', '.join(bad)} must be whole numbers (int), got {', '.join(map(repr, bad.values()))}")
        check_rbit(self.rbit)
        real = isinstance(self.budget, numbers.Real) and not isinstance(self.budget, bool)  # not "1/4", not True
        if not (real and (0 < self.budget < 1 or (self.budget >= 1 and float(self.budget).is_integer()))):
            raise ValueError(f"budget must be a token count >= 1 or a fraction in (0, 1), got {self.budget}")
        if bad := [f"{k} {v}" for k, v in ints.items() if v < 0]:  # (engine's flags: --n-dense, --sink, --recent)
            raise ValueError(f"{', '.join(bad)}: must be >= 0")
        if self.selector not in SELECTORS:
            raise ValueError(f"unknown selector {self.selector!r}; choose one of {', '.join(SELECTORS)}")

    def budget_tokens(self, capacity):
        """K as a token count: a fraction is taken of the cache capacity, fixed for a whole generation so the
        decode step keeps static shapes (CUDA graphs); HATA's released code takes it of each step's length."""
        if self.budget >= 1:
            return int(self.budget)
        return max(1, math.ceil(round(self.budget * capacity, 6)))  # round: 9/11 * 77 = 63.00000000000001 in floats

    def reads_codes(self, capacity):  # whether sparse layers select by hash codes (need projections, code caches)
        return self.selector == "hash" and self.budget_tokens(capacity) < capacity  # K >= capacity: dense

    def checked_file(self, n_layers):  # the projection file a model of n_layers checks, whatever the budget (or None)
        return self.hash_weights if self.selector == "hash" and self.n_dense < n_layers else None


# --------------------------------------------------------------------------------------------------------------
# Layers

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


def rope_frequencies(args: ModelArgs, rope_factors=None):
    """Inverse frequencies (D/2,) with default, linear or llama3 scaling; `rope_factors` (GGUF's rope_freqs
    tensor) divides them when a checkpoint bakes its scaling in that way."""
    D = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D))  # (D/2,)
    scaling = args.rope_scaling or {"type": "default"}
    kind = scaling["type"]  # (ModelArgs refuses a dict without one)
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq  # (D/2,) fp64
        smooth = ((old_ctx / wavelen - low) / (high - low)).clamp(0, 1)  # (D/2,); 0: long waves, 1: short waves
        inv_freq = (1 - smooth) * inv_freq / factor + smooth * inv_freq  # (D/2,)
    if rope_factors is not None:
        inv_freq = inv_freq / rope_factors.double()  # (D/2,)
    return inv_freq.float()  # (D/2,) fp32


def apply_rope(x, cos, sin):
    """x (B, heads, T, D), e.g. H + Hkv heads; cos, sin (B, 1, T, D/2). Half-split layout: dim i pairs with dim
    i + D/2. Returns x's shape and dtype."""
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, heads, T, D/2) fp32 each
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).type_as(x)


def cudnn_lse_attention():
    """SDPA's cuDNN op, which also returns the log-sum-exp that SDPA drops, or None where this torch lacks it or
    its signature differs from the one causal_attention calls (the op is private: a release may change it, and then
    later prefill chunks take the masked pass instead of breaking)."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention", None)
    schema = op.default._schema if op is not None else None
    if schema is None or not {"attn_bias", "compute_log_sumexp", "is_causal"} <= {a.name for a in schema.arguments}:
        return None
    return op if [r.name for r in schema.returns[:2]] == ["output", "logsumexp"] else None


CUDNN_LSE_ATTENTION = cudnn_lse_attention()


def causal_attention(q, keys, values):
    """Causal attention of T queries at the last T of S key positions (a prefill chunk): q (B, H, T, D); keys,
    values (B, Hkv, S, D), S >= T. Query i sees keys 0 .. S - T + i. S = T is a fresh prefill. A later chunk
    (S > T) on CUDA, without autograd, in bf16/fp16 (where cuDNN's SDPA takes the shapes) is two cuDNN passes, the
    S - T cached keys unmasked and the chunk's own T keys causally, merged by their log-sum-exps: 1.8-2.5x faster
    than one masked pass per layer at 32K-128K (BENCHMARKS.md). Elsewhere (CPU, fp32, autograd) it is one pass
    with the mask. Returns (B, H, T, D)."""
    T, S = q.shape[2], keys.shape[2]
    if S < T:
        raise ValueError(f"causal_attention: {T} queries at the last positions of {S} keys (needs S >= T)")
    gqa = q.shape[1] != keys.shape[1]
    if S == T:
        return F.scaled_dot_product_attention(q, keys, values, is_causal=True, enable_gqa=gqa)
    old = keys[:, :, :S - T], values[:, :, :S - T]  # (B, Hkv, S - T, D) each: the cached keys
    new = keys[:, :, S - T:], values[:, :, S - T:]  # (B, Hkv, T, D) each: the chunk's own
    params = SDPAParams(q, *old, None, 0.0, False, gqa)  # attn_mask, dropout_p, is_causal, enable_gqa
    cudnn = CUDNN_LSE_ATTENTION
    if cudnn and q.is_cuda and not torch.is_grad_enabled() and can_use_cudnn_attention(params):  # lse: no gradient
        y_old, lse_old = cudnn(q, *old, attn_bias=None, compute_log_sumexp=True)[:2]  # (B, H, T, D), lse (see merge)
        y_new, lse_new = cudnn(q, *new, attn_bias=None, compute_log_sumexp=True, is_causal=True)[:2]  # the same shapes
        return merge_attention(y_old, lse_old, y_new, lse_new)
    visible = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)  # (T, S)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=visible, enable_gqa=gqa)


def merge_attention(y_a, lse_a, y_b, lse_b):
    """Attention over the union of two disjoint key sets, from each one's output y (B, H, T, D) and log-sum-exp of
    its logits lse (B, H, T) or (B, H, T, 1): the union's softmax weights each output by its set's share of the mass."""
    share = torch.sigmoid(lse_a - lse_b).view(*y_a.shape[:3], 1)  # (B, H, T, 1): e^a / (e^a + e^b), set a's share
    return torch.lerp(y_b.float(), y_a.float(), share).to(y_a.dtype)  # (B, H, T, D)


def write_kv(k, v, k_cache, v_cache, pos):
    """k, v (B, Hkv, T, D) into the caches (B, Hkv, S_max, D) at pos (B, T): a decode step (T = 1) in one launch on
    CUDA (cache_write), a longer chunk by index_put."""
    if k.shape[2] == 1:
        cache_write(k[:, :, 0], v[:, :, 0], k_cache, v_cache, pos[:, 0])
    else:
        b = torch.arange(pos.shape[0], device=pos.device)[:, None]  # (B, 1)
        k_cache[b, :, pos] = k.transpose(1, 2)  # indexed view is (B, T, Hkv, D)
        v_cache[b, :, pos] = v.transpose(1, 2)


class KVCache(nn.Module):
    def __init__(self, B, Hkv, S_max, D, dtype, device=None):
        super().__init__()
        # k, v: (B, Hkv, S_max, D) each
        self.register_buffer("k", torch.zeros(B, Hkv, S_max, D, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(B, Hkv, S_max, D, dtype=dtype, device=device), persistent=False)

    def update(self, pos, k, v):
        """pos (B, T) cache positions; k, v (B, Hkv, T, D). Returns the whole caches (B, Hkv, S_max, D)."""
        write_kv(k, v, self.k, self.v, pos)
        return self.k, self.v


class HashCache(nn.Module):
    """The hash code of every cached key (and its norm, for `use_norm`), beside the KV cache, plus `anchor`: state
    that hamming_topk's Triton path carries from one decode step to the next (where its histogram window starts,
    as an order key; -1: not yet), (B, Hkv) int32. The anchor changes the speed, never the selection."""

    def __init__(self, B, Hkv, S_max, W, use_norm, device=None):
        super().__init__()
        self.register_buffer("codes", torch.zeros(B, Hkv, S_max, W, dtype=torch.int32, device=device),
                             persistent=False)  # (B, Hkv, S_max, W) int32
        self.register_buffer("anchor", torch.full((B, Hkv), -1, dtype=torch.int32, device=device), persistent=False)
        norms = torch.zeros(B, Hkv, S_max, device=device) if use_norm else None  # (B, Hkv, S_max) fp32
        self.register_buffer("norms", norms, persistent=False)

    def update(self, pos, codes, norms=None):
        """pos (B, T); codes (B, Hkv, T, W) int32, or None when a kernel has written them; norms (B, Hkv, T)
        fp32 or None."""
        b = torch.arange(pos.shape[0], device=pos.device)[:, None]  # (B, 1)
        if codes is not None:
            self.codes[b, :, pos] = codes.transpose(1, 2)  # indexed view (B, T, Hkv, W)
        if self.norms is not None:
            self.norms[b, :, pos] = norms.transpose(1, 2).to(self.norms.dtype)  # indexed view (B, T, Hkv)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_id, hata: HataArgs | None):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wqkv = nn.Linear(args.dim, (args.n_heads + 2 * args.n_kv_heads) * args.head_dim, bias=False)  # wq|wk|wv
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.hata = hata if hata is not None and layer_id >= hata.n_dense else None  # None: a dense layer
        self.kv_cache = None
        self.kv_cache_cls = KVCache  # what setup_caches allocates; offload.py swaps in a host-memory cache
        self.hash_cache = None  # a HashCache only in a layer that selects by hash codes (Transformer.set_hata)
        self.budget = 0  # K in tokens, set with the caches
        self.hash_proj = None  # (Hkv, D, R) fp32, set by Transformer.set_hash_projections
        self.apply_rope = apply_rope  # Transformer.compile_pointwise swaps in a compiled one
        self.keep_qk, self.qk = False, None  # keep_qk: forward keeps its post-RoPE (q, k) in qk (the hash trainer)

    def forward(self, x, cos, sin, pos, mask, lengths, S):
        """Project x to q, k, v, rotate q and k, write k, v (and k's hash codes) into the caches, then attend: HATA's
        top-K in a sparse layer's decode step (T = 1, K < S), else dense. x (B, T, dim); cos, sin (B, 1, T, D/2);
        pos (B, T) the new tokens' cache positions; lengths (B,) = pos[:, -1] + 1; S the positions to attend over
        (S_max in a CUDA decode step: static shapes; else the last position + 1); mask (B, 1, T, S) additive (0 or
        -inf), or None for a prefill chunk at S - T .. S - 1 in every sequence (causal). Returns (B, T, dim)."""
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        qk, v = self.wqkv(x).split([(H + Hkv) * D, Hkv * D], dim=-1)  # (B, T, (H + Hkv) * D), (B, T, Hkv * D)
        qk = self.apply_rope(qk.view(B, T, H + Hkv, D).transpose(1, 2), cos, sin)  # (B, H + Hkv, T, D): one pass
        q, k = qk.split([H, Hkv], dim=1)  # (B, H, T, D), (B, Hkv, T, D)
        v = v.view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
        self.qk = (q, k) if self.keep_qk else None
        keys, values = self.kv_cache.update(pos, k, v)  # (B, Hkv, S_max, D) each, or a prefix of S_max (offload.py)
        q_codes = None  # (B, H, W) int32 in a decode step of a layer that selects by hash codes
        if self.hash_cache is not None:  # set_hata gave one (K < S_max): hash every new key, even if K >= S now
            norms = k.float().norm(dim=-1) if self.hata.use_norm else None  # (B, Hkv, T) fp32
            if T == 1:  # decode: the new key's code goes into the cache in the launch that hashes the queries
                q_codes = hash_encode_step(q[:, :, 0], k[:, :, 0], self.hash_proj, self.hash_cache.codes,
                                           pos[:, 0])  # (B, H, W) int32
                if norms is not None:
                    self.hash_cache.update(pos, codes=None, norms=norms)  # (the codes: written just above)
            else:  # a prefill chunk
                self.hash_cache.update(pos, hash_encode(k, self.hash_proj), norms)  # codes (B, Hkv, T, W) int32
        # Attend: HATA's top-K in a sparse layer's decode step, else dense in the fastest form for the shape
        if self.hata is not None and T == 1 and self.budget < S:  # (K >= S selects everything: dense, the same)
            y = self.sparse_decode(q[:, :, 0], q_codes, keys, values, S, lengths)[:, :, None]  # (B, H, 1, D)
        elif mask is None:  # a prefill chunk, at the same positions in every sequence
            y = causal_attention(q, keys[:, :, :S], values[:, :, :S])  # (B, H, T, D)
        elif T == 1 and not q.is_cuda:  # CPU dense decode: the G query heads of a KV head form one (G, D) block
            # (vs enable_gqa at 8K: 1.45x faster for Llama-3.1-8B's 32 / 8 heads, the same for 9 / 3; on CUDA 3x slower)
            y = F.scaled_dot_product_attention(q.view(B, Hkv, H // Hkv, D), keys[:, :, :S], values[:, :, :S],
                                               attn_mask=mask).view(B, H, 1, D)
        else:  # CUDA decode (the mask S_max long), or a chunk whose sequences start at different positions
            y = F.scaled_dot_product_attention(q, keys[:, :, :S], values[:, :, :S], attn_mask=mask, enable_gqa=H != Hkv)
        return self.wo(y.transpose(1, 2).reshape(B, T, H * D))  # (B, T, dim)

    def sparse_decode(self, q, q_codes, keys, values, S, lengths):
        """HATA decode: q (B, H, D); q_codes (B, H, W); keys, values (B, Hkv, S_max, D), the whole caches (a [:, :, :S]
        view would make the attention ref copy its S rows first: dense's bytes); S <= S_max the positions that may
        be valid; lengths (B,). Returns (B, H, D)."""
        hata, K = self.hata, self.budget
        if hata.selector == "hash" and not hata.use_norm:  # HATA (on CUDA the fused score + counting select)
            idx = hamming_topk(q_codes, self.hash_cache.codes[:, :, :S], lengths, K, hata.n_sink, hata.n_recent,
                               anchor=self.hash_cache.anchor)  # (B, Hkv, K) int32
            return sparse_decode_attention(q, keys, values, idx)  # (B, H, D)
        if hata.selector == "oracle":  # the exact top-K by the attention probability summed over the group
            score = -self.group_probs(q, keys[:, :, :S], lengths)  # (B, Hkv, S) fp32, smaller = selected first
        elif hata.selector == "quest":
            score = -self.quest_bounds(q, keys[:, :, :S], lengths)  # (B, Hkv, S) fp32
        else:  # use_norm (HATA's released scripts): 1 - 2 ham_j / R falls as the angle of q_j and k grows (LSH), so
            # summed over the group and times ||k|| it is a proxy of sum_j q_j.k / ||q_j||; negated: small is close
            ham = hamming_score(q_codes, self.hash_cache.codes[:, :, :S], lengths)  # (B, Hkv, S) int32
            score = -(self.n_heads // self.n_kv_heads - 2 * ham.float() / hata.rbit) * self.hash_cache.norms[:, :, :S]
        idx = select_topk(score, lengths, K, hata.n_sink, hata.n_recent)  # (B, Hkv, K) int32
        return sparse_decode_attention(q, keys, values, idx)  # (B, H, D)

    def group_probs(self, q, keys, lengths):
        """Dense softmax probabilities summed over the G query heads of each KV head: (B, Hkv, S) fp32, for keys
        (B, Hkv, S, D)."""
        B, H, D = q.shape
        Hkv, S = keys.shape[1], keys.shape[2]
        qg = q.float().view(B, Hkv, H // Hkv, D)  # (B, Hkv, G, D)
        logits = qg @ keys.float().transpose(-1, -2) / math.sqrt(D)  # (B, Hkv, G, S)
        valid = torch.arange(S, device=q.device) < lengths[:, None]  # (B, S)
        logits = logits.masked_fill(~valid[:, None, None], float("-inf"))  # (B, Hkv, G, S)
        return logits.softmax(-1).sum(2)  # (B, Hkv, S) fp32

    def quest_bounds(self, q, keys, lengths):
        """Quest (Tang et al., ICML 2024) as a comparison selector: each page of QUEST_PAGE tokens gets the upper
        bound of q.k from its per-channel key min/max, summed over the G query heads; every token carries its
        page's bound, so the top-K tokens are the best pages (ties: the newer page first). The bounds are taken
        from the cache every step: an accuracy baseline, not a fast path. Returns (B, Hkv, S) fp32, for keys
        (B, Hkv, S, D)."""
        B, H, D = q.shape
        Hkv, S = keys.shape[1], keys.shape[2]
        n_pages = -(-S // QUEST_PAGE)
        valid = (torch.arange(n_pages * QUEST_PAGE, device=q.device) < lengths[:, None])[:, None, :, None]
        k = F.pad(keys.float(), (0, 0, 0, n_pages * QUEST_PAGE - S))  # (B, Hkv, n_pages * QUEST_PAGE, D)
        k_max = k.masked_fill(~valid, -torch.inf).view(B, Hkv, n_pages, QUEST_PAGE, D).amax(3)  # (B, Hkv, n_pages, D)
        k_min = k.masked_fill(~valid, torch.inf).view(B, Hkv, n_pages, QUEST_PAGE, D).amin(3)  # (B, Hkv, n_pages, D)
        # an empty page's max / min are -inf / inf, and 0 * inf is NaN: kept finite (its bound is huge, but its
        # positions lie past its sequence's length, which select_topk never takes)
        k_max, k_min = k_max.clamp(min=-1e30), k_min.clamp(max=1e30)  # (B, Hkv, n_pages, D) each
        qg = q.float().view(B, Hkv, H // Hkv, 1, D)  # (B, Hkv, G, 1, D)
        bound = torch.maximum(qg * k_max[:, :, None], qg * k_min[:, :, None]).sum(-1).sum(2)  # (B, Hkv, n_pages)
        return bound.repeat_interleave(QUEST_PAGE, dim=-1)[..., :S]  # (B, Hkv, S)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w13 = nn.Linear(args.dim, 2 * args.ffn_dim, bias=False)  # gate w1 | up w3
        self.w2 = nn.Linear(args.ffn_dim, args.dim, bias=False)  # down

    def forward(self, x):
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_id, hata):
        super().__init__()
        self.attention = Attention(args, layer_id, hata)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, pos, mask, lengths, S):
        h = x + self.attention(self.attention_norm(x), cos, sin, pos, mask, lengths, S)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, hata: HataArgs | None = None):
        super().__init__()
        self.args, self.hata = args, hata
        # nn.Embedding's own init (randn), given: its normal_ on the meta device imports torch._dynamo (1.5 s)
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim, _weight=torch.randn(args.vocab_size, args.dim))
        self.layers = nn.ModuleList(TransformerBlock(args, i, hata) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.rope_factors, self.max_batch_size, self.max_seq_len = None, 0, 0  # rope_factors: GGUF's rope_freqs
        self.warned_random_projections = False  # said once a model: eval and bench set many policies on one

    def sparse_layers(self):
        return [layer.attention for layer in self.layers if layer.attention.hata is not None]

    def cache_bytes(self, max_batch_size, max_seq_len):
        """(one layer's K/V, every sparse layer's key codes, norms and anchors) in bytes: what setup_caches would
        allocate."""
        args, hata, sparse = self.args, self.hata, self.sparse_layers()
        layer = 2 * max_batch_size * args.n_kv_heads * max_seq_len * args.head_dim * self.output.weight.dtype.itemsize
        codes = sparse and hata.reads_codes(max_seq_len)  # a position's code bytes per KV head, and an fp32 norm
        per_row = (max_seq_len * (hata.rbit // 8 + 4 * hata.use_norm) + 4) if codes else 0  # (+ the int32 anchor)
        return layer, len(sparse) * max_batch_size * args.n_kv_heads * per_row

    def forward_bytes(self, batch, tokens, keys):
        """Estimated working memory, in bytes, of a forward of `tokens` new positions (a prefill chunk, T) of `batch`
        sequences over `keys` positions in all, its own included (S >= T; S > T: a later chunk), beyond weights and
        caches. engine.prefill's peaks: up to 5% below it on an H200 (bf16, eager; up to 25% below with --compile; B
        1-8; Llama-3.1-8B, SmolLM2), up to 1.5x of it on the CPU (fp32, resident memory; BENCHMARKS.md, 2026-12-04)."""
        a, weight = self.args, self.output.weight
        cudnn = weight.is_cuda and CUDNN_LSE_ATTENTION and weight.dtype in (torch.bfloat16, torch.float16)
        mask = tokens * keys * 4 if keys > tokens and not cudnn else 0  # a later chunk's masked pass: its (T, S) mask
        per_token = 4 * a.ffn_dim + 4 * a.dim  # the MLP's peak: (B, T, 2F) projection, gate, product; 4 x (B, T, dim)
        logits = batch * a.vocab_size * 10  # (B, V): the chunk's in the dtype and in fp32, and prefill's fp32 `last`
        return batch * tokens * per_token * weight.dtype.itemsize + mask + logits

    def setup_caches(self, max_batch_size, max_seq_len):
        """Allocate the KV (and hash) caches and the RoPE table: self.max_seq_len positions (not args.max_seq_len, the
        context the model was trained for, which bounds it) for exactly self.max_batch_size sequences a forward, on
        the weights' device and in their dtype: call it after moving the model (the RoPE tables stay where made)."""
        args = self.args
        if not (max_batch_size >= 1 and 1 <= max_seq_len <= args.max_seq_len):  # (0 would read as "no caches")
            raise ValueError(f"setup_caches({max_batch_size}, {max_seq_len}): a batch of at least 1 and a length in "
                             f"[1, {args.max_seq_len}], the model's context length")
        device, dtype = self.output.weight.device, self.output.weight.dtype
        # none of the old caches stays, and no new one serves until every layer has its own: a call refused midway
        # (offload's size check, memory) leaves a model that asks for setup_caches, not a mix of old and new caches
        self.max_batch_size = self.max_seq_len = 0
        for layer in self.layers:  # free the old caches before allocating new ones (set_hata makes the hash caches)
            layer.attention.kv_cache = layer.attention.hash_cache = None
        for layer in self.layers:
            layer.attention.kv_cache = layer.attention.kv_cache_cls(max_batch_size, args.n_kv_heads, max_seq_len,
                                                                    args.head_dim, dtype, device)
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        inv_freq = rope_frequencies(args, self.rope_factors)  # (D/2,)
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)  # (S_max, D/2)
        self.rope_cos, self.rope_sin = angles.cos().to(device), angles.sin().to(device)  # (S_max, D/2) each
        self.set_hata(self.hata, rehash=False)

    def compile_pointwise(self):
        """torch.compile the parts made of small elementwise kernels: the norms, the MLP module (for its SiLU gate)
        and RoPE. Inductor fuses them: 1.3 ms off a Llama-3.1-8B decode step on an H200 (7.1 -> 5.8 ms at a 16-token
        context; BENCHMARKS.md, 2026-11-29). Attention stays eager: SDPA and the HATA kernels are fused already."""
        rope = torch.compile(apply_rope)
        for layer in self.layers:
            layer.feed_forward.compile()
            layer.attention_norm.compile()
            layer.ffn_norm.compile()
            layer.attention.apply_rope = rope
        self.norm.compile()

    def set_hata(self, hata: HataArgs | None, rehash=True):
        """Set the decode policy: dense (None) or HATA with these settings. With `rehash`, the hash caches are
        rebuilt from the keys already cached, so one prefill can serve many selectors and budgets (eval.py)."""
        self.hata = hata
        for i, layer in enumerate(self.layers):
            attn = layer.attention
            attn.hata = hata if hata is not None and i >= hata.n_dense else None
            attn.hash_cache, attn.hash_proj = None, None
            attn.budget = attn.hata.budget_tokens(self.max_seq_len) if attn.hata is not None else 0
        if far := [i for i, l in enumerate(self.layers) if l.attention.kv_cache is not None
                   and type(l.attention.kv_cache) is not KVCache
                   and not (l.attention.hata is not None and l.attention.hata.reads_codes(self.max_seq_len))]:
            print(f"warning: layers {far} keep their K/V in host memory but now read all of it every step (dense, "
                  "oracle, Quest, or K covering the cache): set kv_cache_cls to KVCache, setup_caches", file=sys.stderr)
        if hata is None or not self.sparse_layers():
            return
        if not hata.reads_codes(self.max_seq_len):  # oracle, Quest, a K that covers the cache, or no cache yet
            if path := hata.checked_file(self.args.n_layers):  # a wrong file is an error whatever the budget
                load_hash_projections(path, self.args, hata, key_signature(self, hata.n_dense))
            return
        self.set_hash_projections(hata.hash_weights)
        for attn in self.sparse_layers():
            keys = attn.kv_cache.k  # (B, Hkv, S_max, D)
            attn.hash_cache = HashCache(*keys.shape[:3], hata.rbit // 32, hata.use_norm, keys.device)
            if rehash:
                attn.hash_cache.codes.copy_(hash_encode(keys, attn.hash_proj))  # (B, Hkv, S_max, W) int32
                if hata.use_norm:
                    attn.hash_cache.norms.copy_(keys.float().norm(dim=-1))  # (B, Hkv, S_max)

    def forward(self, tokens, input_pos=None, output_idx=None):
        """tokens (B, T); input_pos (B,) the cache position of each sequence's first token, or None when every
        sequence starts at 0 (a fresh prefill: causal attention, right padding allowed); output_idx (B,) the index
        in T whose logits to return, or None for all. Returns logits (B, T, V) or (B, V) in fp32. One token at
        input_pos (T == 1) is a decode step: sparse layers attend to their top-K there once K < S (so a prefill chunk
        after position 0 needs T >= 2, as engine.prefill keeps it). A chunk's positions (T > 1) and a CPU decode step's
        are checked against the caches; a CUDA decode step's (no host sync, for CUDA graphs) are the caller's to keep
        inside them."""
        if tokens.dim() != 2 or tokens.shape[1] == 0:
            raise ValueError(f"tokens must be a (B, T) tensor with T >= 1, got shape {tuple(tokens.shape)}")
        B, T = tokens.shape
        for name, idx in (("input_pos", input_pos), ("output_idx", output_idx)):  # no host sync; a bool reads as 1
            if idx is not None and (idx.shape != (B,) or idx.is_floating_point() or idx.dtype == torch.bool):
                raise ValueError(f"{name} must be an integer (B,) = ({B},) tensor, got {idx.dtype} {tuple(idx.shape)}")
        if self.max_seq_len == 0:
            raise RuntimeError("call setup_caches(max_batch_size, max_seq_len) before forward")
        if B != self.max_batch_size:  # the caches' rows are the batch's sequences
            raise ValueError(f"batch of {B} but the caches hold {self.max_batch_size} sequences: setup_caches({B}, ..)")
        if input_pos is None and T > self.max_seq_len:
            raise ValueError(f"{T} tokens but the caches hold {self.max_seq_len} positions: setup_caches(.., {T})")
        start = torch.zeros(B, dtype=torch.long, device=tokens.device) if input_pos is None else input_pos
        pos = start[:, None] + torch.arange(T, device=tokens.device)  # (B, T)
        # S: the cache positions a query may see; causal: no mask needed (causal_attention)
        if input_pos is None:  # a fresh prefill: its own T keys
            S, causal = T, True
        elif T == 1 and tokens.is_cuda:  # a CUDA decode step: the whole cache (static shapes, no host sync)
            S, causal = self.max_seq_len, False
        else:  # a later prefill chunk or a CPU decode step: the keys up to its last position, checked
            lo, hi = torch.stack(start.aminmax()).tolist()
            S = hi + T
            if not (lo >= 0 and S <= self.max_seq_len):
                raise ValueError(f"positions {lo}..{S - 1} are outside the caches' 0..{self.max_seq_len - 1}")
            causal = T > 1 and lo == hi  # a prefill chunk at one position in every sequence: no mask
        cos, sin = self.rope_cos[pos][:, None], self.rope_sin[pos][:, None]  # (B, 1, T, D/2)
        mask = None
        if not causal:  # the cache may hold a prefix: query at position p sees keys at positions <= p. Additive (0 /
            # -inf) in the weights' dtype, made once a step: SDPA would convert a bool mask again in every layer
            visible = torch.arange(S, device=tokens.device) <= pos[:, :, None]  # (B, T, S)
            mask = torch.zeros(visible.shape, dtype=self.output.weight.dtype,
                               device=tokens.device).masked_fill(~visible, float("-inf"))[:, None]  # (B, 1, T, S)
        lengths = pos[:, -1] + 1  # (B,) valid cache positions after this step
        x = self.tok_embeddings(tokens)  # (B, T, dim)
        for layer in self.layers:
            x = layer(x, cos, sin, pos, mask, lengths, S)
        if output_idx is not None:
            x = x[torch.arange(B, device=x.device), output_idx]  # (B, dim)
        return self.output(self.norm(x)).float()

    # ----------------------------------------------------------------------------------------------------------
    # Hash projections: safetensors, `layers.{l}.hash_proj` (Hkv, D, R) for each sparse layer l

    def set_hash_projections(self, path=None, seed=0):
        """Load trained projections from `path`, or draw seeded Gaussian ones (plain LSH) with a warning."""
        if not self.sparse_layers():
            return
        hata, args = self.hata, self.args
        if path is None:
            if not self.warned_random_projections:
                print(f"warning: seeded random projections (seed {seed}) make the hash codes; they select less "
                      "accurately than trained ones (train_hash.py makes those, --hash-weights loads them)",
                      file=sys.stderr)
                self.warned_random_projections = True
            projs = random_hash_projections(args, hata.rbit, hata.n_dense, seed)
        else:
            projs = load_hash_projections(path, args, hata, key_signature(self, hata.n_dense))
        for i in range(hata.n_dense, args.n_layers):  # the sparse layers
            self.layers[i].attention.hash_proj = projs[i].float().to(self.output.weight.device)


# --------------------------------------------------------------------------------------------------------------
# Hash projections: the seeded random draw, and the trained files (save, read, check against the model, load)

def random_hash_projections(args: ModelArgs, rbit, n_dense, seed=0):
    """Seeded Gaussian projections (plain LSH), what a model uses without a file and, over sqrt(D), what training
    starts from (train_hash.start_projections): {layer: (Hkv, D, R)} for the layers from n_dense on."""
    gen = torch.Generator().manual_seed(seed)
    return {i: torch.randn(args.n_kv_heads, args.head_dim, rbit, generator=gen) for i in range(n_dense, args.n_layers)}


def key_signature(model, n_dense, probes=16):
    """{layer: (probes,) fp32} for each sparse layer: key outputs, spread over the KV heads, for a fixed random input.
    A projection file records its model's, so that another model of the same shape is refused. A quantized copy or
    a light fine-tune of the model stays within load_hash_projections' tolerance."""
    args = model.args
    x = torch.randn(args.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rows = args.n_heads * args.head_dim + torch.arange(probes) * args.n_kv_heads * args.head_dim // probes  # wk's
    signature = {}
    for i in range(n_dense, args.n_layers):
        w = model.layers[i].attention.wqkv.weight.detach()  # (dim of q|k|v, dim)
        signature[i] = (w[rows.to(w.device)].cpu().double() @ x).float()
    return signature


def save_hash_projections(path, projs, args: ModelArgs, hata: HataArgs, signature=None):
    """projs: {layer: (Hkv, D, R) tensor} for every sparse layer; signature: key_signature of their model."""
    shape, shapes = (args.n_kv_heads, args.head_dim, hata.rbit), {tuple(p.shape) for p in projs.values()}
    if sorted(projs) != list(range(hata.n_dense, args.n_layers)) or shapes - {shape}:  # a file that loads refuse
        raise ValueError(f"the projections for {path} must be one {shape} tensor for each layer {hata.n_dense}.."
                         f"{args.n_layers - 1}, got layers {sorted(projs)} of shapes {sorted(shapes)}: not saved")
    tensors = {f"layers.{i}.hash_proj": p.detach().float().contiguous().cpu() for i, p in projs.items()}
    if not all(t.isfinite().all() for t in tensors.values()):
        raise ValueError(f"the projections for {path} are not finite (NaN or inf): not saved")
    meta = {"model": args.describe(), "rbit": str(hata.rbit), "n_dense": str(hata.n_dense)}
    if signature is not None:
        meta["key_signature"] = json.dumps({i: [float(f"{v:.6g}") for v in s.tolist()] for i, s in signature.items()})
    made = {name: (t.dtype, t.shape, lambda t=t: t) for name, t in tensors.items()}
    write_whole(path, lambda tmp: write_safetensors(tmp, made, meta))  # (save_file's metadata order changes a run)


def write_whole(path, write):
    """write(a new file) beside path, then rename it over path: a crash, Ctrl-C or full disk midway leaves the old
    file as it was, not a cut one. A failed write is an OSError naming path. As open() would: a link's target is
    written (not the link replaced by a file), a read-only file is refused, a file replaced keeps its mode, a new one
    gets the umask's (a writer's own temporary file may be private: 0600). Makes path's folder."""
    folder, name = os.path.split(real := os.path.realpath(path))
    tmp, umask = os.path.join(folder, f".{name[:50]}.{os.getpid()}.tmp"), os.umask(0)  # (50 characters: 200 bytes)
    os.umask(umask)
    try:
        os.makedirs(folder, exist_ok=True)
        old = os.stat(real).st_mode & 0o7777 if os.path.exists(real) else None
        if old is not None and not os.access(real, os.W_OK):  # read-only: open() would refuse it (root's: not)
            raise PermissionError("the file is read-only")
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask if old is None else old)
        os.replace(tmp, real)
    except OSError as e:  # a full disk's OSError names no file
        raise OSError(f"cannot write {path}: {e}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


SAFETENSORS_DTYPES = {torch.int64: "I64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def write_safetensors(path, tensors, meta):
    """A safetensors file written a tensor at a time: {name: (dtype, shape, a function giving the tensor)} and the
    metadata {str: str}. safetensors' save_file takes every tensor at once and copies each to bytes, twice the K/V in
    host memory (32 GiB for Llama-3.1-8B's 128K prompt in bf16). The layout is the format's: the header's length (8
    bytes, little-endian), the JSON header, padded with spaces to 8 bytes, then each tensor's bytes in its order."""
    header, at = {"__metadata__": meta}, 0
    for name, (dtype, shape, _) in tensors.items():
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [at, at + size]}
        at += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name, (dtype, shape, make) in tensors.items():
            if (t := make().cpu().contiguous()).dtype != dtype or tuple(t.shape) != tuple(shape):
                raise ValueError(f"write_safetensors: {name} is {t.dtype} {tuple(t.shape)}, its header says {dtype} "
                                 f"{tuple(shape)}")
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)
            del t  # before the next is made: one copy at a time


def read_hash_file(path, with_tensors=True):
    """(metadata: "model", "rbit", "n_dense" and, since 2026-12-04, "key_signature"; {name: tensor} or {}) of a
    projection file, or one clear error."""
    from safetensors import safe_open
    if not os.path.isfile(path):
        raise FileNotFoundError(f"hash weights file not found (or a directory): {path}")
    open(path, "rb").close()  # no read access: open's error says so (safe_open's below says "No such file")
    try:
        with safe_open(path, "pt") as f:
            meta, names = f.metadata() or {}, list(f.keys())
            tensors = {name: f.get_tensor(name) for name in names} if with_tensors else {}
    except Exception as e:
        raise ValueError(f"cannot read hash weights {path}: not a .safetensors file, or a cut one ({e})") from None
    if not ({"model", "rbit", "n_dense"} <= set(meta) and meta["rbit"].isdecimal() and meta["n_dense"].isdecimal()):
        raise ValueError(f"hash weights {path} lack train_hash.py's metadata (model, rbit, n_dense: whole numbers)")
    try:  # the settings engine.py takes from the file where no flag gives them: checked here, naming the file
        HataArgs(rbit=int(meta["rbit"]), n_dense=int(meta["n_dense"]))
    except ValueError as e:
        raise ValueError(f"hash weights {path}: {e}") from None
    layers = [int(i) for name in names if (i := name.removeprefix("layers.").removesuffix(".hash_proj")).isdecimal()]
    if min(layers, default=None) != int(meta["n_dense"]):  # (else n_dense=40 decoded densely, the tensors unread)
        raise ValueError(f"hash weights {path}: n_dense={meta['n_dense']} in its metadata, but its first projection "
                         f"is for layer {min(layers, default=None)}; the file is corrupt")
    return meta, tensors


def check_hash_model(meta, args: ModelArgs, path, hata: HataArgs | None = None):
    """A projection file's metadata against the model's shape and, given `hata`, its bits and dense layers."""
    if meta["model"] != args.describe():
        raise ValueError(f"hash weights {path} were made for '{meta['model']}', not this model ('{args.describe()}')")
    if hata is None:
        return
    for key, flag in (("rbit", "--rbit"), ("n_dense", "--n-dense")):
        if int(meta[key]) != getattr(hata, key):
            raise ValueError(f"hash weights {path} have {key}={meta[key]} but {key}={getattr(hata, key)} was asked "
                             f"for; pass {flag} {meta[key]}")


def load_hash_projections(path, args: ModelArgs, hata: HataArgs, signature=None):
    """Read and check a projection file against the model (its shape; its weights where the file and the caller give
    a key_signature) and HataArgs; returns {layer: (Hkv, D, R)}."""
    meta, tensors = read_hash_file(path)
    where = f"hash weights {path}"
    check_hash_model(meta, args, path, hata)
    want = {f"layers.{i}.hash_proj" for i in range(hata.n_dense, args.n_layers)}
    if set(tensors) != want:
        raise ValueError(f"{where}: missing {sorted(want - set(tensors))[:3]}, unexpected "
                         f"{sorted(set(tensors) - want)[:3]}")
    shape = (args.n_kv_heads, args.head_dim, hata.rbit)
    for name, t in tensors.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"{where}: {name} has shape {tuple(t.shape)}, expected {shape} (the model's KV heads and "
                             f"head dim, and rbit={meta['rbit']} from the file's metadata); the file is corrupt")
        if not (t.is_floating_point() and t.isfinite().all()):
            why = "holds NaN or inf" if t.is_floating_point() else f"holds {t.dtype}, not floating-point values"
            raise ValueError(f"{where}: {name} {why}")  # (before: one message, naming fp32 as if it were the fault)
    if signature is not None and "key_signature" in meta:  # (files written before it have none: not checked)
        try:
            saved = {int(i): torch.tensor(v, dtype=torch.float32) for i, v in json.loads(meta["key_signature"]).items()}
        except (ValueError, TypeError, AttributeError):  # not JSON, not {layer: [numbers]}
            saved = {}
        if saved.keys() != signature.keys() or not all(saved[i].shape == signature[i].shape and saved[i].isfinite()
                                                       .all() for i in saved):
            raise ValueError(f"{where}: its key_signature metadata is damaged")
        similar = min(torch.cosine_similarity(saved[i], signature[i], dim=0).item() for i in saved)
        if similar < 0.9:
            raise ValueError(f"{where} were trained on another model of this shape: its key weights differ (cosine "
                             f"{similar:.2f} of 1 in the least similar layer); train_hash.py makes projections for it")
    return {i: tensors[f"layers.{i}.hash_proj"] for i in range(hata.n_dense, args.n_layers)}


# --------------------------------------------------------------------------------------------------------------
# Checkpoint loading: GGUF file, Hugging Face directory, Meta directory; every tensor consumed, every shape checked

WEIGHT_NAMES = [  # (Meta's: what from_state_dict takes, Hugging Face, GGUF); {i} is the layer index
    ("tok_embeddings.weight", "model.embed_tokens.weight", "token_embd.weight"),
    ("norm.weight", "model.norm.weight", "output_norm.weight"),
    ("output.weight", "lm_head.weight", "output.weight"),
    ("layers.{i}.attention_norm.weight", "model.layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight"),
    ("layers.{i}.attention.wq.weight", "model.layers.{i}.self_attn.q_proj.weight", "blk.{i}.attn_q.weight"),
    ("layers.{i}.attention.wk.weight", "model.layers.{i}.self_attn.k_proj.weight", "blk.{i}.attn_k.weight"),
    ("layers.{i}.attention.wv.weight", "model.layers.{i}.self_attn.v_proj.weight", "blk.{i}.attn_v.weight"),
    ("layers.{i}.attention.wo.weight", "model.layers.{i}.self_attn.o_proj.weight", "blk.{i}.attn_output.weight"),
    ("layers.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.ffn_norm.weight"),
    ("layers.{i}.feed_forward.w1.weight", "model.layers.{i}.mlp.gate_proj.weight", "blk.{i}.ffn_gate.weight"),
    ("layers.{i}.feed_forward.w2.weight", "model.layers.{i}.mlp.down_proj.weight", "blk.{i}.ffn_down.weight"),
    ("layers.{i}.feed_forward.w3.weight", "model.layers.{i}.mlp.up_proj.weight", "blk.{i}.ffn_up.weight"),
]
FORMATS = ("meta", "hf", "gguf")  # the columns of WEIGHT_NAMES
DERIVED = ("rope.freqs", ".rotary_emb.inv_freq")  # endings of tables some checkpoints store; we recompute them
# Settings for math hata does not implement, refused rather than run as something else: (key, the test its harmless
# values pass, what hata does). Bias tensors, experts and quantized safetensors (qweight, scales) need no row:
# WEIGHT_NAMES refuses them (a GGUF's quantized types are dequantized).
# A sliding window needs none either: it caps the context (hf_args, gguf_args, meta_context), within which attention
# is whole.
NEVER = lambda v, a: False
UNSUPPORTED = {
    "hf": [("partial_rotary_factor", lambda v, a: v == 1, "RoPE on the whole head (1)"),
           ("rotary_dim", lambda v, a: v == a.head_dim, "RoPE on the whole head ({a.head_dim})"),
           ("attention_logit_softcapping", NEVER, "no softcapping (null)"),
           ("final_logit_softcapping", NEVER, "no softcapping (null)")],
    "gguf": [("llama.rope.dimension_count", lambda v, a: v == a.head_dim, "RoPE on the whole head ({a.head_dim})")],
    "meta": [("use_qk_norm", lambda v, a: not v, "no QK norm (false)"),  # Llama 4's; its MoE tensors are refused too
             ("nope_layer_interval", NEVER, "RoPE in every layer (null)"),
             ("attention_chunk_size", NEVER, "attention to the whole context (null)")],
}


def refuse_unsupported(where, fmt, setting, args):
    """One error for the first setting (`setting(key)`, None when absent) of UNSUPPORTED[fmt] that is not harmless."""
    for key, harmless, ours in UNSUPPORTED[fmt]:
        if (value := setting(key)) is not None and not harmless(value, args):
            raise ValueError(f"{where}: {key}={value!r} is not supported; hata implements {ours.format(a=args)}")


def checkpoint_format(path):
    """("gguf", the .gguf file) or ("hf" | "meta", the directory): what load_checkpoint reads, told from names and
    64 bytes (engine.py asks first, so that a wrong --checkpoint is not met as an error of its tokenizer)."""
    if not os.path.exists(path := os.fspath(path)):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    names = os.listdir(path) if os.path.isdir(path) else []
    read = ("config.json", "params.json", "*.gguf", "model*.safetensors*", "consolidated.*", "tokenizer*",
            "chat_template*")
    # a link to nothing: an incomplete Hugging Face snapshot
    if broken := sorted(n for n in names if any(fnmatch.fnmatch(n, p) for p in read)
                        and not os.path.exists(os.path.join(path, n))):
        raise FileNotFoundError(f"{path}: {', '.join(broken[:3])} " + ("links to a file that does" if len(broken) == 1
                                else "link to files that do") + " not exist; an incomplete download?")
    ggufs = any(name.endswith(".gguf") for name in names)
    # the format whose weights are there first (a Meta download may hold a config.json too); a Hugging Face GGUF
    # repository holds a config.json beside its .gguf file and no other weights: it is read as the .gguf
    found = [(fmt, any(fnmatch.fnmatch(n, weights) for n in names)) for fmt, name, weights in
             (("hf", "config.json", "model*.safetensors*"), ("meta", "params.json", "consolidated.*.pth"))
             if os.path.isfile(os.path.join(path, name))]
    for fmt, has_weights in sorted(found, key=lambda f: not f[1]):
        if has_weights or not ggufs:
            return fmt, path
    how = "pass a .gguf file or a checkpoint directory"
    path, head = file_head(path, missing=ValueError(  # a directory: its one .gguf (the default model's package)
        f"{path} has no config.json (Hugging Face), params.json (Meta) or .gguf file; {how}"))
    if head[:4] != b"GGUF":  # file_head calls a *.gguf without it a broken download; another file, a wrong argument
        raise ValueError(f"{path} is not a GGUF file (it does not start with 'GGUF'): {how}")
    return "gguf", path


@contextlib.contextmanager
def reading(path):
    """A reader meets a missing config field, metadata key or tensor as a KeyError, a field of the wrong kind as a
    TypeError or AttributeError, a bad value as a ValueError: each becomes one ValueError naming the checkpoint."""
    try:
        yield
    except KeyError as e:
        raise ValueError(f"{path}: the checkpoint has no {e}; is it complete, and a Llama model?") from None
    except (TypeError, AttributeError) as e:
        raise ValueError(f"{path}: malformed checkpoint ({e})") from None
    except ValueError as e:  # meta_context's and the libraries' errors name no file; the readers' own start with it
        said = str(e).lstrip("'")  # (named where its next character ends the name: not "t", the start of "the")
        if said.startswith(path) and (path.endswith(("/", os.sep)) or said[len(path):][:1] in (":", "/", os.sep)):
            raise
        raise ValueError(f"{path}: {e}") from None


def checkpoint_metadata(path):
    """(the context length, ModelArgs or None) from the checkpoint's metadata alone (a GGUF's keys, config.json,
    params.json), with its architecture and settings checked there: engine.py asks before the tokenizer and the
    weights load, so that another model's checkpoint, a prompt longer than the context or another model's hash
    weights is one line at once (not an error of the tokenizer, or one after minutes of loading). A Meta
    checkpoint's ModelArgs need its weights (params.json has no ffn_dim and may give vocab_size -1: read_meta takes
    both from the weights' shapes): None."""
    fmt, path = checkpoint_format(path)
    with reading(path):
        if fmt in ("gguf", "hf"):  # (a GGUF's parse kept for the tokenizer and the loader)
            args = gguf_args(path, gguf_reader(path, keep=True))[0] if fmt == "gguf" else hf_args(path)
            return args.max_seq_len, args
        p = read_json(os.path.join(path, "params.json"))
        refuse_unsupported(os.path.join(path, "params.json"), "meta", p.get, None)
        return meta_context(p), None


def load_checkpoint(path, dtype=torch.float32):
    """Returns (ModelArgs, {Meta's name: tensor on the CPU}, rope_factors or None): a safetensors or .pth file's
    tensors in their own dtype (from_state_dict converts them); a GGUF's weights dequantized into `dtype` one by
    one, never all in float32 (the default model, bf16: 0.8 GB peak, not 1.2)."""
    fmt, path = checkpoint_format(path)
    with reading(path):
        args, raw = read_gguf(path, dtype) if fmt == "gguf" else read_hf(path) if fmt == "hf" else read_meta(path)
    if bad := sorted(name for name, w in raw.items() if not isinstance(w, torch.Tensor)):
        raise ValueError(f"{path}: {bad[:4]} are not tensors; is it a Llama checkpoint?")
    rope_factors = raw.pop("rope_freqs.weight", None)  # GGUF bakes llama3 RoPE scaling into this tensor
    if rope_factors is not None and not (rope_factors.shape == (args.head_dim // 2,) and (rope_factors > 0).all()):
        found = (f"it has shape {tuple(rope_factors.shape)}" if rope_factors.shape != (args.head_dim // 2,) else
                 "some are not (zero, negative or NaN)")
        raise ValueError(f"{path}: rope_freqs.weight must hold head_dim / 2 = {args.head_dim // 2} factors, each > 0; "
                         f"{found}")
    raw = {name: w for name, w in raw.items() if not name.endswith(DERIVED)}
    if len(raw) < args.n_layers:  # (before a name table of n_layers rows: 10^9 layers would fill the memory)
        raise ValueError(f"{path}: {args.n_layers} layers in its metadata, but only {len(raw)} tensors")
    table = weight_names(fmt, args.n_layers)
    if leftovers := sorted(set(raw) - set(table)):
        raise ValueError(f"{path}: {len(leftovers)} tensor{'s' * (len(leftovers) > 1)} this model does not use, e.g. "
                         f"{leftovers[:4]}")
    sd = {}
    for name, t in raw.items():
        sd[ours := table[name]] = t
        if fmt != "hf" and ours.endswith((".wq.weight", ".wk.weight")):  # Meta's interleaved RoPE pairs (2i, 2i+1)
            n = args.n_heads if ours.endswith(".wq.weight") else args.n_kv_heads  # -> half-split pairs (i, i + D/2)
            if t.shape != (n * args.head_dim, args.dim):  # before its rows are regrouped
                raise ValueError(f"{path}: {name} has shape {tuple(t.shape)}, the model expects "
                                 f"{(n * args.head_dim, args.dim)}")
            sd[ours] = t.view(n, t.shape[0] // n // 2, 2, t.shape[1]).transpose(1, 2).reshape(t.shape)
    return args, sd, rope_factors


def weight_names(fmt, n_layers):
    """{the name in a `fmt` checkpoint: ours} for every weight of an n_layers Llama."""
    col, layers = FORMATS.index(fmt), lambda row: range(n_layers) if "{i}" in row[0] else [0]
    return {row[col].format(i=i): row[0].format(i=i) for row in WEIGHT_NAMES for i in layers(row)}


def gguf_reader(path, keep):
    try:
        return open_gguf(path, keep)
    except ImportError:  # no gguf package (pip install -r requirements.txt): not a fault of the file
        raise
    except Exception as e:
        raise ValueError(f"{path}: cannot read it as a GGUF file ({e}); is the file complete?") from None


def read_gguf(path, dtype=torch.float32):
    import gguf
    import numpy as np
    reader = gguf_reader(path, keep=False)  # every tensor is copied out below: no one needs the mapping after
    args, shapes = gguf_args(path, reader)
    raw = {}
    for t in reader.tensors:
        try:
            f64 = t.tensor_type == gguf.GGMLQuantizationType.F64  # (ggml's, which gguf's dequantize lacks)
            w = t.data.astype("float32") if f64 else gguf.quants.dequantize(t.data, t.tensor_type)  # numpy fp32 first
        except NotImplementedError as e:  # e.g. an I32 tensor: no weight of a Llama model
            raise ValueError(f"{path}: tensor {t.name} is of type {t.tensor_type.name}, which gguf cannot make "
                             f"floats of ({e})") from None
        w = w.reshape(shapes[t.name])  # copied only where it is the mapping's (F32 tensors)
        raw[t.name] = torch.from_numpy(w.copy() if np.may_share_memory(w, t.data) else w).to(
            torch.float32 if t.name == "rope_freqs.weight" else dtype)
    return args, raw


def gguf_args(path, reader):
    """(ModelArgs, {tensor: shape}) from a GGUF's metadata; its architecture and settings checked."""
    def value(key, default=...):  # the metadata value of `key`; no default: a required key
        if key not in reader.fields and default is ...:
            raise KeyError(key)
        return reader.fields[key].contents() if key in reader.fields else default

    if reader.endianess.name == "BIG":  # gguf swaps the header's numbers, not its dequantized tensors: NaN weights
        raise ValueError(f"{path}: a big-endian GGUF, which llama.cpp does not read here either; convert it "
                         "(python -m gguf.scripts.gguf_convert_endian FILE little)")
    if (parts := value("split.count", 1)) > 1:  # llama-gguf-split's output: its first part lacks most tensors
        raise ValueError(f"{path}: part {value('split.no', 0) + 1} of a GGUF split into {parts} files; merge them "
                         f"first (llama-gguf-split --merge)")
    if (arch := value("general.architecture", None)) != "llama":
        raise ValueError(f"{path}: unsupported architecture {arch!r}; hata runs Llama-architecture models")
    if value("llama.expert_count", 0):
        raise ValueError(f"{path}: a mixture-of-experts model (Mixtral); hata runs dense Llama models")
    n_heads = value("llama.attention.head_count")
    kind = value("llama.rope.scaling.type", "linear")  # as llama.cpp: a factor without a type is linear scaling
    factor = value("llama.rope.scaling.factor", value("llama.rope.scale_linear", 0.0))  # the second: older converters
    if kind not in ("linear", "none"):
        raise ValueError(f"{path}: unsupported RoPE scaling {kind!r}")
    scaling = {"type": "linear", "factor": factor} if kind == "linear" and factor not in (0.0, 1.0) else None
    shapes = {t.name: [int(d) for d in reversed(t.shape)] for t in reader.tensors}  # GGUF lists dims reversed
    # ggml's layout, which it checks too: each tensor where the one before it ends, padded to the alignment (a damaged
    # offset or type would read another tensor's bytes without a word)
    at = reader.data_offset
    for t in reader.tensors:
        if t.data_offset != at:
            raise ValueError(f"{path}: tensor {t.name} starts at byte {t.data_offset}, not at {at} where the tensors "
                             "before it end: the file is corrupt; re-download it")
        at += -(-int(t.n_bytes) // reader.alignment) * reader.alignment
    if shapes["token_embd.weight"][1:] != [value("llama.embedding_length")]:  # before the settings it would garble
        raise ValueError(f"{path}: llama.embedding_length {value('llama.embedding_length')} is not the width of "
                         f"token_embd.weight {shapes['token_embd.weight']}: the file is corrupt; re-download it")
    context, window = value("llama.context_length"), value("llama.attention.sliding_window", 0) or math.inf  # 0: none
    names = dict(dim="embedding_length", n_layers="block_count", n_heads="attention.head_count",
                 n_kv_heads="attention.head_count_kv", ffn_dim="feed_forward_length", rope_theta="rope.freq_base",
                 norm_eps="attention.layer_norm_rms_epsilon", factor="rope.scaling.factor",
                 head_dim="attention.key_length",
                 max_seq_len="attention.sliding_window" if window < context else "context_length")
    args = ModelArgs.read(path, {k: "llama." + v for k, v in names.items()}, dim=value("llama.embedding_length"),
                          n_layers=value("llama.block_count"), n_heads=n_heads,
                          n_kv_heads=value("llama.attention.head_count_kv", n_heads),
                          vocab_size=shapes["token_embd.weight"][0], ffn_dim=value("llama.feed_forward_length"),
                          norm_eps=value("llama.attention.layer_norm_rms_epsilon"),
                          rope_theta=value("llama.rope.freq_base", 10000.0), rope_scaling=scaling,
                          max_seq_len=min(context, window), tie_embeddings="output.weight" not in shapes,
                          head_dim=value("llama.attention.key_length", 0))  # checked before the tensors are dequantized
    refuse_unsupported(path, "gguf", lambda key: value(key, None), args)
    return args, shapes


def hf_args(path):
    """ModelArgs from config.json; its model type and settings checked."""
    cfg = read_json(os.path.join(path, "config.json"))
    if cfg.get("model_type") != "llama":
        raise ValueError(f"{path}: unsupported model_type {cfg.get('model_type')!r}; hata runs Llama models")
    if cfg.get("hidden_act", "silu") not in ("silu", "swish"):
        raise ValueError(f"{path}: unsupported hidden_act {cfg['hidden_act']!r}; Llama's MLP is SwiGLU (silu)")
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    kind = rope.get("rope_type", rope.get("type", None if "factor" in rope else "default"))  # a factor alone: refused
    scaling = None if kind == "default" else {"type": kind, **{k: v for k, v in rope.items()
                                                              if k not in ("rope_type", "type", "rope_theta")}}
    if (theta := cfg.get("rope_theta")) is None:  # (transformers v5 may write null here, the value in rope_parameters)
        theta = rope.get("rope_theta", None if "rope_theta" in cfg else 10000.0)  # (a null alone is refused)
    context = cfg.get("max_position_embeddings", 2048)  # transformers' LlamaConfig default
    window = cfg.get("sliding_window") or math.inf  # within the window: full attention
    if type(window) not in (int, float):
        raise ValueError(f"{path}: config.json's sliding_window must be a whole number or null, got {window!r}")
    narrower = type(context) in (int, float) and window < context  # (a context of another type: named below)
    names = dict(dim="hidden_size", n_layers="num_hidden_layers", n_heads="num_attention_heads",
                 n_kv_heads="num_key_value_heads", ffn_dim="intermediate_size", norm_eps="rms_norm_eps",
                 tie_embeddings="tie_word_embeddings",
                 max_seq_len="sliding_window" if narrower else "max_position_embeddings")
    args = ModelArgs.read(os.path.join(path, "config.json"), names, dim=cfg["hidden_size"],
                          n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"],
                          n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
                          vocab_size=cfg["vocab_size"], ffn_dim=cfg["intermediate_size"],
                          norm_eps=cfg["rms_norm_eps"], rope_theta=theta, rope_scaling=scaling,
                          max_seq_len=window if narrower else context,
                          tie_embeddings=cfg.get("tie_word_embeddings", False),
                          head_dim=cfg.get("head_dim") or 0)
    refuse_unsupported(os.path.join(path, "config.json"), "hf", {**rope, **cfg}.get, args)  # v5: rope_parameters
    return args


def read_hf(path):
    from safetensors import safe_open
    args = hf_args(path)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(os.path.join(path, "model.safetensors")):  # before an index, as transformers reads them
        files = ["model.safetensors"]
    elif os.path.isfile(index):
        files = sorted(set(read_json(index)["weight_map"].values()))
        if bad := [f for f in files if not isinstance(f, str) or os.path.basename(f) != f or f in ("", ".", "..")]:
            raise ValueError(f"{index}: its weight_map names files outside the directory ({bad[0]!r})")
    elif shards := sorted(n for n in os.listdir(path) if re.fullmatch(r"model-\d+-of-\d+\.safetensors", n)):
        raise ValueError(f"{path}: {shards[0]} and the other shards need model.safetensors.index.json, which says "
                         "what each holds: download it too")
    else:
        raise ValueError(f"{path}: no model.safetensors or model.safetensors.index.json (pickled .bin "
                         f"checkpoints are not loaded; convert them to safetensors)")
    if gone := [f for f in files if not os.path.exists(os.path.join(path, f))]:  # before any read
        raise ValueError(f"{path}: the download is incomplete; model.safetensors.index.json names {len(files)} "
                         f"shard files and {len(gone)} of them are missing ({', '.join(gone[:3])}"
                         f"{', ...' * (len(gone) > 3)})")
    raw = {}
    for file in (os.path.join(path, name) for name in files):
        if os.path.isfile(file):  # a Git LFS pointer is named as one, not read as a bad safetensors header
            file_head(file)
        try:
            with safe_open(file, "pt") as f:
                if again := set(f.keys()) & set(raw):
                    raise ValueError(f"it repeats tensors of another shard, e.g. {sorted(again)[:3]}")
                raw.update({k: f.get_tensor(k) for k in f.keys()})
        except Exception as e:
            raise ValueError(f"{file}: cannot read it ({e})") from None
    if args.tie_embeddings:
        raw.pop("lm_head.weight", None)  # a tied copy some exporters write: consumed, not used
    return args, raw


def read_meta(path):
    p = read_json(os.path.join(path, "params.json"))
    refuse_unsupported(os.path.join(path, "params.json"), "meta", p.get, None)  # before the shards are read
    shards = sorted(glob.glob(os.path.join(glob.escape(path), "consolidated.*.pth")))  # escape: a folder "llama[1]"
    if not shards:
        raise ValueError(f"{path}: params.json but no consolidated.*.pth weights")
    parts = []
    for shard in shards:
        file_head(shard)  # a Git LFS pointer is named as one
        try:  # weights_only: tensors and plain containers only, never arbitrary pickled objects
            if not zipfile.is_zipfile(shard):
                raise ValueError("empty, cut short, or not a torch zip file")
            parts.append(torch.load(shard, map_location="cpu", weights_only=True, mmap=True))
        except Exception as e:  # torch's message would suggest weights_only=False: never, for a file from elsewhere
            why = "it holds objects other than tensors" if "Weights only" in str(e) else (
                f"cannot read it ({str(e).splitlines()[0]})")
            raise ValueError(f"{shard}: {why}; re-download it") from None
    if not all(isinstance(part, dict) and all(isinstance(name, str) for name in part) for part in parts):
        raise ValueError(f"{path}: malformed checkpoint (a consolidated.*.pth holds no {{name: tensor}} dict)")
    if any(part.keys() != parts[0].keys() for part in parts):
        raise ValueError(f"{path}: the consolidated.*.pth shards hold different tensors; re-download them")
    raw = {}
    for name, w in parts[0].items():  # model-parallel shards: column-parallel on dim 0, row-parallel on dim 1
        if len(parts) == 1 or w.dim() == 1:
            raw[name] = w
        else:
            # row-parallel: wo, w2, and the embedding where it is cut on dim (Llama 2; Llama 3 cuts it on vocab)
            row = name.endswith(("wo.weight", "w2.weight")) or (name == "tok_embeddings.weight"
                                                              and w.shape[1] != p["dim"])
            try:
                raw[name] = torch.cat([part[name] for part in parts], dim=1 if row else 0)
            except RuntimeError as e:
                raise ValueError(f"{name}: the consolidated.*.pth shards' pieces do not fit together ({e}); "
                                 f"re-download them") from None
    scaled = p.get("use_scaled_rope", False)  # Llama 3.1+: llama3 scaling by llama-models' factor, which params.json
    # may omit: 32 for Llama 3.2 1B and 3B (meta-llama/llama-models#166), else 8 (Llama 3.1)
    if (factor := p.get("rope_scaling_factor")) is None:  # (null as llama-models' default; 0 is refused)
        factor = 32.0 if (p["dim"], p["n_layers"]) in ((2048, 16), (3072, 28)) else 8.0
    names = dict(factor="rope_scaling_factor", high_freq_factor="rope_high_freq_factor")  # the rest: ours
    # Meta's model has an output layer of its own, loaded strictly (llama-models), so Meta's files always hold one:
    # the tied Llama 3.2 1B and 3B a copy of the embedding, kept here as one matrix (as config.json's tie gives)
    embedding, output = raw["tok_embeddings.weight"], raw.get("output.weight")
    tied = output is not None and torch.equal(output, embedding)  # (False for another shape)
    args = ModelArgs.read(os.path.join(path, "params.json"), names, dim=p["dim"], n_layers=p["n_layers"],
                          n_heads=p["n_heads"], n_kv_heads=p.get("n_kv_heads") or p["n_heads"],
                          vocab_size=embedding.shape[0],
                          ffn_dim=raw["layers.0.feed_forward.w1.weight"].shape[0], norm_eps=p.get("norm_eps", 1e-5),
                          rope_theta=p.get("rope_theta", 10000.0),
                          rope_scaling={**PRESETS["llama-3.1-8b"].rope_scaling, "factor": factor,
                                        "high_freq_factor": p.get("rope_high_freq_factor", 4.0)} if scaled else None,
                          max_seq_len=meta_context(p), tie_embeddings=tied, head_dim=p.get("head_dim") or 0)
    if output is None:  # cut short or not Meta's: never read as tied (an untied model would run on its embedding)
        raise ValueError(f"{shards[0]}{' (and every other shard)' * (len(shards) > 1)}: no output.weight; Meta's "
                         "checkpoints always hold it (Llama 3.2 1B and 3B: a copy of tok_embeddings.weight), so this "
                         "one is incomplete or not Meta's; re-download it")
    if tied:
        del raw["output.weight"]  # consumed: the model's output layer is its embedding
    return args, raw


def meta_context(p):
    """params.json has no context length: Llama 3.1+ (scaled RoPE) 128K, Llama 3 8K, Code Llama (Llama 2 with RoPE
    theta 1e6) 16K, LLaMA 1 (norm_eps 1e-6) 2K, Llama 2 4K; within a sliding_window (as config.json's), where
    attention is whole."""
    if type(scaled := p.get("use_scaled_rope", False)) is not bool:  # JSON's "false" is a string, and true in Python
        raise ValueError(f"params.json's use_scaled_rope must be true or false, got {scaled!r}")
    context = p.get("max_seq_len") or (131072 if scaled else 8192 if p.get("vocab_size", 0) > 100000 else 16384
                                       if p.get("rope_theta", 0) >= 1e6 else 2048 if p.get("norm_eps") == 1e-6
                                       else 4096)
    window = p.get("sliding_window") or context  # (0 or null: none)
    for key, value in (("max_seq_len", context), ("sliding_window", window)):
        if type(value) is not int or value < 1:
            raise ValueError(f"params.json's {key} must be a whole number >= 1, got {value!r}")
    return min(context, window)


def fused_weights(args):
    """The model stores wq|wk|wv and w1|w3 of each layer stacked in one matrix (one matmul instead of three and
    two: a decode step is a chain of matrix-vector products, and fewer, larger ones run closer to the memory
    bandwidth). Returns {fused name: [(checkpoint name, rows)]} in stacking order."""
    H, Hkv, D = args.n_heads, args.n_kv_heads, args.head_dim
    out = {}
    for i in range(args.n_layers):
        a, f = f"layers.{i}.attention.", f"layers.{i}.feed_forward."
        out[a + "wqkv.weight"] = [(a + "wq.weight", H * D), (a + "wk.weight", Hkv * D), (a + "wv.weight", Hkv * D)]
        out[f + "w13.weight"] = [(f + "w1.weight", args.ffn_dim), (f + "w3.weight", args.ffn_dim)]
    return out


def from_checkpoint(path, hata: HataArgs | None = None, device="cpu", dtype=torch.float32):
    args, sd, rope_factors = load_checkpoint(path, dtype)
    theirs = {ours: name for name, ours in weight_names(checkpoint_format(path)[0], args.n_layers).items()}
    return from_state_dict(args, sd, hata, device, dtype, rope_factors, where=path, names=theirs)


def from_state_dict(args, sd, hata=None, device="cpu", dtype=torch.float32, rope_factors=None, where="checkpoint",
                    names=None):
    """Build the model on the meta device and load `sd` (our names) into it: no double allocation, and tensors
    already of the right device and dtype are used as they are (models built from one `sd` share them), except
    the stacked wqkv and w13 (see fused_weights); every weight must be finite in `dtype`. Errors name a tensor as
    `names` ({ours: the file's}) does."""
    named = lambda name: (names or {}).get(name, name)
    sd = {k: w for k, w in sd.items() if k != "output.weight" or not args.tie_embeddings}  # tied: the embedding's
    with torch.device("meta"):
        model = Transformer(args, hata)
    expected = {name: tuple(t.shape) for name, t in model.named_parameters()}  # tied: listed once, as the embedding
    fused = fused_weights(args)
    for name, parts in fused.items():  # checked as the checkpoint's separate tensors
        del expected[name]
        expected.update({part: (rows, args.dim) for part, rows in parts})
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    if missing or unexpected:
        said = [f"{len(ns)} tensor{'s' * (len(ns) > 1)} {what}, e.g. {[named(n) for n in ns[:4]]}"
                for what, ns in (("missing", missing), ("unexpected", unexpected)) if ns]
        untied = " (config.json's tie_word_embeddings is false or absent)" * (missing == ["output.weight"])
        raise ValueError(f"{where}: {'; '.join(said)}{untied}")
    for name, w in sd.items():
        if tuple(w.shape) != expected[name]:
            raise ValueError(f"{where}: {named(name)} has shape {tuple(w.shape)}, the model expects {expected[name]}")
        if not w.is_floating_point() or w.dtype.itemsize < 2:  # float8: scaled by tensors of its own (Meta's, FP8)
            raise ValueError(f"{where}: {named(name)} holds {w.dtype}, not floating-point weights of 16 bits or more")
    given, sd = sd, {name: w.to(device=device, dtype=dtype) for name, w in sd.items()}
    # a NaN or inf shows in its tensor's min or max (one pass, no copy: a twentieth of isfinite's time; one wait for
    # the GPU); else NaN keys made all-NaN scores, which attention turns to 0: wrong text, no error
    finite = torch.stack([torch.stack(torch.aminmax(w)).isfinite().all() for w in sd.values()]).tolist()
    if not all(finite):
        name = list(sd)[finite.index(False)]
        wider = "; load it in bfloat16 or float32 (--dtype)" if dtype == torch.float16 else ""
        if given[name].isfinite().all():
            raise ValueError(f"{where}: {named(name)} overflows {dtype} (values past "
                             f"{torch.finfo(dtype).max:.4g}){wider}")
        if wider:  # (a GGUF is dequantized into float16 itself: there an overflow looks like the file's own inf)
            raise ValueError(f"{where}: {named(name)} holds NaN or inf in float16: a value past 65504, or a corrupt "
                             f"file{wider}")
        raise ValueError(f"{where}: {named(name)} holds NaN or inf; the file is corrupt")
    for name, parts in fused.items():
        sd[name] = torch.cat([sd.pop(part) for part, _ in parts])
    if args.tie_embeddings:  # load_state_dict wants both names; assign=True gives each a Parameter: tied again below
        sd["output.weight"] = sd["tok_embeddings.weight"]
    model.load_state_dict(sd, assign=True)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.rope_factors = rope_factors
    return model.eval()
