"""The dense model against fixed expectations: golden logits from an independent implementation (Hugging Face
transformers loading the same GGUF, see make_golden.py), the KV cache against re-running the whole sequence,
batches against single prompts, and the three checkpoint loaders against each other on real weights."""
import fractions
import json
import math
import os
import re
import sys
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from engine import generate
import hata_kernels as hk
import model as model_module
import tokenizer as tokenizer_module
from model import (PRESETS, HataArgs, KVCache, ModelArgs, RMSNorm, Transformer, causal_attention,
                   checkpoint_format, checkpoint_metadata, from_checkpoint, from_state_dict, load_checkpoint, read_meta,
                   rope_frequencies)
from tests.helpers import (GOLDEN, HF_CFG, random_ids, read_only, tiny_model, write_gguf, write_hf, write_meta,
                           write_meta_shards)


def logits_of(model, ids):
    model.setup_caches(1, len(ids))
    with torch.inference_mode():
        return model(torch.tensor([ids]))[0]  # (T, V)


def test_golden_logits(smol):
    gold = load_file(GOLDEN)
    torch.testing.assert_close(logits_of(smol, gold["ids_a"].tolist()), gold["logits_a"], atol=1e-3, rtol=0)
    got_b = logits_of(smol, gold["ids_b"].tolist())[gold["pos_b"]]
    torch.testing.assert_close(got_b, gold["logits_b"], atol=1e-3, rtol=0)


def test_capital_of_france(smol):
    smol.setup_caches(1, 16)
    with torch.inference_mode():
        new, _ = generate(smol, [[504, 3575, 282, 4649, 314]], max_new_tokens=2)  # "The capital of France is"
    assert new[0][0] == 7042  # " Paris"


def test_a_refused_setup_caches_leaves_no_mix_of_caches():
    """A cache class that refuses midway (offload's plan for a smaller batch, memory) leaves a model without caches,
    which asks for setup_caches; before, it said it held the new batch over layers of old, new and no caches."""
    model = tiny_model(HataArgs(budget=4, n_dense=1))
    model.setup_caches(1, 16)
    assert all(layer.attention.hash_cache is not None for layer in model.layers[1:])
    made = []

    def refused(*a):  # the third layer's cache is refused
        if len(made) == 2:
            raise ValueError("the offload plan allowed fewer bytes")
        made.append(KVCache(*a))
        return made[-1]
    for layer in model.layers:
        layer.attention.kv_cache_cls = refused
    with pytest.raises(ValueError, match="the offload plan allowed fewer bytes"):
        model.setup_caches(2, 16)
    assert (model.max_batch_size, model.max_seq_len) == (0, 0)
    assert all(layer.attention.kv_cache in (None, *made) and layer.attention.hash_cache is None
               for layer in model.layers)
    with pytest.raises(RuntimeError, match=re.escape("call setup_caches(max_batch_size, max_seq_len) before forward")):
        model(torch.zeros(1, 1, dtype=torch.long), torch.tensor([3]))
    for layer in model.layers:
        layer.attention.kv_cache_cls = KVCache
    model.setup_caches(2, 16)  # and it can be set up again
    assert model(torch.zeros(2, 2, dtype=torch.long)).shape[0] == 2


def test_caches_hold_at_most_the_models_context():
    model = Transformer(PRESETS["tiny"])  # context 1024
    model.setup_caches(1, 1024)  # the limit itself
    for size in ((1, 1025), (1, 0), (0, 16)):  # (before: a length 0 was taken, and forward said "call setup_caches")
        with pytest.raises(ValueError, match=re.escape(f"setup_caches{size}: a batch of at least 1 and a length in "
                                                       "[1, 1024], the model's context length")):
            model.setup_caches(*size)
    model.setup_caches(2, 16)
    # before: IndexErrors deep inside, "cache_write: pos must be (B,)", position 1
    for pos in (torch.tensor(3), torch.tensor([3.0, 3.0]), torch.tensor([3]), torch.tensor([True, True])):
        with pytest.raises(ValueError, match=r"input_pos must be an integer \(B,\) = \(2,\) tensor"):
            model(torch.zeros(2, 1, dtype=torch.long), pos)
    for idx in (torch.tensor([2]), torch.tensor([2.0, 2.0])):  # before: a (1,) index served every sequence
        with pytest.raises(ValueError, match=r"output_idx must be an integer \(B,\) = \(2,\) tensor"):
            model(torch.zeros(2, 3, dtype=torch.long), output_idx=idx)
    for tokens in (torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, dtype=torch.long)):  # before: bare index errors
        with pytest.raises(ValueError, match=r"tokens must be a \(B, T\) tensor with T >= 1, got shape \(2,"):
            model(tokens)


def test_model_args_name_what_is_wrong():
    """A RoPE scaling dict without a "type" (Hugging Face's own spelling is "rope_type", which hf_args reads) is
    refused, not decoded as unscaled RoPE; a head dim of 0 from dim // n_heads says where it came from; the
    defaults are Llama 3 8B's shape and context (before: 131072 tokens without Llama 3.1's RoPE scaling)."""
    llama3 = dict(PRESETS["llama-3.1-8b"].rope_scaling)
    llama3["rope_type"] = llama3.pop("type")
    with pytest.raises(ValueError, match="unsupported RoPE scaling None, the 'type' of"):
        ModelArgs(rope_scaling=llama3)
    words = "head_dim must be an even whole number in [2, 2^31), got 0 (dim // n_heads)"
    with pytest.raises(ValueError, match=re.escape(words)):
        ModelArgs(dim=4, n_heads=8, n_kv_heads=8)
    # whole numbers, read as floats (before: torch took them as int64, which they overflow)
    big = ModelArgs(rope_theta=10 ** 30, rope_scaling={"type": "linear", "factor": 10 ** 30})
    assert torch.equal(rope_frequencies(big), rope_frequencies(ModelArgs(rope_theta=1e30, rope_scaling={
        "type": "linear", "factor": 1e30})))
    with pytest.raises(ValueError, match="tie_embeddings must be true"):
        ModelArgs(tie_embeddings=1)
    assert ModelArgs().max_seq_len == 8192 and ModelArgs().rope_scaling is None


def test_kv_cache_decode_equals_full_rerun(smol):
    """20 decode steps through the cache against a fresh full forward pass over the whole sequence each step."""
    ids = load_file(GOLDEN)["ids_b"][:30].tolist()
    smol.setup_caches(1, 64)
    with torch.inference_mode():
        new, _ = generate(smol, [ids], max_new_tokens=21)
        seq = ids + new[0]
        cached = []
        smol.setup_caches(1, 64)
        smol(torch.tensor([ids]))
        for step in range(20):
            pos = len(ids) + step
            cached.append(smol(torch.tensor([[seq[pos]]]), torch.tensor([pos]))[0, -1])
        full = logits_of(smol, seq[:len(ids) + 20])[len(ids):]  # (20, V)
    torch.testing.assert_close(torch.stack(cached), full, atol=1e-4, rtol=0)
    assert full.argmax(-1).tolist() == new[0][1:21]  # generate's greedy tokens are the full passes' too


def test_prefill_after_cached_prefix(smol, monkeypatch):
    """A second prefill chunk on top of a cached prefix gives the logits of one pass over both; it attends to the
    cache up to its own end only (NaN past it would spoil a masked pass over the whole cache). A chunk at one
    position in every sequence takes causal_attention (no mask; two cuDNN passes on CUDA), one at different
    positions a mask."""
    ids = load_file(GOLDEN)["ids_b"][:40].tolist()
    whole = logits_of(smol, ids)
    calls = []
    monkeypatch.setattr(model_module, "causal_attention",
                        lambda q, k, v: calls.append((q.shape[2], k.shape[2])) or causal_attention(q, k, v))
    smol.setup_caches(1, 64)
    with torch.inference_mode():
        smol(torch.tensor([ids[:17]]))
        for layer in smol.layers:
            layer.attention.kv_cache.k[:, :, 40:] = float("nan")
        rest = smol(torch.tensor([ids[17:]]), torch.tensor([17]))[0]
        assert set(calls) == {(17, 17), (23, 40)}  # the fresh prefill, then the chunk over the cache to its end
        smol.setup_caches(2, 64)  # two sequences at their own positions: the mask ends at the later one's end
        smol(torch.tensor([ids[:23], ids[:23]]))
        for layer in smol.layers:
            layer.attention.kv_cache.k[:, :, 40:] = float("nan")
        calls.clear()
        both = smol(torch.tensor([ids[17:34], ids[23:40]]), torch.tensor([17, 23]))
        assert not calls
    torch.testing.assert_close(rest, whole[17:], atol=1e-4, rtol=0)
    torch.testing.assert_close(both, torch.stack([whole[17:34], whole[23:40]]), atol=1e-4, rtol=0)


def masked_attention_ref(q, keys, values):
    """Query i of T sees keys 0 .. S - T + i, as one masked softmax (float64, GQA by repeating K/V heads)."""
    T, S, G = q.shape[2], keys.shape[2], q.shape[1] // keys.shape[1]
    k, v = (x.double().repeat_interleave(G, 1) for x in (keys, values))
    logits = q.double() @ k.transpose(-1, -2) / q.shape[-1] ** 0.5  # (B, H, T, S)
    hidden = torch.arange(S) > torch.arange(T)[:, None] + S - T
    return logits.masked_fill(hidden.to(q.device), float("-inf")).softmax(-1) @ v


def chunk_inputs(B, H, Hkv, T, S, D, dtype, device):
    """Queries, keys and values whose cached part (values near +1) and chunk part (near -1) give far apart
    outputs, so a wrong weighting of the two shows."""
    gen = torch.Generator().manual_seed(T + S)
    q, k, v = (torch.randn(B, h, n, D, generator=gen) for h, n in ((H, T), (Hkv, S), (Hkv, S)))
    v[:, :, :S - T] += 1.0
    v[:, :, S - T:] -= 1.0
    return tuple(x.to(device, dtype) for x in (q, k, v))


@pytest.mark.parametrize("B,H,Hkv,T,S,D", [(1, 4, 2, 3, 8, 16), (2, 3, 3, 5, 5, 8), (1, 9, 3, 7, 20, 64)])
def test_causal_attention(B, H, Hkv, T, S, D):
    """A prefill chunk's attention (query i sees keys up to S - T + i) against one masked softmax, odd sizes; S = T
    is a fresh prefill. fp32 on the CPU: one masked pass."""
    q, k, v = chunk_inputs(B, H, Hkv, T, S, D, torch.float32, "cpu")
    torch.testing.assert_close(causal_attention(q, k, v).double(), masked_attention_ref(q, k, v), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=f"{T} queries at the last positions of {T - 1} keys"):
        causal_attention(q, k[:, :, :T - 1], v[:, :, :T - 1])  # a negative S - T would slice from the end


