"""HATA decode-step kernels: hash codes, Hamming scores, top-k selection, sparse attention.

Implements the decode step of HATA (Hash-Aware Top-k Attention, Gong et al., ACL 2025, arXiv 2506.02572,
Sec. 3: learned binary hash codes, Hamming-distance scoring, top-k sparse attention). Shape comments name B
sequences, H query heads, Hkv KV heads, G = H / Hkv, D head dim, R hash bits, W = R / 32 code words, S the cached
positions an op sees (lengths[b] of them valid), S_max the caches' capacity, K (`budget`) the slots selected.

Each op is a triple, side by side:
    _op_kernel   Triton kernel(s), one a launch (GPU; on the CPU under TRITON_INTERPRET=1): hamming_topk's are
                 _topk_{score,threshold,compact}_kernel, sparse_decode_attention's _sparse_attn_{split,merge}_kernel,
                 and hash_encode_step runs _hash_encode_kernel with its KEY row
    op()         input checks (ValueError, one line) + dispatch
    op_ref()     torch, the definition; runs anywhere (on the CPU, numpy counts bits)

Dispatch: op(..., use_triton=None) picks Triton when the inputs are CUDA tensors, else the ref; on CUDA, hash_encode
takes cuBLAS for long prefills with W not a power of two and cache_write the ref for D not a power of two; the
hashing and attention kernels refuse (ValueError) a head dim D that is not a power of two >= 16, and attention fp64.

    hash_encode(x, proj)                        -> codes (B, Hx, T, W) int32
    hash_encode_step(q, k, proj, code_cache, pos) -> q codes (B, H, W); the new keys' codes into the cache
    hamming_score(q_codes, k_codes, lengths)    -> score (B, Hkv, S) int32
    select_topk(score, lengths, budget, ...)    -> idx   (B, Hkv, budget) int32, -1 = unused slot
    hamming_topk(q_codes, k_codes, lengths, budget, ...)  score + select in 3 launches (the hash selector)
    sparse_decode_attention(q, k_cache, v_cache, idx)     -> out (B, H, D)
    cache_write(k, v, k_cache, v_cache, pos)    a decode step's new K and V rows into the caches, one launch

Conventions (the contract with model.py):
- Packing: bit i of word w is (x @ P)[32*w + i] > 0; words are int32, bit 31 is the sign bit.
- Score: sum over the G query heads of a KV head of popcount(k_code XOR q_code); smaller is closer.
  Positions s >= lengths[b] score G*R + 1 (worse than any real score).
- Selection: per (b, h), with len = min(lengths[b], S), the K_eff = min(budget, len) positions with the smallest
  score; ties go to the newer (larger) position. Sinks [0, n_sink) and the recent window [len - n_recent, len),
  both cut to [0, len), are selected first and count toward the budget: they rank before every scored position,
  and if they alone exceed the budget the newest of them win ("newer wins" again). Slots beyond K_eff hold -1.
  The refs return positions ascending, then the -1s, and so do the Triton kernels today; callers should
  still treat a selection as a set (a kernel may change its order).
- Strides: every op accepts non-contiguous inputs (not hamming_topk's anchor: state it rewrites). The Triton
  paths read x, q, k_cache, v_cache and idx through their strides (views k_cache[:, :, :S] cost nothing; the
  attention ref copies them); k_codes may be any view whose (S, W) rows are packed (codes[:, :, :S] of a
  (B, Hkv, S_max, W) buffer is), else a copy.
"""
import math
import os

import numpy as np
import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_INTS = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


# ----------------------------------------------------------------------------------------------------------
# helpers shared by the ops


def _use_triton(use_triton, *tensors):
    """None -> Triton when every tensor lives on CUDA, else the ref. True needs CUDA tensors or the interpreter."""
    on_cuda = all(t.is_cuda for t in tensors)
    _check(on_cuda or _INTERPRET or not use_triton, "use_triton=True needs CUDA tensors (or TRITON_INTERPRET=1)")
    return on_cuda if use_triton is None else bool(use_triton)


def _check(cond, msg):
    if not cond:
        raise ValueError(msg)


def _check_devices(op, **ts):  # one device for every input; the message is built only when they differ
    if len({t.device for t in ts.values()}) > 1:
        raise ValueError(f"{op}: inputs on different devices ({', '.join(f'{n} {t.device}' for n, t in ts.items())})")


def _is_int(t):  # lengths and positions: int32 or int64 (a bool True reads as 1; uint8 and int8 wrap, in the refs'
    return t.dtype in (torch.int32, torch.int64)  # `length - n_recent` and clamps, past 127 or 255)


def triton_head_dim(D):  # engine.py asks before a model loads on CUDA
    """Whether the hashing and attention kernels take head dim D: tl.arange tiles a power of two, tl.dot >= 16."""
    return (D & (D - 1)) == 0 and D >= 16


def _check_triton_head_dim(D, op):
    _check(triton_head_dim(D), f"{op}: Triton path needs D a power of two >= 16, got {D}")


def _popcount_words(words, lut=None):
    """Set bits of each int32 word: numpy's bitwise_count on the CPU; else (lut=True: on the CPU too) a byte table."""
    if lut is False or (lut is None and words.device.type == "cpu"):
        return torch.from_numpy(np.bitwise_count(words.numpy().view(np.uint32)))
    table = sum((torch.arange(256, device=words.device) >> i) & 1 for i in range(8)).to(torch.int32)  # (256,)
    return table[words.view(torch.uint8).long()].view(*words.shape, 4).sum(-1)  # words' shape, int64


def _check_int32_span(t, op):  # score and select kernels: int32 row offsets (int64 costs registers; score: maxnreg 96)
    n = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))  # elements from the first to the last
    _check(n < 2 ** 31, f"{op}: the Triton path indexes with int32 offsets and this input spans {n} >= 2^31 elements; "
           "split the batch")


def _launch(out, launches):  # an op's (name, launch) list in order (bench.py times each); returns its output
    for _, launch in launches:
        launch()
    return out


def _next_pow2(n):
    return 1 << max(0, int(n) - 1).bit_length()


def _rows_contiguous(codes):
    """(B, Hkv, S, W) codes whose (S, W) rows are packed (a cache view codes[:, :, :S] is); else a copy."""
    W = codes.shape[-1]
    return codes if codes.stride(3) == 1 and codes.stride(2) == W else codes.contiguous()


