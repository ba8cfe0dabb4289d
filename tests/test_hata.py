"""HATA inside the model (reference path on the CPU): with K >= S it is dense attention; selection is per sequence;
the oracle selector keeps the model's tokens; hash projections save, load and refuse what does not fit; the caches'
sizes, policy switches, half precision and head grouping that a mutation run of model.py found untested."""
import json
import math
import os
import re
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

import hata_kernels as hk
import model as model_module
from engine import decode_one_token, generate, prefill
from model import (PRESETS, QUEST_PAGE, HataArgs, ModelArgs, Transformer, causal_attention, from_state_dict,
                   load_hash_projections, random_hash_projections, save_hash_projections)
from train_hash import load_corpus
from tests.test_kernels import DEV, as_sets, assert_topk_matches_ref
from tests.helpers import GOLDEN, count_sparse_steps, random_ids, tiny_model, unreadable


def prompt(n):
    return load_file(GOLDEN)["ids_b"][:n].tolist()


def decode_logits(model, ids, steps, capacity=96):
    """Prefill ids, then teacher-force `steps` more tokens of the dense model's own greedy output; returns the
    logits of every decode step (steps, V) and the greedy tokens."""
    model.setup_caches(1, capacity)
    with torch.inference_mode():
        new, _ = generate(model, [ids], max_new_tokens=steps + 1)
        model.setup_caches(1, capacity)
        model(torch.tensor([ids]))
        logits = [model(torch.tensor([[t]]), torch.tensor([len(ids) + i]))[0, -1] for i, t in enumerate(new[0][:steps])]
    return torch.stack(logits), new[0]


def test_the_kernels_select_the_refs_sets_from_real_trained_codes(smol_weights, tok, monkeypatch):
    """The default model's shipped projections on 400 tokens of the Bible: trained codes spread wider than the
    random ones of tests/test_kernels.py (a row's K-th score may lie far from its minimum), and in every sparse layer
    the Triton score + select kernels (the interpreter on the CPU) pick the ref's sets, on the fast path and the
    slow one."""
    args, sd = smol_weights
    ids = tok.encode(load_corpus()[0][1])[:400]
    calls, ref = [], model_module.hamming_topk
    monkeypatch.setattr(model_module, "hamming_topk", lambda *a, **k: calls.append(a) or ref(*a, **k))
    shipped = os.path.join(os.path.dirname(model_module.__file__), "weights", "smollm2-135m-r128.safetensors")
    model = from_state_dict(args, sd, HataArgs(budget=64, n_sink=4, n_recent=16, hash_weights=shipped))
    model.setup_caches(1, len(ids))
    with torch.inference_mode():
        model(torch.tensor([ids[:-1]]))
        model(torch.tensor([ids[-1:]]), torch.tensor([len(ids) - 1]))  # one decode step: a selection per layer
    assert len(calls) == args.n_layers - HataArgs.n_dense
    for layer, (q_codes, k_codes, lengths, K, n_sink, n_recent) in enumerate(calls):
        q_codes, k_codes, lengths = q_codes.to(DEV), k_codes.to(DEV), lengths.to(DEV)
        want = hk.hamming_topk_ref(q_codes, k_codes, lengths, K, n_sink, n_recent)
        got = hk.hamming_topk(q_codes, k_codes, lengths, K, n_sink, n_recent, use_triton=True)
        assert as_sets(got) == as_sets(want)
        if layer % 7 == 0:  # and down the threshold kernel's slow path (a window of 4 bins), in blocks of 16 keys
            assert_topk_matches_ref(q_codes, k_codes, lengths, K, n_sink, n_recent, window=4)


def test_budget_at_least_capacity_is_dense(smol_weights):
    """K >= the cache capacity (the engine's case when the budget covers prompt + new tokens): dense exactly."""
    args, sd = smol_weights
    ids = prompt(20)
    dense_logits, dense_tokens = decode_logits(from_state_dict(args, sd), ids, 32)
    hata_logits, hata_tokens = decode_logits(from_state_dict(args, sd, HataArgs(budget=2048)), ids, 32)
    assert hata_tokens == dense_tokens
    assert torch.equal(hata_logits, dense_logits)  # the same code path: bit for bit


@pytest.mark.parametrize("use_norm", [False, True])
def test_a_cpu_step_whose_budget_covers_its_keys_is_dense(smol_weights, use_norm, monkeypatch):
    """K >= S but K < S_max: a CPU step attends densely, as selecting every key would (gathering K rows would cost
    more than the step's S keys), so no step runs the sparse path and the logits are dense's; the hash codes are
    still written for the steps that K no longer covers. (On CUDA, with static shapes, the step runs the sparse
    path and selects everything: the same logits up to rounding order.)"""
    args, sd = smol_weights
    ids = prompt(20)
    dense_logits, dense_tokens = decode_logits(from_state_dict(args, sd), ids, 32)
    monkeypatch.setattr(model_module.Attention, "sparse_decode", lambda *a: pytest.fail("a sparse step"))
    hata = HataArgs(budget=64, use_norm=use_norm)  # K = 64 >= S (at most 20 + 33), capacity 96
    model = from_state_dict(args, sd, hata)
    hata_logits, hata_tokens = decode_logits(model, ids, 32)
    assert hata_tokens == dense_tokens and torch.equal(hata_logits, dense_logits)  # dense's path: bit for bit
    attn = model.layers[2].attention  # the codes of every cached key, the decoded ones too
    torch.testing.assert_close(attn.hash_cache.codes[:, :, :52], hk.hash_encode_ref(attn.kv_cache.k[:, :, :52],
                                                                                       attn.hash_proj), rtol=0, atol=0)


def test_a_step_over_one_key_more_than_the_budget_is_sparse(monkeypatch):
    """K = S - 1, the first step that drops a key: every sparse layer selects (its K indices all used), where the
    step before, with K = S, attends densely (as the test above)."""
    model = Transformer(PRESETS["tiny"], HataArgs(budget=6, n_dense=1)).eval()
    model.setup_caches(1, 16)
    picked = []
    monkeypatch.setattr(model_module, "sparse_decode_attention",
                        lambda q, k, v, idx: picked.append(idx) or hk.sparse_decode_attention(q, k, v, idx))
    with torch.inference_mode():
        prefill(model, torch.tensor([[3, 4, 5, 6, 7]]), torch.tensor([5]))  # positions 0-4
        decode_one_token(model, torch.tensor([8]), torch.tensor([5]))  # 6 keys, K = 6: dense
        assert not picked
        decode_one_token(model, torch.tensor([9]), torch.tensor([6]))  # 7 keys, K = 6
    assert len(picked) == PRESETS["tiny"].n_layers - 1 and all((idx >= 0).sum() == 2 * 6 for idx in picked)