def test_merge_attention():
    """The cuDNN path's merge, which only a GPU reaches inside causal_attention: the outputs and log-sum-exps of
    the cached keys (unmasked) and of the chunk's own (causal) give one masked softmax over both. fp32, CPU."""
    B, H, Hkv, T, S, D = 2, 6, 2, 5, 12, 16
    q, k, v = chunk_inputs(B, H, Hkv, T, S, D, torch.float32, "cpu")
    def part(keys, values, hidden):  # attention over some of the keys: output (B, H, T, D), lse (B, H, T)
        keys, values = (x.repeat_interleave(H // Hkv, 1) for x in (keys, values))
        logits = (q @ keys.transpose(-1, -2) / D ** 0.5).masked_fill(hidden, float("-inf"))
        return logits.softmax(-1) @ values, logits.logsumexp(-1)
    old = part(k[:, :, :S - T], v[:, :, :S - T], torch.zeros(T, S - T, dtype=torch.bool))
    new = part(k[:, :, S - T:], v[:, :, S - T:], torch.ones(T, T, dtype=torch.bool).triu(1))
    merged = model_module.merge_attention(*old, *new)
    torch.testing.assert_close(merged.double(), masked_attention_ref(q, k, v), atol=1e-5, rtol=0)


def test_cudnn_lse_attention_checks_the_private_op(monkeypatch):
    """The pinned torch has SDPA's cuDNN op with the arguments and results causal_attention uses; a torch without
    the op, or with another signature, gets None (later chunks take the masked pass) rather than a failing call."""
    assert model_module.CUDNN_LSE_ATTENTION is not None
    def fake(schema):
        return SimpleNamespace(default=SimpleNamespace(_schema=torch._C.parse_schema(schema)))
    ours = "aten::op(Tensor query, Tensor key, Tensor value, Tensor? attn_bias, bool compute_log_sumexp, " \
           "bool is_causal=False) -> (Tensor output, Tensor logsumexp)"
    for schema, found in [(ours, True), (ours.replace("attn_bias", "attn_mask"), False),
                          (ours.replace("logsumexp", "lse"), False)]:
        monkeypatch.setattr(torch.ops, "aten", SimpleNamespace(_scaled_dot_product_cudnn_attention=fake(schema)))
        assert (model_module.cudnn_lse_attention() is not None) == found, schema
    monkeypatch.setattr(torch.ops, "aten", SimpleNamespace())
    assert model_module.cudnn_lse_attention() is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("H,Hkv,D,T,S", [(32, 8, 128, 3, 1000), (32, 8, 128, 2, 4098), (32, 8, 128, 257, 4099),
                                         (32, 8, 128, 1023, 1025), (9, 3, 64, 2048, 6144), (4, 4, 64, 2, 3)])
def test_causal_attention_cuda(monkeypatch, H, Hkv, D, T, S):
    """bf16 on CUDA: the two cuDNN passes merged by their log-sum-exps (when cuDNN takes the inputs; without
    autograd, as in the engine) against float64, within flash-attention's rule for the same masked pass in bf16
    (2x torch's error + 1e-5) plus the two passes' own bf16 roundings: each pass's output, a mean of values, is
    rounded to bf16 before the merge (half an ulp: 2^-8 of max |v| at most), and the merge weights them by shares
    that sum to 1."""
    verdicts = []
    def spy(params):
        verdicts.append(can_use(params))
        return verdicts[-1]
    can_use = model_module.can_use_cudnn_attention
    monkeypatch.setattr(model_module, "can_use_cudnn_attention", spy)
    q, k, v = chunk_inputs(2, H, Hkv, T, S, D, torch.bfloat16, "cuda")
    ref = masked_attention_ref(q, k, v)
    visible = torch.ones(T, S, dtype=torch.bool, device="cuda").tril(S - T)
    with torch.no_grad():
        y_torch = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=H != Hkv)
        err, err_torch = ((y - ref).abs().max() for y in (causal_attention(q, k, v), y_torch))
    assert err <= 2 * err_torch + 1e-5 + 2 ** -8 * v.abs().max(), (err, err_torch)
    if S > T and not any(verdicts):
        pytest.skip("cuDNN attention does not take these inputs here: only the masked pass was tested")


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="needs a Hopper (sm_90) or newer CUDA GPU, where the two-pass prefill was measured")
def test_cuda_later_prefill_chunks_take_the_two_cudnn_passes():
    """The test above skips a case that cuDNN does not take: here a torch without the cuDNN op (or one refusing the
    engine's chunk shapes) fails instead of turning those cases into skips, and the 1.8-2.5x goes unnoticed."""
    assert model_module.CUDNN_LSE_ATTENTION is not None, "this torch has no cuDNN attention returning its lse"
    for H, Hkv, D, T, S in ((32, 8, 128, 4096, 8192), (9, 3, 64, 2048, 6144)):  # Llama-3.1-8B's, the default model's
        q, k, v = chunk_inputs(1, H, Hkv, T, S, D, torch.bfloat16, "cuda")
        params = model_module.SDPAParams(q, k[:, :, :S - T], v[:, :, :S - T], None, 0.0, False, H != Hkv)
        assert model_module.can_use_cudnn_attention(params), (H, Hkv, D, T, S)


def test_cpu_decode_reads_the_cache_up_to_its_last_position(smol):
    """On the CPU a decode step attends over the cache up to the batch's last position, not all of it (a cache sized
    for 8000 new tokens made every step 2-3x slower): NaN past it changes nothing. A step outside the caches is one
    ValueError (on CUDA the caller checks, as a captured graph cannot)."""
    ids = load_file(GOLDEN)["ids_b"][:40].tolist()
    whole = logits_of(smol, ids)
    smol.setup_caches(1, 64)
    with torch.inference_mode():
        smol(torch.tensor([ids[:39]]))
        for layer in smol.layers:
            layer.attention.kv_cache.k[:, :, 40:] = float("nan")
        step = smol(torch.tensor([ids[39:]]), torch.tensor([39]))[0, 0]
        with pytest.raises(ValueError, match="positions 64..64 are outside the caches"):
            smol(torch.tensor([[1]]), torch.tensor([64]))
    torch.testing.assert_close(step, whole[39], atol=1e-4, rtol=0)


def test_batch_equals_single(smol):
    prompts = [[504, 3575, 282, 4649, 314], load_file(GOLDEN)["ids_b"][:23].tolist(), [19556, 28, 905, 17]]
    with torch.inference_mode():
        alone = []
        for p in prompts:
            smol.setup_caches(1, 64)
            alone.append(generate(smol, [p], max_new_tokens=12)[0][0])
        smol.setup_caches(3, 64)
        batch, _ = generate(smol, prompts, max_new_tokens=12)
    assert batch == alone


# --------------------------------------------------------------------------------------------------------------
# The three loaders on the same real weights

@pytest.fixture(scope="module")
def small_smol(smol_weights):
    """The default model cut to 3 layers (so the exported copies are quick to write and read)."""
    args, sd = smol_weights
    keep = {k: v for k, v in sd.items() if not k.startswith("layers.") or int(k.split(".")[1]) < 3}
    keep.pop("output.weight", None)  # tied
    return replace(args, n_layers=3), keep


def test_three_loaders_agree(small_smol, tmp_path):
    """GGUF (cut to 3 layers in memory), HF safetensors and Meta .pth directories give the same logits."""
    args, sd = small_smol
    ids = [504, 3575, 282, 4649, 314]
    ref = logits_of(from_state_dict(args, sd), ids)
    write_hf(tmp_path / "hf", args, sd)
    write_meta(tmp_path / "meta", args, sd)
    for path in (tmp_path / "hf", tmp_path / "meta"):
        torch.testing.assert_close(logits_of(from_checkpoint(str(path)), ids), ref, atol=1e-5, rtol=0)


def test_sharded_hf_index(small_smol, tmp_path):
    args, sd = small_smol
    write_hf(tmp_path, args, sd)
    tensors = load_file(tmp_path / "model.safetensors")
    names = sorted(tensors)
    os.remove(tmp_path / "model.safetensors")
    halves = {"a.safetensors": names[::2], "b.safetensors": names[1::2]}
    for file, part in halves.items():
        save_file({n: tensors[n] for n in part}, tmp_path / file)
    with open(tmp_path / "model.safetensors.index.json", "w") as f:
        json.dump({"weight_map": {n: file for file, part in halves.items() for n in part}}, f)
    model = from_checkpoint(str(tmp_path))
    assert torch.equal(model.layers[2].feed_forward.w2.weight, sd["layers.2.feed_forward.w2.weight"])
    os.remove(tmp_path / "model.safetensors.index.json")  # shards without their index: the index is asked for
    for i, file in enumerate(halves):
        os.rename(tmp_path / file, tmp_path / f"model-0000{i + 1}-of-00002.safetensors")
    with pytest.raises(ValueError, match="model-00001-of-00002.safetensors and the other shards need model.safet"):
        from_checkpoint(str(tmp_path))
    for file in os.listdir(tmp_path):  # a download's leftover is no shard
        if file.startswith("model-"):
            os.rename(tmp_path / file, tmp_path / f"{file}.part")
    with pytest.raises(ValueError, match="no model.safetensors or model.safetensors.index.json"):
        from_checkpoint(str(tmp_path))
    # a model.safetensors is read first, before an index, as transformers does
    embed = tensors["model.embed_tokens.weight"] + 1
    save_file({**tensors, "model.embed_tokens.weight": embed}, tmp_path / "model.safetensors")
    assert torch.equal(load_checkpoint(str(tmp_path))[1]["tok_embeddings.weight"], embed)


def test_missing_and_extra_keys(small_smol, tmp_path):
    args, sd = small_smol
    write_hf(tmp_path, args, sd)
    tensors = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"},
              tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r": 1 tensor missing, e\.g\. \['model\.layers\.1\.mlp\.up_proj\.weight'\]$"):
        from_checkpoint(str(tmp_path))  # the file's name for it, and no "0 tensors unexpected, e.g. []" tail
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}))
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=re.escape("missing, e.g. ['lm_head.weight'] (config.json's "
                                                   "tie_word_embeddings is false or absent)")):
        from_checkpoint(str(tmp_path))
    write_hf(tmp_path, args, sd)
    save_file({**tensors, "model.layers.1.mlp.extra.weight": torch.zeros(2)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r": 1 tensor this model does not use, e\.g\. \['model\.layers\.1\.mlp\.extra"):
        from_checkpoint(str(tmp_path))
    save_file({**tensors, "model.norm.weight": torch.zeros(7)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r": model\.norm\.weight has shape \(7,\)"):
        from_checkpoint(str(tmp_path))



def test_malformed_checkpoints_are_one_error(small_smol, tmp_path, monkeypatch):
    """Config fields of the wrong kind, another activation, integer weights, a tensor in two shards, a pickled
    object in a Meta checkpoint: each a ValueError naming the problem, before any model is built."""
    args, sd = small_smol
    write_hf(tmp_path, args, sd)
    cfg = json.loads((tmp_path / "config.json").read_text())
    for change, words in [({"num_attention_heads": 0}, "whole numbers in [1, 2^31), got {'num_attention_heads': 0}"),
                          ({"hidden_size": "576"}, "whole numbers in [1, 2^31), got {'hidden_size': '576'}"),
                          ({"vocab_size": 10 ** 30}, "got {'vocab_size': " + str(10 ** 30)),  # not a TypeError
                          ({"num_hidden_layers": 10 ** 9}, "1000000000 layers in its metadata, but only"),  # not OOM
                          ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false, got 'false'"),
                          ({"rope_scaling": {"rope_type": "linear"}}, "linear RoPE scaling needs factor"),
                          ({"rope_scaling": {"rope_type": "yarn", "factor": 4}}, "unsupported RoPE scaling 'yarn'"),
                          ({"rope_scaling": {"rope_type": "dim"}}, "RoPE scaling 'dim', the 'type' of {'type': 'dim'}"),
                          ({"hidden_act": "gelu"}, "unsupported hidden_act 'gelu'"),
                          ({"rope_scaling": [1]}, "malformed checkpoint"),
                          ({"head_dim": "16"}, "head_dim must be an even whole number in [2, 2^31), got '16'"),
                          ({"head_dim": 63}, "head_dim must be an even whole number in [2, 2^31), got 63"),
                          ({"head_dim": 10 ** 30}, f"in [2, 2^31), got {10 ** 30}"),  # not torch's overflow
                          ({"rope_theta": 10 ** 400}, "rope_theta must be finite numbers > 0"),  # not OverflowError
                          ({"rms_norm_eps": "1e-5"}, "rms_norm_eps must be finite numbers > 0, got {'rms_norm_eps': "),
                          ({"rope_theta": -1.0}, "rope_theta must be finite numbers > 0"),
                          ({"rms_norm_eps": True}, "got {'rms_norm_eps': True}"),  # JSON's true is no number
                          ({"num_hidden_layers": True}, "got {'num_hidden_layers': True}"),
                          ({"max_position_embeddings": 0}, "got {'max_position_embeddings': 0}"),  # config.json's names
                          ({"sliding_window": -1}, "got {'sliding_window': -1}"),
                          ({"num_key_value_heads": 2},
                           "num_attention_heads=9 is not a multiple of num_key_value_heads=2")]:
        (tmp_path / "config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(ValueError, match=re.escape(words)) as e:
            from_checkpoint(str(tmp_path))
        assert str(e.value).startswith(str(tmp_path))  # the file is named
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "hidden_act": "swish"}))  # SiLU's other name
    assert checkpoint_metadata(str(tmp_path))[1].dim == args.dim
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_attention_heads": 0}))
    os.symlink(tmp_path, tmp_path / "m")  # a short name, "m", that the message holds anyway ("model's")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"^m/config.json: the model's sizes"):
        from_checkpoint("m")
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="holds a JSON list, not an object"):
        from_checkpoint(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(tmp_path / "model.safetensors")
    save_file({**tensors, "model.norm.weight": tensors["model.norm.weight"].to(torch.int8)},
              tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="norm.weight holds torch.int8, not floating-point weights"):
        from_checkpoint(str(tmp_path))
    os.remove(tmp_path / "model.safetensors")
    save_file(tensors, tmp_path / "a.safetensors")
    save_file({"model.norm.weight": tensors["model.norm.weight"]}, tmp_path / "b.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {**{n: "a.safetensors" for n in tensors}, "model.norm.weight": "b.safetensors"}}))
    with pytest.raises(ValueError, match=r"repeats tensors of another shard, e\.g\. \['model\.norm\.weight'\]"):
        from_checkpoint(str(tmp_path))
    meta = tmp_path / "meta"
    write_meta(meta, args, sd)
    one = torch.load(meta / "consolidated.00.pth", weights_only=True)
    for change, words in [({"norm.weight": "x"}, "['norm.weight'] are not tensors"),  # before any shape is read
                          ({"layers.1.attention.wk.weight": torch.zeros(50, args.dim)},  # before the RoPE regrouping
                           f"layers.1.attention.wk.weight has shape (50, {args.dim}), the model expects (192, 576)")]:
        torch.save({**one, **change}, meta / "consolidated.00.pth")
        with pytest.raises(ValueError, match=re.escape(words)):
            from_checkpoint(str(meta))
    torch.save(one, meta / "consolidated.00.pth")
    torch.save({k: v for k, v in one.items() if k != "norm.weight"}, meta / "consolidated.01.pth")
    with pytest.raises(ValueError, match="shards hold different tensors"):  # not the first shard's set alone
        from_checkpoint(str(meta))
    torch.save(torch.zeros(3), meta / "consolidated.01.pth")  # a second shard that is no {name: tensor}
    with pytest.raises(ValueError, match="malformed checkpoint"):
        from_checkpoint(str(meta))
    os.remove(meta / "consolidated.01.pth")
    (meta / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 1, "n_heads": 4}))
    for bad in ([torch.zeros(2)], torch.zeros(3)):  # a list, a tensor: not {name: tensor}
        torch.save(bad, meta / "consolidated.00.pth")
        with pytest.raises(ValueError, match="malformed checkpoint"):
            from_checkpoint(str(meta))
    torch.save(fractions.Fraction(1, 3), meta / "consolidated.00.pth")  # a class weights_only refuses
    with pytest.raises(ValueError, match="consolidated.00.pth: it holds objects other than tensors; re-download") as e:
        from_checkpoint(str(meta))
    assert "weights_only" not in str(e.value)
    (meta / "consolidated.00.pth").write_bytes(open(meta / "consolidated.00.pth", "rb").read()[:40])  # truncated
    with pytest.raises(ValueError, match="consolidated.00.pth: cannot read it \\(.*\\); re-download it") as e:
        from_checkpoint(str(meta))
    assert "\n" not in str(e.value) and str(e.value).count(str(meta)) == 1  # (reading() adds no second path)