def _planes(G):
    """How many two's-complement bit planes hold v = floor((G - 2c) / 2) for every c in [0, G] (see _group_score)."""
    return (G // 2).bit_length() + 1


@triton.jit
def _popcount(x, HW_POPC: tl.constexpr):
    """popcount of each int32 lane. SWAR bit trick (exact, also in the interpreter) or the PTX popc."""
    if HW_POPC:
        return tl.inline_asm_elementwise("popc.b32 $0, $1;", "=r,r", [x], dtype=tl.int32, is_pure=True, pack=1)
    else:
        # bit counts of 2-bit fields, 4-bit fields, bytes; two folds add the byte counts into the low byte (<= 32).
        # Arithmetic shifts are harmless: three masks clear the sign bits, after which x >= 0 (the folds add zeros)
        x = x - ((x >> 1) & 0x55555555)
        x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
        x = (x + (x >> 4)) & 0x0F0F0F0F
        x = x + (x >> 8)
        x = x + (x >> 16)
        return x & 0x3F


# ----------------------------------------------------------------------------------------------------------
# 1. hash_encode: codes = pack(x @ P > 0)


@triton.jit
def _hash_encode_kernel(
    x_ptr, p_ptr, c_ptr,                    # x (B, Hx, T, D), proj (Hkv, D, R) fp32, codes (B, Hx, T, W) int32
    k_ptr, pos_ptr, kc_ptr,                 # KEY only: new keys (B, Hkv, D), pos (B,), code cache (B, Hkv, S_max, W)
    Hkv, T,
    sxb, sxh, sxt, sxd,
    sph, spd, spr,
    scb, sch, sct,
    skb, skh, skd,
    skcb, skch, skcs, skcw,
    G: tl.constexpr, D: tl.constexpr, BLOCK_R: tl.constexpr, NW: tl.constexpr, PRECISION: tl.constexpr,
    KEY: tl.constexpr,
):
    """Program (row block, b * Hkv + h, word block) writes NW words of BLOCK_R rows r = (g, t) of the G heads
    that use proj[h]: each projection slice is loaded once a program. Up to 64 rows (decode), or W not a power of
    two: NW = 1, over cdiv(rows, BLOCK_R) * B * Hkv * W programs; more rows: NW = min(W, 2) (the (D, 64) proj
    slice and a 128-row block fit in registers: 2.4-3x faster than the ref's fp32 matmul, 32K keys, 8 heads, R 128).
    KEY (decode, T = 1): one more row, r = G, is the KV head's new key; its code goes to the cache at pos[b], so
    a decode step hashes its queries and its key in one launch."""
    pid_r = tl.program_id(0)
    pid_bh = tl.program_id(1)
    wb = tl.program_id(2)
    b = (pid_bh // Hkv).to(tl.int64)                                           # int64: b * stride may pass 2^31
    h = pid_bh % Hkv
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)                                # (BLOCK_R,) flattened (g, t)
    j = h * G + r // T                                                         # (BLOCK_R,) row head
    t = r % T                                                                  # (BLOCK_R,) token
    d = tl.arange(0, D)                                                        # (D,)
    i = tl.arange(0, 32 * NW)                                                  # (32 NW,) bit of the word block
    x_ptrs = x_ptr + b * sxb + j[:, None] * sxh + t[:, None] * sxt + d[None, :] * sxd  # (BLOCK_R, D)
    if KEY:
        is_key = (r == G)[:, None]                                             # (BLOCK_R, 1)
        x_ptrs = tl.where(is_key, k_ptr + b * skb + h * skh + d[None, :] * skd, x_ptrs)
    x = tl.load(x_ptrs, mask=r[:, None] < G * T + KEY, other=0.0).to(tl.float32)  # (BLOCK_R, D) fp32
    p = tl.load(p_ptr + h * sph + d[:, None] * spd + (32 * NW * wb + i[None, :]) * spr)  # (D, 32 NW) fp32
    y = tl.dot(x, p, input_precision=PRECISION)                                # (BLOCK_R, 32 NW) fp32
    bits = (y > 0).to(tl.int32) << (i % 32)[None, :]                           # (BLOCK_R, 32 NW) int32
    words = tl.sum(tl.reshape(bits, (BLOCK_R, NW, 32)), axis=2)                # (BLOCK_R, NW) distinct bits: sum == OR
    w = NW * wb + tl.arange(0, NW)                                             # (NW,)
    c_ptrs = c_ptr + b * scb + j[:, None] * sch + t[:, None] * sct + w[None, :]  # (BLOCK_R, NW)
    if KEY:
        pos = tl.load(pos_ptr + b).to(tl.int64)
        c_ptrs = tl.where(is_key, kc_ptr + b * skcb + h * skch + pos * skcs + w[None, :] * skcw, c_ptrs)
    tl.store(c_ptrs, words, mask=r[:, None] < G * T + KEY)


def hash_encode(x, proj, use_triton=None):
    """x (B, Hx, T, D) float, proj (Hkv, D, R) fp32 -> codes (B, Hx, T, W) int32; row-head j uses
    proj[j // (Hx // Hkv)], so keys pass Hx = Hkv and queries Hx = H. The projection runs in fp32."""
    _check_hash(x, proj, "hash_encode")
    B, Hx, T, D = x.shape
    Hkv, _, R = proj.shape
    W = R // 32
    rows = T * Hx // Hkv
    if use_triton is None:  # prefill rows without the tensor-core path (W not a power of two): cuBLAS + packing
        use_triton = _use_triton(None, x, proj) and (rows <= 64 or _uses_tensor_cores(rows, W))
    if not _use_triton(use_triton, x, proj) or x.numel() == 0:
        return hash_encode_ref(x, proj)
    _check_triton_head_dim(D, "hash_encode")
    codes = torch.empty(B, Hx, T, W, dtype=torch.int32, device=x.device)  # (B, Hx, T, W) int32
    _hash_encode_into(x, proj, codes)
    return codes


def _check_hash(x, proj, op, x_name="x"):  # x_name: what the op calls x (hash_encode_step's q)
    _check(x.dim() == 4, f"{op}: x must be (B, Hx, T, D), got shape {tuple(x.shape)}")
    _check(proj.dim() == 3, f"{op}: proj must be (Hkv, D, R), got shape {tuple(proj.shape)}")
    _check(x.dtype in _FLOATS, f"{op}: {x_name} must be fp32/bf16/fp16, got {x.dtype}")
    _check(proj.dtype == torch.float32, f"{op}: proj must be float32, got {proj.dtype}")
    D, (Hkv, Dp, R) = x.shape[3], proj.shape
    _check(Dp == D, f"{op}: proj head dim {Dp} != {x_name} head dim {D}")
    _check(R % 32 == 0 and R > 0, f"{op}: R = {R} hash bits must be a positive multiple of 32")
    _check(x.shape[1] % Hkv == 0, f"{op}: {x_name} heads {x.shape[1]} must be a multiple of proj heads {Hkv}")
    _check(x.device == proj.device, f"{op}: {x_name} on {x.device} but proj on {proj.device}")


def _uses_tensor_cores(rows, W):
    """Whether hash_encode's kernel takes the prefill configuration for `rows` rows of W words each."""
    return rows > 64 and (W & (W - 1)) == 0


def _hash_encode_into(x, proj, codes, key=None):
    """Launch the kernel writing into codes (B, Hx, T, W) int32, any view whose last stride is 1 (a decode
    step's key codes go through `key`). No checks: callers have done them.
    key = (k (B, Hkv, D), pos (B,), code_cache (B, Hkv, S_max, W)): decode only (T = 1), the new keys' codes go
    to code_cache[b, :, pos[b]] in the same launch.
    Up to 64 rows (G * T, + 1 with a key), or W not a power of two: one 32-bit word per program, fp32 FMA dot.
    More rows: two words per program (one when W = 1; W a power of two) on the tensor cores in tf32x3, which keeps
    fp32 accuracy (~1e-6 relative; a bit can differ from the ref only where x.P is that close to zero)."""
    B, Hx, T, D = x.shape
    Hkv, _, R = proj.shape
    assert codes.stride(3) == 1 and (key is None or T == 1)
    G, W = Hx // Hkv, R // 32
    rows = G * T + (key is not None)
    if _uses_tensor_cores(rows, W):
        BLOCK_R, NW, precision = 128, min(W, 2), "tf32x3"                   # fastest on the H200 (0.24 ms, 32K x 8)
    else:
        BLOCK_R, NW, precision = (16 if rows <= 16 else 64), 1, "ieee"         # tl.dot needs >= 16 rows
    k, pos, kc = key if key is not None else (x[:, :, 0], codes, codes)       # unused without a key
    _hash_encode_kernel[(triton.cdiv(rows, BLOCK_R), B * Hkv, W // NW)](
        x, proj, codes, k, pos, kc, Hkv, T, *x.stride(), *proj.stride(), *codes.stride()[:3], *k.stride(),
        *kc.stride(), G=G, D=D, BLOCK_R=BLOCK_R, NW=NW, PRECISION=precision, KEY=key is not None,
    )


def hash_encode_step(q, k, proj, code_cache, pos, use_triton=None):
    """A decode step's hashing: q (B, H, D) queries, k (B, Hkv, D) new keys, proj (Hkv, D, R) fp32, code_cache
    (B, Hkv, S_max, W) int32, pos (B,) -> q codes (B, H, W) int32, and code_cache[b, :, pos[b]] = the keys'
    codes. One launch on CUDA (the model's decode). pos must lie in [0, S_max) (not checked: a host sync)."""
    _check(q.dim() == 3, f"hash_encode_step: q must be (B, H, D), got shape {tuple(q.shape)}")
    _check_hash(q[:, :, None], proj, "hash_encode_step", "q")
    (B, H, D), (Hkv, _, R) = q.shape, proj.shape
    _check(k.shape == (B, Hkv, D) and k.dtype == q.dtype, f"hash_encode_step: k must be (B, Hkv, D) = ({B}, {Hkv}, "
           f"{D}) {q.dtype} like q, got {k.dtype} {tuple(k.shape)}")
    _check(code_cache.dim() == 4 and code_cache.dtype == torch.int32 and code_cache.shape[:2] == (B, Hkv)
           and code_cache.shape[3] * 32 == R, f"hash_encode_step: code_cache must be (B, Hkv, S_max, W) = ({B}, "
           f"{Hkv}, S_max, {R // 32}) int32, got {code_cache.dtype} {tuple(code_cache.shape)}")
    _check(pos.shape == (B,) and _is_int(pos), f"hash_encode_step: pos must be (B,) = ({B},) "
           f"int32 or int64, got {pos.dtype} {tuple(pos.shape)}")
    _check_devices("hash_encode_step", q=q, k=k, code_cache=code_cache, pos=pos)
    if not _use_triton(use_triton, q, k, proj, code_cache, pos):
        return hash_encode_step_ref(q, k, proj, code_cache, pos)
    _check_triton_head_dim(D, "hash_encode_step")
    codes = torch.empty(B, H, 1, R // 32, dtype=torch.int32, device=q.device)  # (B, H, 1, W) int32
    _hash_encode_into(q[:, :, None], proj, codes, key=(k, pos.contiguous(), code_cache))
    return codes[:, :, 0]                                                      # (B, H, W) int32


def hash_encode_ref(x, proj):
    """Definition. Memory: reads x (B*Hx*T*D elements) and proj (Hkv*D*R*4 B); writes an fp32 copy of x (unless it
    is contiguous fp32), the fp32 x @ proj (B*Hx*T*R*4 B, as large at D = R), two R-byte uint8 tensors a row (the 0/1
    bits, then bit i times 2^(i % 8)), and the codes (B*Hx*T*R/8 B)."""
    B, Hx, T, D = x.shape
    Hkv, _, R = proj.shape
    xg = x.float().reshape(B, Hkv, Hx // Hkv * T, D)                          # (B, Hkv, G*T, D): row heads of proj h
    y = (xg @ proj.float()).view(B, Hx, T, R)                                 # (B, Hx, T, R) fp32
    bits = (y > 0).view(B, Hx, T, R // 8, 8).view(torch.uint8)                 # (B, Hx, T, R/8, 8) 0 or 1
    weight = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=x.device)  # (8,) uint8
    packed = (bits * weight).sum(-1, dtype=torch.uint8)                       # (B, Hx, T, R/8) bytes
    return packed.view(torch.int32)  # (B, Hx, T, W): little-endian, byte j of a word holds bits 8j..8j+7


def hash_encode_step_ref(q, k, proj, code_cache, pos):
    """Definition: hash_encode_ref of the queries and the keys (into the cache at pos), as G + 1 rows of each KV
    head's projection in one encode (rounding depends on a matmul's rows: a projection near 0 may take either sign)."""
    (B, H, D), Hkv = q.shape, k.shape[1]
    x = torch.cat([q.reshape(B, Hkv, H // Hkv, D), k[:, :, None]], dim=2)     # (B, Hkv, G + 1, D)
    codes = hash_encode_ref(x, proj)                                           # (B, Hkv, G + 1, W) int32
    code_cache[torch.arange(B, device=k.device), :, pos.long()] = codes[:, :, -1]  # (B, Hkv, W) into the cache
    return codes[:, :, :-1].reshape(B, H, codes.shape[-1])                     # (B, H, W) int32 (also for B = 0)


# ----------------------------------------------------------------------------------------------------------
# 2. hamming_score: group-summed Hamming distance of every cached key


@triton.jit
def _group_score(k_ptrs, k_mask, qc_ptr, G: tl.constexpr, W: tl.constexpr, W_P2: tl.constexpr,
                 NPL: tl.constexpr, HW_POPC: tl.constexpr):
    """Sum over the G query heads of popcount(k XOR q) for a block of keys.
    k_ptrs (BLOCK_S, W_P2) pointers to key words; qc_ptr points at the group's (G, W) query codes.

    Direct: G popcounts per word. Bit planes (fewer popcounts for G >= 4): with c_i the number of the group's
    query codes that have bit i set, score = C0 + sum_i k_i * (G - 2 c_i), C0 = sum_i c_i. Write G - 2 c_i =
    2 v_i + (G odd), v_i in [-ceil(G/2), floor(G/2)], and split v_i into NPL two's-complement bit planes
    (the same for every key; NPL = _planes(G)): score = C0 + (G odd) * popc(k) + 2 * sum_j +-2^j popc(k & plane_j)
    (minus for the top plane, the sign). plane_j is a word mask whose bit i is bit j of v_i, so sum_i k_i v_i =
    sum_j +-2^j popc(k & plane_j). G = 4: v in {2, 1, 0, -1, -2}, 3 planes, 12 popcounts a key at R = 128, not 16."""
    wi = tl.arange(0, W_P2)                                                    # (W_P2,)
    k = tl.load(k_ptrs, mask=k_mask & (wi[None, :] < W), other=0)              # (BLOCK_S, W_P2) int32
    if NPL + G % 2 < G:                                                        # popcounts per word: planes vs G
        r = tl.arange(0, 32)
        score = tl.zeros([k.shape[0]], dtype=tl.int32)
        c = tl.zeros([W_P2, 32], dtype=tl.int32)                               # (W_P2, 32) heads with bit set
        for g in range(G):
            q = tl.load(qc_ptr + g * W + wi, mask=wi < W, other=0)             # (W_P2,) int32
            c += (q[:, None] >> r[None, :]) & 1
        v = (G - 2 * c) >> 1                                                   # (W_P2, 32) floor((G - 2c) / 2)
        for j in tl.static_range(NPL):
            plane = tl.sum(((v >> j) & 1) << r[None, :], axis=1)               # (W_P2,) bit plane j of v
            cnt = tl.sum(_popcount(k & plane[None, :], HW_POPC), axis=1)       # (BLOCK_S,)
            if j == NPL - 1:
                score -= cnt << j                                              # two's complement sign plane
            else:
                score += cnt << j
        score = 2 * score + tl.sum(c)                                          # + C0
        if G % 2 == 1:
            score += tl.sum(_popcount(k, HW_POPC), axis=1)
    else:
        score = tl.zeros([k.shape[0]], dtype=tl.int32)                         # (BLOCK_S,)
        for g in range(G):
            q = tl.load(qc_ptr + g * W + wi, mask=wi < W, other=0)             # (W_P2,) int32
            score += tl.sum(_popcount(k ^ q[None, :], HW_POPC), axis=1)        # (BLOCK_S,)
    return score


@triton.jit
def _hamming_score_kernel(
    qc_ptr, kc_ptr, len_ptr, out_ptr,      # q codes (B, H, W) contiguous, k codes (B, Hkv, S, W), out (B, Hkv, S)
    Hkv, S,
    skb, skh,                              # k codes: stride W along S, 1 along W (a constexpr lets loads vectorize)
    G: tl.constexpr, W: tl.constexpr, W_P2: tl.constexpr, NPL: tl.constexpr, R: tl.constexpr,
    BLOCK_S: tl.constexpr, HW_POPC: tl.constexpr,
):
    """Program (block of BLOCK_S positions, b * Hkv + h): each position's group-summed score, G * R + 1 past the
    length. Only model.py's use_norm selector reads it; the hash selector scores inside _topk_score_kernel."""
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hkv
    h = pid_bh % Hkv
    length = tl.minimum(tl.load(len_ptr + b), S)                               # as the refs: no read past S
    s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)                                # (BLOCK_S,)
    wi = tl.arange(0, W_P2)                                                    # (W_P2,)
    k_ptrs = kc_ptr + b * skb + h * skh + s[:, None] * W + wi[None, :]         # (BLOCK_S, W_P2)
    score = _group_score(k_ptrs, s[:, None] < length, qc_ptr + pid_bh * G * W, G, W, W_P2, NPL, HW_POPC)
    score = tl.where(s < length, score, G * R + 1)                             # (BLOCK_S,) int32
    tl.store(out_ptr + pid_bh * S + s, score, mask=s < S)


def _check_codes(q_codes, k_codes, lengths, op):
    _check(q_codes.dim() == 3, f"{op}: q_codes must be (B, H, W), got shape {tuple(q_codes.shape)}")
    _check(k_codes.dim() == 4, f"{op}: k_codes must be (B, Hkv, S, W), got shape {tuple(k_codes.shape)}")
    _check(q_codes.dtype == torch.int32 and k_codes.dtype == torch.int32,
           f"{op}: codes must be int32, got {q_codes.dtype} and {k_codes.dtype}")
    B, H, W = q_codes.shape
    Bk, Hkv, S, Wk = k_codes.shape
    _check(Bk == B and Wk == W, f"{op}: q_codes {tuple(q_codes.shape)} and k_codes {tuple(k_codes.shape)} "
           "disagree on B or W")
    _check(H % Hkv == 0, f"{op}: query heads {H} must be a multiple of KV heads {Hkv}")
    _check(lengths.dim() == 1 and lengths.shape[0] == B and _is_int(lengths),
           f"{op}: lengths must be an int32 or int64 (B,) = ({B},) tensor, got {lengths.dtype} {tuple(lengths.shape)}")
    _check_devices(op, q_codes=q_codes, k_codes=k_codes, lengths=lengths)


def hamming_score(q_codes, k_codes, lengths, use_triton=None):
    """q_codes (B, H, W) int32, k_codes (B, Hkv, S, W) int32, lengths (B,) -> score (B, Hkv, S) int32."""
    _check_codes(q_codes, k_codes, lengths, "hamming_score")
    if not _use_triton(use_triton, q_codes, k_codes, lengths):
        return hamming_score_ref(q_codes, k_codes, lengths)
    B, H, W = q_codes.shape
    _, Hkv, S, _ = k_codes.shape
    k_codes = _rows_contiguous(k_codes)
    _check_int32_span(k_codes, "hamming_score")
    out = torch.empty(B, Hkv, S, dtype=torch.int32, device=q_codes.device)    # (B, Hkv, S) int32
    BLOCK_S = 1024 if not _INTERPRET else max(16, min(1024, _next_pow2(S)))
    grid = (triton.cdiv(S, BLOCK_S), B * Hkv)
    _hamming_score_kernel[grid](
        q_codes.contiguous(), k_codes, lengths.contiguous(), out, Hkv, S, *k_codes.stride()[:2],
        G=H // Hkv, W=W, W_P2=_next_pow2(W), NPL=_planes(H // Hkv), R=32 * W, BLOCK_S=BLOCK_S, HW_POPC=not _INTERPRET,
    )
    return out


def hamming_score_ref(q_codes, k_codes, lengths):
    """Definition. Memory: reads k_codes (B*Hkv*S*W*4 B, 16 B/token/head at R=128) once, into a transposed copy as
    large; writes the XOR with the G query codes of its head as (B, Hkv, G, W, S) words (S innermost: long, fast
    loops on the CPU), their popcounts (numpy's bitwise_count on the CPU, 1 B a word; elsewhere a 256-entry byte
    table through int64 byte indices, 32 B a word, then 16 B of counts and an 8 B sum), and the score (B*Hkv*S*4 B)."""
    B, H, W = q_codes.shape
    _, Hkv, S, _ = k_codes.shape
    G = H // Hkv
    k_rows = k_codes.transpose(-1, -2).contiguous()                            # (B, Hkv, W, S): one strided pass
    xor = k_rows[:, :, None] ^ q_codes.reshape(B, Hkv, G, W, 1)                # (B, Hkv, G, W, S) int32
    count = _popcount_words(xor)                                               # (B, Hkv, G, W, S) uint8 / int64
    score = count.reshape(B, Hkv, G * W, S).sum(2, dtype=torch.int32)         # (B, Hkv, S) int32
    valid = torch.arange(S, device=k_codes.device) < lengths.view(B, 1, 1)    # (B, 1, S) bool
    return torch.where(valid, score, G * 32 * W + 1)                           # (B, Hkv, S) int32


# ----------------------------------------------------------------------------------------------------------
# 3. select_topk: smallest-score positions with sinks, recent window, newest-wins ties (the oracle, Quest and
#    use_norm selectors; the hash selector's own counting select is section 4)


def _check_select(lengths, budget, n_sink, n_recent, B, device, op):
    _check(lengths.dim() == 1 and lengths.shape[0] == B and _is_int(lengths),
           f"{op}: lengths must be an int32 or int64 (B,) = ({B},) tensor, got {lengths.dtype} {tuple(lengths.shape)}")
    _check(lengths.device == device, f"{op}: lengths on {lengths.device}, scores/codes on {device}")
    _check(type(budget) is int and budget >= 1, f"{op}: budget must be an int >= 1, got {budget!r}")  # not True
    _check(type(n_sink) is int and n_sink >= 0, f"{op}: n_sink must be an int >= 0, got {n_sink!r}")
    _check(type(n_recent) is int and n_recent >= 0, f"{op}: n_recent must be an int >= 0, got {n_recent!r}")


@triton.jit
def _select_key64(key, s, length, n_sink, n_recent):
    """int64 order key of a position: sinks and the recent window rank below every int32 key;
    the caller excludes s >= length."""
    forced = (s < n_sink) | (s >= length - n_recent)
    return tl.where(forced, -2147483649, key.to(tl.int64))


@triton.jit
def _select_topk_kernel(
    key_ptr, len_ptr, idx_ptr,             # key (B, Hkv, S) int32 order key, lengths (B,), idx (B, Hkv, budget)
    Hkv, S,
    budget, n_sink, n_recent, BLOCK_S: tl.constexpr, FILL_BLOCK: tl.constexpr,
):
    """One program per (b, h). Finds the K_eff-th smallest key by bisection on the int32 key (32 or 33 counting
    passes over the row), then counts and compacts: keys below it, plus the newest ties, ascending."""
    pid_bh = tl.program_id(0)
    b = pid_bh // Hkv
    length = tl.minimum(tl.load(len_ptr + b), S).to(tl.int32)
    k_eff = tl.minimum(length, budget)
    row = key_ptr + pid_bh * S
    # bisection: the largest t such that count(key < t) < k_eff is the K_eff-th smallest key
    lo = tl.full([], -2147483650, tl.int64)                                    # below every key
    hi = tl.full([], 2147483648, tl.int64)                                     # above every key
    while hi - lo > 1:
        mid = (lo + hi) // 2
        cnt = tl.zeros([], tl.int32)
        for start in range(0, S, BLOCK_S):
            s = start + tl.arange(0, BLOCK_S)                                  # (BLOCK_S,)
            key = _select_key64(tl.load(row + s, mask=s < length, other=0), s, length, n_sink, n_recent)
            cnt += tl.sum(((key < mid) & (s < length)).to(tl.int32))
        if cnt < k_eff:
            lo = mid
        else:
            hi = mid
    t = lo                                                                     # threshold key
    n_less = tl.zeros([], tl.int32)
    n_eq = tl.zeros([], tl.int32)
    for start in range(0, S, BLOCK_S):
        s = start + tl.arange(0, BLOCK_S)
        key = _select_key64(tl.load(row + s, mask=s < length, other=0), s, length, n_sink, n_recent)
        n_less += tl.sum(((key < t) & (s < length)).to(tl.int32))
        n_eq += tl.sum(((key == t) & (s < length)).to(tl.int32))
    skip = n_eq - (k_eff - n_less)                                             # oldest ties left out
    # compaction in ascending position order
    out = idx_ptr + pid_bh * budget
    n_out = tl.zeros([], tl.int32)
    eq_seen = tl.zeros([], tl.int32)
    for start in range(0, S, BLOCK_S):
        s = start + tl.arange(0, BLOCK_S)
        valid = s < length
        key = _select_key64(tl.load(row + s, mask=valid, other=0), s, length, n_sink, n_recent)
        eq = (key == t) & valid                                                # (BLOCK_S,)
        eq_rank = eq_seen + tl.cumsum(eq.to(tl.int32), axis=0) - 1             # (BLOCK_S,) rank among ties
        sel = ((key < t) & valid) | (eq & (eq_rank >= skip))                   # (BLOCK_S,)
        rank = n_out + tl.cumsum(sel.to(tl.int32), axis=0) - 1                 # (BLOCK_S,)
        tl.store(out + rank, s, mask=sel)
        n_out += tl.sum(sel.to(tl.int32))
        eq_seen += tl.sum(eq.to(tl.int32))
    for start in range(0, budget, FILL_BLOCK):
        k = start + tl.arange(0, FILL_BLOCK)
        tl.store(out + k, tl.full([FILL_BLOCK], -1, tl.int32), mask=(k >= k_eff) & (k < budget))


def _order_key_int32(score):
    """Map any real score to an int32 key with the same order (and the same ties) where exact:
    integers as they are (select_topk has checked that they fit int32), floats through their fp32 bit pattern
    (-0.0 as 0.0: equal scores tie; every NaN ranks last: torch keeps or drops a NaN's sign bit by where it lies)."""
    if not score.is_floating_point():
        return score.to(torch.int32)  # (B, Hkv, S) int32
    bits = torch.where(score.isnan(), 0x7FFFFFFF, score.float().view(torch.int32))  # (B, Hkv, S) int32; NaN: +NaN
    return torch.where(bits < 0, -(bits & 0x7FFFFFFF), bits)                   # negative floats: minus magnitude


def select_topk(score, lengths, budget, n_sink=0, n_recent=0, use_triton=None):
    """score (B, Hkv, S) float, int8-int64 or uint8, smaller is closer -> idx (B, Hkv, budget) int32, -1 padded: a set.
    Both paths order float scores by their fp32 value; integer scores must fit in int32."""
    _check(score.dim() == 3, f"select_topk: score must be (B, Hkv, S), got shape {tuple(score.shape)}")
    _check(score.is_floating_point() or score.dtype in _INTS, f"select_topk: score must be a float or a signed integer "
           f"(or uint8) tensor, got {score.dtype}")  # torch has few ops for uint16/32/64
    _check(score.dtype != torch.int64 or score.numel() == 0 or (score.min() >= -2 ** 31 and score.max() < 2 ** 31),
           "select_topk: integer scores must fit in int32 (as both paths order them)")  # a host sync, for int64 only
    B, Hkv, S = score.shape
    _check_select(lengths, budget, n_sink, n_recent, B, score.device, "select_topk")
    if not _use_triton(use_triton, score, lengths):
        return select_topk_ref(score, lengths, budget, n_sink, n_recent)
    _check_int32_span(score, "select_topk")
    key = _order_key_int32(score).contiguous()                                 # (B, Hkv, S) int32
    idx = torch.empty(B, Hkv, budget, dtype=torch.int32, device=score.device)  # (B, Hkv, K) int32
    BLOCK_S = 1024 if not _INTERPRET else 256
    _select_topk_kernel[(B * Hkv,)](key, lengths.contiguous(), idx, Hkv, S, budget, n_sink, n_recent, BLOCK_S=BLOCK_S,
                                    FILL_BLOCK=min(1024, max(16, _next_pow2(budget))))
    return idx


def select_topk_ref(score, lengths, budget, n_sink=0, n_recent=0):
    """Definition. Every position gets one int64 order key, smaller = selected first (length = min(lengths[b], S)):
        forced (sink or recent)   -2^62 + (S - 1 - s)               newest first
        scored                    (order(score) + 2^31) * S + (S - 1 - s)   smallest score, then newest
        past the length           2^62                              even a sink's: never selected
    where order() is the score itself for integer scores (|score| < 2^31) and _order_key_int32 for floats
    (fp32 order, as in the Triton path). The keys of a row's valid positions are distinct (those past the length
    tie at 2^62 and come out as -1), so its K_eff smallest are one set, whichever partial selection finds them
    (torch.topk; numpy's argpartition on the CPU). Memory: reads score (B*Hkv*S), builds the int64 keys
    (B*Hkv*S*8 B) in a few passes, writes (B*Hkv*K*4 B)."""
    B, Hkv, S = score.shape
    dev = score.device
    pos = torch.arange(S, device=dev)                                          # (S,)
    length = lengths.view(B, 1, 1).to(dev).clamp(max=S)                        # (B, 1, 1) as the kernels
    valid = pos < length                                                       # (B, 1, S)
    forced = valid & ((pos < n_sink) | (pos >= length - n_recent))             # (B, 1, S)
    newest = S - 1 - pos                                                       # (S,) the tie rule: newer first
    order = score if not score.is_floating_point() else _order_key_int32(score)  # (B, Hkv, S) integers
    key = torch.add(newest + 2**31 * S, order, alpha=S)                        # (B, Hkv, S) int64: the table's "scored"
    fixed = torch.where(forced, -2**62 + newest, 2**62)                        # (B, 1, S) int64: forced or past length
    key = torch.where(forced | ~valid, fixed, key)                             # (B, Hkv, S) int64
    n = min(budget, S)
    if dev.type == "cpu" and n > 0:  # numpy's argpartition: the same set, in half torch.topk's time at S = 8K
        sel = torch.from_numpy(np.sort(np.argpartition(key.numpy(), n - 1, axis=-1)[..., :n], axis=-1))
    else:
        sel = torch.topk(key, n, dim=-1, largest=False, sorted=False).indices.sort(dim=-1).values  # n smallest
    sel = torch.nn.functional.pad(sel, (0, budget - n), value=S)               # (B, Hkv, K)
    return torch.where(sel < length, sel, -1).to(torch.int32)  # past the length (only when K > length): unused


# ----------------------------------------------------------------------------------------------------------
# 4. hamming_topk: score + counting select in three launches (the hash selector of the model)

# The Triton path is a counting select in three launches, all on the device (no host round trip, so it can
# be captured in a CUDA graph). The group-summed score is an integer in [0, G*R]; for even G every score of a
# row has the same parity (popcount(k ^ q_g) mod 2 = parity(k) ^ parity(q_g), summed over an even number of heads),
# so score >> 1 keeps order and ties exactly and halves the range (SHIFT = 1 for even G). A row is one (b, KV
# head); its order keys:
#     0 = sink or recent (selected first; past the budget, the newest), 1 + (score >> SHIFT) = scored position,
#     KMAX + 1 = past the length (KMAX = (G*R >> SHIFT) + 1, the largest key of a valid position).
# WIN, the bins of a block's histogram (a power of two, _hamming_topk_launches'), is a window of keys, not the
# recent window; CSHIFT sets the slow path's coarse bins.
#   A  _topk_score_kernel      per block of BLOCK_S keys: int16 order keys, the window's base (the row's anchor
#                              from the last step, else the block's smallest scored key m_b) and a windowed
#                              histogram: bin 0 = forced, bin 1 = keys below the base, bin 2 + x - base = key x
#                              for base <= x < base + WIN - 3, bin WIN - 1 = everything above or past the length
#   B  _topk_threshold_kernel  per row: the windows, shifted to the least base (gmin), add up to exact
#                              counts for every key < gmin + WIN - 3. The threshold t (the K_eff-th smallest
#                              key) lies there for random codes (~3 standard deviations of the score above
#                              the minimum); trained codes spread wider (BENCHMARKS.md: 1 to 3 of the default
#                              model's 28 sparse layers at 8K reached past it before rows had anchors), and a row
#                              whose t lies outside has B count the stored keys (exact: coarse bins <= 64, fine ones
#                              2 << CSHIFT, then a count pass per block). Then per block: keys < t, ties at t to take
#                              (newest first), output offset; and the row's anchor for the next step, max(1, t -
#                              (WIN - 4) // 2): a decode step's threshold lies near the last one's, wherever the
#                              row's minimum is (BENCHMARKS.md: no measured step of the default model left it).
#   C  _topk_compact_kernel    per block: write positions with key < t and the block's share of ties at t.
# A small window keeps the histogram cheap: Triton builds it from one warp ballot per bin-index bit and a
# popcount per owned bin, so its cost grows with the number of bins.


def hamming_topk(q_codes, k_codes, lengths, budget, n_sink=0, n_recent=0, use_triton=None, anchor=None):
    """q_codes (B, H, W), k_codes (B, Hkv, S, W) int32, lengths (B,) -> idx (B, Hkv, budget) int32, -1 padded.
    Same selection as select_topk(hamming_score(...)), a set (the Triton path's order is ascending today too).
    anchor (B, Hkv) int32, the Triton path's state between decode steps (-1: none yet): where each row's window
    starts, set from this step's threshold; it changes the speed (the fast path), never the selection."""
    _check_codes(q_codes, k_codes, lengths, "hamming_topk")
    _check_select(lengths, budget, n_sink, n_recent, q_codes.shape[0], q_codes.device, "hamming_topk")
    if not _use_triton(use_triton, q_codes, k_codes, lengths):
        if anchor is not None:  # the ref has no use for it, but takes only what the Triton path takes
            _check_anchor(anchor, *k_codes.shape[:2], q_codes.device)
        return hamming_topk_ref(q_codes, k_codes, lengths, budget, n_sink, n_recent)
    return _launch(*_hamming_topk_launches(q_codes, k_codes, lengths, budget, n_sink, n_recent, anchor))


def _check_anchor(anchor, B, Hkv, dev):
    _check(anchor.shape == (B, Hkv) and anchor.dtype == torch.int32 and anchor.is_contiguous() and anchor.device == dev,
           f"hamming_topk: anchor must be a contiguous ({B}, {Hkv}) int32 tensor on {dev}")


def hamming_topk_ref(q_codes, k_codes, lengths, budget, n_sink=0, n_recent=0):
    """Definition: select_topk_ref(hamming_score_ref(...)). Memory: the sum of the two."""
    return select_topk_ref(hamming_score_ref(q_codes, k_codes, lengths), lengths, budget, n_sink, n_recent)


@triton.jit
def _topk_score_kernel(
    qc_ptr, kc_ptr, len_ptr, anc_ptr, key_ptr, base_ptr,  # q codes (B, H, W), k codes (B, Hkv, S, W), lengths,
    hist_ptr, Hkv, S, NBLK, n_sink, n_recent,             # anchors (B*Hkv,), keys (B*Hkv, S) int16, bases
    skb, skh,                                             # (B*Hkv, NBLK), hist (B*Hkv, NBLK, WIN + 1) int32
    G: tl.constexpr, W: tl.constexpr, W_P2: tl.constexpr, NPL: tl.constexpr, SHIFT: tl.constexpr,
    KMAX: tl.constexpr, WIN: tl.constexpr, BLOCK_S: tl.constexpr, HW_POPC: tl.constexpr,
):
    """Program (block of BLOCK_S positions, b*Hkv + h): the block's int16 order keys, its window's base (the row's
    anchor, else the block's smallest scored key m_b) and a WIN-bin histogram of its keys relative to the base (bin
    0 forced, bin 1 below the base, bin WIN - 1 above the window or past the length). Only these small windows, not
    the keys, go to the threshold kernel's fast path."""
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hkv
    h = pid_bh % Hkv
    length = tl.minimum(tl.load(len_ptr + b), S).to(tl.int32)
    anchor = tl.load(anc_ptr + pid_bh)                                         # -1: none
    if pid_s * BLOCK_S < length:                                               # blocks past the length: idle
        s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)                            # (BLOCK_S,)
        valid = s < length
        wi = tl.arange(0, W_P2)                                                # (W_P2,)
        k_ptrs = kc_ptr + b * skb + h * skh + s[:, None] * W + wi[None, :]    # (BLOCK_S, W_P2)
        score = _group_score(k_ptrs, valid[:, None], qc_ptr + pid_bh * G * W, G, W, W_P2, NPL, HW_POPC)
        forced = (s < n_sink) | (s >= length - n_recent)
        key = tl.where(forced, 0, 1 + (score >> SHIFT))                         # (BLOCK_S,) int32
        key = tl.where(valid, key, KMAX + 1)                                   # past the length
        tl.store(key_ptr + pid_bh * S + s, key.to(tl.int16), mask=s < S)
        scored = valid & (key > 0)
        base = tl.where(anchor >= 0, anchor, tl.min(tl.where(scored, key, KMAX + 1)))  # else m_b: none below
        rel = tl.where(scored, tl.minimum(tl.maximum(key - base + 2, 1), WIN - 1), 0)  # window bin (forced -> 0)
        rel = tl.where(valid, rel, WIN - 1)
        hist = tl.histogram(rel, WIN)                                          # (WIN,) int32
        tl.store(base_ptr + pid_bh * NBLK + pid_s, base)
        tl.store(hist_ptr + (pid_bh * NBLK + pid_s) * (WIN + 1) + tl.arange(0, WIN), hist)  # rows padded, see hist


@triton.jit
def _window_tile(hist_ptr, base_ptr, row, blk, nblk, NBLK, j, gmin, WIN: tl.constexpr):
    """(BLK_CHUNK, WIN) counts of the blocks blk (< nblk valid of NBLK) at row-relative bins j: j = 0 forced, j = 1
    below gmin, j >= 2 key gmin + j - 2. Exact for j <= WIN - 2: every block's window reaches key gmin + WIN - 4.
    Key x sits in block bin x - base + 2 = j + gmin - base; a block bin < 2 means x < base, which the block does not
    hold (0) when its base is its m_b. A row's anchor is every block's base: gmin, and bin 1 the keys below it."""
    base = tl.load(base_ptr + row * NBLK + blk, mask=blk < nblk, other=0)      # (BLK_CHUNK,)
    bb = tl.where(j[None, :] <= 1, j[None, :], j[None, :] + gmin - base[:, None])  # (BLK_CHUNK, WIN) block bin
    ok = (blk[:, None] < nblk) & (j[None, :] <= WIN - 2) & ((j[None, :] <= 1) | (bb >= 2))
    return tl.load(hist_ptr + (row * NBLK + blk[:, None]) * (WIN + 1) + bb, mask=ok, other=0)


@triton.jit
def _block_info(ip, blk, nblk, less, eq, need, n_eq, eq_seen, off, t):
    """Store offset, skip, count, t of the blocks blk (< nblk valid) from their counts of keys below t (less) and
    at t (eq): a block takes its `less` keys and, newest blocks first, the ties the row still needs. Returns the
    running (offset, ties seen) after these blocks."""
    eq_after = n_eq - eq_seen - tl.cumsum(eq, axis=0)                          # ties in later blocks
    take = tl.minimum(tl.maximum(need - eq_after, 0), eq)                      # this block's ties
    cnt = less + take
    m = blk < nblk
    tl.store(ip + blk * 4 + 0, off + tl.cumsum(cnt, axis=0) - cnt, mask=m)    # exclusive prefix
    tl.store(ip + blk * 4 + 1, eq - take, mask=m)                              # oldest ties skipped
    tl.store(ip + blk * 4 + 2, cnt, mask=m)
    tl.store(ip + blk * 4 + 3, tl.zeros_like(cnt) + t, mask=m)
    return off + tl.sum(cnt), eq_seen + tl.sum(eq)


@triton.jit
def _topk_threshold_kernel(
    len_ptr, key_ptr, base_ptr, hist_ptr, info_ptr, idx_ptr, # lengths, keys (B*Hkv, S) int16, bases, hist,
    anc_ptr, Hkv, S, NBLK, budget,                           # info (B*Hkv, NBLK, 4), idx (B*Hkv, budget), anchors
    KMAX: tl.constexpr, WIN: tl.constexpr, BLOCK_S: tl.constexpr, BLK_CHUNK: tl.constexpr,
    CSHIFT: tl.constexpr, NC: tl.constexpr, HIST_CHUNK: tl.constexpr, FILL_BLOCK: tl.constexpr,
):
    """One program per row. Finds t, the K_eff-th smallest key, from the blocks' windows (fast) or by counting the
    stored keys (slow), then writes each valid block's (offset, skip, count, t): count = its keys < t plus the ties
    it takes (the newest blocks' ties first), offset = the earlier blocks' counts, skip = its oldest ties left out.
    With these the compaction places every block's positions without seeing the others; slots >= K_eff get -1.
    The row's anchor becomes max(1, t - (WIN - 4) // 2): the next step's window, with t in its middle."""
    pid_bh = tl.program_id(0)
    b = pid_bh // Hkv
    length = tl.minimum(tl.load(len_ptr + b), S).to(tl.int32)
    k_eff = tl.minimum(length, budget)
    nblk = (length + BLOCK_S - 1) // BLOCK_S                                   # blocks holding valid keys
    blk0 = tl.arange(0, BLK_CHUNK)                                             # the first chunk's bases load
    # masked by NBLK, known at launch, not nblk: the load need not wait for lengths[b]; the where drops blocks >= nblk
    base0 = tl.load(base_ptr + pid_bh * NBLK + blk0, mask=blk0 < NBLK, other=KMAX + 1)
    gmin = tl.min(tl.where(blk0 < nblk, base0, KMAX + 1))
    for c in range(BLK_CHUNK, nblk, BLK_CHUNK):
        blk = c + tl.arange(0, BLK_CHUNK)
        gmin = tl.minimum(gmin, tl.min(tl.load(base_ptr + pid_bh * NBLK + blk, mask=blk < nblk, other=KMAX + 1)))
    j = tl.arange(0, WIN)                                                      # (WIN,) row-relative bins
    tile0 = _window_tile(hist_ptr, base_ptr, pid_bh, blk0, nblk, NBLK, j, gmin, WIN)
    total = tl.sum(tile0, axis=0)                                              # (WIN,) the first chunk's, kept
    for c in range(BLK_CHUNK, nblk, BLK_CHUNK):
        total += tl.sum(_window_tile(hist_ptr, base_ptr, pid_bh, c + tl.arange(0, BLK_CHUNK), nblk, NBLK, j, gmin,
                                     WIN),
                        axis=0)
    cum = tl.cumsum(total, axis=0)                                             # (WIN,) inclusive
    tj = tl.sum((cum < k_eff).to(tl.int32))  # bins before the K_eff-th key's; 1 or > WIN - 2: slow path
    ip = info_ptr + pid_bh * NBLK * 4
    off = tl.zeros([], dtype=tl.int32)                                         # running output offset
    eq_seen = tl.zeros([], dtype=tl.int32)                                     # ties in earlier blocks
    if (tj <= WIN - 2) & (tj != 1):
        # fast path: per block, counts below and at the threshold from the windows
        t = tl.where(tj == 0, 0, gmin + tj - 2)                                # threshold key
        n_less = tl.sum(tl.where(j < tj, total, 0))
        n_eq = tl.sum(tl.where(j == tj, total, 0))
        for c in range(0, nblk, BLK_CHUNK):
            blk = c + tl.arange(0, BLK_CHUNK)                                  # (BLK_CHUNK,)
            tile = tile0                                                       # the first chunk's, from the totals
            if c > 0:                                                          # later chunks (past 64 blocks) reload
                tile = _window_tile(hist_ptr, base_ptr, pid_bh, blk, nblk, NBLK, j, gmin, WIN)
            less = tl.sum(tl.where(j[None, :] < tj, tile, 0), axis=1)          # (BLK_CHUNK,)
            eq = tl.sum(tl.where(j[None, :] == tj, tile, 0), axis=1)           # (BLK_CHUNK,)
            off, eq_seen = _block_info(ip, blk, nblk, less, eq, k_eff - n_less, n_eq, eq_seen, off, t)
    else:
        # slow exact path: the threshold lies past some block's window (or below the row's anchor). Three passes
        # over the row's stored keys: key >> CSHIFT finds the threshold's coarse bin tc, the low bits of the keys in
        # tc find t, then each block counts its keys below and at t. (Rejected: one pass over every key value,
        # KMAX + 2 bins, took 191 instead of 116 us at 128K; 8 cut points a pass instead, 163-287 us.)
        row = key_ptr + pid_bh * S
        NF: tl.constexpr = 1 << CSHIFT                                         # key values per coarse bin
        vc = tl.arange(0, NC)                                                  # (NC,) coarse bins
        n_c = tl.zeros([NC], dtype=tl.int32)                                   # (NC,) keys per coarse bin
        for c in range(0, length, HIST_CHUNK):  # masked lanes read KMAX + 1, above every key: never move tc, tf
            s = c + tl.arange(0, HIST_CHUNK)
            n_c += tl.histogram(tl.load(row + s, mask=s < length, other=KMAX + 1).to(tl.int32) >> CSHIFT, NC)
        tc = tl.sum((tl.cumsum(n_c, axis=0) < k_eff).to(tl.int32))            # coarse bin of the threshold
        below = tl.sum(tl.where(vc < tc, n_c, 0))                              # keys in lower coarse bins
        vf = tl.arange(0, 2 * NF)                                              # (2 NF,) NF + 1 used, bin NF = others
        n_f = tl.zeros([2 * NF], dtype=tl.int32)
        for c in range(0, length, HIST_CHUNK):
            s = c + tl.arange(0, HIST_CHUNK)
            key = tl.load(row + s, mask=s < length, other=KMAX + 1).to(tl.int32)
            n_f += tl.histogram(tl.where((key >> CSHIFT) == tc, key & (NF - 1), NF), 2 * NF)
        tf = tl.sum((below + tl.cumsum(n_f, axis=0) < k_eff).to(tl.int32))    # < NF: bin tc holds the K_eff-th
        t = (tc << CSHIFT) + tf                                                # the K_eff-th smallest key
        n_less = below + tl.sum(tl.where(vf < tf, n_f, 0))
        n_eq = tl.sum(tl.where(vf == tf, n_f, 0))
        PB: tl.constexpr = HIST_CHUNK // BLOCK_S                               # blocks per pass step
        for c in range(0, nblk, PB):
            blk = c + tl.arange(0, PB)                                         # (PB,)
            s = blk[:, None] * BLOCK_S + tl.arange(0, BLOCK_S)[None, :]        # (PB, BLOCK_S)
            key = tl.load(row + s, mask=s < length, other=KMAX + 1).to(tl.int32)
            less = tl.sum((key < t).to(tl.int32), axis=1)                      # (PB,)
            eq = tl.sum((key == t).to(tl.int32), axis=1)                       # (PB,)
            off, eq_seen = _block_info(ip, blk, nblk, less, eq, k_eff - n_less, n_eq, eq_seen, off, t)
    for c in range(0, budget, FILL_BLOCK):
        k = c + tl.arange(0, FILL_BLOCK)
        tl.store(idx_ptr + pid_bh * budget + k, tl.full([FILL_BLOCK], -1, tl.int32), mask=(k >= k_eff) & (k < budget))
    tl.store(anc_ptr + pid_bh, tl.maximum(t - (WIN - 4) // 2, 1))  # the next step's window: t in its middle


@triton.jit
def _topk_compact_kernel(
    key_ptr, len_ptr, info_ptr, idx_ptr,      # keys (B*Hkv, S) int16, lengths, info (B*Hkv, NBLK, 4), idx
    Hkv, S, NBLK, budget,
    BLOCK_S: tl.constexpr,
):
    """Writes the block's selected positions, ascending, into its slots [offset, offset + count) of the row.
    One scan ranks both the keys below t and the ties at t (the block takes its newest `count - less` ties).
    No branches: the length, the block's info and its keys load at once, and a block past the length (whose info was
    never written) masks its stores, as does one with a count of 0 (which would select nothing anyway); branching on
    the length first made them three dependent loads (BENCHMARKS.md, History). (An atomic cursor instead of the scan
    measured slower: 33 vs 24 us at B=8.)"""
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    length = tl.minimum(tl.load(len_ptr + pid_bh // Hkv), S).to(tl.int32)
    s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)                                # (BLOCK_S,)
    key = tl.load(key_ptr + pid_bh * S + s, mask=s < S, other=32767).to(tl.int32)  # int16 max: above every key
    ip = info_ptr + (pid_bh * NBLK + pid_s) * 4
    off = tl.load(ip + 0)
    skip = tl.load(ip + 1)
    cnt = tl.load(ip + 2)
    t = tl.load(ip + 3)
    less = (key < t).to(tl.int32)
    eq = (key == t).to(tl.int32)
    packed = tl.cumsum(less + (eq << 16), axis=0)                  # one scan: less below bit 16 (BLOCK_S < 2^16)
    less_before = (packed & 0xFFFF) - less
    eq_before = (packed >> 16) - eq
    active = s < tl.where(cnt > 0, length, 0)     # not past the length (info never written there), nor a count of 0
    sel = ((less == 1) | ((eq == 1) & (eq_before >= skip))) & active           # the oldest `skip` ties stay out
    rank = less_before + tl.maximum(eq_before - skip, 0)                       # taken ties are the last ones
    tl.store(idx_ptr + pid_bh * budget + off + rank, s, mask=sel)


def _hamming_topk_window(G, R):  # _hamming_topk_launches' default window (its docstring says why)
    sigma_key = math.sqrt(G * R) / 2 / 2 ** int(G % 2 == 0)
    return min(128, max(32, _next_pow2(math.ceil(8 * sigma_key))))


def _hamming_topk_launches(q_codes, k_codes, lengths, budget, n_sink, n_recent, anchor=None, window=None,
                           block_s=None, hist_chunk=None):
    """Allocate the outputs and scratch, return (idx, [(name, launch), ...]); bench.py times each launch.
    anchor: hamming_topk's (read by the score kernel, written by the threshold kernel), or None: a fresh one.
    window: histogram bins per block, a power of two >= 4 (tests shrink it to exercise the slow path). The default:
    8 standard deviations of the key for independent random codes (sqrt(G * R) / 2 score units, halved for even G),
    rounded up to a power of two in 32..128 (64 bins, 11 sigma, for Llama-3.1-8B; 128, 13 sigma, for the default
    model); more bins cost every block (BENCHMARKS.md: 64 / 128 / 256 bins, selector 24 / 29 / 50 us, B=1/128K).
    block_s, hist_chunk (the slow path's keys a step, a power-of-two multiple of block_s): tests' sizes."""
    B, H, W = q_codes.shape
    _, Hkv, S, _ = k_codes.shape
    G, R = H // Hkv, 32 * W
    shift = int(G % 2 == 0)                                # even G: a row's scores share one parity, drop that bit
    window = window or _hamming_topk_window(G, R)
    k_codes = _rows_contiguous(k_codes)
    _check_int32_span(k_codes, "hamming_topk")
    q_codes, lengths = q_codes.contiguous(), lengths.contiguous()              # the kernels read lengths[b]
    kmax = (G * R >> shift) + 1                                                # largest key of a valid position
    _check(kmax < 2 ** 15 - 1, f"hamming_topk: G * R = {G * R} is too large for the int16 order keys")
    cshift = max(0, (kmax + 1).bit_length() - 6)                               # slow path: <= 64 coarse bins
    block_s = block_s or (2048 if not _INTERPRET else max(16, min(128, _next_pow2(S))))
    _check(hist_chunk is None or (hist_chunk >= block_s and _next_pow2(hist_chunk) == hist_chunk),
           f"hamming_topk: hist_chunk must be a power of two >= block_s = {block_s}, got {hist_chunk}")
    nblk = triton.cdiv(S, block_s)
    dev = q_codes.device
    keys = torch.empty(B * Hkv, S, dtype=torch.int16, device=dev)             # (B*Hkv, S) order keys
    bases = torch.empty(B * Hkv, nblk, dtype=torch.int32, device=dev)          # (B*Hkv, NBLK) window bases
    hist = torch.empty(B * Hkv, nblk, window + 1, dtype=torch.int32, device=dev)  # (B*Hkv, NBLK, WIN + 1) windows,
    # a pad int each: at a stride of WIN (a power of two) anchored rows' loads conflicted, 1.2-2.9 us at 128K (H100)
    info = torch.empty(B * Hkv, nblk, 4, dtype=torch.int32, device=dev)       # (B*Hkv, NBLK, 4) offset/skip/count/t
    idx = torch.empty(B, Hkv, budget, dtype=torch.int32, device=dev)          # (B, Hkv, K) int32
    if anchor is None:
        anchor = torch.full((B, Hkv), -1, dtype=torch.int32, device=dev)       # (B, Hkv): no window to follow yet
    _check_anchor(anchor, B, Hkv, dev)
    # launch configurations measured on the H200 (llama8b, S = 128K): the score kernel capped at 96 registers a
    # thread (5 blocks per SM instead of 3) takes 53.6 instead of 58.9 us at B = 8; R = 256 codes need more
    nw = {} if _INTERPRET else {"num_warps": 4}
    score_cfg = {**nw, **({"maxnreg": 96} if W <= 4 and not _INTERPRET else {})}

    def score():
        _topk_score_kernel[(nblk, B * Hkv)](
            q_codes, k_codes, lengths, anchor, keys, bases, hist, Hkv, S, nblk, n_sink, n_recent, *k_codes.stride()[:2],
            G=G, W=W, W_P2=_next_pow2(W), NPL=_planes(G), SHIFT=shift, KMAX=kmax, WIN=window, BLOCK_S=block_s,
            HW_POPC=not _INTERPRET, **score_cfg,
        )

    def threshold():  # 8 warps: the slow path 116 instead of 139 us at 128K, the fast path the same
        _topk_threshold_kernel[(B * Hkv,)](
            lengths, keys, bases, hist, info, idx, anchor, Hkv, S, nblk, budget, KMAX=kmax, WIN=window, BLOCK_S=block_s,
            BLK_CHUNK=max(2, min(64, _next_pow2(nblk))), CSHIFT=cshift, NC=_next_pow2(((kmax + 1) >> cshift) + 1),
            HIST_CHUNK=hist_chunk or block_s * (1 if _INTERPRET else max(1, 8192 // block_s)),
            FILL_BLOCK=max(16, min(1024, _next_pow2(budget))), **({} if _INTERPRET else {"num_warps": 8}),
        )

    def compact():
        _topk_compact_kernel[(nblk, B * Hkv)](keys, lengths, info, idx, Hkv, S, nblk, budget, BLOCK_S=block_s,
                                              **nw)

    return idx, [("topk.score", score), ("topk.threshold", threshold), ("topk.compact", compact)]


# ----------------------------------------------------------------------------------------------------------
# 5. sparse_decode_attention: softmax(q K_sel^T * scale) V_sel over the selected rows

# The Triton path is split-K attention over the gathered rows: program (split, b*Hkv + h) gathers BLOCK_N selected
# rows of K and V straight from the cache (no materialized copy) and serves all G query heads of KV head h with
# them; a small merge kernel then combines the splits' partial outputs by log-sum-exp (in log2 units: exp2).


def sparse_decode_attention(q, k_cache, v_cache, idx, scale=None, use_triton=None):
    """q (B, H, D), k_cache/v_cache (B, Hkv, S_max, D), idx (B, Hkv, K) int32 (-1 = unused) -> (B, H, D)
    in q's dtype. Indices must lie in [0, S_max) or be -1 (not checked: that would need a host sync).
    A query head whose KV head selects nothing, or whose selected keys all score -inf, gets zeros; NaN stays NaN
    (for the engine's check of the logits)."""
    _check(q.dim() == 3, f"sparse_decode_attention: q must be (B, H, D), got shape {tuple(q.shape)}")
    _check(k_cache.dim() == 4 and v_cache.shape == k_cache.shape,
           f"sparse_decode_attention: k_cache/v_cache must both be (B, Hkv, S_max, D), got "
           f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    _check(idx.dim() == 3 and idx.dtype == torch.int32,
           f"sparse_decode_attention: idx must be (B, Hkv, K) int32, got {idx.dtype} {tuple(idx.shape)}")
    _check(q.dtype in _FLOATS + (torch.float64,) and k_cache.dtype == q.dtype and v_cache.dtype == q.dtype,
           f"sparse_decode_attention: q, k_cache, v_cache must share one float dtype, got "
           f"{q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    B, H, D = q.shape
    Bk, Hkv, S_max, Dk = k_cache.shape
    _check(Bk == B and Dk == D, f"sparse_decode_attention: q {tuple(q.shape)} and k_cache "
           f"{tuple(k_cache.shape)} disagree on B or D")
    _check(H % Hkv == 0, f"sparse_decode_attention: query heads {H} must be a multiple of KV heads {Hkv}")
    _check(idx.shape[:2] == (B, Hkv), f"sparse_decode_attention: idx {tuple(idx.shape)} must start with "
           f"(B, Hkv) = ({B}, {Hkv})")
    _check_devices("sparse_decode_attention", q=q, k_cache=k_cache, v_cache=v_cache, idx=idx)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if not _use_triton(use_triton, q, k_cache, v_cache, idx):
        return sparse_decode_attention_ref(q, k_cache, v_cache, idx, scale)
    _check(not (_INTERPRET and q.dtype == torch.bfloat16), "sparse_decode_attention: the Triton interpreter computes "
           "bf16 tl.dot wrongly (triton#11584): on the CPU use fp16, fp32 or the ref")
    return _launch(*_sparse_attention_launches(q, k_cache, v_cache, idx, scale))


def sparse_decode_attention_ref(q, k_cache, v_cache, idx, scale=None):
    """Definition. Memory: gathers the K selected key and value rows per KV head (2*B*Hkv*K*D*itemsize B; reshape
    copies a [:, :, :S] view first: pass whole caches), then for bf16/fp16 casts them to the fp32 it accumulates in
    (2*B*Hkv*K*D*4 B more; fp64 inputs accumulate in fp64); writes B*H*D."""
    (B, H, D), (_, Hkv, S_max, _) = q.shape, k_cache.shape
    K, G = idx.shape[-1], H // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if S_max == 0:  # an empty cache: every slot -1, nothing to gather (index_select would fail): zeros, as the kernel
        return q.new_zeros(B, H, D)
    acc = torch.promote_types(q.dtype, torch.float32)
    used = idx >= 0                                                            # (B, Hkv, K) bool
    bh = torch.arange(B * Hkv, device=q.device).view(B, Hkv, 1)                # (B, Hkv, 1)
    rows = (bh * S_max + idx.clamp(min=0)).reshape(-1)                         # (B*Hkv*K,) rows of the flat cache
    k_sel = k_cache.reshape(-1, D).index_select(0, rows).view(B, Hkv, K, D).to(acc)  # (B, Hkv, K, D)
    v_sel = v_cache.reshape(-1, D).index_select(0, rows).view(B, Hkv, K, D)    # (B, Hkv, K, D)
    # a -1 slot read row 0: its value row is zeroed (0 * NaN = NaN), those rows only (a masked_fill_ of all of v_sel
    # took 8x the time on the CPU at K = 512)
    unused = (~used).reshape(-1).nonzero()[:, 0]                               # (n,) flat slots of -1: few or none
    v_sel = v_sel.to(acc).view(-1, D).index_fill_(0, unused, 0).view(B, Hkv, K, D)  # (B, Hkv, K, D)
    s = (q.view(B, Hkv, G, D).to(acc) @ k_sel.transpose(-1, -2)) * scale      # (B, Hkv, G, K)
    s = s.masked_fill(~used[:, :, None, :], -math.inf)  # (B, Hkv, G, K)
    live = ~(s == -math.inf).all(-1, keepdim=True)                            # (B, Hkv, G, 1); a NaN row is live
    p = torch.where(live, torch.softmax(s, dim=-1), 0.0)                       # (B, Hkv, G, K)
    return (p @ v_sel).reshape(B, H, D).to(q.dtype)                            # (B, Hkv, G, D) -> (B, H, D)


@triton.jit
def _sparse_attn_split_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, o_ptr, lse_ptr,   # q (B, H, D), k/v (B, Hkv, S_max, D), idx (B, Hkv, K),
    Hkv, K, NSPLIT, scale,                          # o (B*Hkv, NSPLIT, G, D) fp32, lse (B*Hkv, NSPLIT, G) fp32
    sqb, sqh, sqd,
    skb, skh, sks, skd,
    svb, svh, svs, svd,
    sib, sih, sik,
    G: tl.constexpr, G_P2: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
):
    """Program (split n, b*Hkv + h): softmax attention of the G query heads over this split's BLOCK_N selected rows;
    stores o_n = sum p v / l_n and lse_n = m_n + log2 l_n = log2 sum 2^s (s in log2 units; -inf: none selected)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)                                           # a (B, Hkv, S_max, D) cache may
    h = pid_bh % Hkv                                                           # pass 2^31 elements
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                                # (BLOCK_N,)
    d = tl.arange(0, D)                                                        # (D,)
    g = tl.arange(0, G_P2)                                                     # (G_P2,)
    rows = tl.load(idx_ptr + b * sib + h * sih + n * sik, mask=n < K, other=-1)  # (BLOCK_N,) int32
    used = rows >= 0
    rows = tl.where(used, rows, 0).to(tl.int64)
    q = tl.load(q_ptr + b * sqb + (h * G + g)[:, None] * sqh + d[None, :] * sqd,
                mask=g[:, None] < G, other=0.0)                                # (G_P2, D)
    k = tl.load(k_ptr + b * skb + h * skh + rows[:, None] * sks + d[None, :] * skd,
                mask=used[:, None], other=0.0)                                 # (BLOCK_N, D) gathered rows
    v = tl.load(v_ptr + b * svb + h * svh + rows[:, None] * svs + d[None, :] * svd,
                mask=used[:, None], other=0.0)                                 # (BLOCK_N, D)
    LOG2E: tl.constexpr = 1.4426950408889634
    if IEEE:  # fp32 inputs: exact products (tl.dot's default would round them to tf32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee")                     # (G_P2, BLOCK_N) fp32
    else:
        s = tl.dot(q, tl.trans(k))
    s = tl.where(used[None, :], s * (scale * LOG2E), -float("inf"))            # log2 domain
    m = tl.max(s, axis=1)                                                      # (G_P2,)
    m_safe = tl.where(m == -float("inf"), 0.0, m)                              # a split with nothing selected
    p = tl.exp2(s - m_safe[:, None])                                           # (G_P2, BLOCK_N)
    l = tl.sum(p, axis=1)                                                      # (G_P2,)
    if IEEE:
        acc = tl.dot(p, v.to(tl.float32), input_precision="ieee")              # (G_P2, D) fp32
    else:
        acc = tl.dot(p.to(v.dtype), v)                                         # p rounded to V's bf16/fp16
    l_safe = tl.where(l > 0, l, 1.0)
    o = acc / l_safe[:, None]
    lse = tl.where(l > 0, m_safe + tl.log2(l_safe), -float("inf"))                  # (G_P2,) log2 units
    row = (pid_bh * NSPLIT + pid_n) * G + g                                    # (G_P2,)
    tl.store(o_ptr + row[:, None] * D + d[None, :], o, mask=g[:, None] < G)
    tl.store(lse_ptr + row, lse, mask=g < G)


@triton.jit
def _sparse_attn_merge_kernel(
    o_ptr, lse_ptr, out_ptr,                  # o (B*Hkv, NSPLIT, G, D), lse (B*Hkv, NSPLIT, G), out (B, H, D)
    H, NSPLIT,
    sob, soh,
    G: tl.constexpr, D: tl.constexpr, SPLIT_CHUNK: tl.constexpr,
):
    """out = sum_n 2^lse_n o_n / sum_n 2^lse_n over the splits, accumulated with a running max m as online softmax
    does: what came before is rescaled by alpha = 2^(m_old - m_new)."""
    pid = tl.program_id(0)                                                     # one query head of one sequence
    b = pid // H
    j = pid % H
    base = (b * (H // G) + j // G) * NSPLIT                                    # first split of KV head j // G
    d = tl.arange(0, D)
    m = tl.full([], -float("inf"), tl.float32)                                # running max of the lse
    acc = tl.zeros([D], dtype=tl.float32)
    den = tl.zeros([], dtype=tl.float32)
    for c in range(0, NSPLIT, SPLIT_CHUNK):                                    # one pass: lse and o load together
        sp = c + tl.arange(0, SPLIT_CHUNK)                                     # (SPLIT_CHUNK,)
        lse = tl.load(lse_ptr + (base + sp) * G + j % G, mask=sp < NSPLIT, other=-float("inf"))
        o = tl.load(o_ptr + ((base + sp) * G + j % G)[:, None] * D + d[None, :],
                    mask=sp[:, None] < NSPLIT, other=0.0)                      # (SPLIT_CHUNK, D)
        m_new = tl.maximum(m, tl.max(lse))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)                  # no split selected anything yet
        alpha = tl.exp2(m - m_safe)                                            # rescales what came before
        wgt = tl.exp2(lse - m_safe)                                            # (SPLIT_CHUNK,)
        acc = acc * alpha + tl.sum(wgt[:, None] * o, axis=0)
        den = den * alpha + tl.sum(wgt)
        m = m_new
    out = acc / tl.where(den > 0, den, 1.0)                                    # nothing selected: zeros
    tl.store(out_ptr + b * sob + j * soh + d, out.to(out_ptr.dtype.element_ty))


def _sparse_attention_launches(q, k_cache, v_cache, idx, scale):
    """Allocate the output and partials, return (out, [(name, launch), ...]); bench.py times each launch."""
    B, H, D = q.shape
    _, Hkv, _, _ = k_cache.shape
    K, G = idx.shape[-1], H // Hkv
    _check_triton_head_dim(D, "sparse_decode_attention")
    _check(q.dtype != torch.float64, "sparse_decode_attention: Triton path takes fp32/bf16/fp16, got float64")
    block_n = 64 if not _INTERPRET else 16                                     # selected rows a split program reads
    nsplit = triton.cdiv(K, block_n)
    o = torch.empty(B * Hkv, nsplit, G, D, dtype=torch.float32, device=q.device)  # (B*Hkv, NSPLIT, G, D) partial outs
    lse = torch.empty(B * Hkv, nsplit, G, dtype=torch.float32, device=q.device)   # (B*Hkv, NSPLIT, G) log2-sum-exp
    out = torch.empty(B, H, D, dtype=q.dtype, device=q.device)                  # (B, H, D)

    def split():
        _sparse_attn_split_kernel[(nsplit, B * Hkv)](
            q, k_cache, v_cache, idx, o, lse, Hkv, K, nsplit, scale,
            *q.stride(), *k_cache.stride(), *v_cache.stride(), *idx.stride(),
            G=G, G_P2=max(16, _next_pow2(G)), D=D, BLOCK_N=block_n, IEEE=q.dtype == torch.float32,  # tl.dot: >= 16
            **({} if _INTERPRET else {"num_warps": 4}),
        )

    def merge():  # one warp: 5.0 us on the H200 at B=1, S=128K, against 6.5 us with four
        _sparse_attn_merge_kernel[(B * H,)](o, lse, out, H, nsplit, *out.stride()[:2], G=G, D=D,
                                            SPLIT_CHUNK=max(2, min(32, _next_pow2(nsplit))),
                                            **({} if _INTERPRET else {"num_warps": 1}))

    return out, [("attn.split", split), ("attn.merge", merge)]


# ----------------------------------------------------------------------------------------------------------
# 6. cache_write: a decode step's new K and V rows into the KV caches (every layer, dense or sparse)


@triton.jit
def _cache_write_kernel(
    k_ptr, v_ptr, pos_ptr, kcache_ptr, vcache_ptr,  # k/v (B, Hkv, D), pos (B,), caches (B', Hkv, S_max, D)
    Hkv,
    skb, skh, skd, svb, svh, svd,
    skcb, skch, skcs, skcd, svcb, svch, svcs, svcd,
    D: tl.constexpr, BLOCK_H: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)                                          # one sequence: its Hkv rows of K and V
    h = tl.arange(0, BLOCK_H)[:, None]                                         # (BLOCK_H, 1)
    d = tl.arange(0, D)[None, :]                                               # (1, D)
    pos = tl.load(pos_ptr + b).to(tl.int64)
    m = h < Hkv
    k = tl.load(k_ptr + b * skb + h * skh + d * skd, mask=m)                   # (BLOCK_H, D)
    v = tl.load(v_ptr + b * svb + h * svh + d * svd, mask=m)                   # (BLOCK_H, D)
    tl.store(kcache_ptr + b * skcb + h * skch + pos * skcs + d * skcd, k, mask=m)
    tl.store(vcache_ptr + b * svcb + h * svch + pos * svcs + d * svcd, v, mask=m)


def cache_write(k, v, k_cache, v_cache, pos, use_triton=None):
    """k, v (B, Hkv, D) -> k_cache[b, :, pos[b]] = k[b] and v_cache[b, :, pos[b]] = v[b] for the caches' first B
    sequences, (B', Hkv, S_max, D) with B' >= B. One launch on CUDA (D a power of two; else the ref): torch's
    index_put takes two kernels and an arange a layer (its 64 index_puts in 32 layers: 234 us of a 128K step);
    with this kernel in every layer a 128K decode step of Llama-3.1-8B's shape took 0.26-0.35 ms less at B=1
    (0.32-0.59 ms at B=4). pos must lie in [0, S_max) (not checked: a host sync)."""
    _check(k.dim() == 3 and v.shape == k.shape, f"cache_write: k and v must both be (B, Hkv, D), got "
           f"{tuple(k.shape)} and {tuple(v.shape)}")
    B, Hkv, D = k.shape
    _check(k_cache.dim() == 4 and v_cache.shape == k_cache.shape and k_cache.shape[0] >= B
           and k_cache.shape[1:2] + k_cache.shape[3:] == (Hkv, D), f"cache_write: caches must both be (B', {Hkv}, "
           f"S_max, {D}) with B' >= {B}, got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    _check(k.dtype == v.dtype == k_cache.dtype == v_cache.dtype, f"cache_write: k, v and the caches must share "
           f"one dtype, got {k.dtype}, {v.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    _check(pos.shape == (B,) and _is_int(pos), f"cache_write: pos must be (B,) = ({B},) int32 or int64, "
           f"got {pos.dtype} {tuple(pos.shape)}")
    _check_devices("cache_write", k=k, v=v, k_cache=k_cache, v_cache=v_cache, pos=pos)
    if not _use_triton(use_triton, k, v, k_cache, v_cache, pos) or (D & (D - 1)) != 0:
        return cache_write_ref(k, v, k_cache, v_cache, pos)
    _cache_write_kernel[(B,)](
        k, v, pos.contiguous(), k_cache, v_cache, Hkv, *k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride(),
        D=D, BLOCK_H=_next_pow2(Hkv), **({} if _INTERPRET else {"num_warps": 1}),
    )


def cache_write_ref(k, v, k_cache, v_cache, pos):
    """Definition: index_put of each sequence's rows at its position."""
    b = torch.arange(k.shape[0], device=k.device)                              # (B,)
    k_cache[b, :, pos.long()] = k                                              # indexed view (B, Hkv, D)
    v_cache[b, :, pos.long()] = v