@pytest.mark.parametrize("use_norm, chunk, windows", [(False, 4096, (1, 2)), (True, 4096, (1, 2)), (False, 4, (1, 2)),
                                                      (True, 5, (1, 2)), (True, 4096, (0, 0))])
def test_sparse_layers_select_what_the_algorithm_says(monkeypatch, use_norm, chunk, windows):
    """Every decode step of every sparse layer against HATA written out from the refs: the layer's
    projection hashes the queries and every cached key, the score is the Hamming distance summed over the G query
    heads of a KV head (use_norm: -(G - 2 ham / R) * ||k||), and the top K, with the sinks and the recent window,
    are what the layer attends to, with each head's own query; per sequence, with the keys of decoded tokens too, after
    a prefill in one chunk or several (each chunk's codes at its own positions); without the windows, the newest key
    is scored too."""
    args = PRESETS["tiny"]
    hata = HataArgs(budget=5, n_sink=windows[0], n_recent=windows[1], n_dense=1, use_norm=use_norm)
    torch.manual_seed(0)
    model = Transformer(args, hata).eval()
    for layer in model.layers:
        layer.attention.keep_qk = True  # its post-RoPE (q, k): the queries the attention must be given, head by head
    seen = []  # (q, keys, values, idx) of each sparse layer's attention, in layer order
    real = model_module.sparse_decode_attention
    monkeypatch.setattr(model_module, "sparse_decode_attention", lambda *a: seen.append(a) or real(*a))
    lengths = torch.tensor([11, 17])
    model.setup_caches(2, 32)
    G, R = args.n_heads // args.n_kv_heads, hata.rbit
    with torch.inference_mode():
        prefill(model, torch.randint(0, args.vocab_size, (2, 17)), lengths, chunk)
        for step in range(4):
            seen.clear()
            decode_one_token(model, torch.randint(0, args.vocab_size, (2,)), lengths + step)
            attns = [layer.attention for layer in model.layers[hata.n_dense:]]
            assert len(seen) == len(attns) == args.n_layers - hata.n_dense
            n = lengths + step + 1  # valid positions after this step
            for attn, (q, keys, values, idx) in zip(attns, seen):
                assert torch.equal(q, attn.qk[0][:, :, 0])  # (B, H, D)
                codes = hk.hash_encode_ref(keys, attn.hash_proj)  # (B, Hkv, S_max, W)
                for b in range(2):  # the code (and norm) cache holds every valid key's
                    assert torch.equal(attn.hash_cache.codes[b, :, :n[b]], codes[b, :, :n[b]])
                    if use_norm:
                        torch.testing.assert_close(attn.hash_cache.norms[b, :, :n[b]], keys[b, :, :n[b]].norm(dim=-1))
                ham = hk.hamming_score_ref(hk.hash_encode_ref(q[:, :, None], attn.hash_proj)[:, :, 0], codes, n)
                score = -(G - 2 * ham / R) * keys.norm(dim=-1) if use_norm else ham  # (B, Hkv, S_max)
                assert as_sets(idx) == as_sets(hk.select_topk_ref(score, n, 5, *windows))


def test_oracle_at_half_budget_keeps_greedy_tokens(smol_weights, monkeypatch):
    args, sd = smol_weights
    ids = prompt(32)
    model = from_state_dict(args, sd)
    model.setup_caches(1, 48)
    sparse_steps = count_sparse_steps(monkeypatch)
    with torch.inference_mode():
        dense, _ = generate(model, [ids], max_new_tokens=16)
        assert not sparse_steps
        oracle = from_state_dict(args, sd, HataArgs(budget=16, selector="oracle"))  # S/2 of the prompt
        oracle.setup_caches(1, 48)
        sparse, _ = generate(oracle, [ids], max_new_tokens=16)
    assert len(sparse_steps) == 15 * (args.n_layers - HataArgs.n_dense)  # every decode step of every sparse layer
    assert sparse == dense


def test_sparse_decode_really_selects(smol_weights):
    """A budget of 2 tokens must change the logits (the selection is not silently dense)."""
    args, sd = smol_weights
    ids = prompt(30)
    dense_logits, _ = decode_logits(from_state_dict(args, sd), ids, 3)
    tiny_logits, _ = decode_logits(from_state_dict(args, sd, HataArgs(budget=2)), ids, 3)
    assert (tiny_logits - dense_logits).abs().max() > 0.1


@pytest.mark.parametrize("selector", ["hash", "oracle", "quest"])
def test_batch_selects_per_sequence(smol_weights, selector, monkeypatch):
    """Prompts of different lengths in one batch, budget smaller than every context: each sequence gets the
    tokens it gets alone, so no sequence selects another's or a padded position. Every decode step of every sparse
    layer does select (a selector that fell back to dense attention would agree with itself too)."""
    args, sd = smol_weights
    model = from_state_dict(args, sd, HataArgs(budget=6, n_sink=1, n_recent=2, selector=selector))
    prompts = [prompt(9), prompt(31)[5:], prompt(17)[3:]]
    sparse_steps = count_sparse_steps(monkeypatch)
    with torch.inference_mode():
        alone = []
        for p in prompts:
            model.setup_caches(1, 48)
            alone.append(generate(model, [p], max_new_tokens=10)[0][0])
        model.setup_caches(3, 48)
        batch, _ = generate(model, prompts, max_new_tokens=10)
    assert len(sparse_steps) == 4 * 9 * (args.n_layers - HataArgs.n_dense)  # 4 runs of 9 decode steps
    assert batch == alone


def test_set_hata_after_a_dense_prefill(smol_weights):
    """One dense prefill, then switching to HATA rebuilds the hash caches from the cached keys: the tokens equal
    those of a model that was HATA from the start (eval.py relies on this to share prefills)."""
    args, sd = smol_weights
    hata = HataArgs(budget=8, n_recent=2, use_norm=True)
    ids = prompt(40)
    direct = from_state_dict(args, sd, hata)
    direct.setup_caches(1, 56)
    switched = from_state_dict(args, sd)
    switched.setup_caches(1, 56)
    with torch.inference_mode():
        want, _ = generate(direct, [ids], max_new_tokens=12)
        first = switched(torch.tensor([ids]))[0, -1].argmax()
        switched.set_hata(hata)
        got = [int(first)]
        for i in range(11):
            got.append(int(switched(torch.tensor([[got[-1]]]), torch.tensor([len(ids) + i]))[0, -1].argmax()))
    assert got == want[0]