def test_weights_that_are_not_finite_are_refused_at_load(small_smol, tmp_path):
    """One NaN in a key projection made every score of its head NaN, which attention turned to 0: wrong text, exit
    status 0. A NaN or inf weight is refused naming the tensor, and so is one that float16 cannot hold."""
    args, sd = small_smol
    write_hf(tmp_path, args, sd)
    tensors = load_file(tmp_path / "model.safetensors")
    name = "model.layers.0.self_attn.k_proj.weight"
    for bad, dtype, words in ((math.nan, torch.float32, f"{name} holds NaN or inf; the file is corrupt"),
                              (math.nan, torch.float16, f"{name} holds NaN or inf in float16: a value past 65504, "
                                                        "or a corrupt file; load it in bfloat16"),
                              (-math.inf, torch.bfloat16, f"{name} holds NaN or inf"),
                              (1e5, torch.float16, f"{name} overflows torch.float16 (values past 6.55e+04); load "
                                                   "it in bfloat16 or float32 (--dtype)")):
        w = tensors[name].clone()
        w[0, 0] = bad
        save_file({**tensors, name: w}, tmp_path / "model.safetensors")
        with pytest.raises(ValueError, match=re.escape(words)):
            from_checkpoint(str(tmp_path), dtype=dtype)
    assert from_checkpoint(str(tmp_path), dtype=torch.bfloat16).layers[0].attention.wqkv.weight.isfinite().all()
    save_file({**tensors, name: torch.full_like(tensors[name], 6e4)}, tmp_path / "model.safetensors")
    assert from_checkpoint(str(tmp_path), dtype=torch.float16)  # finite in float16 (their sum is not)


def test_incomplete_checkpoint_metadata(tmp_path):
    """A field, metadata key or tensor the readers need is missing: a ValueError naming it, not a KeyError."""
    pytest.importorskip("gguf")  # a requirement; the GPU machine lacks it
    hf, meta = tmp_path / "hf", tmp_path / "meta"
    hf.mkdir()
    meta.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="has no 'hidden_size'"):
        from_checkpoint(str(hf))
    (hf / "config.json").write_text("{model_type: llama}")
    with pytest.raises(ValueError, match="config.json' is not valid JSON"):
        from_checkpoint(str(hf))
    (meta / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 1, "n_heads": 4}))
    torch.save({}, meta / "consolidated.00.pth")
    with pytest.raises(ValueError, match="has no 'tok_embeddings.weight'"):
        from_checkpoint(str(meta))
    embedding = torch.zeros(8, 4).numpy()
    bare = write_gguf(tmp_path / "m.gguf", lambda writer: writer.add_tensor("token_embd.weight", embedding))
    with pytest.raises(ValueError, match="has no 'llama.attention.head_count'"):  # the architecture and nothing else
        from_checkpoint(bare)


def write_model_gguf(path, keys, tensors=(), big_endian=False):
    """A one-layer GGUF (dim 8, 2 heads: head_dim 4, context 64) with `keys` over those and only the embedding and
    `tensors`: enough for load_checkpoint, which checks no tensor set."""
    def fill(writer):
        for key, value in {"llama.block_count": 1, "llama.embedding_length": 8, "llama.attention.head_count": 2,
                           "llama.feed_forward_length": 16, "llama.context_length": 64,
                           "llama.attention.layer_norm_rms_epsilon": 1e-5, **keys}.items():  # a value None: left out
            if value is not None:
                {int: writer.add_uint32, float: writer.add_float32, str: writer.add_string}[type(value)](key, value)
        for t_name, t in [("token_embd.weight", torch.zeros(16, 8)), *tensors]:
            writer.add_tensor(t_name, t.numpy())
    return write_gguf(path, fill, big_endian)


def test_gguf_named_file_without_magic_reads_as_the_tokenizer_says(tmp_path):
    """A *.gguf without the 'GGUF' magic: the tokenizer's one line, word for word (both call tokenizer.file_head; a
    --tokenizer may name such a file); another file without it is a wrong argument, not a bad file."""
    from tokenizer import Tokenizer
    for name, data in (("empty.gguf", b""), ("zeroed.gguf", b"\0\0\0\0\3\0\0\0" * 8), ("text.gguf", b"hi\n" * 9)):
        (tmp_path / name).write_bytes(data)
        path = str(tmp_path / name)
        with pytest.raises(ValueError) as ours:
            load_checkpoint(tmp_path / name)  # a Path as well as a str
        with pytest.raises(ValueError) as tokenizers:
            Tokenizer.from_path(path)
        assert str(ours.value) == f"{path!r} is not a GGUF file (it does not start with 'GGUF'): truncated or " \
                                  "corrupt; re-download it"
        assert str(ours.value) == str(tokenizers.value)
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(ValueError, match=r"\(it does not start with 'GGUF'\): pass a .gguf file or a checkpoint dir"):
        load_checkpoint(str(tmp_path / "model.safetensors"))


def test_a_missing_gguf_package_is_named_not_blamed_on_the_file(gguf_path, monkeypatch):
    """Without the gguf package, reading a GGUF's metadata or its tokenizer says so (they said "is the file
    complete?" and "truncated or corrupt ...; re-download it")."""
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf fails, as without the package
    tokenizer_module._open_gguf.cache_clear()  # (a reader kept from another test would hide it)
    for read in (checkpoint_metadata, tokenizer_module.Tokenizer.from_path):
        with pytest.raises(ImportError, match="a GGUF file needs the gguf package"):
            read(gguf_path)


def test_checkpoint_metadata_alone(tmp_path):
    """engine.py asks before the tokenizer and the weights: the context length from the metadata, with the
    architecture checked there. A Hugging Face GGUF repository (config.json beside the .gguf, no safetensors) is
    its GGUF."""
    gguf = pytest.importorskip("gguf")
    path = write_model_gguf(tmp_path / "m.gguf", {})
    assert model_module.checkpoint_metadata(path)[0] == 64
    (repo := tmp_path / "repo").mkdir()
    (repo / "m.gguf").write_bytes(open(path, "rb").read())
    (repo / "config.json").write_text('{"model_type": "llama"}')
    assert model_module.checkpoint_format(repo) == ("gguf", str(repo / "m.gguf"))
    (repo / "model.safetensors").write_bytes(b"")
    assert model_module.checkpoint_format(repo)[0] == "hf"
    writer = gguf.GGUFWriter(str(tmp_path / "q.gguf"), "qwen2")
    writer.add_uint32("qwen2.context_length", 64)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    with pytest.raises(ValueError, match="unsupported architecture 'qwen2'"):
        model_module.checkpoint_metadata(str(tmp_path / "q.gguf"))
    (hf := tmp_path / "hf").mkdir()
    (hf / "config.json").write_text('{"model_type": "qwen2"}')
    with pytest.raises(ValueError, match="unsupported model_type 'qwen2'"):
        model_module.checkpoint_metadata(str(hf))
    (meta := tmp_path / "meta").mkdir()
    (meta / "params.json").write_text('{"dim": 64, "use_scaled_rope": true}')
    assert model_module.checkpoint_metadata(str(meta)) == (131072, None)
    for bad in ('"4096"', "-1", "100.5"):  # a TypeError later, "exceeds the model's context of -1", after the load
        (meta / "params.json").write_text(f'{{"dim": 64, "max_seq_len": {bad}}}')
        with pytest.raises(ValueError, match=f"meta: params.json's max_seq_len must be a whole number >= 1, got "):
            model_module.checkpoint_metadata(str(meta))
    (meta / "params.json").write_text('{"dim": 64, "use_scaled_rope": "false"}')  # before: a 128K Llama 3.1 read
    with pytest.raises(ValueError, match="params.json's use_scaled_rope must be true or false, got 'false'"):
        model_module.checkpoint_metadata(str(meta))


def test_directory_holding_one_gguf(tmp_path):
    """A directory without config.json or params.json (a GGUF's pip package) loads its one .gguf file; with several
    it names them and asks which; with none it says what it looked for."""
    pytest.importorskip("gguf")
    with pytest.raises(ValueError, match=r"has no config.json \(Hugging Face\), params.json \(Meta\) or .gguf file; "
                                         "pass a .gguf file or a checkpoint directory"):
        load_checkpoint(str(tmp_path))
    path = write_model_gguf(tmp_path / "m.gguf", {"llama.context_length": 63})
    (tmp_path / "README.md").write_text("not a checkpoint")
    args, sd, _ = load_checkpoint(str(tmp_path))
    want_args, want_sd, _ = load_checkpoint(path)
    assert args == want_args and args.max_seq_len == 63
    assert sd.keys() == want_sd.keys() and all(torch.equal(sd[k], want_sd[k]) for k in sd)
    write_model_gguf(tmp_path / "a.gguf", {})
    with pytest.raises(ValueError) as e:
        load_checkpoint(str(tmp_path))
    assert str(e.value) == f"{str(tmp_path)!r} holds several .gguf files (a.gguf, m.gguf); pass the one to use"
    (hf := tmp_path / "snapshot").mkdir()  # a Hugging Face snapshot whose blobs did not all arrive
    (hf / "config.json").write_text('{"model_type": "llama"}')
    os.symlink(tmp_path / "blobs" / "abc", hf / "model.safetensors")
    os.symlink(tmp_path / "old-run", hf / "latest")  # a link the loader does not read: in nobody's way
    with pytest.raises(FileNotFoundError, match="snapshot: model.safetensors links to a file that does not exist; an "
                                                "incomplete download"):
        load_checkpoint(str(hf))


