"""Tests for hata_kernels.py: each ref against a brute-force Python-loop definition, each Triton kernel
against its ref (on the CPU through the Triton interpreter), CUDA tests at realistic sizes, bad input."""
import math
import os
import re

import torch

if not torch.cuda.is_available():                  # must precede the first @triton.jit definition
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import hata_kernels as hk  # noqa: E402

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
DEV = "cuda" if CUDA else "cpu"             # Triton-vs-ref tests: the interpreter on the CPU, the GPU if any


# ----------------------------------------------------------------------------------------------------------
# brute-force definitions: Python loops over every element, straight from hata_kernels.py's conventions


def to_int32(u):
    """Unsigned 32-bit Python int -> the int32 with the same bits."""
    return u - (1 << 32) if u >= (1 << 31) else u


def brute_hash_encode(x, proj):
    B, Hx, T, D = x.shape
    Hkv, _, R = proj.shape
    G = Hx // Hkv
    xs, ps = x.double().tolist(), proj.double().tolist()
    out = torch.zeros(B, Hx, T, R // 32, dtype=torch.int32)
    for b in range(B):
        for j in range(Hx):
            for t in range(T):
                for w in range(R // 32):
                    word = 0
                    for i in range(32):
                        y = sum(xs[b][j][t][d] * ps[j // G][d][32 * w + i] for d in range(D))
                        word |= int(y > 0) << i
                    out[b, j, t, w] = to_int32(word)
    return out


def brute_hamming_score(q_codes, k_codes, lengths):
    B, H, W = q_codes.shape
    _, Hkv, S, _ = k_codes.shape
    G = H // Hkv
    qs, ks = q_codes.tolist(), k_codes.tolist()
    out = torch.zeros(B, Hkv, S, dtype=torch.int32)
    for b in range(B):
        for h in range(Hkv):
            for s in range(S):
                if s >= lengths[b]:
                    out[b, h, s] = G * 32 * W + 1
                    continue
                out[b, h, s] = sum(bin((ks[b][h][s][w] ^ qs[b][h * G + g][w]) & 0xFFFFFFFF).count("1")
                                   for g in range(G) for w in range(W))
    return out


def brute_select(score, lengths, budget, n_sink=0, n_recent=0):
    """Sets of selected positions, [b][h] -> sorted list."""
    B, Hkv, S = score.shape
    out = []
    for b in range(B):
        n = int(lengths[b])
        row = []
        for h in range(Hkv):
            def rank(s):
                forced = s < n_sink or s >= n - n_recent
                return (0 if forced else 1, 0 if forced else float(score[b, h, s]), -s)
            row.append(sorted(sorted(range(n), key=rank)[:min(budget, n)]))
        out.append(row)
    return out


def as_sets(idx):
    """(B, Hkv, K) -> [b][h] -> (sorted selected positions, number of -1 slots)."""
    return [[(sorted(p for p in r if p >= 0), sum(1 for p in r if p < 0)) for r in rows] for rows in idx.tolist()]


def sorted_sets(idx):  # a selection is a set (hata_kernels.py: a kernel may change its order)
    return torch.sort(idx, dim=-1).values                                     # -1s first, then positions


def brute_attention(q, k_cache, v_cache, idx, scale):
    B, H, D = q.shape
    Hkv = k_cache.shape[1]
    G = H // Hkv
    out = torch.zeros(B, H, D, dtype=torch.float64)
    for b in range(B):
        for j in range(H):
            h = j // G
            sel = [int(s) for s in idx[b, h] if s >= 0]
            if not sel:
                continue
            logits = [scale * sum(float(q[b, j, d]) * float(k_cache[b, h, s, d]) for d in range(D)) for s in sel]
            m = max(logits)
            p = [math.exp(x - m) for x in logits]
            for d in range(D):
                out[b, j, d] = sum(pi * float(v_cache[b, h, s, d]) for pi, s in zip(p, sel)) / sum(p)
    return out


def random_codes(*shape, gen):
    return torch.randint(-2**31, 2**31, shape, dtype=torch.int64, generator=gen).to(torch.int32)


# ----------------------------------------------------------------------------------------------------------
# refs against the brute-force definitions


@pytest.mark.parametrize("G,R", [(1, 32), (3, 128), (4, 64)])
def test_hash_encode_ref(G, R):
    gen = torch.Generator().manual_seed(G * 100 + R)
    Hkv, D, T = 2, 16, 3
    proj = torch.randn(Hkv, D, R, generator=gen)
    for Hx in (Hkv, Hkv * G):
        x = torch.randn(2, Hx, T, D, generator=gen)
        assert torch.equal(hk.hash_encode_ref(x, proj), brute_hash_encode(x, proj))


def test_hash_encode_packing():
    """A vector whose projection is positive exactly at dims 0, 31, 33 (and 127), and 0 at dim 5: bit 31 is the sign
    bit, a bit is set only where x.P > 0; the kernel packs the same words."""
    D, R = 16, 128
    proj = -torch.ones(1, D, R)
    for r in (0, 31, 33, 127):
        proj[0, :, r] = 1.0
    proj[0, :, 5] = 0.0                                                        # x.P exactly 0: bit 5 clear (> 0)
    x = torch.ones(1, 1, 1, D)
    codes = hk.hash_encode_ref(x, proj)[0, 0, 0].tolist()
    assert codes == [1 | -2**31, 2, 0, -2**31]
    assert hk.hash_encode(x.to(DEV), proj.to(DEV), use_triton=True)[0, 0, 0].tolist() == codes


@pytest.mark.parametrize("S", [1, 63, 257])
@pytest.mark.parametrize("G,R", [(1, 32), (3, 128), (4, 32), (4, 128)])
def test_hamming_score_ref(S, G, R):
    gen = torch.Generator().manual_seed(S * 7 + G * 3 + R)
    B, Hkv, W = 2, 2, R // 32
    q = random_codes(B, Hkv * G, W, gen=gen)
    k = random_codes(B, Hkv, S, W, gen=gen)
    lengths = torch.tensor([S, max(1, S // 2)])
    ref = hk.hamming_score_ref(q, k, lengths)
    assert ref.dtype == torch.int32 and ref.shape == (B, Hkv, S)
    assert torch.equal(ref, brute_hamming_score(q, k, lengths))
    for dims in ((0, 1), (1, 2)):  # the same codes with B or W out of place (before: an error from .view)
        assert torch.equal(hk.hamming_score_ref(q.transpose(*dims).contiguous().transpose(*dims), k, lengths), ref)
    words = torch.tensor([0, -1, -2**31, 2**31 - 1, 0x0F0F0F0F, 0x00FF0001], dtype=torch.int32)
    for lut in (False, True):  # numpy's count (the CPU), the byte table (the ref off the CPU), each on every byte
        assert hk._popcount_words(words, lut=lut).tolist() == [0, 32, 1, 31, 16, 9], lut
        assert torch.equal(hk._popcount_words(k, lut=lut).long(), hk._popcount_words(k, lut=not lut).long())


@pytest.mark.parametrize("S", [1, 63, 257])
@pytest.mark.parametrize("budget,n_sink,n_recent", [(1, 0, 0), (8, 0, 0), (16, 2, 3), (40, 4, 16), (300, 1, 1)])
def test_select_topk_ref(S, budget, n_sink, n_recent):
    gen = torch.Generator().manual_seed(S + budget)
    B, Hkv = 3, 2
    score = torch.randint(0, 12, (B, Hkv, S), generator=gen, dtype=torch.int32)   # many ties
    lengths = torch.tensor([S, max(1, S - 5), max(1, S // 3)])
    idx = hk.select_topk_ref(score, lengths, budget, n_sink, n_recent)
    assert idx.shape == (B, Hkv, budget) and idx.dtype == torch.int32
    brute = brute_select(score, lengths, budget, n_sink, n_recent)
    for b in range(B):
        for h in range(Hkv):
            k_eff = min(budget, int(lengths[b]))
            assert idx[b, h].tolist() == brute[b][h] + [-1] * (budget - k_eff)   # ascending, then -1s


def test_select_topk_ref_float_scores():
    gen = torch.Generator().manual_seed(5)
    score = torch.randn(2, 3, 63, generator=gen).round(decimals=1)            # negative values and ties
    lengths = torch.tensor([63, 20])
    idx = hk.select_topk_ref(score, lengths, 10, 1, 2)
    brute = brute_select(score, lengths, 10, 1, 2)
    assert [[s for s, _ in row] for row in as_sets(idx)] == brute
    signed = torch.tensor([[[0.0, -0.0, 0.0, 1.0, -0.0, 2.0]]])                 # -0.0 == 0.0: one tie, newest wins
    for use_triton in (False, True):
        picked = hk.select_topk(signed.to(DEV), torch.tensor([6], device=DEV), 2, use_triton=use_triton)
        assert sorted_sets(picked).tolist() == [[[2, 4]]]
    neg_nan = torch.tensor([-512], dtype=torch.int16).view(torch.float16)      # 0xFE00: a NaN with the sign bit
    for n in (3, 8):  # every NaN ranks last (before: first in a row of 8, last in a row of 3, by where torch's fp16
        score = torch.cat([neg_nan, torch.arange(1, n, dtype=torch.float16)]).view(1, 1, n)  # -> fp32 kept the sign)
        for use_triton in (False, True):
            assert hk.select_topk(score.to(DEV), torch.tensor([n], device=DEV), 1, use_triton=use_triton).tolist() == \
                [[[1]]]
    q0, k0, codes0 = torch.randn(0, 2, 16), torch.randn(0, 1, 16), torch.zeros(0, 1, 4, 1, dtype=torch.int32)
    assert hk.hash_encode_step_ref(q0, k0, torch.randn(1, 16, 32), codes0, torch.zeros(0, dtype=torch.long)).shape == \
        (0, 2, 1)  # B = 0, as the kernel (before: the ref's reshape(B, H, -1) of no elements raised)


def test_select_topk_ref_rules():
    """Ties: newer wins; sinks and recent always in; nothing at or past the length; budget >= length."""
    score = torch.tensor([[[5, 1, 1, 1, 9, 1, 9, 9]]], dtype=torch.int32)     # (1, 1, 8)
    L = torch.tensor([8])
    assert hk.select_topk_ref(score, L, 2).tolist() == [[[3, 5]]]             # ties among 1s: newest two
    assert hk.select_topk_ref(score, L, 3, n_sink=1).tolist() == [[[0, 3, 5]]]
    assert hk.select_topk_ref(score, L, 3, n_recent=2).tolist() == [[[5, 6, 7]]]
    assert hk.select_topk_ref(score, L, 2, n_sink=2, n_recent=2).tolist() == [[[6, 7]]]  # forced > budget: newest
    assert hk.select_topk_ref(score, torch.tensor([4]), 3).tolist() == [[[1, 2, 3]]]     # s >= 4 never
    assert hk.select_topk_ref(score, torch.tensor([3]), 5).tolist() == [[[0, 1, 2, -1, -1]]]  # budget >= length
    assert hk.select_topk_ref(score, L, 5, n_sink=20, n_recent=20).tolist() == [[[3, 4, 5, 6, 7]]]


@pytest.mark.parametrize("score", [torch.tensor([[[0, 2, 1, 1]]], dtype=torch.int32),
                                   torch.tensor([[[math.inf, math.nan]]])])
def test_select_topk_ranks_by_score_before_age_and_nan_last(score):
    """The score decides before the position at any distance: the oldest key of the smallest score beats the newest
    of the next score (an order key that packed positions into S - 1 values per score made those two tie). Every NaN
    ranks last, after +inf too (a NaN keyed as +inf ties with it, and the newer NaN would win)."""
    for use_triton in (False, True):
        picked = hk.select_topk(score.to(DEV), torch.tensor([score.shape[-1]], device=DEV), 1, use_triton=use_triton)
        assert picked.tolist() == [[[0]]]


@pytest.mark.parametrize("S,G,R", [(63, 3, 128), (257, 4, 32)])
def test_hamming_topk_ref(S, G, R):
    gen = torch.Generator().manual_seed(S + G)
    B, Hkv, W = 2, 2, R // 32
    q = random_codes(B, Hkv * G, W, gen=gen)
    k = random_codes(B, Hkv, S, W, gen=gen)
    lengths = torch.tensor([S, S // 3])
    idx = hk.hamming_topk_ref(q, k, lengths, 20, 2, 4)
    brute = brute_select(brute_hamming_score(q, k, lengths), lengths, 20, 2, 4)
    assert [[s for s, _ in row] for row in as_sets(idx)] == brute


@pytest.mark.parametrize("G", [1, 3, 4])
def test_sparse_attention_ref(G):
    gen = torch.Generator().manual_seed(G)
    B, Hkv, S_max, D, K = 2, 2, 37, 8, 6
    q = torch.randn(B, Hkv * G, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, Hkv, S_max, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, Hkv, S_max, D, generator=gen, dtype=torch.float64)
    idx = torch.randint(0, S_max, (B, Hkv, K), generator=gen, dtype=torch.int32)
    idx[0, 1, 3:] = -1                                                        # partly unused
    idx[1, 0, :] = -1                                                         # nothing selected -> zeros
    out = hk.sparse_decode_attention_ref(q, k, v, idx, 0.3)
    torch.testing.assert_close(out, brute_attention(q, k, v, idx, 0.3), atol=1e-12, rtol=0)  # (allclose: rtol 1e-5)
    v[1, 0] = math.nan                                                        # an unwritten cache (torch.empty)
    assert torch.all(hk.sparse_decode_attention_ref(q, k, v, idx, 0.3)[1, :G] == 0)
    k[0, 1, idx[0, 1, 0]] = math.nan                                          # a selected key: NaN, as the kernel's
    out = hk.sparse_decode_attention_ref(q, k, v, idx, 0.3)                    # (the engine's logits check sees it)
    assert out[0, G:].isnan().all() and not out[0, :G].isnan().any() and torch.all(out[1, :G] == 0)


@pytest.mark.parametrize("S_max, K", [(8, 0), (0, 3)])
def test_sparse_attention_with_no_slots_is_zeros_in_both_paths(S_max, K):
    """K = 0 slots, or K slots all -1 in an empty cache (S_max = 0), select nothing: zeros, as the kernel gives (the
    ref failed in amax over an empty dim, and in index_select on an empty cache)."""
    q, k, v = torch.randn(1, 4, 16), torch.randn(1, 2, S_max, 16), torch.randn(1, 2, S_max, 16)
    idx = torch.full((1, 2, K), -1, dtype=torch.int32)
    assert torch.equal(hk.sparse_decode_attention_ref(q, k, v, idx), torch.zeros(1, 4, 16))
    tri = hk.sparse_decode_attention(q.to(DEV), k.to(DEV), v.to(DEV), idx.to(DEV), use_triton=True)
    assert torch.equal(tri.cpu(), torch.zeros(1, 4, 16))


def test_sparse_attention_ref_accumulates_half_inputs_in_fp32():
    """fp16 q, k, v (large logits, values far from 0): the ref's result is within fp16 rounding of float64's, which
    it is only when it accumulates in fp32 (in fp16: 9e-3, against 2e-3). attention_tolerance measures the kernels
    against the ref in their dtype, so a ref that lost precision would loosen every kernel test's bar."""
    gen = torch.Generator().manual_seed(0)
    B, Hkv, G, D, S, K = 1, 2, 4, 64, 2048, 2000
    q = (8 * torch.randn(B, Hkv * G, D, generator=gen)).half()
    k = torch.randn(B, Hkv, S, D, generator=gen).half()
    v = (torch.randn(B, Hkv, S, D, generator=gen) + 3).half()
    idx = torch.stack([torch.randperm(S, generator=gen)[:K] for _ in range(B * Hkv)]).view(B, Hkv, K).int()
    out = hk.sparse_decode_attention_ref(q, k, v, idx)
    ref64 = hk.sparse_decode_attention_ref(q.double(), k.double(), v.double(), idx)
    assert out.dtype == torch.float16 and (out.double() - ref64).abs().max().item() <= 4e-3


def test_sparse_attention_ref_is_dense_when_all_selected():
    gen = torch.Generator().manual_seed(0)
    B, Hkv, G, S, D = 2, 2, 3, 19, 16
    q = torch.randn(B, Hkv * G, D, generator=gen)
    k = torch.randn(B, Hkv, S, D, generator=gen)
    v = torch.randn(B, Hkv, S, D, generator=gen)
    idx = torch.arange(S, dtype=torch.int32).expand(B, Hkv, S).contiguous()
    out = hk.sparse_decode_attention_ref(q, k, v, idx)
    dense = torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)[:, :, 0]
    assert torch.allclose(out, dense, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# bad input


def test_bad_input():
    """Each check fires with its own words (a bare ValueError could come from another check)."""
    c = torch.zeros(1, 4, 2, 4, dtype=torch.int32)
    q = torch.zeros(1, 8, 4, dtype=torch.int32)
    L = torch.tensor([2])
    cache, pos = torch.zeros(1, 2, 4, 1, dtype=torch.int32), torch.tensor([0])
    q8, k8 = torch.zeros(1, 4, 8), torch.zeros(1, 2, 8)
    qf, kf = torch.zeros(1, 8, 16), torch.zeros(1, 4, 5, 16)
    idx = torch.zeros(1, 4, 3, dtype=torch.int32)
    cases = [
        (lambda: hk.hash_encode(torch.zeros(1, 2, 1, 8, dtype=torch.int32), torch.zeros(2, 8, 32)),
         "x must be fp32/bf16/fp16, got torch.int32"),
        (lambda: hk.hash_encode(torch.zeros(1, 2, 1, 8), torch.zeros(2, 16, 32)), "proj head dim 16 != x head dim 8"),
        (lambda: hk.hash_encode(torch.zeros(1, 2, 1, 8), torch.zeros(2, 8, 48)), "R = 48 hash bits must be"),
        (lambda: hk.hash_encode(torch.zeros(1, 3, 1, 8), torch.zeros(2, 8, 32)), "x heads 3 must be a multiple"),
        (lambda: hk.hash_encode_step(q8, k8, torch.zeros(2, 8, 64), cache, pos), "code_cache must be (B, Hkv, S_max"),
        (lambda: hk.hash_encode_step(q8.double(), k8, torch.zeros(2, 8, 32), cache, pos),  # its own argument's name
         "hash_encode_step: q must be fp32/bf16/fp16, got torch.float64"),
        (lambda: hk.hash_encode_step(q8[:, :3], k8, torch.zeros(2, 8, 32), cache, pos), "q heads 3 must be a multiple"),
        (lambda: hk.hash_encode_step(q8, torch.zeros(1, 3, 8), torch.zeros(2, 8, 32), cache, pos),
         "k must be (B, Hkv, D) = (1, 2, 8)"),
        (lambda: hk.hash_encode_step(q8, k8, torch.zeros(2, 8, 32), cache, torch.tensor([0.0])),
         "pos must be (B,) = (1,) int32 or int64"),
        (lambda: hk.hash_encode_step(q8, torch.zeros(1, 2, 8, device="meta"), torch.zeros(2, 8, 32), cache, pos),
         "inputs on different devices (q cpu, k meta, code_cache cpu, pos cpu)"),
        (lambda: hk.hash_encode_step(q8, k8, torch.zeros(2, 8, 32), cache, torch.tensor([True])),
         "pos must be (B,) = (1,) int32 or int64, got torch.bool"),
        (lambda: hk.hamming_score(q, c, torch.tensor([True])), "lengths must be an int32 or int64 (B,) = (1,) tensor"),
        (lambda: hk.select_topk(torch.zeros(1, 4, 2), torch.tensor([True]), 2), "lengths must be an int32 or int64"),
        (lambda: hk.cache_write(qf[:, :4], qf[:, :4], kf, kf, torch.tensor([True])),
         "pos must be (B,) = (1,) int32 or int64, got torch.bool"),
        (lambda: hk.cache_write(qf[:, :4], qf[:, :4], kf, kf.to("meta"), L), "different devices (k cpu, v cpu, "
         "k_cache cpu, v_cache meta, pos cpu)"),
        (lambda: hk.hamming_topk(q, c, L.to("meta"), 2), "different devices (q_codes cpu, k_codes cpu, lengths meta)"),
        (lambda: hk.sparse_decode_attention(qf, kf, kf, idx.to("meta")), "idx meta)"),
        (lambda: hk.hamming_score(q.long(), c, L), "codes must be int32"),
        (lambda: hk.hamming_score(q[:, :, :2], c, L), "disagree on B or W"),
        (lambda: hk.hamming_score(q, c, torch.tensor([2, 2])), "lengths must be an int32 or int64 (B,) = (1,) tensor"),
        (lambda: hk.select_topk(torch.zeros(1, 4, 256), torch.tensor([5], dtype=torch.uint8), 3),  # the ref's clamp
         "lengths must be an int32 or int64 (B,) = (1,) tensor, got torch.uint8"),  # to S = 256 overflowed uint8
        (lambda: hk.select_topk(torch.zeros(1, 4, 2), L, 0), "budget must be an int >= 1, got 0"),
        (lambda: hk.select_topk(torch.zeros(1, 4, 2), L, 2, n_sink=-1), "n_sink must be an int >= 0, got -1"),
        (lambda: hk.hamming_topk(q, c, L, 0), "budget must be an int >= 1, got 0"),
        (lambda: hk.hamming_topk(q, c, L, True), "budget must be an int >= 1, got True"),  # not budget 1
        (lambda: hk.sparse_decode_attention(qf, kf, kf, idx.long()), "idx must be (B, Hkv, K) int32"),
        (lambda: hk.sparse_decode_attention(qf, kf.half(), kf.half(), idx), "must share one float dtype"),
        (lambda: hk.sparse_decode_attention(qf[:, :6], kf, kf, idx), "query heads 6 must be a multiple of KV heads 4"),
        (lambda: hk.sparse_decode_attention(qf, kf, kf, idx[:, :2]), "must start with (B, Hkv) = (1, 4)"),
        (lambda: hk.hash_encode(torch.zeros(1, 2, 1, 8), torch.zeros(2, 8, 0)), "R = 0 hash bits must be"),
        (lambda: hk.hash_encode(torch.zeros(1, 2, 1, 8), torch.zeros(2, 8, 32, device="meta")),
         "x on cpu but proj on meta"),
        (lambda: hk.hamming_score(q.expand(2, -1, -1), c, torch.tensor([2, 2])), "disagree on B or W"),
        (lambda: hk.hamming_score(q[:, :6], c, L), "query heads 6 must be a multiple of KV heads 4"),
        (lambda: hk.select_topk(torch.zeros(1, 4, 2), L.to("meta"), 2), "lengths on meta, scores/codes on cpu"),
        (lambda: hk.sparse_decode_attention(qf, kf.expand(2, -1, -1, -1), kf.expand(2, -1, -1, -1), idx),
         "disagree on B or D"),  # (else the first B cached sequences, silently)
        (lambda: hk.sparse_decode_attention(qf, kf, kf.half(), idx), "must share one float dtype"),
        (lambda: hk.hamming_topk(q, c, L, 2, anchor=torch.zeros(1, 3, dtype=torch.int32)),  # the ref's path too
         "anchor must be a contiguous (1, 4) int32 tensor on cpu"),
        (lambda: hk._hamming_topk_launches(q, c, L, 2, 0, 0, anchor=torch.zeros(1, 4, dtype=torch.int64)),
         "anchor must be a contiguous (1, 4) int32 tensor on cpu"),
        (lambda: hk._hamming_topk_launches(q, c, L, 2, 0, 0, block_s=16, hist_chunk=48),
         "hist_chunk must be a power of two >= block_s = 16, got 48"),
        # (a too-wide code cache or another head count: an index_put shape error; a strided anchor: a wrong-strided
        # kernel read; lengths of another batch: a view error deep in the ref)
        (lambda: hk.hash_encode_step(q8, k8, torch.zeros(2, 8, 32), torch.zeros(1, 2, 4, 2, dtype=torch.int32), pos),
         "code_cache must be (B, Hkv, S_max, W) = (1, 2, S_max, 1)"),  # W = 2 words where R = 32 is one
        (lambda: hk.hamming_topk(q, c, L, 2, anchor=torch.zeros(1, 8, dtype=torch.int32)[:, ::2], use_triton=False),
         "anchor must be a contiguous (1, 4) int32 tensor on cpu"),
        (lambda: hk.select_topk(torch.zeros(1, 4, 3), torch.tensor([3, 3]), 2),
         "lengths must be an int32 or int64 (B,) = (1,) tensor, got torch.int64 (2,)"),
        (lambda: hk.cache_write(qf[:, :4], qf[:, :4], kf[:, :3], kf[:, :3], L),
         "caches must both be (B', 4, S_max, 16) with B' >= 1"),
        (lambda: hk.cache_write(qf[:, :4], qf[:, :4], torch.zeros(1, 5, 5, 16), torch.zeros(1, 5, 5, 16), L),
         "caches must both be (B', 4, S_max, 16) with B' >= 1"),
        (lambda: hk.cache_write(qf[:, :4], qf[:, :3], kf, kf, L),
         "k and v must both be (B, Hkv, D), got (1, 4, 16) and (1, 3, 16)"),
    ]
    for call, words in cases:
        with pytest.raises(ValueError, match=re.escape(words)):
            call()
    assert [hk.triton_head_dim(D) for D in (8, 16, 24, 32, 100, 128)] == [False, True, False, True, False, True]


# ----------------------------------------------------------------------------------------------------------
# Triton kernels against the refs (on the CPU through the interpreter: tiny grids)


def attention_tolerance(q, k, v, idx, out):
    """flash-attention's rule: kernel error <= 2 * error of torch in the same dtype + 1e-5 (vs float64)."""
    ref64 = hk.sparse_decode_attention_ref(q.double(), k.double(), v.double(), idx)
    ref_same = hk.sparse_decode_attention_ref(q, k, v, idx)
    err_torch = (ref_same.double() - ref64).abs().max().item()
    err = (out.double() - ref64).abs().max().item()
    assert err <= 2 * err_torch + 1e-5, (err, err_torch)


@pytest.mark.parametrize("G,R,D,T", [(1, 32, 16, 1), (3, 128, 32, 5), (4, 64, 16, 17), (2, 128, 16, 40),
                                     (4, 128, 16, 40), (2, 96, 16, 40), (1, 256, 64, 130), (1, 32, 16, 80)])
def test_hash_encode_triton(G, R, D, T):  # G*T > 64 rows: 2 words a program (W = 3 or 1: 1); > 128: 2 row blocks
    gen = torch.Generator().manual_seed(G + R + T)
    Hkv = 2
    proj = torch.randn(Hkv, D, R, generator=gen).to(DEV)
    for Hx, dtype in ((Hkv, torch.float32), (Hkv * G, torch.float16)):
        x = torch.randn(2, Hx, T, D, generator=gen).to(dtype).to(DEV)
        assert_codes_match(hk.hash_encode(x, proj, use_triton=True), x, proj)
    x = torch.randn(2, Hkv, T, 2 * D, generator=gen).to(DEV)[..., ::2]                # non-contiguous view
    assert_codes_match(hk.hash_encode(x, proj, use_triton=True), x, proj)


@pytest.mark.parametrize("G,R,D", [(1, 32, 16), (3, 96, 32), (4, 64, 16), (17, 64, 16), (16, 64, 16)])
def test_hash_encode_step(G, R, D):  # G = 16: the key is row 17 of 17, one past a 16-row block
    """Decode hashing: the queries' codes returned, each new key's code in the cache at its own position and
    nothing else in the cache touched; the ref against the brute-force codes, the kernel against the ref."""
    gen = torch.Generator().manual_seed(G + R + D)
    B, Hkv, S_max = 3, 2, 7
    proj = torch.randn(Hkv, D, R, generator=gen)
    q = torch.randn(B, Hkv * G, 2 * D, generator=gen).half()[..., ::2]               # non-contiguous view
    k = torch.randn(B, Hkv, D, generator=gen).half()
    pos = torch.tensor([[6, 1], [0, 1], [3, 1]])[:, 0]                               # non-contiguous
    cache = random_codes(B, Hkv, S_max, R // 32, gen=gen)
    want = cache.clone()
    want[torch.arange(B), :, pos] = brute_hash_encode(k[:, :, None], proj)[:, :, 0]
    ref_cache = cache.clone()
    q_codes = hk.hash_encode_step_ref(q, k, proj, ref_cache, pos)
    assert torch.equal(q_codes, brute_hash_encode(q[:, :, None], proj)[:, :, 0])
    assert torch.equal(ref_cache, want)
    tri_cache = cache.to(DEV).transpose(2, 3).contiguous().transpose(2, 3)          # words strided by S_max
    tri = hk.hash_encode_step(q.to(DEV), k.to(DEV), proj.to(DEV), tri_cache, pos.to(DEV), use_triton=True)
    assert_codes_match(tri[:, :, None], q.to(DEV)[:, :, None], proj.to(DEV))
    keys = tri_cache[torch.arange(B), :, pos.to(DEV)]                                  # (B, Hkv, W)
    assert_codes_match(keys[:, :, None], k.to(DEV)[:, :, None], proj.to(DEV))
    tri_cache[torch.arange(B), :, pos.to(DEV)] = want[torch.arange(B), :, pos].to(DEV)
    assert torch.equal(tri_cache.cpu(), want)                                          # no other slot written


class Launches:
    """A Triton kernel that records its grids: kernel[grid](...) as the ops launch it."""
    def __init__(self, kernel, grids):
        self.kernel, self.grids = kernel, grids

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


@pytest.mark.parametrize("Hkv,D,dtype", [(3, 16, torch.float32), (1, 64, torch.bfloat16), (5, 32, torch.float16),
                                         (2, 24, torch.float32)])             # D = 24: the ref, on every device
def test_cache_write(Hkv, D, dtype, monkeypatch):
    """A decode step's K and V rows land at each sequence's own position of the first B sequences' caches, nothing
    else changes; the ref against a loop, the kernel against the ref (a copy: exact), launched once where it tiles D."""
    gen = torch.Generator().manual_seed(Hkv + D)
    B, S_max = 2, 9
    k = torch.randn(B, 1, Hkv, D, generator=gen).to(dtype).transpose(1, 2)[:, :, 0]  # (B, Hkv, D) strided, as in
    v = torch.randn(B, Hkv, 2 * D, generator=gen).to(dtype)[..., ::2]                # the model; a strided view
    pos = torch.tensor([[8, 0], [3, 0]])[:, 0]                                       # non-contiguous
    caches = [torch.randn(B + 1, Hkv, S_max, D, generator=gen).to(dtype) for _ in range(2)]  # one more sequence
    want = [c.clone() for c in caches]
    for b in range(B):
        want[0][b, :, pos[b]], want[1][b, :, pos[b]] = k[b], v[b]
    ref = [c.clone() for c in caches]
    hk.cache_write_ref(k, v, *ref, pos)
    assert all(torch.equal(r, w) for r, w in zip(ref, want))
    tri = [c.to(DEV) for c in caches]
    launches = []
    monkeypatch.setattr(hk, "_cache_write_kernel", Launches(hk._cache_write_kernel, launches))
    hk.cache_write(k.to(DEV), v.to(DEV), *tri, pos.to(DEV), use_triton=True)
    assert all(torch.equal(t.cpu(), w) for t, w in zip(tri, want))
    assert len(launches) == (D & (D - 1) == 0)                                # the kernel, or the ref for its D


def test_cache_write_rejects_bad_input():
    k, cache, pos = torch.zeros(2, 3, 16), torch.zeros(2, 3, 8, 16), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="caches must both be"):
        hk.cache_write(k, k, cache[:1], cache[:1], pos)                           # fewer sequences than k
    with pytest.raises(ValueError, match="share one dtype"):
        hk.cache_write(k, k.half(), cache, cache, pos)
    with pytest.raises(ValueError, match="pos must be"):
        hk.cache_write(k, k, cache, cache, pos.float())


def assert_codes_match(codes, x, proj):
    """Kernel codes equal the ref's, except that on a GPU fp32 sums in another order (or tf32x3) may flip the
    sign of a projection within rounding of zero: only there (the interpreter's are exactly equal)."""
    ref = hk.hash_encode_ref(x, proj)
    if not codes.is_cuda:
        assert torch.equal(codes, ref)
        return
    Hx, Hkv = x.shape[1], proj.shape[0]
    y = torch.einsum("bhtd,hdr->bhtr", x.double(), proj.double().repeat_interleave(Hx // Hkv, 0))
    diff = (codes ^ ref).view(*codes.shape, 1) >> torch.arange(32, device=codes.device) & 1  # (B, Hx, T, W, 32)
    assert torch.all(y.view(diff.shape).abs()[diff.bool()] < 1e-3)


@pytest.mark.parametrize("S,G,R", [(1, 1, 32), (63, 3, 128), (257, 4, 64), (40, 8, 256), (33, 5, 96), (17, 2, 160),
                                   (9, 16, 128), (1100, 4, 64)])
def test_hamming_score_triton(S, G, R):  # S = 1100: past the interpreter's one block of 1024 keys
    gen = torch.Generator().manual_seed(S + G + R)
    B, Hkv, W = 2, 2, R // 32
    q = random_codes(B, Hkv * G, W, gen=gen)
    k = random_codes(B, Hkv, S + 3, W, gen=gen)[:, :, :S]                     # cache view (capacity S + 3)
    lengths = torch.tensor([S, max(1, S // 2)])
    q, k, lengths = q.to(DEV), k.to(DEV), lengths.to(DEV)
    assert torch.equal(hk.hamming_score(q, k, lengths, use_triton=True), hk.hamming_score_ref(q, k, lengths))
    if S == 63:  # words not packed along W (a transposed buffer): the kernel reads a packed copy
        k_t = k.transpose(2, 3).contiguous().transpose(2, 3)                  # (B, Hkv, S, W), stride 1 along S
        assert torch.equal(hk.hamming_score(q, k_t, lengths, use_triton=True), hk.hamming_score_ref(q, k, lengths))
        assert as_sets(hk.hamming_topk(q, k_t, lengths, 9, 1, 2, use_triton=True)) == as_sets(
            hk.hamming_topk_ref(q, k, lengths, 9, 1, 2))


@pytest.mark.parametrize("S,budget,n_sink,n_recent,dtype", [
    (1, 4, 0, 0, torch.int32), (63, 8, 2, 3, torch.int32), (257, 40, 4, 16, torch.float32),
    (100, 300, 1, 1, torch.float16), (70, 5, 4, 4, torch.int32), (1200, 1100, 2, 8, torch.int32)])
def test_select_topk_triton(S, budget, n_sink, n_recent, dtype):  # 1100: -1s past the first 1024 slots (S // 3 = 400)
    gen = torch.Generator().manual_seed(S + budget)
    B, Hkv = 2, 2
    if dtype.is_floating_point:
        score = torch.randn(B, Hkv, S, generator=gen).round(decimals=1).to(dtype)   # negatives and ties
    else:
        score = torch.randint(0, 12, (B, Hkv, S), generator=gen, dtype=dtype)
    score, lengths = score.to(DEV), torch.tensor([S, max(1, S // 3)], device=DEV)
    ref = hk.select_topk_ref(score, lengths, budget, n_sink, n_recent)
    assert torch.equal(sorted_sets(hk.select_topk(score, lengths, budget, n_sink, n_recent, use_triton=True)),
                       sorted_sets(ref))


@pytest.mark.parametrize("B,Hkv,S,G,R,budget,n_sink,n_recent", [
    (2, 2, 1, 1, 32, 4, 0, 0), (2, 2, 63, 3, 128, 8, 2, 3), (2, 2, 257, 4, 64, 40, 4, 16),
    (2, 2, 300, 2, 32, 300, 0, 0), (2, 2, 257, 4, 32, 5, 4, 4), (1, 1, 129, 3, 64, 7, 1, 2),
    (3, 1, 65, 8, 32, 9, 0, 1), (2, 1, 1200, 2, 32, 1100, 1, 4)])
def test_hamming_topk_triton(B, Hkv, S, G, R, budget, n_sink, n_recent):  # 1100: -1s past the first 1024 slots
    gen = torch.Generator().manual_seed(S + G + budget)
    W = R // 32
    q = random_codes(B, Hkv * G, W, gen=gen)
    k = random_codes(B, Hkv, S + 5, W, gen=gen)[:, :, :S]
    k[-1, 0, :S // 2] = k[-1, 0, 0]                                           # many exact ties
    lengths = torch.tensor([S, max(1, S // 3), S - 1][:B], device=DEV)
    q, k = q.to(DEV), k.to(DEV)
    ref = hk.hamming_topk_ref(q, k, lengths, budget, n_sink, n_recent)
    tri = hk.hamming_topk(q, k, lengths, budget, n_sink, n_recent, use_triton=True)
    assert tri.shape == ref.shape and tri.dtype == torch.int32
    assert as_sets(tri) == as_sets(ref)
    assert torch.equal(hk.hamming_topk(q, k, lengths, budget, n_sink, n_recent, use_triton=False), ref)  # its arguments


def assert_topk_matches_ref(q, k, lengths, budget, n_sink, n_recent, window, hist_chunk=None):
    """The three top-k launches with a given histogram window and 16-key blocks select the ref's set."""
    idx, launches = hk._hamming_topk_launches(q, k, lengths, budget, n_sink, n_recent, window=window, block_s=16,
                                              hist_chunk=hist_chunk)
    for _, launch in launches:
        launch()
    assert as_sets(idx) == as_sets(hk.hamming_topk_ref(q, k, lengths, budget, n_sink, n_recent))


def order_thresholds(q, k, lengths, budget, n_sink, n_recent):
    """(B, Hkv): each row's t, the K_eff-th smallest order key (0 forced, 1 + (score >> shift) scored)."""
    S, G = k.shape[2], q.shape[1] // k.shape[1]
    pos, length = torch.arange(S), lengths.cpu().clamp(max=S).view(-1, 1, 1)  # (S,), (B, 1, 1)
    key = 1 + (hk.hamming_score_ref(q, k, lengths).cpu().long() >> int(G % 2 == 0))
    key = torch.where((pos < n_sink) | (pos >= length - n_recent), 0, key).masked_fill(pos >= length, 2**20)
    k_eff = length.clamp(max=budget).expand(-1, k.shape[1], 1)                 # (B, Hkv, 1)
    return key.sort(-1).values.gather(-1, k_eff - 1)[..., 0]


@pytest.mark.parametrize("window", [16, 128])
def test_hamming_topk_triton_follows_each_rows_threshold_by_its_anchor(window):
    """A row's anchor (where its window starts; -1: none, the blocks' minima) changes only the path: anchors
    with the threshold in the window, at its start, past its end (the slow path) or below it (every key in bin 1,
    the slow path) select the ref's set. Then each row's anchor puts its threshold t in the middle of its window,
    max(1, t - (window - 4) // 2), for the next step, whose query is close to this one's."""
    gen = torch.Generator().manual_seed(window)
    B, Hkv, G, W, S = 2, 2, 3, 4, 150
    q = random_codes(B, Hkv * G, W, gen=gen)
    k = random_codes(B, Hkv, S, W, gen=gen)
    k[1, 0, 60:] = k[1, 0, 5]                                                  # ties at t
    q, k, lengths = q.to(DEV), k.to(DEV), torch.tensor([S, 90], device=DEV)
    for budget, n_sink, n_recent in ((40, 2, 3), (3, 2, 3), (120, 0, 1)):  # (3: t = 0, among the forced keys)
        ref = as_sets(hk.hamming_topk_ref(q, k, lengths, budget, n_sink, n_recent))
        t = order_thresholds(q, k, lengths, budget, n_sink, n_recent)
        after = (t - (window - 4) // 2).clamp(min=1)
        for start in (-1, 1, 10**4, t, t + 1, after, (t - window + 4).clamp(min=1), (t - window + 3).clamp(min=1)):
            anchor = torch.as_tensor(start, dtype=torch.int32).expand(B, Hkv).contiguous().to(DEV)
            idx, launches = hk._hamming_topk_launches(q, k, lengths, budget, n_sink, n_recent, anchor=anchor,
                                                      window=window, block_s=16)
            for _, launch in launches:
                launch()
            assert as_sets(idx) == ref and torch.equal(anchor.cpu(), after), (budget, start)
        anchor = torch.full((B, Hkv), -1, dtype=torch.int32, device=DEV)
        assert as_sets(hk.hamming_topk(q, k, lengths, budget, n_sink, n_recent, use_triton=True, anchor=anchor)) == ref
        assert torch.equal(anchor.cpu(), (t - (hk._hamming_topk_window(G, 32 * W) - 4) // 2).clamp(min=1))


def test_an_anchor_keeps_a_wide_row_on_the_fast_path(monkeypatch):
    """What the anchor is for: a row whose threshold lies past its blocks' windows (16 bins: 12 keys above the
    row's minimum) takes the slow path, which counts the stored keys; anchored 6 keys below its threshold, the fast
    path, which reads only the windows. Seen by spoiling the stored keys between the score and threshold launches
    (every one reads as forced): only the slow path then finds another threshold, and leaves another anchor."""
    gen = torch.Generator().manual_seed(3)
    q, k = random_codes(1, 3, 4, gen=gen).to(DEV), random_codes(1, 1, 150, 4, gen=gen).to(DEV)
    lengths = torch.tensor([150], device=DEV)
    t, low = (order_thresholds(q, k, lengths, K, 0, 0) for K in (40, 1))
    assert t - low > 12  # past the blocks' windows
    ref = as_sets(hk.hamming_topk_ref(q, k, lengths, 40))
    for start, fast in ((-1, False), (t - 6, True)):
        anchor = torch.as_tensor(start, dtype=torch.int32).reshape(1, 1).to(DEV)
        made, empty = [], torch.empty
        with monkeypatch.context() as m:
            m.setattr(torch, "empty", lambda *a, **kw: made.append(empty(*a, **kw)) or made[-1])
            idx, (score, threshold, compact) = hk._hamming_topk_launches(q, k, lengths, 40, 0, 0, anchor=anchor,
                                                                         window=16, block_s=16)
        keys = next(x for x in made if x.dtype == torch.int16)                 # the order keys' scratch
        score[1]()
        kept = keys.clone()
        keys.fill_(0)
        threshold[1]()
        assert torch.equal(anchor.cpu(), t - 6) == fast, (start, anchor, t)
        keys.copy_(kept)
        compact[1]()
        assert (as_sets(idx) == ref) == fast


@pytest.mark.parametrize("window,G,W", [(4, 3, 4), (16, 3, 4), (32, 3, 4), (4, 1, 1), (4, 8, 8)])
def test_hamming_topk_triton_window_fallback(window, G, W):
    """A window too narrow for the threshold sends rows down the slow exact path (windows 4 and 16 with budget 60;
    its coarse bins are 1, 8 and 32 key values wide for these G, R), a wide one keeps them on the fast path (32):
    the same selection either way."""
    gen = torch.Generator().manual_seed(window + G)
    B, Hkv, S = 2, 2, 200
    q = random_codes(B, Hkv * G, W, gen=gen).to(DEV)
    k = random_codes(B, Hkv, S, W, gen=gen)
    k[0, 1, 40:] = k[0, 1, 0]                                                  # ties at t across many blocks
    k, lengths = k.to(DEV), torch.tensor([S, 77], device=DEV)
    for budget, n_sink, n_recent in ((60, 2, 5), (3, 0, 0)):
        assert_topk_matches_ref(q, k, lengths, budget, n_sink, n_recent, window=window)


@pytest.mark.parametrize("window", [64, 4])
def test_hamming_topk_triton_many_blocks(window):
    """Rows of more blocks than the threshold kernel reads in one chunk (64): the fast path (window 64) and the
    slow path (window 4) walk the later chunks too; the slow path also reading 4 blocks a step, as on the GPU (the
    interpreter's default is 1; 71 blocks: a partial last step). Same selection."""
    gen = torch.Generator().manual_seed(window)
    B, Hkv, G, W, S = 2, 1, 2, 2, 16 * 64 + 99                               # 71 blocks of 16 keys
    q = random_codes(B, Hkv * G, W, gen=gen)
    k = random_codes(B, Hkv, S, W, gen=gen)
    k[0, 0, 1000:] = k[0, 0, 3]                                                # ties in the second chunk
    q, k, lengths = q.to(DEV), k.to(DEV), torch.tensor([S, 1030], device=DEV)
    assert_topk_matches_ref(q, k, lengths, 70, 1, 2, window=window)
    assert_topk_matches_ref(q, k, lengths, 70, 1, 2, window=window, hist_chunk=64)


@pytest.mark.parametrize("G", [1, 2, 3])
def test_hamming_topk_triton_keys_at_the_largest_score(G):
    """Keys whose code is the complement of every query code of the group score G * R, the top of the order keys'
    range (one more than the largest key would read as past the length): selected like any other, never out of
    range. Budgets below, at and above the length; the default window and a 4-bin one (the slow path)."""
    gen = torch.Generator().manual_seed(G)
    B, Hkv, W, S = 1, 1, 1, 40
    q = random_codes(B, Hkv, W, gen=gen).repeat(1, G, 1)                       # G equal query codes
    k = (~q[:, :1, None]).repeat(1, 1, S, 1)                                   # (B, Hkv, S, W) all at distance R
    k[:, :, :10] = q[:, :1, None]                                              # ten at distance 0
    q, k, lengths = q.to(DEV), k.to(DEV), torch.tensor([33], device=DEV)
    for budget in (20, 33, 40):
        ref = hk.hamming_topk_ref(q, k, lengths, budget)
        assert as_sets(hk.hamming_topk(q, k, lengths, budget, use_triton=True)) == as_sets(ref)
        assert_topk_matches_ref(q, k, lengths, budget, 0, 0, window=4)


def test_hamming_topk_triton_outlier_blocks():
    """Keys equal to the group's best code (a sink or a repeated phrase) in a few blocks pull the row minimum far
    below the rest, beyond the window's reach (the slow path): same selection."""
    gen = torch.Generator().manual_seed(7)
    B, Hkv, G, W, S = 2, 2, 3, 4, 300
    q = random_codes(B, Hkv * G, W, gen=gen)
    k = random_codes(B, Hkv, S, W, gen=gen)
    bits = (q.view(B, Hkv, G, W, 1) >> torch.arange(32)) & 1                  # (B, Hkv, G, W, 32)
    best = ((bits.sum(2) * 2 > G).int() << torch.arange(32)).sum(-1).int()     # (B, Hkv, W) majority code
    for s in (5, 6, 70, 250):                                                  # 3 blocks of 16 keys
        k[:, :, s] = best
    k[1, 0, 100:140] = best[1, 0]                                              # ties at the minimum
    q, k, lengths = q.to(DEV), k.to(DEV), torch.tensor([S, 257], device=DEV)
    for budget, n_sink, n_recent in ((30, 0, 0), (50, 2, 3), (3, 0, 0)):
        assert_topk_matches_ref(q, k, lengths, budget, n_sink, n_recent, window=32)


@pytest.mark.parametrize("G,D,K,dtype", [(1, 16, 5, torch.float32), (3, 32, 37, torch.float16),
                                         (4, 64, 20, torch.float32), (2, 16, 600, torch.float32),
                                         (3, 16, 1100, torch.float16)])
def test_sparse_attention_triton(G, D, K, dtype):
    """K = 600, 1100: more splits than the merge reads at once (it rescales across chunks)."""
    gen = torch.Generator().manual_seed(G + D + K)
    B, Hkv, S_max = 2, 2, max(50, K)
    q = torch.randn(B, Hkv * G, D, generator=gen).to(dtype)
    k = torch.randn(B, Hkv, S_max + 7, D, generator=gen).to(dtype)[:, :, :S_max]   # cache views
    v = torch.randn(B, Hkv, S_max + 7, D, generator=gen).to(dtype)[:, :, :S_max]
    idx = torch.randint(0, S_max, (B, Hkv, K), generator=gen, dtype=torch.int32)
    idx[0, 1, K // 2:] = -1
    idx[1, 0, :] = -1                                                         # nothing selected -> zeros
    q, k, v, idx = q.to(DEV), k.to(DEV), v.to(DEV), idx.to(DEV)
    out = hk.sparse_decode_attention(q, k, v, idx, use_triton=True)
    assert out.dtype == dtype and out.shape == q.shape
    assert torch.all(out[1, :G] == 0)
    attention_tolerance(q, k, v, idx, out)


@pytest.mark.parametrize("G,K", [(2, 1), (3, 63), (1, 257), (17, 20)])  # G > 16: the dot pads to 32 rows
def test_sparse_attention_triton_strided_large_logits_and_scale(G, K):
    """The model's layouts: q a view into the fused q|k tensor (batch stride (H + Hkv) * D), idx transposed.
    Logits of a few hundred (plain randn gives a few) overflow exp unless both kernels subtract the running max;
    an explicit scale must be the one applied."""
    gen = torch.Generator().manual_seed(G + K)
    B, Hkv, D, S_max = 2, 2, 32, 300
    qk = 30 * torch.randn(B, Hkv * G + Hkv, D, generator=gen)
    k = torch.randn(B, Hkv, S_max, D, generator=gen)
    v = torch.randn(B, Hkv, S_max, D, generator=gen)
    idx = torch.randint(0, S_max, (B, K, Hkv), generator=gen, dtype=torch.int32)
    qk, k, v, idx = qk.to(DEV), k.to(DEV), v.to(DEV), idx.to(DEV)  # views taken on the device (.to copies them)
    q, idx = qk[:, :Hkv * G], idx.transpose(1, 2)                             # (B, H, D) strided, (B, Hkv, K)
    out = hk.sparse_decode_attention(q, k, v, idx, scale=0.37, use_triton=True)
    assert not q.is_contiguous() and torch.isfinite(out).all()
    ref64 = hk.sparse_decode_attention_ref(q.double(), k.double(), v.double(), idx, scale=0.37)
    torch.testing.assert_close(out.double(), ref64, atol=1e-4, rtol=0)  # fp32 in, fp32 accumulation


def test_odd_layouts_and_edges():
    """Non-contiguous lengths (the kernels read lengths[b]), lengths beyond S (the ref clamps them as the kernels
    do: no index S, the recent window at the cache's end), a non-contiguous idx, and T = 0 tokens to hash."""
    gen = torch.Generator().manual_seed(7)
    B, Hkv, G, S, W = 2, 2, 3, 20, 2
    q, k = random_codes(B, Hkv * G, W, gen=gen).to(DEV), random_codes(B, Hkv, S, W, gen=gen).to(DEV)
    lengths = torch.tensor([20, 0, 7, 0], device=DEV)[::2]                    # (B,) stride 2: [20, 7]
    dense = lengths.contiguous()
    assert torch.equal(hk.hamming_score(q, k, lengths, use_triton=True), hk.hamming_score_ref(q, k, dense))
    score = hk.hamming_score_ref(q, k, dense)
    assert as_sets(hk.select_topk(score, lengths, 5, use_triton=True)) == as_sets(hk.select_topk_ref(score, dense, 5))
    assert as_sets(hk.hamming_topk(q, k, lengths, 5, 1, 2, use_triton=True)) == as_sets(
        hk.hamming_topk_ref(q, k, dense, 5, 1, 2))
    long = torch.tensor([S + 3, 3], device=DEV)                               # longer than the cache
    assert torch.equal(hk.hamming_score(q, k, long, use_triton=True), hk.hamming_score_ref(q, k, long))  # (its
    # reads past S never reached the output; the kernel now clamps the length, which only the buffer's end could show)
    ref = hk.hamming_topk_ref(q, k, long, S + 2, 0, 2)
    assert ref.max() < S and as_sets(ref) == as_sets(hk.hamming_topk(q, k, long, S + 2, 0, 2, use_triton=True))
    best = min(range(S - 2), key=lambda s: (int(score[0, 0, s]), -s))        # smallest score, newest on ties
    assert as_sets(hk.hamming_topk_ref(q, k, long, 3, 0, 2))[0][0] == (sorted([best, S - 2, S - 1]), 0)
    qa, kv = torch.randn(B, Hkv * G, 64, device=DEV), torch.randn(B, Hkv, S, 64, device=DEV)
    idx = hk.hamming_topk_ref(q, k, dense, 4).transpose(1, 2).contiguous().transpose(1, 2)  # (B, Hkv, 4) strided
    torch.testing.assert_close(hk.sparse_decode_attention_ref(qa, kv, kv, idx),
                               hk.sparse_decode_attention_ref(qa, kv, kv, idx.contiguous()), rtol=0, atol=0)
    proj = torch.randn(Hkv, 64, 32 * W, device=DEV)
    assert hk.hash_encode(qa[:, :, None][:, :, :0], proj, use_triton=True).shape == (B, Hkv * G, 0, W)


def test_refused_inputs(monkeypatch):
    """int64 scores beyond int32 (the Triton select orders int32 keys: they would wrap; the ref's int64 keys
    overflow at 2^61 and dropped the sink below), unsigned 32-bit ones (the kernel wrapped them), and use_triton=True
    on CPU tensors outside the interpreter: one ValueError each, not a wrong answer or an error deep in Triton."""
    lengths = torch.tensor([3], device=DEV)
    big = torch.tensor([[[0, 2 ** 31, -1]]], device=DEV)                      # (1, 1, 3) int64
    huge = torch.tensor([[[0, 5, -2 ** 61, 7]]], device=DEV)
    for use_triton in (True, False):
        with pytest.raises(ValueError, match="fit in int32"):
            hk.select_topk(big, lengths, 2, use_triton=use_triton)
        with pytest.raises(ValueError, match="fit in int32"):
            hk.select_topk(huge, lengths + 1, 1, n_sink=1, use_triton=use_triton)
        for dtype in (torch.uint32, torch.bool):
            with pytest.raises(ValueError, match=f"a float or a signed integer .* got {dtype}"):
                hk.select_topk(big.clamp(min=0).to(dtype), lengths, 1, use_triton=use_triton)
    codes = torch.zeros(1, 1, 1024, dtype=torch.int32, device=DEV)           # G = 1, R = 32768: keys past int16
    with pytest.raises(ValueError, match="too large for the int16 order keys"):
        hk.hamming_topk(codes, codes[:, :, None].expand(1, 1, 4, 1024), lengths, 2, use_triton=True)
    assert as_sets(hk.select_topk_ref(big, lengths, 2)) == [[([0, 2], 0)]]
    assert as_sets(hk.select_topk(big - 2 ** 31 + 1, lengths, 2, use_triton=True)) == [[([0, 2], 0)]]
    monkeypatch.setattr(hk, "_INTERPRET", True)                              # where bf16 tl.dot is wrong
    x, idx = torch.zeros(1, 2, 4, 16, dtype=torch.bfloat16), torch.zeros(1, 2, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="interpreter computes bf16 tl.dot wrongly"):
        hk.sparse_decode_attention(x[:, :, 0], x, x, idx, use_triton=True)
    monkeypatch.setattr(hk, "_INTERPRET", False)
    codes = torch.zeros(1, 2, 1, 4, dtype=torch.int32)                       # (B, H, S, W) on the CPU
    for call in (lambda: hk.hamming_score(codes[:, :, 0], codes[:, :1], lengths[:1].cpu(), use_triton=True),
                 lambda: hk.hash_encode(torch.randn(1, 1, 1, 64), torch.randn(1, 64, 128), use_triton=True)):
        with pytest.raises(ValueError, match="use_triton=True needs CUDA tensors"):
            call()


def test_refused_past_int32_offsets(monkeypatch):
    """The score and select kernels offset rows in int32: inputs spanning 2^31 elements get one ValueError, not a
    wrapped offset. Meta tensors: the shapes without the memory (the check runs before any launch)."""
    monkeypatch.setattr(hk, "_INTERPRET", True)                               # the Triton path for any device
    B, Hkv, G, S, W = 512, 8, 4, 131072, 4                                    # Llama-3.1-8B's codes at 128K
    codes = torch.empty(B, Hkv, S, W, dtype=torch.int32, device="meta")      # 2^31 elements
    q_codes = torch.empty(B, Hkv * G, W, dtype=torch.int32, device="meta")
    lengths = torch.empty(B, dtype=torch.int64, device="meta")
    heads_outer = torch.empty(Hkv, B, S, W, dtype=torch.int32, device="meta").transpose(0, 1)  # batch stride S * W
    for call in (lambda: hk.hamming_score(q_codes, codes, lengths, use_triton=True),
                 lambda: hk.hamming_topk(q_codes, codes, lengths, 2048, use_triton=True),
                 lambda: hk.hamming_topk(q_codes, heads_outer, lengths, 2048, use_triton=True),
                 lambda: hk.select_topk(codes.view(B, Hkv, S * W), lengths, 2048, use_triton=True)):
        with pytest.raises(ValueError, match="int32 offsets"):
            call()
    hk._check_int32_span(torch.empty(2 ** 31 - 1, device="meta"), "x")       # one element fewer passes


def test_lengths_past_int32_select_the_whole_row():
    """A length beyond the row (the contract allows any) is clamped to S before it is narrowed to int32, as the
    refs do: 2^31 + 5 selects like S, not like a negative length."""
    gen = torch.Generator().manual_seed(3)
    q, k = random_codes(1, 2, 2, gen=gen).to(DEV), random_codes(1, 1, 9, 2, gen=gen).to(DEV)
    for n in (2 ** 31 + 5, 2 ** 32 + 3):
        lengths = torch.tensor([n], device=DEV)
        want = as_sets(hk.hamming_topk_ref(q, k, lengths, 4, 1, 1))
        assert as_sets(hk.hamming_topk(q, k, lengths, 4, 1, 1, use_triton=True)) == want, n
        score = hk.hamming_score_ref(q, k, lengths).float()
        assert as_sets(hk.select_topk(score, lengths, 4, 1, 1, use_triton=True)) == as_sets(
            hk.select_topk_ref(score, lengths, 4, 1, 1)), n


# ----------------------------------------------------------------------------------------------------------
# CUDA: realistic sizes (skipped without a GPU)


@needs_cuda
@pytest.mark.parametrize("R,D,dtype", [(64, 64, torch.bfloat16), (128, 128, torch.float16), (256, 128, torch.bfloat16)])
def test_cuda_hash_encode(R, D, dtype):
    gen = torch.Generator(device="cuda").manual_seed(R + D)
    Hkv, G = 8, 4
    proj = torch.randn(Hkv, D, R, device="cuda", generator=gen)
    for Hx, T in ((Hkv, 1000), (Hkv * G, 1)):
        x = torch.randn(3, Hx, T, D, device="cuda", generator=gen).to(dtype)
        assert_codes_match(hk.hash_encode(x, proj), x, proj)
    q = torch.randn(3, Hkv * G, D, device="cuda", generator=gen).to(dtype)
    k = torch.randn(3, Hkv, D, device="cuda", generator=gen).to(dtype)
    cache, pos, b = torch.zeros(3, Hkv, 4096, R // 32, dtype=torch.int32, device="cuda"), torch.tensor(
        [4095, 0, 17], device="cuda"), torch.arange(3, device="cuda")
    assert_codes_match(hk.hash_encode_step(q, k, proj, cache, pos)[:, :, None], q[:, :, None], proj)
    assert_codes_match(cache[b, :, pos][:, :, None], k[:, :, None], proj)
    cache[b, :, pos] = 0
    assert not cache.any()                                                              # nothing else written


@needs_cuda
@pytest.mark.parametrize("B,S,G,R", [(1, 131072, 4, 128), (8, 32768, 3, 64), (8, 131072, 4, 256)])
def test_cuda_hamming_score_and_topk(B, S, G, R):
    gen = torch.Generator(device="cuda").manual_seed(B + S + G + R)
    Hkv, W = 8, R // 32
    q = torch.randint(-2**31, 2**31 - 1, (B, Hkv * G, W), device="cuda", generator=gen, dtype=torch.int32)
    k = torch.randint(-2**31, 2**31 - 1, (B, Hkv, S + 64, W), device="cuda", generator=gen,
                      dtype=torch.int32)[:, :, :S]                            # cache view, capacity S + 64
    lengths = torch.randint(S // 2, S + 1, (B,), device="cuda", generator=gen)
    lengths[0] = S
    score_ref = hk.hamming_score_ref(q, k, lengths)
    assert torch.equal(hk.hamming_score(q, k, lengths), score_ref)
    for budget, n_sink, n_recent in ((S // 64, 4, 64), (2048, 0, 0), (S, 0, 0)):
        ref = hk.select_topk_ref(score_ref, lengths, budget, n_sink, n_recent)
        tri = hk.hamming_topk(q, k, lengths, budget, n_sink, n_recent)
        assert torch.equal(sorted_sets(tri), sorted_sets(ref)), (budget, n_sink, n_recent)
    tri = hk.select_topk(score_ref[:, :, :4096], lengths.clamp(max=4096), 300, 2, 8)
    assert torch.equal(sorted_sets(tri), sorted_sets(hk.select_topk_ref(score_ref[:, :, :4096], lengths.clamp(max=4096),
                                                                        300, 2, 8)))


@needs_cuda
@pytest.mark.parametrize("B,H,Hkv,D,dtype", [(1, 32, 8, 128, torch.bfloat16), (8, 9, 3, 64, torch.float16),
                                             (8, 32, 8, 128, torch.bfloat16), (2, 12, 4, 64, torch.float32)])
def test_cuda_sparse_attention(B, H, Hkv, D, dtype):
    gen = torch.Generator(device="cuda").manual_seed(B + H + D)
    S_max, K = 131072, 2048
    q = torch.randn(B, H, D, device="cuda", generator=gen).to(dtype)
    k = torch.randn(B, Hkv, S_max, D, device="cuda", generator=gen).to(dtype)
    v = torch.randn(B, Hkv, S_max, D, device="cuda", generator=gen).to(dtype)
    idx = torch.randint(0, S_max, (B, Hkv, K), device="cuda", generator=gen, dtype=torch.int32)
    idx[0, 0, K // 3:] = -1
    out = hk.sparse_decode_attention(q, k, v, idx)
    attention_tolerance(q, k, v, idx, out)


@pytest.mark.parametrize("H,Hkv,D,R,S,dtype", [(6, 2, 16, 64, 37, torch.float32), (6, 2, 16, 64, 37, torch.float16),
                                               pytest.param(32, 8, 128, 128, 5000, torch.bfloat16, marks=needs_cuda)])
def test_full_budget_is_dense(H, Hkv, D, R, S, dtype):
    """Budget >= length: the HATA step's kernels (hash, select, attend) reproduce dense attention over each
    sequence's own keys (lengths S, about S / 4 and 1)."""
    gen = torch.Generator().manual_seed(0)
    B = 3
    q = torch.randn(B, H, D, generator=gen).to(DEV, dtype)
    k = torch.randn(B, Hkv, S, D, generator=gen).to(DEV, dtype)
    v = torch.randn(B, Hkv, S, D, generator=gen).to(DEV, dtype)
    proj = torch.randn(Hkv, D, R, generator=gen).to(DEV)
    lengths = torch.tensor([S, S // 4, 1], device=DEV)
    q_codes = hk.hash_encode(q[:, :, None], proj, use_triton=True)[:, :, 0]
    idx = hk.hamming_topk(q_codes, hk.hash_encode(k, proj, use_triton=True), lengths, S, use_triton=True)
    out = hk.sparse_decode_attention(q, k, v, idx, use_triton=True)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    for b in range(B):
        n = int(lengths[b])
        qkv = (q[b:b + 1, :, None], k[b:b + 1, :, :n], v[b:b + 1, :, :n])
        dense = sdpa(*(x.double() for x in qkv), enable_gqa=True)[0, :, 0]          # (H, D) fp64
        err_torch = (sdpa(*qkv, enable_gqa=True)[0, :, 0].double() - dense).abs().max().item()  # SDPA in dtype
        assert (out[b].double() - dense).abs().max().item() <= 2 * err_torch + 1e-5


@needs_cuda
def test_cuda_caches_past_2_31_elements():
    """Llama-3.1-8B's cache at 128K with B = 17 (offload.py makes it reachable): one layer's K holds more than 2^31
    elements, so the batch offset b * stride passes int32 and must not wrap (it crashed the kernels)."""
    B, Hkv, G, D, S, R = 17, 8, 4, 128, 131072, 128
    if torch.cuda.mem_get_info()[0] < 12 * 2 ** 30:
        pytest.skip("needs ~12 GB of free GPU memory")
    gen = torch.Generator(device="cuda").manual_seed(0)
    k_cache = torch.zeros(B, Hkv, S, D, dtype=torch.bfloat16, device="cuda")  # (B, Hkv, S, D) 4.5 GB
    v_cache = torch.zeros_like(k_cache)
    ends = [slice(0, 8), slice(S - 8, S)]
    for rows in ends:
        k_cache[:, :, rows] = torch.randn(B, Hkv, 8, D, device="cuda", generator=gen).to(torch.bfloat16)
        v_cache[:, :, rows] = torch.randn(B, Hkv, 8, D, device="cuda", generator=gen).to(torch.bfloat16)
    k, v = (torch.randn(B, Hkv, D, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(2))
    pos = torch.tensor([3] * (B - 1) + [S - 2], device="cuda")
    hk.cache_write(k, v, k_cache, v_cache, pos)
    for b in (0, B - 1):
        assert torch.equal(k_cache[b, :, pos[b]], k[b]) and torch.equal(v_cache[b, :, pos[b]], v[b])
    q = torch.randn(B, Hkv * G, D, device="cuda", generator=gen).to(torch.bfloat16)
    rows = torch.tensor([1, 3, 5, S - 2, S - 5, S - 8, 0], device="cuda")
    idx = torch.where(torch.arange(7, device="cuda") < 6, rows, -1).to(torch.int32).expand(B, Hkv, 7)
    out = hk.sparse_decode_attention(q, k_cache, v_cache, idx)
    small = torch.arange(7, dtype=torch.int32, device="cuda").masked_fill(idx[0, 0] < 0, -1).expand(B, Hkv, 7)
    attention_tolerance(q, k_cache[:, :, rows], v_cache[:, :, rows], small, out)  # the same rows, gathered
    proj = torch.randn(Hkv, D, R, device="cuda", generator=gen)
    codes = hk.hash_encode(k_cache, proj)                                      # (B, Hkv, S, W): set_hata's rehash
    for rows in ends:
        assert_codes_match(codes[:, :, rows].contiguous(), k_cache[:, :, rows], proj)


# ----------------------------------------------------------------------------------------------------------
# From a mutation run of hata_kernels.py's wrappers and refs (2026-12-06)

TRITON_KERNELS = ["_hash_encode_kernel", "_hamming_score_kernel", "_select_topk_kernel", "_topk_score_kernel",
                  "_topk_threshold_kernel", "_topk_compact_kernel", "_sparse_attn_split_kernel",
                  "_sparse_attn_merge_kernel"]


def test_use_triton_true_launches_the_kernels_and_false_none(monkeypatch):
    """use_triton=True runs each op's own Triton kernels, one launch each, and use_triton=False none of them: a wrapper
    that sent both to the ref would pass every kernel-against-ref test above. None launches them for CUDA tensors
    only: on the CPU it takes the refs even where TRITON_INTERPRET=1 could run the kernels."""
    gen = torch.Generator().manual_seed(11)
    B, Hkv, G, S, D = 1, 2, 2, 20, 16
    x, proj = torch.randn(B, Hkv * G, 1, D, generator=gen).to(DEV), torch.randn(Hkv, D, 32, generator=gen).to(DEV)
    k, kv = torch.randn(B, Hkv, D, generator=gen).to(DEV), torch.randn(B, Hkv, S, D, generator=gen).to(DEV)
    cache, pos = torch.zeros(B, Hkv, S, 1, dtype=torch.int32, device=DEV), torch.tensor([3], device=DEV)
    qc, kc = random_codes(B, Hkv * G, 1, gen=gen).to(DEV), random_codes(B, Hkv, S, 1, gen=gen).to(DEV)
    lengths, idx = torch.tensor([S], device=DEV), torch.tensor([[[0, 5, -1], [2, 3, 4]]], dtype=torch.int32, device=DEV)
    score = hk.hamming_score_ref(qc, kc, lengths)
    ops = [  # (the op called with use_triton, the kernels its Triton path launches)
        (lambda t: hk.hash_encode(x, proj, use_triton=t), ["_hash_encode_kernel"]),
        (lambda t: hk.hash_encode_step(x[:, :, 0], k, proj, cache, pos, use_triton=t), ["_hash_encode_kernel"]),
        (lambda t: hk.hamming_score(qc, kc, lengths, use_triton=t), ["_hamming_score_kernel"]),
        (lambda t: hk.select_topk(score, lengths, 5, 1, 2, use_triton=t), ["_select_topk_kernel"]),
        (lambda t: hk.hamming_topk(qc, kc, lengths, 5, 1, 2, use_triton=t),
         ["_topk_score_kernel", "_topk_threshold_kernel", "_topk_compact_kernel"]),
        (lambda t: hk.sparse_decode_attention(x[:, :, 0], kv, kv, idx, use_triton=t),
         ["_sparse_attn_split_kernel", "_sparse_attn_merge_kernel"]),
    ]
    grids = {name: [] for name in TRITON_KERNELS}
    for name in TRITON_KERNELS:
        monkeypatch.setattr(hk, name, Launches(getattr(hk, name), grids[name]))
    for call, kernels in ops:
        for use_triton in (False, True, None):
            for g in grids.values():
                g.clear()
            call(use_triton)
            runs = CUDA if use_triton is None else use_triton
            assert {n: len(g) for n, g in grids.items()} == {n: int(runs and n in kernels) for n in grids}, \
                (kernels, use_triton)


def test_cpu_tensors_take_the_refs_outside_the_interpreter(monkeypatch):
    """Without TRITON_INTERPRET, CPU tensors with use_triton None or False go to the ref; only True is refused."""
    monkeypatch.setattr(hk, "_INTERPRET", False)
    score, lengths = torch.tensor([[[3, 1, 2, 0]]]), torch.tensor([3])
    for use_triton in (None, False):
        assert hk.select_topk(score, lengths, 2, use_triton=use_triton).tolist() == [[[1, 2]]]
    with pytest.raises(ValueError, match="use_triton=True needs CUDA tensors"):
        hk.select_topk(score, lengths, 2, use_triton=True)


def test_score_and_topk_kernels_read_strided_codes_as_the_refs():
    """Codes that are views, not packed buffers: q_codes a slice of wider rows (the kernels index (B, H, W) packed
    words, so they need a copy) and k_codes every other position of a buffer (words packed, rows 2W apart: not the
    (S, W) rows the kernels read in place). Scores and selections equal the refs' of packed copies."""
    gen = torch.Generator().manual_seed(12)
    B, Hkv, G, S, W = 2, 2, 3, 37, 2
    q = random_codes(B, Hkv * G, 2 * W, gen=gen).to(DEV)[:, :, :W]             # (B, H, W) row stride 2W
    k = random_codes(B, Hkv, 2 * S, W, gen=gen).to(DEV)[:, :, ::2]             # (B, Hkv, S, W) position stride 2W
    lengths = torch.tensor([S, 20], device=DEV)
    packed = q.contiguous(), k.contiguous()
    assert torch.equal(hk.hamming_score(q, k, lengths, use_triton=True), hk.hamming_score_ref(*packed, lengths))
    assert as_sets(hk.hamming_topk(q, k, lengths, 9, 1, 2, use_triton=True)) == as_sets(
        hk.hamming_topk_ref(*packed, lengths, 9, 1, 2))


def test_triton_paths_refuse_a_head_dim_they_cannot_tile():
    """use_triton=True with D = 24 (not a power of two: tl.arange) or 8 (below tl.dot's 16) raises one ValueError that
    names the op and D, for both hashing ops and the attention, before any launch."""
    for D in (24, 8):
        x, proj = torch.randn(1, 2, 1, D, device=DEV), torch.randn(2, D, 32, device=DEV)
        cache, pos = torch.zeros(1, 2, 4, 1, dtype=torch.int32, device=DEV), torch.tensor([0], device=DEV)
        kv, idx = torch.randn(1, 2, 4, D, device=DEV), torch.zeros(1, 2, 3, dtype=torch.int32, device=DEV)
        for op, call in (
                ("hash_encode", lambda: hk.hash_encode(x, proj, use_triton=True)),
                ("hash_encode_step", lambda: hk.hash_encode_step(x[:, :, 0], x[:, :, 0], proj, cache, pos,
                                                                 use_triton=True)),
                ("sparse_decode_attention", lambda: hk.sparse_decode_attention(x[:, :, 0], kv, kv, idx,
                                                                               use_triton=True))):
            with pytest.raises(ValueError, match=re.escape(f"{op}: Triton path needs D a power of two >= 16, got {D}")):
                call()


def test_sparse_attention_takes_float64_through_the_ref_only():
    """float64 q, k, v pass the wrapper's checks and take the ref (the brute-force answer, fp64 accumulation);
    use_triton=True refuses them with the dtype named."""
    gen = torch.Generator().manual_seed(13)
    B, Hkv, G, S, D = 1, 2, 3, 9, 16
    q = torch.randn(B, Hkv * G, D, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(B, Hkv, S, D, generator=gen, dtype=torch.float64) for _ in range(2))
    idx = torch.tensor([[[0, 4, 8, -1], [7, -1, 1, 2]]], dtype=torch.int32)
    out = hk.sparse_decode_attention(q, k, v, idx, use_triton=False)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, brute_attention(q, k, v, idx, 1 / math.sqrt(D)), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="Triton path takes fp32/bf16/fp16, got float64"):
        hk.sparse_decode_attention(q.to(DEV), k.to(DEV), v.to(DEV), idx.to(DEV), use_triton=True)


def test_bad_input_of_key_dtype_recent_window_and_sink_count():
    """Keys hashed in another dtype than the queries, a negative recent window, a sink count that is not an int:
    each refused with its own words, by every op that takes them."""
    q, proj = torch.zeros(1, 2, 16, dtype=torch.float16), torch.zeros(1, 16, 32)
    cache, pos = torch.zeros(1, 1, 4, 1, dtype=torch.int32), torch.tensor([0])
    with pytest.raises(ValueError, match=re.escape("k must be (B, Hkv, D) = (1, 1, 16) torch.float16 like q, got "
                                                   "torch.float32")):
        hk.hash_encode_step(q, torch.zeros(1, 1, 16), proj, cache, pos)
    codes, L = torch.zeros(1, 2, 1, dtype=torch.int32), torch.tensor([4])
    k_codes = torch.zeros(1, 1, 4, 1, dtype=torch.int32)
    for select in (lambda **kw: hk.select_topk(torch.zeros(1, 1, 4), L, 2, **kw),
                   lambda **kw: hk.hamming_topk(codes, k_codes, L, 2, **kw)):
        with pytest.raises(ValueError, match="n_recent must be an int >= 0, got -1"):
            select(n_recent=-1)
        for n_sink in (2.0, True):
            with pytest.raises(ValueError, match=f"n_sink must be an int >= 0, got {n_sink}"):
                select(n_sink=n_sink)


# From a mutation run of hata_kernels.py's wrappers (2026-12-07)

def test_sparse_attention_scale_zero_is_a_plain_mean():
    """scale=0.0 is a scale (every selected key weighs the same: the mean of the selected values), not "the default
    1/sqrt(D)"."""
    gen = torch.Generator().manual_seed(43)
    B, Hkv, G, S, D = 1, 2, 2, 9, 16
    q = 10 * torch.randn(B, Hkv * G, D, generator=gen)
    k, v = (torch.randn(B, Hkv, S, D, generator=gen) for _ in range(2))
    idx = torch.tensor([[[0, 4, 8, -1], [7, -1, 1, 2]]], dtype=torch.int32)
    want = torch.stack([v[0, 0, [0, 4, 8]].mean(0), v[0, 1, [7, 1, 2]].mean(0)]).repeat_interleave(G, 0)[None]
    for use_triton in (False, True):
        out = hk.sparse_decode_attention(q.to(DEV), k.to(DEV), v.to(DEV), idx.to(DEV), scale=0.0, use_triton=use_triton)
        torch.testing.assert_close(out.cpu(), want, atol=1e-5, rtol=0)  # fp32 in, fp32 accumulation


def test_hamming_topk_takes_a_hist_chunk_of_one_block():
    """hist_chunk may equal block_s (the slow path reads one block a step: the interpreter's default), not only a
    larger power of two; the selection is the ref's (window 4: the slow path)."""
    gen = torch.Generator().manual_seed(44)
    q, k = random_codes(1, 3, 2, gen=gen).to(DEV), random_codes(1, 1, 40, 2, gen=gen).to(DEV)
    lengths = torch.tensor([37], device=DEV)
    idx = hk._launch(*hk._hamming_topk_launches(q, k, lengths, 9, 1, 2, window=4, block_s=16, hist_chunk=16))
    assert as_sets(idx) == as_sets(hk.hamming_topk_ref(q, k, lengths, 9, 1, 2))


# ----------------------------------------------------------------------------------------------------------
# From a mutation run of hata_kernels.py's Triton kernel bodies (2026-12-06): each test below fails on a kernel
# mutant that every test above let through


def codes_at_distances(scores):
    """A list of S scores in [0, 32] -> the all-zero query code (1, 1, 1) and (1, 1, S, 1) int32 key codes at exactly
    those Hamming distances from it (G = 1, W = 1: key code s has its lowest scores[s] bits set), on DEV."""
    k = torch.tensor([to_int32((1 << p) - 1) for p in scores], dtype=torch.int32).view(1, 1, -1, 1)
    return torch.zeros(1, 1, 1, dtype=torch.int32).to(DEV), k.to(DEV)


def test_select_topk_triton_selects_nan_scores_when_the_budget_needs_them():
    """A budget beyond the non-NaN scores takes NaNs too (they rank last, newest first): the bisection's threshold is
    then the NaN key, int32's maximum, which an upper bound of 2^31 - 1 could never reach (too few selected)."""
    nan = math.nan
    score = torch.tensor([[[nan, 1.0, nan, 2.0, nan, nan, 0.5]]])
    lengths = torch.tensor([7])
    for budget, n_sink in ((5, 0), (7, 0), (4, 1)):
        ref = hk.select_topk_ref(score, lengths, budget, n_sink)
        tri = hk.select_topk(score.to(DEV), lengths.to(DEV), budget, n_sink, use_triton=True)
        assert as_sets(tri) == as_sets(ref), (budget, n_sink)
    assert as_sets(hk.select_topk_ref(score, lengths, 5)) == [[([1, 3, 4, 5, 6], 0)]]     # the two newest NaNs


def test_hamming_topk_triton_forced_rank_before_score_zero():
    """Keys equal to the query code score 0; the sinks and the recent window still rank before them (order key 0
    is theirs alone, scored keys start at 1), and forced positions beyond the budget keep the newest forced ones,
    not the newest score-0 keys."""
    scores = [0] * 10 + [5, 7, 3, 9, 4, 6, 8, 2, 7, 5]                         # S = 20; positions 0..9 score 0
    q, k = codes_at_distances(scores)
    lengths = torch.tensor([20], device=DEV)
    for budget, n_sink, n_recent in ((3, 2, 2), (5, 2, 2), (6, 3, 1), (12, 0, 3)):
        ref = hk.hamming_topk_ref(q, k, lengths, budget, n_sink, n_recent)
        assert as_sets(hk.hamming_topk(q, k, lengths, budget, n_sink, n_recent, use_triton=True)) == as_sets(ref)
        assert_topk_matches_ref(q, k, lengths, budget, n_sink, n_recent, window=4)
    assert as_sets(hk.hamming_topk_ref(q, k, lengths, 3, 2, 2)) == [[([1, 18, 19], 0)]]


@pytest.mark.parametrize("scores,budget", [([3, 4] + [9] * 14, 3), ([3, 4, 4] + [9] * 13, 4), ([3] + [4] * 15, 2)])
def test_hamming_topk_triton_window_edge(scores, budget):
    """A 4-bin window holds forced, key m_b, key m_b + 1 and everything above: the threshold just past the last exact
    bin (slow path) or in it (fast path), with the keys above the window in the same block."""
    q, k = codes_at_distances(scores)
    assert_topk_matches_ref(q, k, torch.tensor([16], device=DEV), budget, 0, 0, window=4)


def test_hamming_topk_triton_row_minimum_in_a_later_chunk():
    """Rows of more than 64 blocks: the smallest scores lie only in blocks of the second chunk, which the threshold
    kernel reads after the first; the row minimum must come from every chunk, or the windows miss those keys."""
    gen = torch.Generator().manual_seed(21)
    S = 16 * 70 + 5                                                            # 71 blocks of 16 keys
    scores = (10 + torch.randint(0, 5, (S,), generator=gen)).tolist()
    for s in (16 * 66 + 3, 16 * 66 + 9, 16 * 68 + 1):
        scores[s] = 2
    q, k = codes_at_distances(scores)
    for budget in (2, 3, 40):
        assert_topk_matches_ref(q, k, torch.tensor([S], device=DEV), budget, 1, 1, window=32)


def test_sparse_attention_triton_separate_layouts_and_unwritten_rows():
    """K and V caches in different layouts (every stride differs, D strided in both), and NaN in rows nothing selects
    (an unwritten torch.empty cache; -1 slots must not read them into the sum): the ref's answer."""
    gen = torch.Generator().manual_seed(31)
    B, Hkv, G, D, S = 2, 2, 3, 16, 40
    q = torch.randn(B, Hkv * G, D, generator=gen).to(DEV)
    k = torch.randn(B, Hkv, S, 2 * D, generator=gen).to(DEV)[..., ::2]             # strides (., ., 2D, 2)
    v = torch.randn(S, B, 3 * D, Hkv, generator=gen).to(DEV).permute(1, 3, 0, 2)[..., ::3]  # (B, Hkv, S, D) permuted
    idx = torch.randint(1, S, (B, Hkv, 37), generator=gen, dtype=torch.int32)
    idx[0, 0, 5:] = -1
    idx[1, 1, ::2] = -1
    k[:, :, 0], v[:, :, 0] = math.nan, math.nan                                 # row 0: never selected
    idx = idx.to(DEV)
    out = hk.sparse_decode_attention(q, k, v, idx, use_triton=True)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, hk.sparse_decode_attention_ref(q, k.contiguous(), v.contiguous(), idx),
                               atol=1e-5, rtol=0)                               # fp32 in, fp32 accumulation


def test_sparse_attention_triton_keeps_heads_apart():
    """A selected V row holding inf makes its own KV head's output non-finite and no other's: the merge reads a
    power-of-two chunk of splits (4 for 3 here), and the slots past the last split, the next head's, must stay out
    of the sum (a zero weight times inf is NaN)."""
    gen = torch.Generator().manual_seed(34)
    B, Hkv, G, D, S, K = 2, 2, 2, 16, 60, 37                                   # 3 splits of 16 rows
    q = torch.randn(B, Hkv * G, D, generator=gen).to(DEV)
    k, v = (torch.randn(B, Hkv, S, D, generator=gen).to(DEV) for _ in range(2))
    idx = torch.randint(0, S, (B, Hkv, K), generator=gen, dtype=torch.int32).to(DEV)
    for b, h in ((0, 1), (1, 0)):
        v[b, h, idx[b, h, 0]] = math.inf
    out = hk.sparse_decode_attention(q, k, v, idx, use_triton=True)
    ref = hk.sparse_decode_attention_ref(q, k, v, idx)
    for b, h in ((0, 0), (1, 1)):                                              # the heads without inf
        heads = slice(h * G, (h + 1) * G)
        assert torch.isfinite(out[b, heads]).all()
        torch.testing.assert_close(out[b, heads], ref[b, heads], atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's NumPy on NaN and inf: expected here
def test_sparse_attention_non_finite_scores_as_the_ref():
    """Kernel and ref on non-finite scores (3 splits of 16 rows): a head whose selected keys all score -inf gets 0
    (as one that selects nothing), -inf keys in only some splits get weight 0, and a NaN key makes its head NaN."""
    gen = torch.Generator().manual_seed(35)
    B, Hkv, G, D, S, K = 1, 3, 2, 16, 60, 37
    q = torch.rand(B, Hkv * G, D, generator=gen).to(DEV) + 0.5                 # positive: -inf keys score -inf
    k, v = (torch.randn(B, Hkv, S, D, generator=gen).to(DEV) for _ in range(2))
    idx = torch.stack([torch.randperm(S, generator=gen)[:K] for _ in range(Hkv)]).view(B, Hkv, K).int().to(DEV)
    k[0, 0, idx[0, 0].long(), 0] = -math.inf                                   # head 0: every selected key
    k[0, 1, idx[0, 1, :20].long(), 0] = -math.inf                              # head 1: splits 0 and part of 1
    k[0, 2, idx[0, 2, 30].long(), 1] = math.nan                                # head 2: one key
    out = hk.sparse_decode_attention(q, k, v, idx, use_triton=True)
    ref = hk.sparse_decode_attention_ref(q, k, v, idx)
    assert torch.all(ref[0, :G] == 0) and torch.isfinite(ref[0, G:2 * G]).all() and ref[0, 2 * G:].isnan().all()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0, equal_nan=True)


def test_sparse_attention_triton_merge_after_an_empty_chunk():
    """More splits than the merge reads at once (32 of 16 rows), with every slot of the middle chunk unused: the
    running max must survive a chunk that adds nothing (the third chunk rescales what the first summed)."""
    gen = torch.Generator().manual_seed(32)
    B, Hkv, D, S, K = 1, 1, 16, 1100, 1100
    q = torch.randn(B, Hkv, D, generator=gen).to(DEV)
    k, v = (torch.randn(B, Hkv, S, D, generator=gen).to(DEV) for _ in range(2))
    idx = torch.randperm(S, generator=gen)[:K].int().view(B, Hkv, K)
    idx[..., 512:1024] = -1                                                     # splits 32..63: the second chunk
    idx = idx.to(DEV)
    out = hk.sparse_decode_attention(q, k, v, idx, use_triton=True)
    torch.testing.assert_close(out, hk.sparse_decode_attention_ref(q, k, v, idx), atol=1e-5, rtol=0)


def test_hash_encode_step_and_cache_write_read_strided_inputs():
    """The model's new keys are views k[:, :, 0] of a wider tensor: k strided along D for the hashing step and for
    cache_write, whose K and V caches also differ in layout. Results equal the refs' on contiguous copies."""
    gen = torch.Generator().manual_seed(33)
    B, Hkv, G, D, R, S_max = 2, 2, 2, 16, 64, 6
    proj = torch.randn(Hkv, D, R, generator=gen).to(DEV)
    q = torch.randn(B, Hkv * G, D, generator=gen).to(DEV)
    k = torch.randn(B, Hkv, 3 * D, generator=gen).to(DEV)[..., ::3]               # D stride 3
    pos = torch.tensor([5, 2], device=DEV)
    cache = random_codes(B, Hkv, S_max, R // 32, gen=gen).to(DEV)
    want = cache.clone()
    q_ref = hk.hash_encode_step_ref(q, k.contiguous(), proj, want, pos)
    assert torch.equal(hk.hash_encode_step(q, k, proj, cache, pos, use_triton=True), q_ref)
    assert torch.equal(cache, want)
    v = torch.randn(B, Hkv, 2 * D, generator=gen).to(DEV)[..., ::2]
    k_cache = torch.randn(B, Hkv, S_max, D, generator=gen).to(DEV)
    v_cache = torch.randn(S_max, Hkv, B, D, generator=gen).to(DEV).permute(2, 1, 0, 3)  # other strides than k_cache
    ref = [k_cache.clone(), v_cache.clone()]
    hk.cache_write_ref(k.contiguous(), v.contiguous(), *ref, pos)
    hk.cache_write(k, v, k_cache, v_cache, pos, use_triton=True)
    assert torch.equal(k_cache, ref[0]) and torch.equal(v_cache, ref[1])