def decode_tiny(model, steps=4):
    """Prefill two random prompts (11 and 17 tokens) in a 32-token cache, then greedy decode steps: (steps + 1,
    B, V) logits."""
    model.setup_caches(2, 32)
    tokens, lengths = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(1)), torch.tensor([11, 17])
    with torch.inference_mode():
        logits = [prefill(model, tokens, lengths, chunk=8)]  # a chunk after the first hashes into the cache too
        for step in range(steps):
            logits.append(decode_one_token(model, logits[-1].argmax(-1), lengths + step))
    return torch.stack(logits)


@pytest.mark.parametrize("selector, budget, hashed", [("oracle", 5, False), ("quest", 5, False), ("hash", 32, False),
                                                      ("hash", 0.99, False), ("hash", 31, True), ("hash", 0.5, True)])
def test_codes_only_where_the_hash_selector_reads_them(monkeypatch, capsys, selector, budget, hashed):
    """set_hata gives projections and hash caches to the sparse layers of the hash selector with K below the
    cache's 32 tokens (0.99 of it is 32), and to no other: nothing else is hashed and no random-projection warning
    is printed. The logits are those of the old way, which hashed every sparse layer's keys and queries anyway."""
    torch.manual_seed(0)
    model = Transformer(PRESETS["tiny"], HataArgs(budget=budget, n_dense=1, selector=selector)).eval()
    calls = []
    for name in ("hash_encode", "hash_encode_step"):
        real = getattr(model_module, name)
        monkeypatch.setattr(model_module, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    logits = decode_tiny(model)
    attns = [layer.attention for layer in model.layers]
    want = [False] + [hashed] * 3  # layer 0 is dense
    assert [a.hash_cache is not None for a in attns] == [a.hash_proj is not None for a in attns] == want
    assert sorted(set(calls)) == (["hash_encode", "hash_encode_step"] if hashed else [])
    err = capsys.readouterr().err
    if hashed:  # one line, naming where trained projections come from; once a model, however many policies follow
        assert err.count("\n") == 1 and "seeded random projections" in err and "train_hash.py makes those" in err
        model.set_hata(HataArgs(budget=16, n_dense=1, selector=selector))
        assert model.layers[1].attention.hash_proj is not None and capsys.readouterr().err == ""
    else:
        assert err == ""
        monkeypatch.setattr(HataArgs, "reads_codes", lambda self, capacity: capacity > 0)  # as before: codes everywhere
        old = decode_tiny(model)
        assert calls and model.layers[1].attention.hash_cache is not None
        assert torch.equal(logits, old)


def test_a_hash_weights_file_is_checked_whatever_the_budget(tmp_path):
    """A K that covers the cache reads no codes, yet the hash selector's file is still checked before any work (a
    short engine.py run with a wrong --hash-weights fails); the oracle's is not read (engine.py: 'ignored')."""
    args, path = PRESETS["tiny"], str(tmp_path / "p.safetensors")
    save_hash_projections(path, {i: torch.randn(2, 16, 64) for i in (1, 2, 3)}, args, HataArgs(rbit=64, n_dense=1))
    for budget in (8, 64):
        model = Transformer(args, HataArgs(budget=budget, n_dense=1, hash_weights=path))  # rbit 128, not the file's
        with pytest.raises(ValueError, match="pass --rbit 64"):
            model.setup_caches(1, 64)
    model = Transformer(args, HataArgs(budget=8, n_dense=1, selector="oracle", hash_weights=path))
    model.setup_caches(1, 64)
    assert all(layer.attention.hash_proj is None for layer in model.layers)


def test_a_hash_weights_file_is_refused_for_another_models_weights(tmp_path):
    """A file records the key weights it was trained on (key_signature): another model of the same shape is refused,
    before any work, while the same weights in bf16 or with a quantization's noise (3%) load; a file without the
    record (made before it) is not checked; a damaged record is an error."""
    args, path, hata = PRESETS["tiny"], str(tmp_path / "p.safetensors"), HataArgs(rbit=64, n_dense=1)
    torch.manual_seed(0)
    model, other = Transformer(args), Transformer(args)
    projs = {i: torch.randn(args.n_kv_heads, args.head_dim, 64) for i in range(1, args.n_layers)}
    save_hash_projections(path, projs, args, hata, model_module.key_signature(model, 1))
    noisy = Transformer(args).to(torch.bfloat16)
    noisy.load_state_dict(model.state_dict())
    with torch.no_grad():
        for layer in noisy.layers:
            layer.attention.wqkv.weight.mul_(1 + 0.03 * torch.randn_like(layer.attention.wqkv.weight))
    for same in (model, noisy):
        load_hash_projections(path, args, hata, model_module.key_signature(same, 1))
    with pytest.raises(ValueError, match="trained on another model of this shape: its key weights differ"):
        load_hash_projections(path, args, hata, model_module.key_signature(other, 1))
    qd = args.n_heads * args.head_dim  # wqkv's rows: wq's, then wk's, then wv's
    for rows, loads in [(slice(0, qd), True), (slice(qd, qd + args.n_kv_heads * args.head_dim), False), (None, False)]:
        mixed = Transformer(args)  # the model with wq's or wk's rows swapped for another's, or half of each (cos 0.7)
        mixed.load_state_dict(model.state_dict())
        with torch.no_grad():
            for layer, o in zip(mixed.layers, other.layers):
                w, w_other = layer.attention.wqkv.weight, o.attention.wqkv.weight
                w[rows] = w_other[rows] if rows else w + w_other
        if loads:  # the signature reads the key weights only
            load_hash_projections(path, args, hata, model_module.key_signature(mixed, 1))
        else:
            with pytest.raises(ValueError, match="trained on another model of this shape"):
                load_hash_projections(path, args, hata, model_module.key_signature(mixed, 1))
    other.hata = HataArgs(rbit=64, budget=4, n_dense=1, hash_weights=path)  # the model checks its own weights
    with pytest.raises(ValueError, match="trained on another model of this shape"):
        other.setup_caches(1, 8)
    nan = json.dumps({i: [math.nan] * 16 for i in range(1, args.n_layers)})  # the right shape, not numbers
    for record, fits in [(None, True), ("[1, 2]", False), ('{"1": [1.0]}', False), ("{", False), (nan, False)]:
        meta = {"model": args.describe(), "rbit": "64", "n_dense": "1"} | ({"key_signature": record} if record else {})
        save_file({f"layers.{i}.hash_proj": p for i, p in projs.items()}, path, metadata=meta)
        if fits:
            load_hash_projections(path, args, hata, model_module.key_signature(other, 1))
        else:
            with pytest.raises(ValueError, match="key_signature metadata is damaged"):
                load_hash_projections(path, args, hata, model_module.key_signature(other, 1))


def test_bad_hata_values():
    with pytest.raises(ValueError, match="budget"):
        HataArgs(budget=0)
    with pytest.raises(ValueError, match="budget"):
        HataArgs(budget=-3)
    with pytest.raises(ValueError, match="budget"):
        HataArgs(budget=2.5)
    for odd in ("1/4", True, None):  # a string compared with numbers raised a bare TypeError; True passed as 1
        with pytest.raises(ValueError, match="budget must be a token count"):
            HataArgs(budget=odd)
    with pytest.raises(ValueError, match="multiple of 32"):
        HataArgs(rbit=48)
    with pytest.raises(ValueError, match="selector"):
        HataArgs(selector="magic")
    assert HataArgs(budget=1 / 64).budget_tokens(8192) == 128
    assert HataArgs(budget=1 / 64).budget_tokens(8193) == 129  # rounded up
    assert HataArgs(budget=0.001).budget_tokens(63) == 1  # at least one token
    assert HataArgs(budget=1e-9).budget_tokens(63) == 1  # even where the fraction rounds to 0 tokens
    model = Transformer(PRESETS["tiny"], HataArgs(budget=1 / 4, n_dense=1))  # a context of 1024 tokens
    model.setup_caches(1, 32)
    assert [attn.budget for attn in model.sparse_layers()] == [8, 8, 8]  # a fraction of the cache, not the context
    assert HataArgs(budget=9 / 11).budget_tokens(77) == 63  # not 64: 9/11 * 77 is 63.00000000000001 in floats
    assert HataArgs(budget=5).budget_tokens(3) == 5  # a count stays a count
    assert HataArgs(budget=1).budget_tokens(64) == 1  # 1 is one token, not the whole cache


def test_hash_projections_round_trip_and_checks(tmp_path):
    args = PRESETS["tiny"]
    hata = HataArgs(rbit=64, n_dense=1)
    projs = {i: torch.randn(args.n_kv_heads, args.head_dim, 64) for i in range(1, args.n_layers)}
    path = str(tmp_path / "p.safetensors")
    save_hash_projections(path, projs, args, hata)
    back = load_hash_projections(path, args, hata)
    assert all(torch.equal(back[i], projs[i]) for i in projs)
    signature = {i: torch.arange(16.0) for i in projs}  # four metadata keys
    for again in ("a", "b", "c", "d"):  # the same projections, the same bytes (before: the metadata's order varied)
        save_hash_projections(str(tmp_path / again), projs, args, hata, signature)
    assert len({(tmp_path / again).read_bytes() for again in "abcd"}) == 1

    model = Transformer(args, HataArgs(rbit=64, budget=4, n_dense=1, hash_weights=path))  # K below the cache's 8
    model.setup_caches(1, 8)
    assert torch.equal(model.layers[2].attention.hash_proj, projs[2])
    assert model.layers[0].attention.hash_proj is None  # dense layer

    with pytest.raises(ValueError, match="not this model"):
        load_hash_projections(path, PRESETS["smollm2-135m"], hata)
    with pytest.raises(ValueError, match="pass --rbit 64"):
        load_hash_projections(path, args, HataArgs(rbit=128, n_dense=1))
    with pytest.raises(ValueError, match="pass --n-dense 1"):
        load_hash_projections(path, args, HataArgs(rbit=64, n_dense=2))
    bad = dict(projs)
    bad[2] = torch.randn(args.n_kv_heads, args.head_dim + 1, 64)
    for wrong in (bad, {i: projs[i] for i in (1, 2)}, {**projs, 0: projs[1]}):  # a shape, a layer short, a dense one
        with pytest.raises(ValueError, match=r"must be one \(2, 16, 64\) tensor for each layer 1..3, got layers"):
            save_hash_projections(path, wrong, args, hata)  # (before: written, then refused by every load)
    save_file({f"layers.{i}.hash_proj": p for i, p in bad.items()}, path,
              metadata={"model": args.describe(), "rbit": "64", "n_dense": "1"})
    shape = ("layers.2.hash_proj has shape (2, 17, 64), expected (2, 16, 64) (the model's KV heads and head dim, and "
             "rbit=64 from the file's metadata); the file is corrupt")
    with pytest.raises(ValueError, match=re.escape(shape)):
        load_hash_projections(path, args, hata)
    with pytest.raises(FileNotFoundError):
        load_hash_projections(str(tmp_path / "nope.safetensors"), args, hata)
    bad[2] = torch.full((args.n_kv_heads, args.head_dim, 64), math.nan)  # what a diverged training would write
    with pytest.raises(ValueError, match="not finite"):
        save_hash_projections(path, bad, args, hata)
    save_file({f"layers.{i}.hash_proj": p for i, p in bad.items()}, path,
              metadata={"model": args.describe(), "rbit": "64", "n_dense": "1"})
    with pytest.raises(ValueError, match=r"layers\.2\.hash_proj holds NaN or inf$"):
        load_hash_projections(path, args, hata)
    save_file({f"layers.{i}.hash_proj": p.to(torch.int8) for i, p in projs.items()}, path,
              metadata={"model": args.describe(), "rbit": "64", "n_dense": "1"})
    with pytest.raises(ValueError, match="hash_proj holds torch.int8, not floating-point values$"):
        load_hash_projections(path, args, hata)
    for meta in ({}, {"model": args.describe(), "rbit": "64.0", "n_dense": "1"},  # safetensors, not train_hash.py's
                 {"model": args.describe(), "rbit": "64", "n_dense": ""}):
        save_file({f"layers.{i}.hash_proj": p for i, p in projs.items()}, path, metadata=meta)
        with pytest.raises(ValueError, match="lack train_hash.py's metadata"):
            load_hash_projections(path, args, hata)
    for meta, words in [({"n_dense": "3"}, "n_dense=3 in its metadata, but its first projection is for layer 1"),
                        ({"rbit": "33"}, r"rbit must be a multiple of 32 \(whole int32 code words\) in \[32, 1024\], "
                                         "got 33")]:  # named
        save_file({f"layers.{i}.hash_proj": p for i, p in projs.items()}, path,
                  metadata={"model": args.describe(), "rbit": "64", "n_dense": "1", **meta})
        with pytest.raises(ValueError, match=f"hash weights {re.escape(path)}: {words}"):
            model_module.read_hash_file(path, with_tensors=False)
    open(path, "wb").write(b"\xff" * 64)
    with pytest.raises(ValueError, match="cannot read hash weights .*: not a .safetensors file, or a cut one"):
        load_hash_projections(path, args, hata)
    with pytest.raises(FileNotFoundError, match="not found \\(or a directory\\)"):
        load_hash_projections(str(tmp_path), args, hata)


def test_an_unreadable_hash_weights_file_is_named_as_unreadable(tmp_path, monkeypatch):
    """A projection file its user may not read says so, naming it (before: "not a .safetensors file, or a cut one (No
    such file or directory: ...)", safetensors' words for a file it cannot open: a good file called missing or cut)."""
    args, hata = PRESETS["tiny"], HataArgs(rbit=64, n_dense=1)
    save_hash_projections(path := str(tmp_path / "p.safetensors"), random_hash_projections(args, 64, 1), args, hata)
    unreadable(monkeypatch, path)
    with pytest.raises(PermissionError, match=f"Permission denied: '{re.escape(path)}'"):
        model_module.read_hash_file(path, with_tensors=False)
    with pytest.raises(PermissionError, match=f"Permission denied: '{re.escape(path)}'"):
        load_hash_projections(path, args, hata)


def test_a_hash_weights_file_without_its_model_line_lacks_the_metadata(tmp_path):
    """A file with rbit and n_dense but no "model" (the shape it was made for) is named as lacking train_hash.py's
    metadata, before any check reads it (not a KeyError: 'model')."""
    args, hata, path = PRESETS["tiny"], HataArgs(rbit=64, n_dense=1), str(tmp_path / "p.safetensors")
    save_file({f"layers.{i}.hash_proj": p for i, p in random_hash_projections(args, 64, 1).items()}, path,
              metadata={"rbit": "64", "n_dense": "1"})
    for read in (lambda: model_module.read_hash_file(path, with_tensors=False),
                 lambda: load_hash_projections(path, args, hata)):
        with pytest.raises(ValueError, match="lack train_hash.py's metadata"):
            read()


def test_a_key_signature_is_checked_in_every_layer_and_every_value(tmp_path):
    """One sparse layer of another model's key weights is enough to refuse the file (the least similar layer decides);
    a record of every layer with too few values is damaged (not broadcast against the model's 16)."""
    args, hata, path = PRESETS["tiny"], HataArgs(rbit=64, n_dense=1), str(tmp_path / "p.safetensors")
    torch.manual_seed(0)
    model, other = Transformer(args), Transformer(args)
    projs = random_hash_projections(args, 64, 1)
    save_hash_projections(path, projs, args, hata, model_module.key_signature(model, 1))
    one = Transformer(args)  # the model with layer 3's wq|wk|wv another model's
    one.load_state_dict(model.state_dict())
    with torch.no_grad():
        one.layers[3].attention.wqkv.weight.copy_(other.layers[3].attention.wqkv.weight)
    with pytest.raises(ValueError, match=r"its key weights differ \(cosine -?0\.\d\d of 1 in the least similar layer"):
        load_hash_projections(path, args, hata, model_module.key_signature(one, 1))
    short = json.dumps({i: [1.0] for i in range(1, args.n_layers)})  # every layer, one value each
    save_file({f"layers.{i}.hash_proj": p for i, p in projs.items()}, path,
              metadata={"model": args.describe(), "rbit": "64", "n_dense": "1", "key_signature": short})
    with pytest.raises(ValueError, match="key_signature metadata is damaged"):
        load_hash_projections(path, args, hata, model_module.key_signature(model, 1))


@pytest.mark.parametrize("use_norm, dtype", [(False, torch.float32), (True, torch.float32), (False, torch.float16)])
def test_decode_through_the_kernels_matches_the_refs(monkeypatch, use_norm, dtype):
    """The model's sparse decode (hash, select, attend, after a prefill in chunks) with every op dispatched to its
    Triton kernel, against the same model on the refs, fed the same tokens: logits within the dtype's rounding and
    the same greedy choices. On the CPU the kernels run in Triton's interpreter: where the model meets them in CI."""
    args, hata = PRESETS["tiny"], HataArgs(budget=5, n_sink=1, n_recent=2, n_dense=1, use_norm=use_norm)
    torch.manual_seed(0)
    model = Transformer(args, hata).to(DEV, dtype).eval()
    tokens, lengths = torch.randint(0, args.vocab_size, (2, 17), device=DEV), torch.tensor([11, 17], device=DEV)
    real, runs, picked = hk._use_triton, [], {False: [], True: []}
    for force in (False, True):  # what every op's use_triton=None picks
        def pick(use_triton, *tensors, force=force):  # each op's choice, recorded
            picked[force].append(real(force if use_triton is None else use_triton, *tensors))
            return picked[force][-1]
        monkeypatch.setattr(hk, "_use_triton", pick)
        model.setup_caches(2, 32)
        with torch.inference_mode():
            logits = [prefill(model, tokens, lengths, chunk=8)]  # (B, V) per step
            for step in range(4):
                cur = (runs[0] if runs else logits)[step].argmax(-1)  # the refs' greedy tokens, both times
                logits.append(decode_one_token(model, cur, lengths + step))
        runs.append(torch.stack(logits))  # (steps, B, V)
    assert picked[True] and all(picked[True]) and not any(picked[False])  # every dispatch chose the path asked for
    atol = 1e-4 if dtype == torch.float32 else 4e-3  # fp16: two of its ulps at these logits (|x| < 4; 1 measured)
    torch.testing.assert_close(runs[1], runs[0], atol=atol, rtol=0)
    assert torch.equal(runs[1].argmax(-1), runs[0].argmax(-1))


def test_sparse_decode_attends_over_the_whole_caches(monkeypatch):
    """A sparse step hands the attention the caches themselves, not their [:, :, :S] view: the refs would copy a
    view's first S rows (as many bytes as dense attention reads) before gathering the K selected ones."""
    model = Transformer(PRESETS["tiny"], HataArgs(budget=4, n_dense=0))
    model.setup_caches(2, 32)
    seen = []
    monkeypatch.setattr(model_module, "sparse_decode_attention", lambda q, k, v, idx: seen.append((k, v)) or q)
    lengths = torch.tensor([9, 6])
    with torch.inference_mode():
        prefill(model, torch.randint(0, 64, (2, 9)), lengths)
        decode_one_token(model, torch.tensor([1, 2]), lengths)
    caches = [(layer.attention.kv_cache.k, layer.attention.kv_cache.v) for layer in model.layers]
    assert len(seen) == len(caches) and all(k is ck and v is cv for (k, v), (ck, cv) in zip(seen, caches))


def test_oracle_scores_are_the_group_summed_attention(monkeypatch):
    """The oracle's score, written out in float64 loops: softmax(q_j . k_s / sqrt(D)) over the valid positions,
    summed over the G query heads j of the KV head; its top K (the newest first on ties) is what the layer's
    sparse decode attends to."""
    args = PRESETS["tiny"]
    B, H, Hkv, D, S = 2, args.n_heads, args.n_kv_heads, args.head_dim, 23
    model = Transformer(args, HataArgs(budget=7, selector="oracle", n_dense=0))
    model.setup_caches(B, S)
    attn, seen = model.layers[0].attention, []
    monkeypatch.setattr(model_module, "sparse_decode_attention", lambda q, k, v, idx: seen.append(idx) or q)
    G, gen = H // Hkv, torch.Generator().manual_seed(3)
    q, keys, lengths = torch.randn(B, H, D, generator=gen), torch.randn(B, Hkv, S, D, generator=gen), [23, 9]
    probs = attn.group_probs(q, keys, torch.tensor(lengths))  # (B, Hkv, S)
    attn.sparse_decode(q, None, keys, keys, S, torch.tensor(lengths))
    for b in range(B):
        for h in range(Hkv):
            want = [0.0] * S
            for j in range(h * G, (h + 1) * G):
                logits = [float(q[b, j].double() @ keys[b, h, s].double()) / math.sqrt(D) for s in range(lengths[b])]
                top = max(logits)
                total = sum(math.exp(x - top) for x in logits)
                for s, x in enumerate(logits):
                    want[s] += math.exp(x - top) / total
            torch.testing.assert_close(probs[b, h].double(), torch.tensor(want, dtype=torch.float64), atol=1e-6, rtol=0)
            best = sorted(range(lengths[b]), key=lambda s: (-want[s], -s))[:7]
            assert sorted(p for p in seen[0][b, h].tolist() if p >= 0) == sorted(best)


def test_quest_selects_whole_pages_by_bound():
    """Hand-made cache: each page's bound is sum over channels of max(q * k_max, q * k_min) over its valid keys
    (a negative query channel takes the minimum; keys past the length do not count), and the top K tokens come
    from the pages with the highest bounds (ties: the newer page first, then the newer token)."""
    args = PRESETS["tiny"]
    attn = Transformer(args, HataArgs(budget=16, selector="quest", n_dense=0)).layers[0].attention
    D, S = args.head_dim, 48
    keys = torch.zeros(1, args.n_kv_heads, S, D)
    keys[:, :, 16:32, 0] = torch.linspace(-1, 3, 16)  # page 1 reaches 3 on channel 0
    keys[:, :, 32:40, 0] = 1.0  # page 2: 1 at most on channel 0 ...
    keys[:, :, 32:40, 1] = torch.linspace(-3, 1, 8)  # ... and -3 at least on channel 1, where q is negative
    keys[:, :, 40:48, :2] = 100.0  # past the length 40: must not count
    q = torch.zeros(1, args.n_heads, D)
    q[..., 0], q[..., 1] = 1.0, -1.0
    bounds = attn.quest_bounds(q, keys, torch.tensor([40]))
    G = args.n_heads // args.n_kv_heads
    assert bounds.shape == (1, args.n_kv_heads, S)
    torch.testing.assert_close(bounds[0, 0, ::16], torch.tensor([0.0, 3.0, 4.0]) * G)  # page 2: 1 + 3
    idx = hk.select_topk(-bounds, torch.tensor([40]), 16)  # page 2's 8 valid tokens, then the newest 8 of page 1
    assert as_sets(idx) == [[(list(range(24, 40)), 0)] * args.n_kv_heads]
    empty = attn.quest_bounds(q, keys, torch.tensor([30]))  # page 2 holds no valid key: max -inf, min inf, and
    assert torch.isfinite(empty).all()  # the zero query channels' 0 * inf must not make its bound NaN


@pytest.mark.parametrize("selector", ["oracle", "quest"])
def test_oracle_and_quest_keep_the_sink_and_recent_windows(monkeypatch, selector):
    """--sink and --recent bind every selector: the layer's selection is select_topk of its scores with the windows
    (a layer that passed them as 0, or swapped, still agreed with itself batched and alone: all a test checked)."""
    args = PRESETS["tiny"]
    B, S = 2, 40
    attn = Transformer(args, HataArgs(budget=7, selector=selector, n_dense=0, n_sink=2, n_recent=3)).layers[0].attention
    attn.budget, seen = 7, []
    monkeypatch.setattr(model_module, "sparse_decode_attention", lambda q, k, v, idx: seen.append(idx) or q)
    gen = torch.Generator().manual_seed(5)
    q, keys = torch.randn(B, args.n_heads, args.head_dim, generator=gen), torch.randn(B, args.n_kv_heads, S,
                                                                                    args.head_dim, generator=gen)
    keys[:, :, :2] *= 0.01  # sinks that would not win on their scores
    lengths = torch.tensor([37, 9])
    scores = attn.group_probs(q, keys, lengths) if selector == "oracle" else attn.quest_bounds(q, keys, lengths)
    attn.sparse_decode(q, None, keys, keys, S, lengths)
    assert as_sets(seen[0]) == as_sets(hk.select_topk_ref(-scores, lengths, 7, 2, 3))
    for b, length in enumerate(lengths.tolist()):
        for h in range(args.n_kv_heads):
            assert {0, 1, length - 3, length - 2, length - 1} <= set(seen[0][b, h].tolist())


def allocated(model):
    """(bytes of one layer's K and V caches, bytes of every layer's hash codes, norms and anchors) that setup_caches
    made."""
    kv = [a.kv_cache.k.nbytes + a.kv_cache.v.nbytes for a in (layer.attention for layer in model.layers)]
    assert len(set(kv)) == 1
    codes = sum(b.nbytes for a in (layer.attention for layer in model.layers) if a.hash_cache is not None
                for b in a.hash_cache.buffers())
    return kv[0], codes


@pytest.mark.parametrize("hata, dtype", [
    (None, torch.float32), (HataArgs(budget=8, n_dense=1), torch.float32),
    (HataArgs(budget=8, n_dense=1, use_norm=True, rbit=64), torch.bfloat16),
    (HataArgs(budget=8, n_dense=2, selector="oracle"), torch.float32),  # oracle: no codes
    (HataArgs(budget=64, n_dense=1), torch.float16),  # K covers the cache: no codes
    (HataArgs(budget=0.25, n_dense=1, use_norm=True), torch.float32)])
def test_cache_bytes_is_what_setup_caches_allocates(hata, dtype):
    """cache_bytes (engine's memory check and offload's plan read it) equals the bytes the caches setup_caches
    makes really hold: K and V of one layer in the weights' dtype, and R/8 code bytes (+ a 4-byte norm with
    use_norm) per position and KV head, and a 4-byte anchor per KV head, in each sparse layer that reads codes,
    none otherwise."""
    model = tiny_model(hata, dtype)
    want = model.cache_bytes(2, 64)
    model.setup_caches(2, 64)
    assert want == allocated(model)
    if hata is None or not hata.reads_codes(64):
        assert want[1] == 0


def test_set_hata_back_to_dense_or_oracle_drops_the_hash_caches():
    """After a hash policy that read codes, set_hata(None) or an oracle policy leaves no hash cache or projection
    behind, and the next decode steps are those of a model that was dense (or oracle) from the start (a stale hash
    cache made a dense layer's forward read self.hata.use_norm of None)."""
    ids = random_ids(1, 12)
    for policy in (None, HataArgs(budget=4, n_dense=1, selector="oracle")):
        hashed, ref = tiny_model(HataArgs(budget=4, n_dense=1, use_norm=True)), tiny_model(policy)  # the same weights
        hashed.warned_random_projections = True
        hashed.setup_caches(1, 32)
        ref.setup_caches(1, 32)
        assert all(attn.hash_cache is not None for attn in hashed.sparse_layers())
        with torch.inference_mode():
            hashed(ids)
            ref(ids)
            hashed.set_hata(policy)
            assert all(layer.attention.hash_cache is None and layer.attention.hash_proj is None
                       for layer in hashed.layers)
            for step in range(3):
                tok, pos = torch.tensor([[5 + step]]), torch.tensor([12 + step])
                torch.testing.assert_close(hashed(tok, pos), ref(tok, pos), rtol=0, atol=0)


def test_random_projections_are_the_seed_0_draw_and_follow_their_seed():
    """Without a file the sparse layers use random_hash_projections(args, rbit, n_dense) with its default seed 0:
    what train_hash.py starts from and compares as "random", so a model and the trainer hash alike. Another seed
    (set_hash_projections(None, seed=5)) installs that seed's draw, not seed 0's again."""
    hata = HataArgs(budget=4, n_dense=1, rbit=64)
    model = tiny_model(hata)
    model.warned_random_projections = True  # (no warning on stderr)
    model.setup_caches(1, 16)
    want = random_hash_projections(PRESETS["tiny"], 64, 1)
    for i in range(1, PRESETS["tiny"].n_layers):
        assert torch.equal(model.layers[i].attention.hash_proj, want[i])
    five = random_hash_projections(PRESETS["tiny"], 64, 1, seed=5)  # another seed draws others (train_hash's --seed)
    model.set_hash_projections(None, seed=5)
    for i in range(1, PRESETS["tiny"].n_layers):
        assert torch.equal(model.layers[i].attention.hash_proj, five[i]) and not torch.equal(five[i], want[i])


def test_a_bf16_projection_file_is_used_in_fp32(tmp_path):
    """A projection file holding bf16 tensors (safetensors from elsewhere; save_hash_projections writes fp32) loads
    as fp32 projections, which the hash kernels require, and the model decodes with them."""
    tiny = PRESETS["tiny"]
    projs = {i: torch.randn(tiny.n_kv_heads, tiny.head_dim, 64, generator=torch.Generator().manual_seed(i))
             for i in range(1, tiny.n_layers)}
    path = str(tmp_path / "p.safetensors")
    save_file({f"layers.{i}.hash_proj": p.bfloat16() for i, p in projs.items()}, path,
              metadata={"model": tiny.describe(), "rbit": "64", "n_dense": "1"})
    model = tiny_model(HataArgs(budget=4, n_dense=1, rbit=64, hash_weights=path))
    model.setup_caches(1, 16)
    for i in range(1, tiny.n_layers):
        proj = model.layers[i].attention.hash_proj
        assert proj.dtype == torch.float32 and torch.equal(proj, projs[i].bfloat16().float())
    with torch.inference_mode():
        model(random_ids(1, 8))
        assert torch.isfinite(model(torch.tensor([[3]]), torch.tensor([8]))).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_oracle_scores_in_half_precision_models(dtype):
    """The oracle's group-summed softmax is computed in fp32 whatever the cache dtype: a bf16/fp16 model's keys give
    the probabilities of their fp32 copies (a half-precision key cache against fp32 queries was a dtype error)."""
    model = tiny_model(HataArgs(budget=4, n_dense=0, selector="oracle"), dtype)
    attn = model.layers[0].attention
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, PRESETS["tiny"].n_heads, PRESETS["tiny"].head_dim, generator=gen).to(dtype)
    keys = torch.randn(2, PRESETS["tiny"].n_kv_heads, 12, PRESETS["tiny"].head_dim, generator=gen).to(dtype)
    lengths = torch.tensor([12, 7])
    got = attn.group_probs(q, keys, lengths)
    want = attn.group_probs(q.float(), keys.float(), lengths)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    model.setup_caches(2, 16)  # and a whole oracle decode step runs
    with torch.inference_mode():
        model(random_ids(2, 8))
        assert torch.isfinite(model(torch.tensor([[3], [4]]), torch.tensor([8, 8]))).all()