def test_git_lfs_pointers_are_named(tmp_path):
    """A clone made without git-lfs holds small pointer files in place of the weights: each loader names the file as
    one and says how to fetch it, instead of calling it corrupt or failing on its header."""
    from tokenizer import Tokenizer
    hf, meta, own = tmp_path / "hf", tmp_path / "meta", tmp_path / "own"
    for folder in (hf, meta, own):
        folder.mkdir()
    (hf / "config.json").write_text(json.dumps(HF_CFG))
    (meta / "params.json").write_text(json.dumps({"dim": 8, "n_layers": 1, "n_heads": 2}))
    pointer = b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"7f" * 32 + b"\nsize 538029408\n"
    for load, path, file in [(load_checkpoint, hf, hf / "model.safetensors"),
                             (load_checkpoint, meta, meta / "consolidated.00.pth"),
                             (load_checkpoint, own, own / "m.gguf"), (load_checkpoint, own / "m.gguf", own / "m.gguf"),
                             (Tokenizer.from_path, own, own / "m.gguf")]:
        file.write_bytes(pointer)
        with pytest.raises(ValueError) as e:
            load(path)
        assert str(e.value) == f"{str(file)!r} is a Git LFS pointer, not the file itself: fetch it with " \
                               "`git lfs pull` (or download the file)"


def test_a_failed_save_names_its_file_and_keeps_the_old_one(tmp_path):
    """A full disk's OSError names no file ("[Errno 28] No space left on device"): write_whole names it, and the
    file saved before stays whole, with no scratch file left beside it."""
    (path := tmp_path / "results.json").write_text("old")

    def full(tmp):
        with open(tmp, "w") as f:
            f.write("new, cut")
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError, match=f"^cannot write {re.escape(str(path))}: \\[Errno 28\\] No space left on device$"):
        model_module.write_whole(str(path), full)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["results.json"]


@pytest.mark.skipif(os.name != "posix", reason="links and modes as POSIX has them")
def test_write_whole_writes_as_open_would(tmp_path):
    """A link's target is written (before: the link was replaced by a file, the target left old); a file replaced
    keeps its mode (before: a 0600 file came back 0644), a new one gets the umask's; a name of 250 bytes is written,
    ASCII or not (before: its scratch file's longer name failed)."""
    write = lambda text: lambda tmp: open(tmp, "w").write(text)
    (tmp_path / "real").mkdir()
    (target := tmp_path / "real" / "p.json").write_text("old")
    os.symlink(target, link := tmp_path / "link.json")
    target.chmod(0o600)
    model_module.write_whole(str(link), write("new"))
    assert link.is_symlink() and target.read_text() == "new" and target.stat().st_mode & 0o777 == 0o600
    umask = os.umask(0o022)
    try:
        model_module.write_whole(str(long := tmp_path / ("x" * 250)), write("long"))
    finally:
        os.umask(umask)
    assert long.read_text() == "long" and long.stat().st_mode & 0o777 == 0o644
    model_module.write_whole(str(wide := tmp_path / ("é" * 125)), write("wide"))  # 250 bytes in UTF-8
    assert wide.read_text() == "wide"
    assert sorted(os.listdir(tmp_path)) == ["link.json", "real", "x" * 250, "é" * 125] and os.listdir(
        tmp_path / "real") == ["p.json"]


def test_write_whole_refuses_a_read_only_file_as_open_would(tmp_path, monkeypatch):
    """A file open() would not write (0444, for a user other than root: os.access says so) is kept and named; before,
    the rename replaced it."""
    (path := tmp_path / "ro.json").write_text("kept")
    read_only(monkeypatch, path)
    with pytest.raises(OSError, match=f"^cannot write {re.escape(str(path))}: the file is read-only$"):
        model_module.write_whole(str(path), lambda tmp: open(tmp, "w").write("new"))
    assert path.read_text() == "kept" and os.listdir(tmp_path) == ["ro.json"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_a_pipe_or_device_is_refused_not_read(tmp_path):
    """A named pipe given as the checkpoint or the tokenizer hung the first read until something wrote to it; a
    device such as /dev/zero was read as a file. Both are refused by what they are, before any read; a missing file
    stays one."""
    from tokenizer import Tokenizer
    os.mkfifo(pipe := tmp_path / "m.gguf")
    held = os.open(pipe, os.O_RDWR | os.O_NONBLOCK)  # a writer with bytes waiting: a regression fails, not hangs
    try:
        os.write(held, b"x" * 4096)
        for load in (model_module.checkpoint_metadata, load_checkpoint, Tokenizer.from_path):
            with pytest.raises(ValueError, match=r"m.gguf' is not a regular file \(a pipe or a device\?\): pass the "
                                                 "file itself"):
                load(str(pipe))
    finally:
        os.close(held)
    if os.path.exists("/dev/zero"):
        with pytest.raises(ValueError, match=r"'/dev/zero' is not a regular file"):
            load_checkpoint("/dev/zero")
    with pytest.raises(FileNotFoundError):  # a link to nothing (an incomplete download) is missing, not a device
        Tokenizer.from_path(str(tmp_path / "none.gguf"))


def test_gguf_rope_scaling_experts_and_rope_freqs(tmp_path, monkeypatch):
    """As llama.cpp reads a GGUF: a RoPE factor without a type (or in the older rope.scale_linear key) is linear
    scaling; a mixture-of-experts model is refused before its tensors are read; rope_freqs must fit head_dim."""
    gguf = pytest.importorskip("gguf")

    def write(name, keys, tensors=()):
        return write_model_gguf(tmp_path / name, keys, tensors)
    for keys, want in [({}, None), ({"llama.rope.scaling.factor": 4.0}, 4.0), ({"llama.rope.scale_linear": 2.0}, 2.0),
                       ({"llama.rope.scaling.factor": 4.0, "llama.rope.scale_linear": 2.0}, 4.0),  # llama.cpp's order
                       ({"llama.rope.scaling.factor": 0.0, "llama.rope.scale_linear": 2.0}, None)]:
        scaling = load_checkpoint(write("s.gguf", keys))[0].rope_scaling
        assert scaling == (want and {"type": "linear", "factor": want}), keys
    dequantized = []
    monkeypatch.setattr(gguf.quants, "dequantize", lambda *a: dequantized.append(a) or 1 / 0)
    with pytest.raises(ValueError, match="a mixture-of-experts model"):
        from_checkpoint(write("moe.gguf", {"llama.expert_count": 8}, [("blk.0.ffn_gate_exps.weight", torch.zeros(1))]))
    with pytest.raises(ValueError, match="a mixture-of-experts model"):  # one expert is that layout too
        checkpoint_metadata(write("moe1.gguf", {"llama.expert_count": 1}))
    for keys, words in [({"llama.rope.scaling.factor": -1.0}, "llama.rope.scaling.factor must be finite numbers > 0"),
                        ({"llama.context_length": 0}, "got {'llama.context_length': 0}"),  # the GGUF's keys
                        ({"llama.attention.head_count_kv": 3}, "llama.attention.head_count=2 is not a multiple of "
                                                               "llama.attention.head_count_kv=3")]:
        with pytest.raises(ValueError, match=re.escape(words)):  # ModelArgs' checks: before the tensors too
            from_checkpoint(write("neg.gguf", keys))
    assert dequantized == []
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"rope_freqs.weight must hold head_dim / 2 = 2 factors.*shape \(1,\)"):
        load_checkpoint(write("f.gguf", {}, [("rope_freqs.weight", torch.ones(1))]))
    with pytest.raises(ValueError, match=r"2 factors, each > 0; some are not \(zero, negative or NaN\)"):
        load_checkpoint(write("f.gguf", {}, [("rope_freqs.weight", torch.tensor([1.0, float("nan")]))]))
    with pytest.raises(ValueError, match=r"some are not \(zero, negative or NaN\)"):  # 1 / 0: an infinite frequency
        load_checkpoint(write("z.gguf", {}, [("rope_freqs.weight", torch.tensor([1.0, 0.0]))]))
    with pytest.raises(ValueError, match="tensor t is of type I32, which gguf cannot make floats of"):  # named
        load_checkpoint(write("i.gguf", {}, [("t", torch.ones(2, dtype=torch.int32))]))
    with pytest.raises(ValueError, match=re.escape(": blk.0.attn_k.weight has shape (3, 8), the model expects (8, 8)")):
        load_checkpoint(write("k.gguf", {}, [("blk.0.attn_k.weight", torch.zeros(3, 8))]))  # in the file's words
    assert torch.equal(load_checkpoint(write("f.gguf", {}, [("rope_freqs.weight", torch.ones(2))]))[2], torch.ones(2))
    _, sd, factors = load_checkpoint(str(tmp_path / "f.gguf"), torch.bfloat16)
    assert sd["tok_embeddings.weight"].dtype == torch.bfloat16 and factors.dtype == torch.float32  # RoPE stays fp32


def test_unsupported_math_is_refused(small_smol, tmp_path):
    """Config settings for math hata does not implement (partial RoPE, a sliding window shorter than the context,
    softcapping, Llama 4's QK norm, NoPE layers and chunked attention) are one error naming the file, the key and its
    value, raised before any weights are read (these directories hold none); their harmless values load, and so does
    pretraining_tp, which only splits the matmuls."""
    args, sd = small_smol
    hf, meta = tmp_path / "hf", tmp_path / "meta"
    write_hf(hf, args, sd)
    write_meta(meta, args, sd)
    cfg, params = json.loads((hf / "config.json").read_text()), json.loads((meta / "params.json").read_text())
    bare = tmp_path / "bare"  # settings and no weights: the old loader failed on the weights, or read them first
    bare.mkdir()
    whole_head = "RoPE on the whole head"
    for file, change, words in [
            ("config.json", {"partial_rotary_factor": 0.5}, f"partial_rotary_factor=0.5 is not supported; hata "
                                                            f"implements {whole_head} (1)"),
            # transformers v5 puts it in rope_parameters
            ("config.json", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e5,
                                                 "partial_rotary_factor": 0.25}}, "partial_rotary_factor=0.25"),
            ("config.json", {"rotary_dim": 32}, f"rotary_dim=32 is not supported; hata implements {whole_head} (64)"),
            ("config.json", {"attention_logit_softcapping": 50.0}, "attention_logit_softcapping=50.0 is not supported"),
            ("config.json", {"final_logit_softcapping": 30.0}, "final_logit_softcapping=30.0 is not supported"),
            ("params.json", {"use_qk_norm": True}, "use_qk_norm=True is not supported; hata implements no QK norm"),
            ("params.json", {"nope_layer_interval": 4}, "nope_layer_interval=4 is not supported"),
            ("params.json", {"attention_chunk_size": 8192}, "attention_chunk_size=8192 is not supported")]:
        (bare / "config.json").unlink(missing_ok=True)  # one settings file at a time: config.json is looked for first
        (bare / file).write_text(json.dumps({**(cfg if file == "config.json" else params), **change}))
        with pytest.raises(ValueError, match=re.escape(f"{bare / file}: {words}")):
            load_checkpoint(str(bare))
    harmless = {"partial_rotary_factor": 1.0, "rotary_dim": args.head_dim, "sliding_window": None,
                "attention_logit_softcapping": None, "final_logit_softcapping": None, "pretraining_tp": 2}
    (hf / "config.json").write_text(json.dumps({**cfg, **harmless}))
    (meta / "params.json").write_text(json.dumps({**params, "use_qk_norm": False, "nope_layer_interval": None,
                                                  "attention_chunk_size": None}))
    for path in (hf, meta):
        assert load_checkpoint(str(path))[0] == args, path
    for window, context in ((args.max_seq_len + 1, args.max_seq_len), (4096, 4096)):  # a window caps the context
        (hf / "config.json").write_text(json.dumps({**cfg, "sliding_window": window}))  # (within it: whole attention)
        assert load_checkpoint(hf)[0].max_seq_len == context  # (a Path: load_checkpoint takes one too)


def test_gguf_unsupported_math_is_refused(tmp_path, monkeypatch):
    """Partial RoPE (rope.dimension_count below head_dim; llama.cpp refuses it too) is one error naming the file and
    the key, before any tensor is dequantized; the whole head loads, and a sliding window caps the context."""
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "m.gguf"
    monkeypatch.setattr(gguf.quants, "dequantize", lambda *a: 1 / 0)
    words = "llama.rope.dimension_count=2 is not supported; hata implements RoPE on the whole head (4)"
    with pytest.raises(ValueError, match=re.escape(f"{path}: {words}")):
        load_checkpoint(write_model_gguf(path, {"llama.rope.dimension_count": 2}))
    monkeypatch.undo()
    for window, context in ((64, 64), (16, 16)):
        args = load_checkpoint(write_model_gguf(path, {"llama.rope.dimension_count": 4,
                                                       "llama.attention.sliding_window": window}))[0]
        assert args.head_dim == 4 and args.max_seq_len == context
    wide = write_model_gguf(path, {"llama.attention.key_length": 8, "llama.attention.value_length": 8})
    assert load_checkpoint(wide)[0].head_dim == 8  # a head dim the file states, not dim / heads (4)


def test_a_gguf_with_a_damaged_layout_is_refused(tmp_path):
    """A tensor's offset pointed at another tensor's bytes (or a type change leaving a gap) loaded the wrong weights
    without a word, and an embedding_length that is not the embedding's width was blamed on partial RoPE: ggml's own
    layout (each tensor where the one before it ends, padded to the alignment) and the width are checked."""
    gguf = pytest.importorskip("gguf")
    path = write_model_gguf(tmp_path / "m.gguf", {}, [("blk.0.attn_norm.weight", torch.ones(8)),
                                                      ("output_norm.weight", torch.ones(8)),
                                                      ("rope_freqs.weight", torch.ones(2)),  # 8 bytes, padded to 32
                                                      ("blk.0.ffn_norm.weight", torch.ones(8))])
    assert load_checkpoint(path)[1]["layers.0.ffn_norm.weight"].tolist() == [1.0] * 8  # after the padding
    reader = gguf.GGUFReader(path, "r+")
    reader.tensors[1].field.parts[-1][0] = reader.tensors[2].field.parts[-1][0]  # attn_norm at output_norm's bytes
    reader.data.flush()
    del reader
    with pytest.raises(ValueError, match="tensor blk.0.attn_norm.weight starts at byte .*, not at .* where the tensors "
                                         "before it end: the file is corrupt"):
        checkpoint_metadata(path)
    with pytest.raises(ValueError, match=re.escape("llama.embedding_length 6 is not the width of token_embd.weight "
                                                   "[16, 8]: the file is corrupt")):
        load_checkpoint(write_model_gguf(tmp_path / "e.gguf", {"llama.embedding_length": 6}))


def test_gguf_dequantizes_into_the_asked_dtype(gguf_path, smol_weights):
    """One tensor at a time into bf16 (no float32 copy of the whole model): the float32 load, rounded."""
    _, sd, _ = load_checkpoint(gguf_path, torch.bfloat16)
    ref = smol_weights[1]
    assert sd.keys() == ref.keys() and all(torch.equal(sd[n], w.to(torch.bfloat16)) for n, w in ref.items())


# --------------------------------------------------------------------------------------------------------------
# Model pieces on the tiny preset: dtypes, RoPE scaling

def test_batch_must_match_the_caches():
    model = Transformer(PRESETS["tiny"])
    model.setup_caches(2, 16)
    for B in (1, 3):  # fewer sequences than the caches hold failed deep inside attention; more, here
        with pytest.raises(ValueError, match=f"batch of {B} but the caches hold 2 sequences"):
            model(torch.zeros(B, 3, dtype=torch.long))


@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 4e-3)])
def test_dtypes_run_close_to_fp64(dtype, bound):
    """Logits in fp32 whatever the weights' dtype, within `bound` of the fp64 model relative to the largest logit:
    about 4x the error measured on CPU (fp32 3e-7, bf16 6-7e-3, fp16 7-9e-4; seeds 0-2)."""
    torch.manual_seed(0)
    model = Transformer(PRESETS["tiny"])
    ids = torch.randint(0, 512, (2, 9))
    with torch.inference_mode():
        model.double().setup_caches(2, 16)
        ref = model(ids)
        model.to(dtype).setup_caches(2, 16)
        got = model(ids)
    assert got.dtype == torch.float32
    assert (got.double() - ref).abs().max() <= bound * ref.abs().max()


def test_rms_norm_by_hand():
    """x / sqrt(mean(x^2) + eps) * weight, in fp32 whatever the input dtype; activations of 1e-3 make eps count."""
    gen = torch.Generator().manual_seed(0)
    x, w = 1e-3 * torch.randn(3, 8, generator=gen), torch.randn(8, generator=gen)
    for eps in (1e-5, 1e-6):  # the norm's own eps, not a fixed 1e-5 (Llama 1 used 1e-6)
        norm = model_module.RMSNorm(8, eps=eps)
        with torch.no_grad():
            norm.weight.copy_(w)
            want = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w
            torch.testing.assert_close(norm(x), want, rtol=1e-6, atol=0)
            torch.testing.assert_close(norm(x.double()), want.double(), rtol=1e-6, atol=0)


def test_rope_scaling():
    base = PRESETS["tiny"]
    plain = rope_frequencies(base)
    linear = rope_frequencies(base.__class__(**{**base.__dict__, "rope_scaling": {"type": "linear", "factor": 4.0}}))
    torch.testing.assert_close(linear, plain / 4)
    l3 = PRESETS["llama-3.1-8b"]
    f = rope_frequencies(l3)
    raw = rope_frequencies(l3.__class__(**{**l3.__dict__, "rope_scaling": None}))
    wavelen = 2 * torch.pi / raw
    # llama3 scaling: short waves (< 8192/4) unchanged, long waves (> 8192/1) divided by 8, a blend between
    assert torch.equal(f[wavelen < 2048], raw[wavelen < 2048])
    torch.testing.assert_close(f[wavelen > 8192], raw[wavelen > 8192] / 8)
    mid = (wavelen > 2048) & (wavelen < 8192)
    smooth = (8192 / wavelen[mid] - 1) / (4 - 1)  # Meta's apply_scaling (llama3 repository), written out
    assert mid.any()
    torch.testing.assert_close(f[mid], ((1 - smooth) * raw[mid] / 8 + smooth * raw[mid]).float())
    other = {"type": "llama3", "factor": 16.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
             "original_max_position_embeddings": 32768}  # every field read: waves < 32768/8 kept, > 32768/2 / 16
    f = rope_frequencies(l3.__class__(**{**l3.__dict__, "rope_scaling": other}))
    assert torch.equal(f[wavelen < 4096], raw[wavelen < 4096])
    torch.testing.assert_close(f[wavelen > 16384], raw[wavelen > 16384] / 16)
    mid = (wavelen > 4096) & (wavelen < 16384)
    smooth = (32768 / wavelen[mid] - 2) / (8 - 2)
    assert mid.any()
    torch.testing.assert_close(f[mid], ((1 - smooth) * raw[mid] / 16 + smooth * raw[mid]).float())
    factors = torch.linspace(1, 4, base.head_dim // 2)  # GGUF's rope_freqs tensor divides the frequencies
    torch.testing.assert_close(rope_frequencies(base, factors), plain / factors)


def test_rope_scaling_and_shards_from_checkpoints(small_smol, tmp_path):
    """A Hugging Face config's rope_scaling (Llama 3.1's) and a Meta params.json's use_scaled_rope both give
    Llama 3.1's scaling; a transformers v5 config keeps rope_theta in rope_parameters only; a Meta checkpoint split
    over two model-parallel shards (the embedding split as Llama 2's or Llama 3's) loads as the single file does."""
    args, sd = small_smol
    write_hf(tmp_path / "hf", args, sd)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 8192}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    llama31 = PRESETS["llama-3.1-8b"].rope_scaling
    assert load_checkpoint(str(tmp_path / "hf"))[0].rope_scaling == llama31
    del cfg["rope_scaling"]
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.pop("rope_theta")}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    assert load_checkpoint(str(tmp_path / "hf"))[0].rope_theta == 100000.0  # SmolLM2's, not a default of 10000
    meta, ids = tmp_path / "meta", [504, 3575, 282, 4649, 314]
    write_meta(meta, args, sd)
    whole = logits_of(from_checkpoint(str(meta)), ids)
    one = torch.load(meta / "consolidated.00.pth", weights_only=True)
    params = json.loads((meta / "params.json").read_text())
    (meta / "params.json").write_text(json.dumps({**params, "use_scaled_rope": True}))
    assert load_checkpoint(str(meta))[0].rope_scaling == llama31
    (meta / "params.json").write_text(json.dumps(params))
    for rows in (("wo.weight", "w2.weight", "tok_embeddings.weight"), ("wo.weight", "w2.weight")):  # Llama 2, 3
        write_meta_shards(meta, one, rows)
        torch.testing.assert_close(logits_of(from_checkpoint(str(meta)), ids), whole, atol=1e-5, rtol=0)


def test_hata_args_take_whole_numbers():
    for kw in (dict(rbit=64.0), dict(n_dense=True), dict(n_sink=1.5), dict(n_recent="4")):
        with pytest.raises(TypeError, match=f"{next(iter(kw))} must be whole numbers"):
            HataArgs(**kw)
    assert HataArgs(rbit=64, n_dense=0, budget=0.5).rbit == 64
    for kw, words in ((dict(n_sink=-3), "n_sink -3: must be >= 0"),
                      (dict(n_dense=-1, n_recent=-2), "n_dense -1, n_recent -2: must be >= 0")):  # which, and its value
        with pytest.raises(ValueError, match=words):
            HataArgs(**kw)


def test_meta_rope_factor_bad_positions_and_stray_shards(small_smol, tmp_path):
    """params.json's scaled RoPE takes llama-models' rope_scaling_factor / rope_high_freq_factor (Llama 3.2 1B and 3B
    need 32, not Llama 3.1's 8); llama3 scaling with low_freq_factor >= high_freq_factor is refused; a prompt chunk's
    positions outside the caches are one ValueError, not an IndexError or a write that wraps around to the end; a
    shard index naming a file outside the directory is refused; a use_norm cache survives model.to(bf16)."""
    args, sd = small_smol
    meta = tmp_path / "meta"
    write_meta(meta, args, sd, n_layers=1)
    params = json.loads((meta / "params.json").read_text())
    for extra, want in (({}, None), ({"use_scaled_rope": True}, (8.0, 4.0)),
                        ({"use_scaled_rope": True, "rope_scaling_factor": 32.0, "rope_high_freq_factor": 2.0},
                         (32.0, 2.0))):
        (meta / "params.json").write_text(json.dumps({**params, **extra}))
        scaling = load_checkpoint(str(meta))[0].rope_scaling
        assert (scaling and (scaling["factor"], scaling["high_freq_factor"])) == want, extra
    del params["max_seq_len"]  # as Meta writes it: the context follows from the family (Code Llama: theta 1e6)
    for extra, context in (({}, 4096), ({"rope_theta": 1e6}, 16384), ({"use_scaled_rope": True}, 131072)):
        (meta / "params.json").write_text(json.dumps({**params, **extra}))
        assert load_checkpoint(str(meta))[0].max_seq_len == context, extra
    with pytest.raises(ValueError, match="low_freq_factor < high_freq_factor"):
        replace(PRESETS["llama-3.1-8b"], rope_scaling={**PRESETS["llama-3.1-8b"].rope_scaling, "low_freq_factor": 4.0})
    model = Transformer(PRESETS["tiny"], HataArgs(budget=4, use_norm=True))
    model.setup_caches(1, 8)
    with torch.inference_mode():
        for tokens, start, words in ((torch.zeros(1, 9, dtype=torch.long), None, "9 tokens but the caches hold 8"),
                                     (torch.zeros(1, 3, dtype=torch.long), torch.tensor([6]), r"positions 6..8"),
                                     (torch.zeros(1, 3, dtype=torch.long), torch.tensor([-1]), r"positions -1..1")):
            with pytest.raises(ValueError, match=words):
                model(tokens, start)
        model.to(torch.bfloat16).setup_caches(1, 8)
        model.set_hata(HataArgs(budget=4, use_norm=True))
        model.to(torch.bfloat16)  # the norms' buffer follows; a prefill still writes them
        model(torch.zeros(1, 5, dtype=torch.long))
    norms = model.layers[-1].attention.hash_cache.norms  # (B, Hkv, S_max)
    assert norms.dtype == torch.bfloat16 and (norms[:, :, :5] > 0).all() and not norms[:, :, 5:].any()
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(HF_CFG))
    (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../other/model.safetensors"}}))
    with pytest.raises(ValueError, match="names files outside the directory"):
        load_checkpoint(str(hf))


# Hugging Face's names for our tensors, written out by hand (not read from model.WEIGHT_NAMES)
HF_BY_HAND = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
              "layers.{i}.attention_norm.weight": "model.layers.{i}.input_layernorm.weight",
              "layers.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
              "layers.{i}.attention.wq.weight": "model.layers.{i}.self_attn.q_proj.weight",
              "layers.{i}.attention.wk.weight": "model.layers.{i}.self_attn.k_proj.weight",
              "layers.{i}.attention.wv.weight": "model.layers.{i}.self_attn.v_proj.weight",
              "layers.{i}.attention.wo.weight": "model.layers.{i}.self_attn.o_proj.weight",
              "layers.{i}.feed_forward.w1.weight": "model.layers.{i}.mlp.gate_proj.weight",
              "layers.{i}.feed_forward.w3.weight": "model.layers.{i}.mlp.up_proj.weight",
              "layers.{i}.feed_forward.w2.weight": "model.layers.{i}.mlp.down_proj.weight"}