def test_key_norms_keep_fp32_precision_in_a_bf16_model():
    """use_norm's key norms are taken of the fp32 keys in a prefill chunk and in a decode step alike, as set_hata's
    rehash takes them: a bf16 model's norm cache equals keys.float().norm() to fp32 rounding, not bf16's."""
    model = tiny_model(HataArgs(budget=4, n_dense=1, use_norm=True), torch.bfloat16)
    model.setup_caches(2, 32)
    with torch.inference_mode():
        model(random_ids(2, 9))
        for step in range(2):
            model(torch.tensor([[7], [8]]), torch.tensor([9 + step, 9 + step]))
    for attn in model.sparse_layers():
        keys = attn.kv_cache.k[:, :, :11]
        torch.testing.assert_close(attn.hash_cache.norms[:, :, :11], keys.float().norm(dim=-1), rtol=1e-6, atol=0)


def test_oracle_and_quest_scores_group_query_heads_when_G_differs_from_Hkv():
    """The oracle's probabilities and Quest's page bounds sum over the G query heads h*G .. h*G + G - 1 of KV head h,
    written out per head here for 8 query heads on 2 KV heads (G = 4; the presets the other tests use have G = Hkv,
    where the heads grouped the other way round give the same sums)."""
    args = ModelArgs(dim=64, n_layers=1, n_heads=8, n_kv_heads=2, vocab_size=512, ffn_dim=96, rope_theta=10000.0,
                     max_seq_len=64)
    attn = Transformer(args, HataArgs(budget=4, n_dense=0, selector="oracle")).layers[0].attention
    H, Hkv, D, G, S = 8, 2, args.head_dim, 4, 2 * QUEST_PAGE
    gen = torch.Generator().manual_seed(4)
    q, keys = torch.randn(2, H, D, generator=gen), torch.randn(2, Hkv, S, D, generator=gen)
    lengths = torch.tensor([S, 21])
    probs, bounds = attn.group_probs(q, keys, lengths), attn.quest_bounds(q, keys, lengths)
    for b, n in enumerate(lengths.tolist()):
        for h in range(Hkv):
            want_p, want_b = torch.zeros(S, dtype=torch.float64), torch.zeros(S, dtype=torch.float64)
            for j in range(h * G, (h + 1) * G):
                qj, k = q[b, j].double(), keys[b, h, :n].double()
                want_p[:n] += (k @ qj / math.sqrt(D)).softmax(0)
                for page in range(S // QUEST_PAGE):
                    kp = k[page * QUEST_PAGE:(page + 1) * QUEST_PAGE]
                    if len(kp):
                        want_b[page * QUEST_PAGE:(page + 1) * QUEST_PAGE] += torch.maximum(
                            qj * kp.amax(0), qj * kp.amin(0)).sum()
            torch.testing.assert_close(probs[b, h].double(), want_p, rtol=0, atol=1e-6)
            torch.testing.assert_close(bounds[b, h, :n].double(), want_b[:n], rtol=1e-5, atol=1e-5)


# From a mutation run of model.py's decode path (2026-12-06)

def test_hamming_scores_sum_the_query_heads_of_their_own_kv_head():
    """hamming_score_ref, counted bit by bit: KV head h's score of a key sums popcount(q_j ^ k) over query heads
    j = h*G .. h*G + G - 1 (8 query heads on 2 KV heads), and a position past the length scores G*R + 1."""
    gen = torch.Generator().manual_seed(6)
    B, H, Hkv, S, W, G = 2, 8, 2, 5, 2, 4
    q = torch.randint(-2 ** 31, 2 ** 31, (B, H, W), generator=gen).to(torch.int32)
    k = torch.randint(-2 ** 31, 2 ** 31, (B, Hkv, S, W), generator=gen).to(torch.int32)
    lengths = [5, 3]
    got = hk.hamming_score_ref(q, k, torch.tensor(lengths))
    for b in range(B):
        for h in range(Hkv):
            for s in range(S):
                want = sum(bin((int(q[b, j, w]) ^ int(k[b, h, s, w])) & 0xFFFFFFFF).count("1")
                           for j in range(h * G, (h + 1) * G) for w in range(W)) if s < lengths[b] else G * 32 * W + 1
                assert int(got[b, h, s]) == want, (b, h, s)


def test_causal_attention_refuses_fewer_keys_than_queries_even_one_query_over_no_keys():
    """causal_attention names its S >= T rule for a single query over an empty key set too (T = 1, S = 0)."""
    for T, S in [(1, 0), (3, 2)]:
        with pytest.raises(ValueError, match="needs S >= T"):
            causal_attention(torch.randn(1, 2, T, 8), torch.randn(1, 2, S, 8), torch.randn(1, 2, S, 8))


def test_a_cpu_decode_step_takes_the_grouped_dense_path_not_causal_attention(monkeypatch):
    """A CPU decode step (T = 1, every sequence at one position) attends through the additive mask's grouped SDPA,
    not causal_attention (a prefill chunk's path), and gives a full rerun's last logits."""
    model = tiny_model()
    model.setup_caches(2, 16)
    ids = random_ids(2, 7)
    with torch.inference_mode():
        want = model(ids)[:, -1]
        model(ids[:, :6])
        monkeypatch.setattr(model_module, "causal_attention", lambda *a: pytest.fail("causal_attention in a decode"))
        got = model(ids[:, 6:], torch.tensor([6, 6]))[:, -1]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_select_topk_ref_clamps_a_length_past_the_row_to_the_row():
    """select_topk_ref reads a length past the row (S) as S, as the kernels do: the recent window ends at the row's
    last position, so lengths S + 3 and S select the same keys (sinks, recent, then the smallest newest scores)."""
    score = torch.tensor([[[5, 1, 1, 1, 9, 1, 9, 9]]], dtype=torch.int32)     # (1, 1, 8)
    for n in (8, 11, 2 ** 40):
        assert hk.select_topk_ref(score, torch.tensor([n]), 3, n_recent=2).tolist() == [[[5, 6, 7]]], n
        assert hk.select_topk_ref(score, torch.tensor([n]), 4, n_sink=1, n_recent=1).tolist() == [[[0, 3, 5, 7]]], n


def test_rbit_stops_at_32_and_1024():
    """rbit 0 is a multiple of 32 but no code at all: refused; 1024 bits (128 bytes), the limit, is taken."""
    with pytest.raises(ValueError, match=re.escape("in [32, 1024], got 0")):
        HataArgs(rbit=0)
    assert HataArgs(rbit=1024).rbit == 1024


def test_a_model_dense_in_every_layer_checks_no_hash_file():
    """n_dense = n_layers: no layer selects, so the projection file is not checked; one sparse layer checks it."""
    assert HataArgs(n_dense=4, hash_weights="p.safetensors").checked_file(4) is None
    assert HataArgs(n_dense=3, hash_weights="p.safetensors").checked_file(4) == "p.safetensors"


def test_a_hash_weights_file_with_a_tensor_for_no_layer_of_the_model_is_refused(tmp_path):
    """A projection for layer 4, which the 4-layer tiny model lacks (a deeper model's file with this one's metadata),
    is named as unexpected, not ignored."""
    args, path = PRESETS["tiny"], str(tmp_path / "p.safetensors")
    projs = {f"layers.{i}.hash_proj": torch.randn(2, 16, 64) for i in range(1, 5)}
    save_file(projs, path, metadata={"model": args.describe(), "rbit": "64", "n_dense": "1"})
    with pytest.raises(ValueError, match=re.escape("missing [], unexpected ['layers.4.hash_proj']")):
        load_hash_projections(path, args, HataArgs(rbit=64, n_dense=1))


def test_a_hash_weights_file_of_another_query_head_count_is_refused(tmp_path):
    """The file's whole model line is compared: a model with the same key shape (layers, KV heads, head_dim) but
    twice the query heads is another model, refused before its projections load."""
    args, path, hata = PRESETS["tiny"], str(tmp_path / "p.safetensors"), HataArgs(rbit=64, n_dense=1)
    save_hash_projections(path, {i: torch.randn(2, 16, 64) for i in (1, 2, 3)}, args, hata)
    with pytest.raises(ValueError, match=r"were made for '.* n_heads=4 .*', not this model \('.* n_heads=8 "):
        load_hash_projections(path, replace(args, n_heads=8), hata)