def test_hf_names_written_by_hand_give_the_gguf_logits(small_smol, tmp_path):
    """The export in test_three_loaders_agree reads model.WEIGHT_NAMES, so a swap inside its Hugging Face column
    (gate/up, the two norms, q/k) round-trips unseen; here the file's names are Hugging Face's, typed out."""
    args, sd = small_smol
    ref = logits_of(from_state_dict(args, sd), [504, 3575, 282, 4649, 314])
    write_hf(tmp_path, args, sd)  # config.json (tied); its safetensors replaced below
    tensors = {hf.format(i=i): sd[ours.format(i=i)].contiguous() for ours, hf in HF_BY_HAND.items()
               for i in (range(3) if "{i}" in ours else [0])}
    save_file(tensors, tmp_path / "model.safetensors")
    got = logits_of(from_checkpoint(str(tmp_path)), [504, 3575, 282, 4649, 314])
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("tie", ["absent", False])
def test_an_untied_hf_checkpoint_keeps_its_lm_head(small_smol, tmp_path, tie):
    """config.json without tie_word_embeddings (transformers' default: false) or false, and an lm_head of its own:
    the output layer is lm_head, not the embedding."""
    args, sd = small_smol
    write_hf(tmp_path, args, sd)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.pop("tie_word_embeddings")
    if tie is False:
        cfg["tie_word_embeddings"] = False
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    head = torch.randn(args.vocab_size, args.dim, generator=torch.Generator().manual_seed(0))
    save_file({**load_file(tmp_path / "model.safetensors"), "lm_head.weight": head}, tmp_path / "model.safetensors")
    model = from_checkpoint(str(tmp_path))
    assert not model.args.tie_embeddings
    assert torch.equal(model.output.weight, head)


def test_an_untied_meta_checkpoint_keeps_its_output(small_smol, tmp_path):
    args, sd = small_smol
    write_meta(tmp_path, args, sd)
    one = torch.load(tmp_path / "consolidated.00.pth", weights_only=True)
    head = torch.randn(args.vocab_size, args.dim, generator=torch.Generator().manual_seed(0))
    torch.save({**one, "output.weight": head}, tmp_path / "consolidated.00.pth")
    model = from_checkpoint(str(tmp_path))
    assert not model.args.tie_embeddings and torch.equal(model.output.weight, head)


def test_a_meta_checkpoint_without_output_weight_is_refused(small_smol, tmp_path):
    """Meta's checkpoints always hold output.weight (a tied Llama 3.2 1B or 3B: a copy of the embedding, loaded as
    one matrix), and Meta's loader needs it: a file without it is named, not read as tied (before: an untied model
    ran on its embedding)."""
    args, sd = small_smol
    write_meta(tmp_path, args, sd)
    whole = torch.load(tmp_path / "consolidated.00.pth", weights_only=True)
    one = {name: w for name, w in whole.items() if name != "output.weight"}
    torch.save(one, tmp_path / "consolidated.00.pth")
    with pytest.raises(ValueError, match=r"consolidated.00.pth: no output.weight; Meta's checkpoints always hold it"):
        from_checkpoint(str(tmp_path))
    write_meta_shards(tmp_path, one)  # model-parallel shards, none holding it
    with pytest.raises(ValueError, match=r"consolidated.00.pth \(and every other shard\): no output.weight"):
        load_checkpoint(str(tmp_path))
    os.remove(tmp_path / "consolidated.01.pth")
    torch.save(whole, tmp_path / "consolidated.00.pth")  # as Meta writes a tied model: tied again, one matrix
    ids = [504, 3575, 282, 4649, 314]
    model, want = from_checkpoint(str(tmp_path)), logits_of(from_state_dict(args, sd), ids)
    assert model.args.tie_embeddings and model.output.weight is model.tok_embeddings.weight
    torch.testing.assert_close(logits_of(model, ids), want, atol=1e-5, rtol=0)


def test_tied_weights_stay_one_tensor_after_a_dtype_change(small_smol, monkeypatch):
    """A tied model converted on load (bf16 file, fp32 model) holds one embedding matrix, not two copies, and converts
    it once (it was converted under both names, a second copy on the device until the load)."""
    args, sd = small_smol
    bf16 = {k: v.to(torch.bfloat16) for k, v in sd.items()}
    to, converted = torch.Tensor.to, []
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **kw: converted.append(self) or to(self, *a, **kw))
    model = from_state_dict(args, bf16, dtype=torch.float32)
    monkeypatch.undo()
    assert sum(t is bf16["tok_embeddings.weight"] for t in converted) == 1
    assert model.output.weight is model.tok_embeddings.weight
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # converted, every weight
    model = from_state_dict(args, sd, dtype=torch.bfloat16)  # and the other way
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_meta_scaled_rope_factor_and_context_by_family(tmp_path):
    """params.json may omit rope_scaling_factor: Llama 3.2 1B (dim 2048, 16 layers) and 3B (3072, 28) take 32,
    Llama 3.1 8; without max_seq_len a Llama 3 vocabulary (> 100K) means 8K context. read_meta needs only the two
    tensors it reads sizes from, and output.weight."""
    tensors = {"tok_embeddings.weight": torch.zeros(16, 2), "layers.0.feed_forward.w1.weight": torch.zeros(8, 2),
               "output.weight": torch.zeros(16, 2)}
    torch.save(tensors, tmp_path / "consolidated.00.pth")
    for (dim, n_layers), factor in (((2048, 16), 32.0), ((3072, 28), 32.0), ((4096, 32), 8.0)):
        (tmp_path / "params.json").write_text(json.dumps({"dim": dim, "n_layers": n_layers, "n_heads": 32,
                                                          "use_scaled_rope": True}))
        args = read_meta(str(tmp_path))[0]
        assert args.rope_scaling["factor"] == factor and args.norm_eps == 1e-5, (dim, n_layers)  # Meta's default eps
    (tmp_path / "params.json").write_text(json.dumps({"dim": 4096, "n_layers": 32, "n_heads": 32,
                                                      "vocab_size": 128256, "rope_theta": 500000.0}))
    assert checkpoint_metadata(str(tmp_path)) == (8192, None)


def test_settings_a_reader_once_took_wrongly(tmp_path):
    """From a hunt of the loaders: a big-endian GGUF loaded with NaN weights (gguf swaps the header, not the
    dequantized tensors); a GGUF's sliding_window 0 (no window, as config.json's) was a context of 0; config.json's
    rope_theta 0 or null (not beside a value in rope_parameters) and params.json's rope_scaling_factor 0 ran with
    defaults; params.json's sliding_window (a bad one refused) and head_dim were not read; an error from a checkpoint
    whose name starts its message ("t", "the ...") was not named, and one from inside "d/" was named twice."""
    with pytest.raises(ValueError, match="a big-endian GGUF, which llama.cpp does not read here either"):
        load_checkpoint(write_model_gguf(tmp_path / "big.gguf", {}, big_endian=True))
    for window, context in ((0, 64), (16, 16)):
        path = write_model_gguf(tmp_path / f"w{window}.gguf", {"llama.attention.sliding_window": window})
        assert load_checkpoint(path)[0].max_seq_len == context
    hf = tmp_path / "hf"
    hf.mkdir()
    for theta in (0, None):
        (hf / "config.json").write_text(json.dumps({**HF_CFG, "rope_theta": theta}))
        with pytest.raises(ValueError, match=r"rope_theta must be finite numbers > 0"):
            checkpoint_metadata(str(hf))
    nested = {"rope_theta": None, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}  # transformers v5
    (hf / "config.json").write_text(json.dumps({**HF_CFG, **nested}))
    assert checkpoint_metadata(str(hf))[1].rope_theta == 5e5
    tensors = {"tok_embeddings.weight": torch.zeros(16, 64), "layers.0.feed_forward.w1.weight": torch.zeros(8, 64),
               "output.weight": torch.zeros(16, 64)}
    torch.save(tensors, tmp_path / "consolidated.00.pth")
    params = {"dim": 64, "n_layers": 1, "n_heads": 4, "max_seq_len": 256}
    (tmp_path / "params.json").write_text(json.dumps({**params, "sliding_window": 16, "head_dim": 32}))
    assert checkpoint_metadata(str(tmp_path))[0] == 16 and read_meta(str(tmp_path))[0].head_dim == 32
    for window in (-3, 16.5, True):
        (tmp_path / "params.json").write_text(json.dumps({**params, "sliding_window": window}))
        with pytest.raises(ValueError, match="params.json's sliding_window must be a whole number >= 1"):
            checkpoint_metadata(str(tmp_path))
    (tmp_path / "params.json").write_text(json.dumps({**params, "use_scaled_rope": True, "rope_scaling_factor": 0}))
    with pytest.raises(ValueError, match=r"params.json: the model's rope_scaling_factor must be finite numbers > 0"):
        read_meta(str(tmp_path))
    with pytest.raises(ValueError, match="^t: the model's sizes"), model_module.reading("t"):
        raise ValueError("the model's sizes must be whole numbers")
    with pytest.raises(ValueError, match="^d/config.json: bad"), model_module.reading("d/"):  # named once
        raise ValueError("d/config.json: bad")


@pytest.mark.parametrize("dtype, words", [(torch.int32, "norm.weight holds torch.int32, not floating-point weights"),
                                          (torch.float8_e4m3fn, "norm.weight holds torch.float8_e4m3fn, not "
                                                                "floating-point weights of 16")])
def test_integer_and_float8_weights_are_refused(small_smol, dtype, words):
    """Integers of 16 bits or more are no weights; Meta's FP8 checkpoints hold float8 weights whose scales are other
    files: they loaded unscaled."""
    args, sd = small_smol
    with pytest.raises(ValueError, match=words):
        from_state_dict(args, {**sd, "norm.weight": sd["norm.weight"].to(dtype)})


def test_hf_rope_scaling_in_the_older_type_key(tmp_path):
    """Configs before transformers 4.45 spell rope_scaling's kind as "type" (Code Llama, Llama 2 long-context); a
    factor with no kind is refused (transformers fails on it too), not read as no scaling."""
    cfg = {**HF_CFG, "rope_scaling": {"type": "linear", "factor": 2.0}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert checkpoint_metadata(str(tmp_path))[1].rope_scaling == {"type": "linear", "factor": 2.0}
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "rope_scaling": {"factor": 2.0}}))
    with pytest.raises(ValueError, match=r"unsupported RoPE scaling None, the 'type' of"):
        checkpoint_metadata(str(tmp_path))


def test_a_stored_rotary_inv_freq_is_consumed(small_smol, tmp_path):
    """Older transformers saved each layer's rotary_emb.inv_freq; the loader recomputes it and drops the table."""
    args, sd = small_smol
    write_hf(tmp_path, args, sd)
    tensors = load_file(tmp_path / "model.safetensors")
    inv = torch.ones(args.head_dim // 2)
    save_file({**tensors, "model.layers.0.self_attn.rotary_emb.inv_freq": inv}, tmp_path / "model.safetensors")
    assert from_checkpoint(str(tmp_path)).args.n_layers == 3


def test_every_norm_takes_the_models_eps():
    """SmolLM2 and the tiny preset both use 1e-5, so a hard-coded eps passes the golden logits."""
    model = Transformer(replace(PRESETS["tiny"], norm_eps=0.25))
    eps = [m.eps for m in model.modules() if isinstance(m, RMSNorm)]
    assert len(eps) == 2 * 4 + 1 and set(eps) == {0.25}


def test_config_defaults_when_keys_are_absent(tmp_path):
    """Keys older configs leave out: num_key_value_heads (Llama 2 7B: multi-head, Hkv = H), max_position_embeddings
    (transformers' LlamaConfig default 2048); a GGUF without llama.rope.freq_base (llama.cpp's default 10000)."""
    (tmp_path / "config.json").write_text(json.dumps(HF_CFG))
    context, args = checkpoint_metadata(str(tmp_path))
    assert (args.n_kv_heads, context, args.rope_theta, args.tie_embeddings) == (2, 2048, 10000.0, False)
    pytest.importorskip("gguf")
    args = checkpoint_metadata(write_model_gguf(tmp_path / "m.gguf", {}))[1]
    assert (args.rope_theta, args.n_kv_heads) == (10000.0, 2)


def test_checkpoint_folders_read_by_their_weights(small_smol, tmp_path):
    """A Meta download holding a config.json loads as Meta (the format whose weights are there); folder names with
    glob characters are names, not patterns; shards whose pieces do not fit, a tensor name that is not a string and
    one part of a split GGUF are each one ValueError naming what is wrong."""
    args, sd = small_smol
    meta, hf = tmp_path / "llama [8b]", tmp_path / "hf[1]"
    write_meta(meta, args, sd, n_layers=1)
    write_hf(hf, args, sd, n_layers=1)
    (hf / "m.gguf").write_bytes(b"GGUF")  # a stray .gguf beside a Hugging Face checkpoint's own weights
    (meta / "config.json").write_text((hf / "config.json").read_text())
    assert checkpoint_format(str(meta)) == ("meta", str(meta)) and checkpoint_format(str(hf)) == ("hf", str(hf))
    want = load_checkpoint(str(hf))[1]
    got = load_checkpoint(str(meta))[1]
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    one = torch.load(meta / "consolidated.00.pth", weights_only=True)
    write_meta_shards(meta, one)
    w2 = torch.load(meta / "consolidated.01.pth", weights_only=True)
    torch.save({**w2, "layers.0.feed_forward.w2.weight": w2["layers.0.feed_forward.w2.weight"][:-1]},  # a row short
               meta / "consolidated.01.pth")
    with pytest.raises(ValueError, match=r"llama \[8b\]: layers.0.feed_forward.w2.weight: the consolidated.\*.pth "
                                         r"shards' pieces do not fit together \(.*\); re-download them"):
        load_checkpoint(str(meta))
    torch.save({**w2, 7: torch.zeros(2)}, meta / "consolidated.01.pth")
    with pytest.raises(ValueError, match=r"malformed checkpoint \(a consolidated.\*.pth holds no \{name: tensor\}"):
        load_checkpoint(str(meta))
    pytest.importorskip("gguf")
    part = write_model_gguf(tmp_path / "m-00001-of-00002.gguf", {"split.count": 2, "split.no": 0})
    for read in (load_checkpoint, checkpoint_metadata):
        with pytest.raises(ValueError, match=r"m-00001-of-00002.gguf: part 1 of a GGUF split into 2 files; merge "
                                             r"them first \(llama-gguf-split --merge\)"):
            read(part)


def test_codes_and_norms_after_a_chunk_that_follows_decode_steps():
    """A multi-turn cache: a prefill, decode steps, then a chunk at each sequence's own position. Every cached key's
    code and norm is what hashing the key cache from scratch gives (the decode steps write theirs one at a time)."""
    torch.manual_seed(0)
    model = Transformer(PRESETS["tiny"], HataArgs(budget=4, n_dense=1, use_norm=True)).eval()
    model.setup_caches(2, 32)
    with torch.inference_mode():
        model(torch.randint(0, 512, (2, 9)))  # both at 9 cached positions
        for step in range(3):  # positions 9..11, and 8..10 in the second sequence (its 9th token redrawn)
            model(torch.randint(0, 512, (2, 1)), torch.tensor([9 + step, 8 + step]))
        model(torch.randint(0, 512, (2, 5)), torch.tensor([12, 11]))  # the next turn: a chunk at 12.. and 11..
    assert model.sparse_layers()
    for attn in model.sparse_layers():
        keys = attn.kv_cache.k[:, :, :16]  # (B, Hkv, 16, D): positions 0..15 written in both sequences
        assert torch.equal(attn.hash_cache.codes[:, :, :16], hk.hash_encode_ref(keys, attn.hash_proj))
        torch.testing.assert_close(attn.hash_cache.norms[:, :, :16], keys.float().norm(dim=-1), rtol=1e-6, atol=0)


def test_keep_qk_hands_over_the_post_rope_queries_then_keys():
    """train_hash.py reads attn.qk as (q, k) after a forward with keep_qk: q (B, H, T, D), k (B, Hkv, T, D), the
    key being exactly what went into the KV cache; without keep_qk nothing is kept."""
    model = tiny_model()
    model.setup_caches(1, 16)
    attn = model.layers[1].attention
    attn.keep_qk = True
    with torch.inference_mode():
        model(random_ids(1, 6))
    q, k = attn.qk
    tiny = PRESETS["tiny"]
    assert q.shape == (1, tiny.n_heads, 6, tiny.head_dim) and k.shape == (1, tiny.n_kv_heads, 6, tiny.head_dim)
    assert torch.equal(k, attn.kv_cache.k[:, :, :6])
    assert model.layers[0].attention.qk is None


def test_setup_caches_builds_rope_from_the_checkpoints_rope_factors():
    """A GGUF's rope_freqs (model.rope_factors) divides the RoPE frequencies of the table setup_caches builds, and
    changes the logits; without it the table is the plain one."""
    model = tiny_model()
    ids = random_ids(1, 10)
    model.setup_caches(1, 16)
    with torch.inference_mode():
        plain = model(ids)
    factors = torch.linspace(1.0, 4.0, PRESETS["tiny"].head_dim // 2)
    model.rope_factors = factors
    model.setup_caches(1, 16)
    angles = torch.outer(torch.arange(16, dtype=torch.float32), rope_frequencies(PRESETS["tiny"], factors))
    torch.testing.assert_close(model.rope_cos, angles.cos(), rtol=0, atol=1e-6)
    torch.testing.assert_close(model.rope_sin, angles.sin(), rtol=0, atol=1e-6)
    with torch.inference_mode():
        assert (model(ids) - plain).abs().max() > 1e-3


def test_the_rope_table_is_fp32_cos_and_sin_of_position_times_frequency():
    """setup_caches' RoPE table: cos and sin of position x inverse frequency, (S_max, D/2) in fp32 whatever the
    weights' dtype (bf16 angles would be off by whole radians at long contexts)."""
    model = tiny_model(dtype=torch.bfloat16)
    model.setup_caches(1, 37)
    angles = torch.arange(37.0)[:, None] * rope_frequencies(model.args)  # (37, D/2)
    assert model.rope_cos.dtype == model.rope_sin.dtype == torch.float32
    torch.testing.assert_close(model.rope_cos, angles.cos(), rtol=0, atol=1e-6)
    torch.testing.assert_close(model.rope_sin, angles.sin(), rtol=0, atol=1e-6)


def test_positions_from_zero_to_the_caches_last():
    """input_pos may name position 0 (a chunk at the cache's start gives the fresh prefill's logits) and a decode
    step may write the cache's last position (max_seq_len - 1), giving the logits of one pass over all of it."""
    model = tiny_model()
    ids = random_ids(1, 8)
    model.setup_caches(1, 8)
    with torch.inference_mode():
        whole = model(ids)[0]
        model.setup_caches(1, 8)
        torch.testing.assert_close(model(ids[:, :7], torch.tensor([0]))[0], whole[:7], rtol=0, atol=1e-5)
        last = model(ids[:, 7:], torch.tensor([7]))[0, 0]
    torch.testing.assert_close(last, whole[7], rtol=0, atol=1e-5)


def test_cpu_decode_groups_query_heads_by_kv_head_when_G_differs_from_Hkv():
    """The CPU decode step's (G, D) blocks take query heads h*G .. h*G + G - 1 for KV head h. Both presets the other
    tests use have G = Hkv (tiny 4/2, SmolLM2 9/3), where grouping the heads the other way round gives the same
    result; with 8 query heads on 2 KV heads (G = 4) a decode step must still give the logits of a full pass, in a
    batch at different positions too (the masked path)."""
    args = ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=512, ffn_dim=96, rope_theta=10000.0,
                     max_seq_len=64)
    torch.manual_seed(0)
    model = Transformer(args).eval()
    ids = random_ids(2, 10)
    model.setup_caches(2, 16)
    with torch.inference_mode():
        whole = model(ids)  # (2, 10, V)
        model.setup_caches(2, 16)
        model(ids[:, :8])
        step = model(torch.stack([ids[0, 8:9], ids[1, 8:9]]), torch.tensor([8, 8]))[:, 0]
        torch.testing.assert_close(step, whole[:, 8], rtol=0, atol=1e-5)
        model.setup_caches(2, 16)
        model(ids[:, :9])
        step = model(torch.stack([ids[0, 9:10], ids[1, 8:9]]), torch.tensor([9, 8]))[:, 0]  # its own position each
    torch.testing.assert_close(step, torch.stack([whole[0, 9], whole[1, 8]]), rtol=0, atol=1e-5)


# From a mutation run of the loaders (2026-12-06): behaviour no test held before

def test_sizes_and_head_dim_stop_below_2_to_the_31():
    for kw in (dict(vocab_size=2 ** 31), dict(max_seq_len=2 ** 31)):
        with pytest.raises(ValueError, match=re.escape("whole numbers in [1, 2^31)")):
            ModelArgs(**kw)
    assert ModelArgs(max_seq_len=2 ** 31 - 1).max_seq_len == 2 ** 31 - 1
    words = re.escape(f"head_dim must be an even whole number in [2, 2^31), got {2 ** 31}")
    with pytest.raises(ValueError, match=words):
        ModelArgs(head_dim=2 ** 31)


def test_query_heads_must_be_a_multiple_of_kv_heads():
    with pytest.raises(ValueError, match="n_heads=6 is not a multiple of n_kv_heads=4"):
        ModelArgs(dim=48, n_heads=6, n_kv_heads=4)


@pytest.mark.parametrize("file, settings, words", [
    ("config.json", {**HF_CFG, "partial_rotary_factor": 0}, "partial_rotary_factor=0 is not supported"),  # 0: a value
    ("params.json", {"dim": 64, "n_layers": 1, "n_heads": 4, "use_qk_norm": True},
     "use_qk_norm=True is not supported")])
def test_metadata_alone_refuses_unsupported_settings(tmp_path, file, settings, words):
    (tmp_path / file).write_text(json.dumps(settings))
    with pytest.raises(ValueError, match=words):  # no weights needed: none are there
        checkpoint_metadata(str(tmp_path))


def test_a_meta_checkpoints_stored_rope_freqs_is_consumed(small_smol, tmp_path):
    args, sd = small_smol
    write_meta(tmp_path, args, sd)
    ids = [504, 3575, 282, 4649, 314]
    want = logits_of(from_checkpoint(str(tmp_path)), ids)
    one = torch.load(tmp_path / "consolidated.00.pth", weights_only=True)
    torch.save({**one, "rope.freqs": torch.full((args.head_dim // 2,), 2.0)}, tmp_path / "consolidated.00.pth")
    torch.testing.assert_close(logits_of(from_checkpoint(str(tmp_path)), ids), want, atol=0, rtol=0)  # Llama 2's
    # table, recomputed: dropped, not read as a GGUF's rope_freqs factors (with ones the two were the same)


@pytest.mark.parametrize("keys", [{"llama.rope.scaling.type": "none"},  # convert_hf_to_gguf's
                                  {"llama.rope.scaling.type": "none", "llama.rope.scaling.factor": 4.0},
                                  {"llama.rope.scaling.factor": 1.0}])  # a linear factor of 1 scales nothing
def test_a_gguf_rope_scaling_that_scales_nothing_is_no_scaling(tmp_path, keys):
    """A type "none" (whatever the factor beside it), or a linear factor of 1: read as no scaling, as a factor of 0
    is."""
    assert checkpoint_metadata(write_model_gguf(tmp_path / "n.gguf", keys))[1].rope_scaling is None


def test_a_gguf_without_its_rms_epsilon_is_incomplete(tmp_path):
    with pytest.raises(ValueError, match="has no 'llama.attention.layer_norm_rms_epsilon'"):
        checkpoint_metadata(write_model_gguf(tmp_path / "e.gguf", {"llama.attention.layer_norm_rms_epsilon": None}))


def test_config_nulls_mean_the_transformers_defaults(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**HF_CFG, "num_key_value_heads": None, "head_dim": None}))
    args = checkpoint_metadata(str(tmp_path))[1]
    assert (args.n_kv_heads, args.head_dim) == (2, 4)


def test_a_context_of_null_or_text_is_named_by_its_key(tmp_path):
    """A context length that is no number, beside a sliding window (which it was compared with first), or a window
    that is none: the key."""
    for bad in (None, "4096"):
        (tmp_path / "config.json").write_text(json.dumps({**HF_CFG, "max_position_embeddings": bad,
                                                           "sliding_window": 4096}))
        with pytest.raises(ValueError, match=re.escape(f"got {{'max_position_embeddings': {bad!r}}}")):
            checkpoint_metadata(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**HF_CFG, "sliding_window": "4096"}))
    with pytest.raises(ValueError, match="config.json's sliding_window must be a whole number or null, got '4096'"):
        checkpoint_metadata(str(tmp_path))


def test_a_missing_shard_is_named_before_any_shard_is_read(small_smol, tmp_path, monkeypatch):
    """An index naming a shard that was never downloaded: the incomplete download is named at once, not after
    reading the others (an 8B model's first shards: ~12 GB)."""
    args, sd = small_smol
    write_hf(tmp_path, args, sd)
    tensors = load_file(tmp_path / "model.safetensors")
    os.remove(tmp_path / "model.safetensors")
    names = sorted(tensors)
    save_file({n: tensors[n] for n in names[::2]}, tmp_path / "model-00001-of-00002.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        n: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, n in enumerate(names)}}))
    monkeypatch.setattr("safetensors.safe_open", lambda *a, **k: pytest.fail("a shard was read"))
    with pytest.raises(ValueError, match=r"the download is incomplete; model.safetensors.index.json names 2 shard "
                                         r"files and 1 of them are missing \(model-00002-of-00002.safetensors\)"):
        from_checkpoint(str(tmp_path))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model.safetensors"}}))
    with pytest.raises(ValueError, match=r"names 1 shard files and 1 of them are missing \(model.safetensors\)"):
        from_checkpoint(str(tmp_path))  # an index of one shard too


def test_a_gguf_of_f64_tensors_loads(tmp_path):
    """ggml's F64, which gguf's dequantize lacks, is read as its floats (the README takes floats of 16 bits or more)."""
    norm = torch.arange(8, dtype=torch.float64) / 3
    _, raw, _ = load_checkpoint(write_model_gguf(tmp_path / "f.gguf", {}, [("output_norm.weight", norm)]))
    assert torch.equal(raw["norm.weight"], norm.float())


def test_params_json_of_llama_1_has_its_2k_context():
    """LLaMA 1's params.json is Llama 2's but for norm_eps (1e-6, not 1e-5); neither names its context."""
    assert model_module.meta_context({"dim": 4096, "norm_eps": 1e-6, "vocab_size": -1}) == 2048
    assert model_module.meta_context({"dim": 4096, "norm_eps": 1e-5, "vocab_size": -1}) == 4096


def test_model_safetensors_wins_over_a_stale_index(small_smol, tmp_path):
    args, sd = small_smol
    write_hf(tmp_path, args, sd)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "gone.safetensors"}}))
    assert load_checkpoint(str(tmp_path))[0].n_layers == 3


def test_params_json_without_weights_is_one_error(tmp_path):
    (tmp_path / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 1, "n_heads": 4}))
    with pytest.raises(ValueError, match=r"params.json but no consolidated.\*.pth weights"):
        load_checkpoint(str(tmp_path))


def test_params_json_defaults_and_nulls(tmp_path):
    torch.save({"tok_embeddings.weight": torch.zeros(16, 64), "layers.0.feed_forward.w1.weight": torch.zeros(8, 64),
                "output.weight": torch.zeros(16, 64)}, tmp_path / "consolidated.00.pth")
    (tmp_path / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 1, "n_heads": 4, "n_kv_heads": None}))
    args = read_meta(str(tmp_path))[0]
    assert (args.rope_theta, args.n_kv_heads, args.max_seq_len) == (10000.0, 4, 4096)  # Llama 2's
    for nulls in ({"max_seq_len": None}, {"sliding_window": None}, {"sliding_window": 0}):
        (tmp_path / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 1, "n_heads": 4, **nulls}))
        assert checkpoint_metadata(str(tmp_path)) == (4096, None), nulls


def test_the_checkpoints_rope_factors_reach_the_model(small_smol):
    args, sd = small_smol
    factors = torch.linspace(1, 4, args.head_dim // 2)
    assert from_state_dict(args, sd, rope_factors=factors).rope_factors is factors


@pytest.mark.parametrize("name", ["tokenizer.json", "chat_template.jinja"])
def test_a_dangling_tokenizer_or_template_link_is_an_incomplete_download(tmp_path, name):
    (tmp_path / "config.json").write_text(json.dumps(HF_CFG))
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / name).symlink_to(tmp_path / "blobs" / "abc")
    with pytest.raises(FileNotFoundError, match=f"{name} links to a file that does not exist"):
        checkpoint_format(str(tmp_path))


# From a mutation run of checkpoint loading and configuration (2026-12-06): behaviour no test held before

def test_a_file_that_starts_almost_like_a_gguf_is_a_wrong_argument(tmp_path):
    """All four bytes of the magic are read: "GGUX" is not a GGUF file, named as such (not a GGUF reader's error)."""
    (path := tmp_path / "model.bin").write_bytes(b"GGUX" + b"\0" * 60)
    with pytest.raises(ValueError, match=r"is not a GGUF file \(it does not start with 'GGUF'\): pass a .gguf file"):
        load_checkpoint(str(path))


def test_a_config_without_its_rms_epsilon_is_incomplete(tmp_path):
    """As a GGUF without its epsilon: refused naming the key, not run with a guessed one (transformers' default is
    1e-6; Llama 2's and 3's own 1e-5)."""
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in HF_CFG.items() if k != "rms_norm_eps"}))
    with pytest.raises(ValueError, match="has no 'rms_norm_eps'"):
        checkpoint_metadata(str(tmp_path))


# From a test-strength review of the loaders (2026-12-07): GGUF settings no test held

def test_an_untied_gguf_keeps_its_output_weight(tmp_path):
    """A GGUF with an output.weight of its own is untied (as llama.cpp reads it); one without is tied. Read as tied,
    an untied file ran on its embedding: from_state_dict drops a tied model's output.weight without a word."""
    pytest.importorskip("gguf")
    head = torch.arange(16 * 8, dtype=torch.float32).view(16, 8) / 100
    args, sd, _ = load_checkpoint(write_model_gguf(tmp_path / "u.gguf", {}, [("output.weight", head)]))
    assert not args.tie_embeddings and torch.equal(sd["output.weight"], head)
    assert load_checkpoint(write_model_gguf(tmp_path / "t.gguf", {}))[0].tie_embeddings


def test_a_gguf_rope_scaling_type_hata_does_not_implement_is_refused(tmp_path):
    """llama.cpp's YaRN (any type but linear and none) is one error naming it, not run as no scaling."""
    pytest.importorskip("gguf")
    path = write_model_gguf(tmp_path / "y.gguf", {"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0})
    with pytest.raises(ValueError, match=re.escape(f"{path}: unsupported RoPE scaling 'yarn'")):
        checkpoint_metadata(path)



def test_weights_read_from_a_gguf_are_copies_of_the_file(tmp_path):
    """The weights read from a GGUF are copies, the F32 ones too (which gguf gives as views of its file mapping,
    and only they are copied again): the file rewritten in place afterwards changes no weight."""
    pytest.importorskip("gguf")
    head = torch.full((16, 8), 0.5)
    path = write_model_gguf(tmp_path / "m.gguf", {}, [("output.weight", head)])
    sd = load_checkpoint(path)[1]
    with open(path, "r+b") as f:  # the same file, its last tensor's bytes zeroed
        f.seek(-head.numel() * 4, os.SEEK_END)
        f.write(bytes(head.numel() * 4))
    assert torch.equal(sd["output.weight"], head)


def test_an_hf_config_head_dim_is_taken_not_derived(tmp_path):
    """config.json's head_dim wins over hidden_size // num_attention_heads (models whose heads are wider or narrower
    than the hidden size split n ways); without the key it is derived."""
    (tmp_path / "config.json").write_text(json.dumps({**HF_CFG, "head_dim": 8}))  # 8 // 2 heads would give 4
    assert checkpoint_metadata(str(tmp_path))[1].head_dim == 8
    (tmp_path / "config.json").write_text(json.dumps(HF_CFG))
    assert checkpoint_metadata(str(tmp_path))[1].head_dim == 4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_decode_mask_is_made_in_the_weights_dtype(dtype, monkeypatch):
    """A decode step's (and an uneven chunk's) additive mask is in the weights' dtype, so SDPA never converts it
    again in every layer (and CUDA's fused kernels take it); checked at each SDPA call of a batch decoding at
    different positions."""
    torch.manual_seed(0)
    model = Transformer(PRESETS["tiny"]).to(dtype).eval()
    model.setup_caches(2, 16)
    seen, real = [], F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, **kw):
        seen.append(None if attn_mask is None else attn_mask.dtype)
        return real(q, k, v, attn_mask=attn_mask, **kw)

    with torch.inference_mode():
        model(torch.randint(0, 512, (2, 6)))
        monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
        model(torch.randint(0, 512, (2, 1)), torch.tensor([6, 4]))  # its own position each: a masked step
    assert seen and set(seen) == {dtype}


def test_the_smollm2_preset_is_the_installed_models_architecture(gguf_path):
    """PRESETS["smollm2-135m"] (random-weight runs of the default model's shape, hash-file checks) holds the GGUF's
    own settings: its RMSNorm eps (the dataclass default) and RoPE theta are in no other test."""
    context, args = checkpoint_metadata(gguf_path)
    preset = PRESETS["smollm2-135m"]
    assert args.norm_eps == pytest.approx(preset.norm_eps, rel=1e-6)  # the GGUF stores it as float32
    assert replace(args, norm_eps=preset.norm_eps) == preset and context == preset.max_seq_len


def test_an_hf_rope_type_wins_over_the_older_type_key(tmp_path):
    """transformers reads rope_scaling's "rope_type" first and falls back on the older "type": a config holding both
    (an old "type" left beside a newer "rope_type") is read by its rope_type."""
    rope = {"rope_type": "linear", "type": "dynamic", "factor": 2.0}
    (tmp_path / "config.json").write_text(json.dumps({**HF_CFG, "rope_scaling": rope}))
    assert checkpoint_metadata(str(tmp_path))[1].rope_scaling["type"] == "linear"
