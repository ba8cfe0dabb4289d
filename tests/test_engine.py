"""The command line: it generates on the default model, and bad input gets one clear line on stderr and exit
status 2, raised before the model is loaded where it can be."""
import argparse
import contextlib
import dataclasses
import functools
import io
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import types

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import engine
from engine import parse_budget, sample
from model import CUDNN_LSE_ATTENTION, PRESETS, HataArgs, KVCache, Transformer, save_hash_projections
from tests.helpers import HF_CFG, count_sparse_steps, package_file, read_only, tiny_model, unreadable, write_hf


def run_cli(capsys, *argv):
    """engine.main in-process: (exit status, stdout, stderr); argparse's own errors exit through SystemExit."""
    try:
        code = engine.main(list(argv))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


# a random model of the tiny preset, on the CPU (on a GPU machine the default device is cuda)
TINY = ("--random-weights", "--preset", "tiny", "--device", "cpu")


def error_line(err):
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.usefixtures("gguf_path")  # the default model: skipped when it is not installed
def test_generates_paris(capsys):
    code, out, err = run_cli(capsys, "--prompt", "The capital of France is", "--max-new-tokens", "3", "--dense")
    assert code == 0
    assert out.startswith(" Paris")
    assert "tok/s" in err and "prefill" in err


@pytest.mark.usefixtures("gguf_path")
def test_chat_wraps_the_prompt_in_the_models_template(capsys):
    """--chat: the question goes through the checkpoint's chat template (37 tokens, not the bare question's 7), and
    the instruct model answers it; --system replaces the template's default system message."""
    code, out, err = run_cli(capsys, "--chat", "--prompt", "What is the capital of France?", "--max-new-tokens", "8",
                             "--dense")
    assert code == 0 and out == "The capital of France is Paris.\n" and "prefill: 37 tokens in" in err
    code, out, err = run_cli(capsys, "--chat", "--system", "Answer in French.", "--prompt",
                             "What is the capital of France?", "--max-new-tokens", "1", "--dense")
    assert code == 0 and "prefill: 25 tokens in" in err  # the system message given, not the template's own
    code, _, err = run_cli(capsys, "--system", "Be brief.", "--prompt", "hi", "--max-new-tokens", "1")
    assert code == 0 and "note: ignored in this run: --system (it is a chat's message: add --chat)" in err


def test_missing_checkpoint(capsys, tmp_path):
    code, _, err = run_cli(capsys, "--prompt", "hi", "--checkpoint", str(tmp_path / "nope.gguf"))
    assert code == 2 and "not found" in error_line(err)


def test_truncated_gguf(capsys, tmp_path, gguf_path):
    cut = tmp_path / "cut.gguf"
    with open(gguf_path, "rb") as f:
        cut.write_bytes(f.read(5_000_000))
    code, _, err = run_cli(capsys, "--prompt", "hi", "--checkpoint", str(cut))
    assert code == 2 and str(cut) in error_line(err)


def test_a_wrong_checkpoint_gets_the_loaders_error_not_the_tokenizers(capsys, tmp_path):
    """The tokenizer comes from the checkpoint and is read first: a path that is no checkpoint (an empty directory,
    a text file) is refused in load_checkpoint's words, before the tokenizer fails on it less clearly. A directory
    of the right form without a tokenizer still gets the tokenizer's error."""
    from model import load_checkpoint
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("not a model\n")
    for path in (tmp_path / "empty", tmp_path / "notes.txt"):
        with pytest.raises(ValueError) as loader:
            load_checkpoint(path)
        code, _, err = run_cli(capsys, "--prompt", "hi", "--checkpoint", str(path))
        assert code == 2 and error_line(err) == f"error: {loader.value}", err
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(HF_CFG))  # a Llama config: passes before the tokenizer
    code, _, err = run_cli(capsys, "--prompt", "hi", "--checkpoint", str(tmp_path / "hf"))
    assert code == 2 and "no tokenizer.model, tokenizer.json or .gguf in directory" in error_line(err)
    assert error_line(err).endswith("holding one; or name one with --tokenizer"), err


def hf_dir(tmp_path, smol_weights, drop=None, extra=None):
    """A 2-layer Hugging Face directory of the default model's real weights (tokenizer passed separately)."""
    args, sd = smol_weights
    write_hf(tmp_path, args, {k: v for k, v in sd.items() if k != "output.weight"}, n_layers=2)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors.pop(drop, None)
    save_file({**tensors, **(extra or {})}, tmp_path / "model.safetensors")
    return str(tmp_path)


@pytest.mark.parametrize("change, words", [(dict(drop="model.layers.1.self_attn.k_proj.weight"),
                                            ("missing", "model.layers.1.self_attn.k_proj.weight")),
                                           (dict(extra={"model.layers.0.self_attn.q_bias": torch.zeros(3)}),
                                            ("does not use", "q_bias"))])
def test_safetensors_missing_or_extra_key(capsys, tmp_path, smol_weights, gguf_path, change, words):
    path = hf_dir(tmp_path, smol_weights, **change)
    code, _, err = run_cli(capsys, "--prompt", "hi", "--checkpoint", path, "--tokenizer", gguf_path)
    assert code == 2 and words[0] in error_line(err) and words[1] in err


def test_hf_directory_generates(capsys, tmp_path, smol_weights, gguf_path, tok):
    path = hf_dir(tmp_path, smol_weights)
    code, out, err = run_cli(capsys, "--prompt", "Hello", "--checkpoint", path, "--tokenizer", gguf_path,
                             "--max-new-tokens", "2")
    assert code == 0 and "n_layers=2" in err
    from model import from_checkpoint
    model = from_checkpoint(path)  # the same two layers, run by hand
    model.setup_caches(1, 8)
    with torch.inference_mode():
        new, _ = engine.generate(model, [tok.encode("Hello")], 2)
    assert out == tok.decode(new[0]) + "\n"


@pytest.mark.usefixtures("gguf_path")  # the default model: skipped when it is not installed
def test_prompt_longer_than_max_seq_len(capsys):
    code, _, err = run_cli(capsys, "--prompt", "one two three four five six", "--max-seq-len", "4")
    line = error_line(err)
    assert code == 2 and "--max-seq-len is 4" in line and "loaded" not in err  # refused before loading
    code, _, err = run_cli(capsys, "--prompt", "hello world " * 4200)  # the model's context, read from its metadata
    assert code == 2 and "the model's context is 8192 tokens" in error_line(err) and "loaded" not in err
    code, _, err = run_cli(capsys, "--interactive", "--prompt", "hello world " * 4200)  # a chat's cache: the context,
    assert code == 2 and "but the model's context is 8192 tokens" in error_line(err), err  # no --max-seq-len given


def test_unknown_dtype(capsys):
    code, _, err = run_cli(capsys, "--prompt", "hi", "--dtype", "float8")
    assert code == 2 and "argument --dtype: invalid choice: 'float8'" in error_line(err)


@pytest.mark.parametrize("flag, value, words", [
    ("--budget", "0", "budget"), ("--budget", "-5", "budget"), ("--budget", "abc", "budget"),
    ("--budget", "1/0", "budget"), ("--budget", "2/1", "budget"), ("--rbit", "48", "--rbit must be a multiple of 32"),
    ("--rbit", "-32", "--rbit must be a multiple of 32 (whole int32 code words) in [32, 1024], got -32"),
    ("--budget", "-1/4", "budget '-1/4' is not"), ("--budget", "-1/-4", "budget '-1/-4' is not"),
    ("--temperature", "-1e-3", "--temperature must"),  # not flags
    ("--temperature", "nan", "--temperature"),
    ("--temperature", "-1", "--temperature"), ("--temperature", "inf", "--temperature must be a finite number"),
    ("--top-p", "0", "--top-p"), ("--top-p", "1.5", "--top-p"), ("--top-k", "-1", "--top-k -1: must be >= 0"),
    ("--stop", "", "--stop needs some text"), ("--min-p", "1.5", "--min-p must lie in [0, 1], got 1.5"),
    ("--min-p", "-0.1", "--min-p must lie in [0, 1]"),
    ("--repetition-penalty", "0", "--repetition-penalty must be a finite number > 0 (1 = none), got 0.0"),
    ("--repetition-penalty", "nan", "--repetition-penalty must"), ("--repetition-penalty", "inf", "--repetition-p"),
    ("--n-dense", "-1", "--n-dense -1: must be >= 0"), ("--sink", "-2", "--sink -2: must be >= 0"),
    ("--recent", "-3", "--recent -3: must be >= 0"),
    ("--seed", str(2 ** 64), f"seed {2 ** 64} is outside -2^63 .. 2^64 - 1"),
])
def test_bad_flags(capsys, flag, value, words):
    code, _, err = run_cli(capsys, "--prompt", "hi", flag, value)
    assert code == 2 and words in error_line(err) and "loaded" not in err  # refused before loading


def test_forced_positions_must_fit_the_budget(capsys):
    """More --sink + --recent positions than K: the newest forced ones won, so --sink 20 --budget 8 attended to
    positions 12..19 (neither the first tokens nor the query's own). Refused before the load; equal to K, or with a
    budget covering the cache or --n-dense covering every layer (dense), they run."""
    tiny = [*TINY, "--prompt-len", "16", "--max-new-tokens", "4"]
    for flags in (["--sink", "20"], ["--sink", "6", "--recent", "6"], ["--budget", "1/4", "--recent", "6"]):
        code, _, err = run_cli(capsys, *tiny, "--budget", "8", *flags)
        assert code == 2 and "the positions always attended must fit in it" in error_line(err) and "random weights" \
            not in err
    for flags in (["--budget", "8", "--sink", "4", "--recent", "4"], ["--budget", "20", "--sink", "25"],
                  ["--budget", "8", "--sink", "20", "--n-dense", "4"]):  # every layer dense: no budget to fit
        code, _, err = run_cli(capsys, *tiny, *flags)
        assert code == 0, err


@pytest.mark.usefixtures("gguf_path")  # the default model: skipped when it is not installed
def test_forced_positions_of_a_checkpoint_with_every_layer_dense(capsys):
    """A checkpoint's layer count from its metadata: --n-dense 30 covers the default model's 30 layers, so --sink 20
    over a budget of 8 runs; --n-dense 29 leaves one sparse layer and is refused before the load."""
    for n_dense, want in (("30", 0), ("29", 2)):
        code, _, err = run_cli(capsys, "--prompt", "hi", "--max-new-tokens", "2", "--max-seq-len", "64", "--budget",
                               "8", "--sink", "20", "--n-dense", n_dense)
        assert code == want and ("the positions always attended" in err) == (want == 2) and ("loaded" in err) == \
            (want == 0), err


def test_offload_needs_a_gpu(capsys):
    for flags in (["--offload"], ["--kv-gpu-gb", "1"]):
        code, _, err = run_cli(capsys, "--prompt", "hi", "--device", "cpu", *flags)
        assert code == 2 and "on the CPU it is there already" in error_line(err) and "loaded" not in err


def test_offload_flags_are_checked_before_the_model_loads(capsys):
    for flags, words in [(["--offload", "--dense"], "--offload fetches only the rows HATA's hash selector picks"),
                         (["--offload", "--selector", "oracle"], "--offload fetches only the rows"),
                         (["--offload", "--selector", "quest"], "and --selector quest has none: drop one of them"),
                         *[(["--kv-gpu-gb", v], f"--kv-gpu-gb must be a positive number of GiB, got {float(v)}")
                           for v in ("-1", "0", "nan", "inf")]]:
        code, _, err = run_cli(capsys, "--prompt", "hi", *flags)
        assert code == 2 and words in error_line(err) and "loaded" not in err, (flags, err)


def test_offload_is_noted_as_ignored_only_beside_kv_gpu_gb(capsys, monkeypatch):
    """--kv-gpu-gb decides which layers go to host memory: an --offload beside it is noted; alone it is the plan (a
    CUDA device is pretended; the checkpoint is missing, so nothing loads)."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for flags, noted in ((["--offload", "--kv-gpu-gb", "1"], True), (["--offload"], False)):
        code, _, err = run_cli(capsys, "--prompt", "hi", "--device", "cuda", "--checkpoint", "/nonexistent.gguf",
                               *flags)
        assert code == 2 and "checkpoint not found" in error_line(err)
        assert ("note: ignored in this run: --offload (--kv-gpu-gb decides which layers go to host memory)\n"
                in err) == noted, err


@pytest.mark.usefixtures("gguf_path")  # the default model: skipped when it is not installed
def test_an_offload_plan_that_gains_nothing_is_refused_before_the_weights_load(capsys, monkeypatch):
    """The plan is made from the checkpoint's metadata on a model of no memory: --n-dense covering every layer, or a
    budget covering the cache, was refused only after the load (here a CUDA device is pretended; nothing loads)."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(engine, "from_checkpoint", lambda *a, **k: 1 / 0)
    for flags, words in [(["--n-dense", "30"], "nothing to offload: no layer decodes sparsely"),
                         (["--budget", "1024"], "offloading gains nothing: the budget covers the whole 16-token "
                                                "cache")]:
        code, _, err = run_cli(capsys, "--prompt", "hi", "--device", "cuda", "--offload", "--max-new-tokens", "16",
                               *flags)
        assert code == 2 and words in error_line(err), err
    hata = HataArgs(n_dense=1, budget=8)  # a cap: the plan's own arithmetic, in the run's dtype
    layer, codes = engine.meta_model(PRESETS["tiny"], hata, torch.bfloat16).cache_bytes(1, 64)
    args = argparse.Namespace(offload=False, kv_gpu_gb=(layer + codes) / 2**30)  # the dense layer and the codes
    engine.check_offload(args, PRESETS["tiny"], hata, 1, 64, 8, torch.bfloat16)  # (an 8-token prompt: no copy)
    with pytest.raises(ValueError, match=rf"needs {2 * layer + codes} bytes on the GPU even with all 3 sparse layers"):
        engine.check_offload(args, PRESETS["tiny"], hata, 1, 64, 8, torch.float32)  # a layer twice bf16's


@pytest.mark.usefixtures("gguf_path")  # the default model's tokenizer: skipped when it is not installed
def test_a_head_dim_the_gpu_kernels_cannot_tile_is_refused_before_the_load(capsys, monkeypatch):
    """On CUDA the hashing and attention kernels need a head dim that is a power of two >= 16: OpenLLaMA-3B's 100
    failed in the first prefill, after the weights had loaded. Refused from the metadata now, for any selector;
    runs with no sparse step (a budget of the whole cache, 300 positions, too) go on to the load (a CUDA device is
    pretended; nothing loads)."""
    def load(*args, **kwargs):
        raise ValueError("the load")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(engine, "from_checkpoint", load)
    shape = dataclasses.replace(PRESETS["tiny"], head_dim=100, vocab_size=49152)  # the default model's tokenizer
    monkeypatch.setattr(engine, "checkpoint_metadata", lambda path: (1024, shape))
    for flags in (["--budget", "4"], ["--budget", "1/8", "--selector", "oracle"], ["--budget", "64", "--selector",
                                                                                   "quest"], ["--budget", "299"]):
        code, _, err = run_cli(capsys, "--prompt", "hi", "--device", "cuda", "--max-new-tokens", "300", *flags)
        assert code == 2 and "a power of two >= 16, and this model's is 100: decode with --dense" in error_line(err)
    for flags in (["--dense"], ["--n-dense", "4", "--budget", "4"], ["--budget", "2048"],
                  ["--budget", "300"],  # every position of the cache (1 + 300 - 1): no sparse step
                  ["--device", "cpu", "--budget", "4", "--selector", "oracle"]):
        code, _, err = run_cli(capsys, "--prompt", "hi", "--device", "cuda", "--max-new-tokens", "300", *flags)
        assert code == 2 and error_line(err) == "error: the load", err


def test_bad_device(capsys):
    n = torch.cuda.device_count()
    for device, words in [("xyz", "'xyz' names no device"), ("cuda:x", "'cuda:x' names no device"),
                          (f"cuda:{n}", f"this machine has {n} CUDA"), ("gpu", "'gpu': did you mean cuda?"),
                          ("CPU", "'CPU': did you mean cpu?"),
                          ("meta", "runs on cpu or cuda[:N]"), ("xpu", "runs on cpu or cuda[:N]"),
                          *([] if n else [("cuda", "has 0 CUDA device(s)")])]:
        code, _, err = run_cli(capsys, "--prompt", "hi", "--device", device)
        assert code == 2 and "argument --device" in err and words in err and "loaded" not in err


def test_random_weights_that_do_not_fit_are_refused(monkeypatch, capsys):
    monkeypatch.setattr(engine, "host_available", lambda: 1000)  # bytes free
    with pytest.raises(ValueError, match=r"the tiny shape's weights take .* GiB in torch.float32 but cpu has 0.0 GiB"):
        engine.random_model("tiny", None, "cpu", torch.float32)
    code, _, err = run_cli(capsys, "--random-weights", "--device", "cpu")  # the default preset: Llama-3.1-8B
    assert code == 2 and "llama-3.1-8b shape's weights take 29.9 GiB" in error_line(err)
    monkeypatch.setattr(engine, "host_available", lambda: 0)  # none left (a full cgroup): refused, not read as unknown
    with pytest.raises(ValueError, match=r"but cpu has 0.0 GiB free"):
        engine.random_model("tiny", None, "cpu", torch.float32)
    monkeypatch.setattr(engine, "host_available", lambda: None)  # unknown (no /proc/meminfo): built
    assert engine.random_model("tiny", None, "cpu", torch.float32).args.dim > 0


def test_caches_that_do_not_fit_are_refused_before_they_are_made(monkeypatch, capsys):
    """The KV cache, and the key codes where HATA reads them, against the device's free memory (an 8B model on the
    CPU with a long --max-new-tokens was killed by the OOM killer): tiny, fp32, 4 layers x 2 KV heads x 16 dims x
    K and V = 1024 bytes a position, + 3 sparse layers x 2 heads x 2 words of R = 64 = 48 bytes (and an int32
    anchor per sequence and KV head, 24 bytes); and beside them a prefill chunk's working memory (8 prompts of 100K
    tokens filled an H200 with caches, then ran out in the prefill)."""
    model = tiny_model(HataArgs(rbit=64, budget=4, n_dense=1))
    work = model.forward_bytes(2, 3, 3)  # a 3-token prompt's one chunk
    caches = 2 * 64 * (1024 + 48) + 2 * 24  # B = 2, S = 64
    need = caches + work
    for free, fits in ((need, True), (need - 1, False), (None, True), (0, False)):  # None: unknown; 0: none left
        monkeypatch.setattr(engine, "host_available", lambda: free)
        if fits:
            engine.check_cache_memory(model, 2, 64, 3)
        else:
            with pytest.raises(ValueError, match=r"the caches for 2 sequences of 64 positions and a prefill chunk's "
                                                 r"working memory take 0.0 GiB in torch.float32 but cpu has 0.0 GiB "
                                                 r"free; lower --max-new-tokens or --max-seq-len, or give fewer "
                                                 r"prompts"):
                engine.check_cache_memory(model, 2, 64, 3)
    monkeypatch.setattr(engine, "PREFILL_CHUNK", 8)  # a 20-token prompt: chunks of 8, the last one seeing all 20
    monkeypatch.setattr(engine, "host_available", lambda: caches + model.forward_bytes(2, 8, 20) - 1)
    with pytest.raises(ValueError, match="the caches for 2 sequences"):
        engine.check_cache_memory(model, 2, 64, 20)
    monkeypatch.setattr(engine, "host_available", lambda: caches + model.forward_bytes(2, 8, 20))
    engine.check_cache_memory(model, 2, 64, 20)  # every layer on the device: no copy for a later chunk
    engine.check_cache_memory(model, 2, 64, 20, continued=True)  # nor for a continued prefill's
    with pytest.raises(ValueError, match="and a prefill chunk's working memory"):  # setup passes the prompt's length
        engine.setup(model, argparse.Namespace(compile=False, offload=False, kv_gpu_gb=None), 2, 64, 21)
    # --offload's layers: 2 of 4 layers' K/V on the device, and a later prefill chunk's copy of one, up to the
    # prompt's 20
    for layer in model.layers[2:]:
        layer.attention.kv_cache_cls = functools.partial(KVCache)
    work = model.forward_bytes(2, 8, 20)
    monkeypatch.setattr(engine, "host_available", lambda: 2 * 64 * (512 + 48) + 48 + 2 * 20 * 256 + work - 1)
    with pytest.raises(ValueError, match="the caches for 2 sequences"):
        engine.check_cache_memory(model, 2, 64, 20)
    monkeypatch.setattr(engine, "host_available", lambda: 2 * 64 * (512 + 48) + 48 + 2 * 20 * 256 + work)
    engine.check_cache_memory(model, 2, 64, 20)
    monkeypatch.setattr(engine, "host_available", lambda: 2 * 64 * (512 + 48) + 48 + model.forward_bytes(2, 8, 8))
    engine.check_cache_memory(model, 2, 64, 8)  # one prefill chunk: no copy
    # unless it continues the cache (a chat's later turns): then the copy up to its end counts
    with pytest.raises(ValueError, match="the caches for 2 sequences"):
        engine.check_cache_memory(model, 2, 64, 8, continued=True)
    for layer in model.layers:
        layer.attention.kv_cache_cls = KVCache
    model.set_hata(HataArgs(rbit=64, budget=4, n_dense=1, use_norm=True))  # + a key norm: 3 x 2 x 4 bytes
    monkeypatch.setattr(engine, "host_available", lambda: 2 * 64 * (1024 + 48 + 24) + 48 + model.forward_bytes(2, 8, 8)
                        - 1)
    with pytest.raises(ValueError, match="the caches for 2 sequences"):
        engine.check_cache_memory(model, 2, 64, 8)
    monkeypatch.setattr(engine, "host_available", lambda: 2 ** 20)  # the weights fit, a cache of 1024 positions not
    code, _, err = run_cli(capsys, *TINY, "--prompt-len", "1000", "--budget", "8")
    assert code == 2 and "the caches for 1 sequence of 1024 positions and a prefill chunk's" in error_line(err)


def test_offload_plans_count_a_continued_prefills_copy(monkeypatch):
    """A one-chunk prompt copies nothing back from an offloaded layer, unless its prefill continues the cache (a
    chat's later turns): the plans before the weights load and at setup are told so."""
    copies = []
    monkeypatch.setattr(engine, "plan_offload", lambda *a, copy_len: copies.append(copy_len))
    monkeypatch.setattr(engine, "offload_from_args", lambda *a, copy_len: copies.append(copy_len))
    monkeypatch.setattr(engine, "check_cache_memory", lambda *a: copies.append(a[-1]))
    model = types.SimpleNamespace(setup_caches=lambda *a: None)
    plan = argparse.Namespace(offload=True, kv_gpu_gb=None, compile=False)
    for continued in (False, True):
        engine.check_offload(plan, PRESETS["tiny"], HataArgs(n_dense=1, budget=8), 2, 64, 8, torch.float32, continued)
        engine.setup(model, plan, 2, 64, 8, continued)
    assert copies == [0, 0, False, 8, 8, True]


def test_forward_bytes_counts_the_mlp_the_residual_stream_the_logits_and_a_cpu_mask():
    """A prefill chunk's working memory (Transformer.forward_bytes): tiny (ffn 160, dim 64, vocab 512), fp32, B = 2,
    T = 8: 2 x 8 x (4 x 160 + 4 x 64) x 4 bytes of activations + 2 x 512 x 10 of logits; a later chunk on the CPU
    also makes its (8, 20) mask float (on CUDA its two cuDNN passes take none)."""
    model = tiny_model()
    assert model.forward_bytes(2, 8, 8) == 2 * 8 * 896 * 4 + 10240
    assert model.forward_bytes(2, 8, 20) == 2 * 8 * 896 * 4 + 8 * 20 * 4 + 10240
    model.to(torch.bfloat16)
    assert model.forward_bytes(1, 8, 8) == 8 * 896 * 2 + 5120


def test_forward_bytes_counts_the_mask_where_cuda_takes_the_masked_pass():
    """On CUDA a later chunk in bf16 / fp16 is two cuDNN passes without a mask; in fp32, or on the CPU, it is one
    masked pass. (A stand-in for the model's weight says where it lives: the CPU runs the CUDA case too.)"""
    mask = 8 * 20 * 4  # a later chunk of 8 tokens over 20 keys: the (T, S) fp32 mask
    for is_cuda, dtype, masked in ((True, torch.bfloat16, not CUDNN_LSE_ATTENTION), (True, torch.float32, True),
                                   (False, torch.bfloat16, True)):
        weight = types.SimpleNamespace(is_cuda=is_cuda, dtype=dtype)
        model = types.SimpleNamespace(args=PRESETS["tiny"], output=types.SimpleNamespace(weight=weight))
        expected = 2 * 8 * 896 * dtype.itemsize + mask * masked + 10240
        assert Transformer.forward_bytes(model, 2, 8, 20) == expected, (is_cuda, dtype)


def test_random_weights_are_built_in_their_dtype(monkeypatch):
    """No float32 model first and a cast after (a 7B shape in bf16 was 25 GiB before its 12.6): the weights are made
    in the dtype asked for, and the default dtype is restored."""
    made, real = [], engine.Transformer

    def build(*args):  # the dtypes of each model as it is made
        model = real(*args)
        made.append({p.dtype for p in model.parameters()})
        return model
    monkeypatch.setattr(engine, "Transformer", build)
    engine.random_model("tiny", None, "cpu", torch.bfloat16)
    assert made[-1] == {torch.bfloat16} and torch.get_default_dtype() == torch.float32  # (made[0]: the size check)


def test_bad_prompt_files(capsys, tmp_path, monkeypatch):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    code, _, err = run_cli(capsys, "--prompt-file", str(tmp_path / "latin1.txt"))
    assert code == 2 and "latin1.txt is not UTF-8" in error_line(err) and "e.g. with iconv -f latin1 -t utf-8" in err
    with open(tmp_path / "latin1.txt", "rb") as f:  # (before: "prompt file -", and no way to fix it)
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(f))
        code, _, err = run_cli(capsys, "--prompt-file", "-")
    assert code == 2 and error_line(err).startswith("error: standard input (--prompt-file -) is not UTF-8"), err
    # PowerShell's > writes UTF-16 with a byte order mark; UTF-16-LE has none, and reads as UTF-8 with zero bytes, as
    # a binary file does (before: all three "UTF-16 text", whose iconv would garble the last)
    for text, why in (("The capital".encode("utf-16"), "is UTF-16 text, not UTF-8: convert it, e.g. with iconv -f "
                                                       "utf-16 -t utf-8"),
                      ("The capital".encode("utf-16-le"), "is not text: a zero byte at character 1 (a binary file; "
                                                          "or UTF-16 without a byte order mark: then convert it"),
                      (b"The\x00capital", "is not text: a zero byte at character 3 (a binary file;")):
        (tmp_path / "wide.txt").write_bytes(text)
        code, _, err = run_cli(capsys, "--prompt-file", str(tmp_path / "wide.txt"))
        assert code == 2 and f"wide.txt {why}" in error_line(err), err
    code, _, err = run_cli(capsys, "--prompt-file", str(tmp_path))
    assert code == 2 and f"prompt file {tmp_path} is a directory" in error_line(err)
    code, _, err = run_cli(capsys, "--prompt-file", str(tmp_path / "none.txt"))
    assert code == 2 and "prompt file not found: " in error_line(err)
    code, _, err = run_cli(capsys, "--prompt-file", "/proc/self/mem")  # opens, but its first page cannot be read
    assert code == 2 and error_line(err) == "error: prompt file /proc/self/mem: cannot read it (Input/output error)"


def test_a_missing_gguf_package_is_one_error_line(capsys, monkeypatch, gguf_path):
    """engine.py without the gguf package: one line naming it (a traceback once the readers stopped taking it for a
    corrupt file, which they had said instead)."""
    from tokenizer import _open_gguf
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf fails, as without the package
    _open_gguf.cache_clear()  # (a reader kept from another test would hide it)
    code, _, err = run_cli(capsys, "--checkpoint", gguf_path, "--prompt", "hi", "--max-new-tokens", "1")
    assert code == 2 and "a GGUF file needs the gguf package" in error_line(err)


def test_standard_input_is_one_prompt(capsys, monkeypatch, tmp_path):
    """Standard input or a pipe read twice gave "prompt 2 is empty": "-" and /dev/stdin (here /dev/fd/N) are one."""
    once = "--prompt-file names standard input (or one pipe) twice, which holds one prompt: give it once"
    code, _, err = run_cli(capsys, "--prompt-file", "-", "--prompt", "x", "--prompt-file", "-")
    assert code == 2 and once in error_line(err)
    read, write = os.pipe()
    os.close(write)
    with os.fdopen(read) as pipe:
        monkeypatch.setattr(sys, "stdin", pipe)
        code, _, err = run_cli(capsys, "--prompt-file", "-", "--prompt-file", f"/dev/fd/{read}")
        assert code == 2 and once in error_line(err)
    monkeypatch.setattr(sys, "stdin", None)  # `<&-`: Python's sys.stdin is None
    code, _, err = run_cli(capsys, "--prompt-file", "-")
    assert code == 2 and "--prompt-file -: standard input is closed" in error_line(err)
    (text := tmp_path / "p.txt").write_text("x")  # a file reads the same twice; so does a device such as /dev/null
    assert engine.stream_key(str(text)) is None and engine.stream_key(os.devnull) is None
    read, write = os.pipe()
    os.write(write, b"hi")
    os.close(write)
    with os.fdopen(read) as pipe:  # "--prompt -" is a prompt's text; a file named twice reads the same twice
        monkeypatch.setattr(sys, "stdin", pipe)
        for argv in (["--prompt", "-", "--prompt-file", "-"], ["--prompt-file", str(text), "--prompt-file", str(text)]):
            code, _, err = run_cli(capsys, *argv, "--checkpoint", "/nonexistent.gguf")  # read as asked
            assert code == 2 and "nonexistent" in err and "names standard input" not in err
    # `< p.txt`: /dev/stdin is standard input, which --interactive reads (before: the file was its first message,
    # then each of its lines one more)
    with open(text) as redirected:
        monkeypatch.setattr(sys, "stdin", redirected)
        for name in (f"/dev/fd/{redirected.fileno()}", str(text)):
            code, _, err = run_cli(capsys, "--interactive", "--prompt-file", name)
            assert code == 2 and "a --prompt-file that is not standard input" in error_line(err), err
        code, _, err = run_cli(capsys, "--prompt-file", str(text), "--prompt-file", str(text), "--checkpoint",
                               "/nonexistent.gguf")  # a file, read twice alike: not one stream
        assert code == 2 and "nonexistent" in err and "names standard input" not in err, err
    broken = open(os.devnull)
    broken.close()  # a closed file object as stdin: counted as "-" (its fileno() raises ValueError)
    monkeypatch.setattr(sys, "stdin", broken)
    assert engine.stream_key("-") == "-"
    os.mkfifo(fifo := tmp_path / "fifo")  # refused before it is opened (which would wait for a writer)
    monkeypatch.setattr(engine, "read_prompt_file", lambda path: pytest.fail(f"{path} read before the check"))
    code, _, err = run_cli(capsys, "--prompt-file", str(fifo), "--prompt-file", str(fifo))
    assert code == 2 and once in error_line(err)
    for flag in ("--checkpoint", "--tokenizer", "--hash-weights", "--prompt-file"):  # "": an unset shell variable
        code, _, err = run_cli(capsys, "--prompt", "x", flag, "")
        assert code == 2 and f"argument {flag}: an empty path (an unset shell variable?)" in error_line(err)


def test_a_prompt_or_typed_message_is_read_to_a_limit(capsys, tmp_path, monkeypatch):
    """A prompt file or a typed message longer than PROMPT_CHARS is refused once that much is read (before: /dev/zero,
    or a stray log of gigabytes, was read until memory ran out); one of PROMPT_CHARS characters is read whole."""
    monkeypatch.setattr(engine, "PROMPT_CHARS", 100)
    (tmp_path / "p.txt").write_text("x" * 100)
    assert engine.read_prompt_file(str(tmp_path / "p.txt")) == "x" * 100
    (tmp_path / "p.txt").write_text("x" * 101)
    for path in [tmp_path / "p.txt"] + ["/dev/zero"] * os.path.exists("/dev/zero"):
        code, _, err = run_cli(capsys, "--prompt-file", str(path))
        assert code == 2 and error_line(err) == (f"error: prompt file {path} holds over 100 characters, more than "
                                                 "a model's context takes"), err
    for typed in ("y" * 101 + "\n", "y\\\n" * 60):  # one line, or lines continued with \ (each was bounded alone)
        stdin_of(monkeypatch, "Hi\n" + typed + "Bye\n")
        assert list(engine.typed_turns()) == ["Hi"]
        assert capsys.readouterr().err == ("warning: a message of over 100 characters, more than a model's context "
                                           "takes; the chat ends\n")
    for typed in ("y" * 100, "y\\\n" * 49 + "yy"):  # (a line's "\n" counts)
        stdin_of(monkeypatch, typed)
        assert list(engine.typed_turns()) == [typed.replace("\\\n", "\n")]


@pytest.mark.usefixtures("gguf_path")  # the default model: skipped when it is not installed
def test_prompt_file_may_be_a_pipe(capsys, tmp_path):
    """`--prompt-file <(...)` or `--prompt-file /dev/stdin` reads a pipe, which is no regular file."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)

    def write():
        try:
            fifo.write_text("The capital of France is\n")  # blocks until a reader opens the pipe
        except BrokenPipeError:  # the reader below, when the engine never read it
            pass

    writer = threading.Thread(target=write)
    writer.start()
    code, out, err = run_cli(capsys, "--prompt-file", str(fifo), "--max-new-tokens", "3", "--dense")
    if writer.is_alive():  # the engine refused the pipe without opening it: let the writer go
        os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
    writer.join()
    assert code == 0 and "prefill: 5 tokens" in err and out.startswith(" Paris"), err


def test_interactive_takes_another_pipe_as_its_first_message_and_refuses_stdin_before_reading_it(capsys, tmp_path,
                                                                                                monkeypatch):
    """`--interactive --prompt-file <(...)`: a pipe that is not standard input is the first message (before: refused
    as standard input); `--prompt-file -` is refused before standard input is read (before: after, which at a
    terminal waited for a Ctrl-D first)."""
    stdin_of(monkeypatch, "Hi\n")
    code, _, err = run_cli(capsys, "--interactive", "--prompt-file", "-")
    assert code == 2 and "a --prompt-file that is not standard input" in error_line(err) and sys.stdin.read() == "Hi\n"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=fifo.write_text, args=("Hello\n",))
    writer.start()
    code, _, err = run_cli(capsys, "--interactive", "--prompt-file", str(fifo), "--checkpoint", "/nonexistent.gguf")
    writer.join()
    assert code == 2 and "nonexistent" in error_line(err), err  # read, then the checkpoint refused


@pytest.mark.usefixtures("gguf_path")  # the default model: skipped when it is not installed
def test_prompt_files_repeat_into_a_batch_and_dash_is_stdin(capsys, tmp_path, monkeypatch):
    (tmp_path / "b.txt").write_text("Hello")
    read, write = os.pipe()
    os.write(write, "The capital of France is\n".encode())
    os.close(write)
    with os.fdopen(read) as stdin:
        monkeypatch.setattr(sys, "stdin", stdin)
        code, out, err = run_cli(capsys, "--prompt-file", "-", "--prompt-file", str(tmp_path / "b.txt"),
                                 "--max-new-tokens", "3", "--dense")
    assert code == 0 and "--- 'The capital of France is'\n Paris" in out and "--- 'Hello'" in out, err


def stdin_of(monkeypatch, text):  # a pipe holding `text` as standard input
    read, write = os.pipe()
    os.write(write, text.encode())
    os.close(write)
    monkeypatch.setattr(sys, "stdin", os.fdopen(read))


def test_interactive_answers_each_turn_on_the_kept_cache(capsys, monkeypatch, smol, tok):
    """--interactive: a --prompt, then standard input's lines (a blank one skipped) are the user's turns. Each reply
    is greedy generate's over the whole conversation from scratch (its repetition penalty over all of it), while a
    turn prefills only what follows the cached tokens (the reply as decoded, less its last token)."""
    replies, ids = [], []
    turns = ["What is the capital of France?", "And Germany's?"]
    for turn in turns:
        ids.append(tok.encode_chat([m for t, r in zip(turns, replies) for m in ({"role": "user", "content": t},
                                    {"role": "assistant", "content": r})] + [{"role": "user", "content": turn}]))
        smol.setup_caches(1, len(ids[-1]) + 11)
        new = engine.generate(smol, [ids[-1]], 12, tok.eos_ids, repetition_penalty=1.3)[0][0]
        replies.append(tok.decode([t for t in new if t not in tok.eos_ids]))
    stdin_of(monkeypatch, f"\n{turns[1]}\n")
    code, out, err = run_cli(capsys, "--interactive", "--prompt", turns[0], "--max-new-tokens", "12",
                             "--repetition-penalty", "1.3")
    prefilled = [int(line.split()[1]) for line in err.splitlines() if line.startswith("prefill:")]
    assert code == 0 and out == "".join(r + "\n" for r in replies) and "Berlin" in replies[1], err
    assert prefilled[0] == len(ids[0]) and 2 <= prefilled[1] < len(ids[1]) - len(ids[0]), err


def test_interactive_hands_generate_each_turn_of_one_conversation(capsys, monkeypatch, tok):
    """With a stub generate (each reply "Hello" and <|im_end|>), two --prompt texts are two turns of one chat, whose
    caches are planned as one sequence of the whole cache, continued. Each turn gets --max-new-tokens (here 1, which
    the cache has room for) and the --stop strings; the second starts after the cached
    tokens, the first reply less its last token, and gets the first's kept CUDA graphs (one capture for the chat). A
    cache one token short of the whole conversation forgets the first exchange: the second turn is its own message
    alone, after the system turn the caches share."""
    hello, calls, plans, kept = tok.encode("Hello", bos=False), [], [], []

    def generate(model, prompts, n, stop_ids, *args, start=0, stop_when=None, graphs=None, **kwargs):
        calls.append((len(prompts[0]), n, start, stop_when.texts))
        kept.append(graphs)
        return [hello + [2]], {}
    monkeypatch.setattr(engine, "generate", generate)
    monkeypatch.setattr(engine, "report_speed", lambda timing: None)
    monkeypatch.setattr(engine, "check_cache_memory", lambda model, *plan: plans.append(plan))
    first, again = (tok.encode_chat([{"role": "user", "content": t}]) for t in ("Hi", "Again"))
    both = tok.encode_chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                            {"role": "user", "content": "Again"}])
    system = next(i for i, (a, b) in enumerate(zip(first, again)) if a != b)  # the tokens before the user's turn
    for size in (len(both), len(both) - 1):
        stdin_of(monkeypatch, "")
        code, _, err = run_cli(capsys, "--interactive", "--prompt", "Hi", "--prompt", "Again", "--max-seq-len",
                               str(size), "--max-new-tokens", "1", "--stop", "X")
        assert code == 0 and plans.pop() == (1, size, size, True), err
        assert calls.pop(0) == (len(first), 1, 0, ["X"])
        if size == len(both):
            assert calls.pop(0) == (len(both), 1, len(first) + len(hello), ["X"]) and "forgets" not in err, err
            assert isinstance(kept[0], dict) and kept[1] is kept[0]
        else:
            assert calls.pop(0) == (len(again), 1, system, ["X"]), err
            assert "note: the conversation forgets its oldest exchange to leave this reply room" in err, err  # > half
        assert calls == []


@pytest.mark.usefixtures("gguf_path")  # the default model: skipped when it is not installed
def test_stop_strings_end_the_default_models_text(capsys):
    """--stop ',' on a counting prompt: the text stops before the first comma, and generation stops there too (no
    new-token limit reached); a batch's answers are cut the same way."""
    code, out, err = run_cli(capsys, "--prompt", "Count: 1, 2, 3,", "--stop", ",", "--max-new-tokens", "20",
                             "--dense")
    assert code == 0 and out.strip() and "," not in out and "new-token limit" not in err, (out, err)
    code, out, err = run_cli(capsys, "--prompt", "Count: 1, 2, 3,", "--prompt", "Say: a, b, c,", "--stop", ",",
                             "--max-new-tokens", "20", "--dense")
    answers = [line for line in out.splitlines() if not line.startswith("--- ")]
    assert code == 0 and len(answers) == 2 and not any("," in a for a in answers), out


def test_ctrl_c_stops_an_interactive_reply_not_the_chat(capsys, monkeypatch, tok):
    """Ctrl-C in a turn's prefill (a plain KeyboardInterrupt, not generate's Interrupted) stops that reply and the
    chat reads the next message; the turn's positions from where its prefill started may be half written, so the
    next turn prefills from there again, the earlier turns' positions kept."""
    def instead(n, on_token):
        if n == 2:  # the second turn, in its prefill
            raise KeyboardInterrupt
    calls, _, _ = stub_replies(monkeypatch, tok, instead)
    stdin_of(monkeypatch, "Go on.\nAgain.\n")
    code, out, err = run_cli(capsys, "--interactive", "--prompt", "Hi")
    assert code == 0 and err.count("(reply stopped)") == 1, err
    assert len(calls) == 3 and 0 < calls[1][1] == calls[2][1] and calls[2][0][:calls[1][1]] == calls[1][0][:calls[1][1]]


def test_ctrl_c_in_a_replys_decode_keeps_its_prompt_cached(capsys, monkeypatch, tok):
    """Ctrl-C in a reply's decode loop (Interrupted: the prompt was prefilled whole) leaves the prompt and the reply's
    steps but the last cached, as a whole reply does: the next turn prefills only what follows them, not the first
    message again (a document asked about)."""
    reply = tok.encode("Hello there, my friend", bos=False)

    def instead(n, on_token):  # the first reply stopped after its text, the second one empty
        if n == 1:
            for t in reply:
                on_token(torch.tensor([t]))
            raise engine.Interrupted([reply])
        return []
    calls, _, _ = stub_replies(monkeypatch, tok, instead)
    stdin_of(monkeypatch, "Go on.\n")
    code, out, err = run_cli(capsys, "--interactive", "--prompt", "Hi")
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there, my friend"},
             {"role": "user", "content": "Go on."}]
    assert code == 0 and out == "Hello there, my friend\n\n" and "(reply stopped)" in err, err
    assert len(reply) > 2 and calls[1] == (tok.encode_chat(turns), len(calls[0][0]) + len(reply) - 1)


def test_a_chats_history_keeps_a_reply_cut_at_its_stop_string(capsys, monkeypatch, tok):
    """--interactive --stop: the reply the next turn's prompt holds is the text shown, cut before the --stop string,
    not the tokens the model drew past it."""
    calls, _, turn = stub_replies(monkeypatch, tok, lambda n, on_token: tok.encode("Hello. Q: more", bos=False))
    stdin_of(monkeypatch, "Again\n")
    code, out, err = run_cli(capsys, "--interactive", "--system", "Be brief.", "--prompt", "Hi", "--stop", "Q:",
                             "--max-new-tokens", "8")
    assert code == 0 and [prompt for prompt, _ in calls] == [turn("Hi"), turn("Hi", "Hello. ", "Again")], err


def test_fit_conversation_forgets_whole_exchanges_from_the_oldest_and_keeps_the_system_and_newest():
    """A stub encoding of one token a character: past `limit`, the fewest oldest exchanges go that leave `keep` tokens
    or fewer, or all but the newest message (which may not fit: converse does not send it), after the system message
    if there is one. The messages given are left as they were."""
    tok = type("Chars", (), {"encode_chat": lambda self, ms: list("".join(m["content"] for m in ms))})()
    roles = ["system", "user", "assistant", "user", "assistant", "user"]
    for limit, keep, n_system, kept, forgot in ((12, 12, 1, "S aa bb ccc ddd e", 0), (11, 11, 1, "S ccc ddd e", 1),
                                                (11, 5, 1, "S e", 2), (12, 5, 1, "S aa bb ccc ddd e", 0),
                                                (7, 7, 1, "S e", 2), (1, 1, 1, "S e", 2), (1, 1, 0, "e", 2),
                                                (11, 2, 1, "S e", 2)):  # all gone leaves exactly `keep`: its target
        messages = [{"role": r, "content": c} for r, c in zip(roles, "S aa bb ccc ddd e".split())][1 - n_system:]
        given = list(messages)
        out, ids, n = engine.fit_conversation(tok, messages, n_system, limit, keep)
        assert [m["content"] for m in out] == kept.split() and ids == list(kept.replace(" ", "")) and n == forgot
        assert messages == given
    long = [{"role": r, "content": c} for r, c in zip(roles, ["S", "a", "b", "c", "d", "eeeeee"])]
    out, ids, n = engine.fit_conversation(tok, long, 1, 10, 5)  # past `keep` alone: the fewest that fit `limit`
    assert (len(ids), n) == (9, 1)
    many = [{"role": "system", "content": "S"}] + [{"role": r, "content": "x"} for r in roles[1:3] * 40 + ["user"]]
    out, ids, n = engine.fit_conversation(tok, many, 1, 60, 30)  # 82 tokens: 26 exchanges go, leaving 30
    assert (len(ids), n, len(out)) == (30, 26, 30)


def record_prompts(monkeypatch, replies=None):
    """engine.generate stubbed, each prompt answered with one token (or `replies`, a list of new tokens a prompt):
    returns the list of each call's prompts."""
    seen = []

    def generate(model, prompts, *args, **kwargs):
        seen.append(prompts)
        return replies or [[1]] * len(prompts), {"logprobs": None}
    monkeypatch.setattr(engine, "generate", generate)
    monkeypatch.setattr(engine, "report_speed", lambda timing: None)
    return seen


def stub_replies(monkeypatch, tok, instead=None):
    """engine.generate stubbed, each reply "Hello" (and <|im_end|>), unless instead(the call's number from 1, its
    on_token) raises (a Ctrl-C) or returns other reply tokens: (the calls [(prompt ids, start)], each call's new-token
    limit, turn(*texts): tok's (the default model's) chat encoding of the system message "Be brief." and `texts` as
    alternating user and assistant messages)."""
    calls, rooms = [], []
    hello = tok.encode("Hello", bos=False)

    def generate(model, prompts, n, stop_ids, *args, start=0, on_token=None, **kwargs):
        calls.append((prompts[0], start))
        rooms.append(n)
        reply = None if instead is None else instead(len(calls), on_token)
        return [(hello if reply is None else reply) + [2]], {}
    monkeypatch.setattr(engine, "generate", generate)
    monkeypatch.setattr(engine, "report_speed", lambda timing: None)
    turn = lambda *texts: tok.encode_chat([{"role": "system", "content": "Be brief."}, *(
        {"role": r, "content": c} for r, c in zip(["user", "assistant"] * 9, texts))])
    return calls, rooms, turn


def test_a_message_not_sent_keeps_the_conversation_and_forgetting_keeps_the_system_message(capsys, monkeypatch, tok):
    """--system, with a stub generate (each reply "Hello"): a message one token too long for the cache is not sent,
    and the conversation before it stays whole (before: the exchanges forgotten for it were lost, with a note); a
    cache one token short of the whole conversation forgets the first exchange, not the system message. A first
    turn left less room than asked is noted once, for the turn (not also as a prompt's)."""
    calls, room, turn = stub_replies(monkeypatch, tok)
    sent = lambda: [prompt for prompt, _ in calls]
    whole = turn("Hi", "Hello", "Again")
    over = next(m for k in range(1, 99) if len(turn(m := "word " * k)) == len(whole) + 1)
    flags = ["--interactive", "--system", "Be brief.", "--prompt", "Hi", "--max-new-tokens", "1", "--max-seq-len"]
    stdin_of(monkeypatch, over + "\nAgain\n")
    code, _, err = run_cli(capsys, *flags, str(len(whole)))
    assert code == 0 and sent() == [turn("Hi"), whole] and f"warning: this message takes {len(whole) + 1} tok" in err
    assert "forgets" not in err and "note: at most" not in err, err
    calls.clear()
    stdin_of(monkeypatch, "Again\n")
    code, _, err = run_cli(capsys, *flags, str(len(whole) - 1))
    assert code == 0 and sent() == [turn("Hi"), turn("Again")] and "forgets its oldest exchange" in err, err
    calls.clear()
    stdin_of(monkeypatch, "")
    code, _, err = run_cli(capsys, *flags[:-3], "--max-new-tokens", "3", "--max-seq-len", str(len(turn("Hi")) + 1))
    assert code == 0 and err.count("note: at most") == 1 and f"the conversation {len(turn('Hi'))}" in err, err
    assert room[-1] == 2  # the cache's room: the cache less the turn's tokens, + 1 (the last is never cached)
    calls.clear()  # --max-new-tokens 200, past the cache: a reply's room is half of it, and the history is kept
    stdin_of(monkeypatch, "Again\n")
    code, _, err = run_cli(capsys, *flags[:-3], "--max-seq-len", str(2 * len(whole)))
    assert code == 0 and sent() == [turn("Hi"), whole] and "forgets" not in err, err
    calls.clear()  # a full cache forgets down to half of it (3 exchanges here), not just enough for one reply
    stdin_of(monkeypatch, "Hi\n" * 5)
    code, _, err = run_cli(capsys, *flags[:-3], "--max-new-tokens", "20", "--max-seq-len", "80")
    chat = lambda k: turn(*["Hi", "Hello"] * (k - 1), "Hi")  # k turns
    assert [len(chat(k)) for k in (4, 5, 2)] == [57, 70, 31]  # 70 > the limit, 81 - 20; down to 40: 31
    assert code == 0 and sent() == [chat(1), chat(2), chat(3), chat(4), chat(2), chat(3)], [len(c) for c in sent()]
    assert "forgets its 3 oldest exchanges, down to half the cache" in err and room[-6:] == [20] * 6, err


def test_a_chat_over_the_models_whole_context_does_not_ask_for_a_larger_cache(capsys, monkeypatch, tok):
    """--interactive without --max-seq-len caches the model's whole context: a message too long for it says so, not
    "a larger --max-seq-len holds more" (which would be refused)."""
    stub_replies(monkeypatch, tok)
    stdin_of(monkeypatch, "word " * 8200 + "\nHi\n")
    code, _, err = run_cli(capsys, "--interactive", "--system", "Be brief.", "--prompt", "Hi")
    assert code == 0 and "not sent (the cache is the model's whole context)" in err, err


def test_keep_first_forgets_the_exchanges_after_the_first_which_stays_cached(capsys, monkeypatch, tok):
    """--keep-first, with a stub generate (each reply "Hello"): a full chat forgets its oldest exchanges after the
    first (a document asked about), down to half the cache past it (llama.cpp's --keep), and the turn prefills from
    after that exchange, which the caches still hold. A first exchange past half the cache still leaves later turns
    room (before: each forgot just enough for its own reply, prefilling all after the document again). A message too
    long beside the first exchange is not sent, and the line says the exchange is counted."""
    calls, rooms, turn = stub_replies(monkeypatch, tok)
    chat = lambda *asked: turn(*[m for text in asked[:-1] for m in (text, "Hello")], asked[-1])
    asked = ["Doc", "A", "B", "C", "D"]
    size = len(chat(*asked)) + 15  # the whole chat leaves a reply 16 tokens, not 20
    def keep(first, size, new):  # half the room past the first exchange, which leaves a reply `new` tokens
        return len(turn(first, "Hello")) + (size + 1 - min(new, size // 2) - len(turn(first, "Hello"))) // 2
    assert len(chat("Doc", "B", "C", "D")) > keep("Doc", size, 20) >= len(chat("Doc", "C", "D"))
    flags = ["--interactive", "--system", "Be brief.", "--prompt", "Doc", "--max-new-tokens", "20", "--max-seq-len",
             str(size)]
    stdin_of(monkeypatch, "A\nB\nC\nD\n")
    code, _, err = run_cli(capsys, *flags, "--keep-first")
    assert code == 0 and [c for c, _ in calls] == [chat(*asked[:k]) for k in range(1, 5)] + [chat("Doc", "C", "D")]
    assert "forgets its 2 oldest exchanges after the first, down to half the room past it, to leave" in err, err
    assert "--keep-first keeps" not in err, err
    parts = lambda x, y: next(i for i, (a, b) in enumerate(zip(x, y)) if a != b)  # where two encodings differ
    assert calls[-1][1] == parts(chat(*asked[:4]), chat("Doc", "C", "D")) > len(chat("Doc")), calls[-1][1]
    calls.clear()  # without it, the first exchange goes first, and the turn prefills from the first user message
    stdin_of(monkeypatch, "A\nB\nC\nD\nE\nF\nG\nH\n")
    code, _, err = run_cli(capsys, *flags)
    assert code == 0 and calls[4] == (chat("C", "D"), parts(chat(*asked[:4]), chat("C", "D"))) and calls[4][1] < len(
        chat("Doc")) and "forgets its 3 oldest exchanges, down" in err, err
    assert err.count("note: the conversation forgets") == 2 and err.count(  # the flag, named once
        "(a larger --max-seq-len holds more; --keep-first keeps the first exchange)") == 1, err
    calls.clear()  # a message that fits the cache alone, but not beside the first exchange
    over = next(m for k in range(1, 99) if len(chat("Doc", m := "word " * k)) == size + 1)
    stdin_of(monkeypatch, f"{over}\nA\n")
    code, _, err = run_cli(capsys, *flags, "--keep-first")
    assert code == 0 and [c for c, _ in calls] == [chat("Doc"), chat("Doc", "A")], err
    assert f"warning: this message and the first exchange take {size + 1} tokens in the chat's format" in err, err
    assert "(a larger --max-seq-len holds more; without --keep-first the chat forgets that exchange)" in err, err
    calls.clear()  # a first exchange past half the cache: one forgetting in 10 turns, where each took one before
    long, size = "word " * 60, 160
    assert len(turn(long, "Hello")) > size // 2 and len(chat(long, *"ABCDEF")) <= size - 3 < len(chat(long, *"ABCDEFG"))
    stdin_of(monkeypatch, "".join(f"{c}\n" for c in "ABCDEFGHI"))  # (--max-new-tokens 4: room for size - 3)
    code, _, err = run_cli(capsys, *flags[:4], long, *flags[5:6], "4", flags[7], str(size), "--keep-first")
    assert code == 0 and len(calls) == 10 and calls[7][0] == chat(long, *"EFG"), [len(c) for c, _ in calls]
    assert len(chat(long, *"DEFG")) > keep(long, size, 4) >= len(chat(long, *"EFG"))
    assert err.count("note: the conversation forgets") == 1 and "forgets its 4 oldest exchanges after the first" in err
    rooms.clear()  # a reply's room past half the rest of the cache: forgetting leaves it whole (before: 49 of 50)
    stdin_of(monkeypatch, "A\nB\nC\nword word word\nD\n")
    code, _, err = run_cli(capsys, "--interactive", "--prompt", "word " * 40, "--max-new-tokens", "50", "--max-seq-len",
                           "160", "--keep-first")  # (the template's own system message)
    assert code == 0 and rooms == [50] * 6 and "forgets" in err, (rooms, err)


def test_keep_first_counts_no_first_exchange_before_one_is_sent(capsys, monkeypatch, tok):
    """--keep-first with no --prompt: a first typed message too long for the cache is not sent, and the warning
    blames the message alone (no first exchange is cached yet to share the cache with it); the next one is sent."""
    calls, _, turn = stub_replies(monkeypatch, tok)
    size = len(turn("A")) + 12
    over = next(m for k in range(1, 99) if len(turn(m := "word " * k)) == size + 1)
    stdin_of(monkeypatch, f"{over}\nA\n")
    code, _, err = run_cli(capsys, "--interactive", "--system", "Be brief.", "--max-new-tokens", "4", "--max-seq-len",
                           str(size), "--keep-first")
    assert code == 0 and [c for c, _ in calls] == [turn("A")], err
    assert f"warning: this message takes {size + 1} tokens in the chat's format" in err, err
    assert "first exchange" not in err, err


def test_interactive_forgets_the_oldest_exchange_and_does_not_send_a_message_too_long(capsys, monkeypatch, tok):
    """A conversation that would leave its reply less room than --max-new-tokens forgets its oldest exchange (what is
    left is past half the cache: the note does not say "down to half"); a message the cache cannot hold alone is not
    sent, with one line, and the chat goes on (before: both ended it). A turn left less room than asked says so; a
    chat without a first message names the template's own tokens, not a prompt."""
    size = lambda text: len(tok.encode_chat([{"role": "user", "content": text}]))
    near = next(m for k in range(1, 40) if size(m := "word " * k) == 39)  # alone, it leaves a reply 2 tokens
    stdin_of(monkeypatch, "Tell me more.\n" + "word " * 40 + "\n" + near + "\n")
    code, out, err = run_cli(capsys, "--interactive", "--prompt", "Hi", "--max-seq-len", "40", "--max-new-tokens", "4",
                             "--dense")
    assert code == 0 and len(out.splitlines()) == 3 and err.count("prefill:") == 3, (out, err)
    assert "note: the conversation forgets its oldest exchange to leave this reply room (a larger" in err, err
    assert "warning: this message takes " in err and "chat's format and the cache holds 40 tokens: not sent" in err
    assert err.count("note: at most") == 1, err
    assert "note: at most 2 new tokens: the cache holds 40 tokens and the conversation 39" in err, err
    stdin_of(monkeypatch, "Hi\n")
    code, _, err = run_cli(capsys, "--interactive", "--max-seq-len", "20")
    assert code == 2 and "the chat's format alone has 30 tokens but --max-seq-len is 20" in error_line(err), err
    # a one-word --chat prompt, and which prompt of several (before: "the prompt has 31 tokens", "has 6 tokens")
    code, _, err = run_cli(capsys, "--chat", "--prompt", "Hi", "--max-seq-len", "20")
    assert code == 2 and error_line(err) == ("error: the prompt has 31 tokens in the chat's format but --max-seq-len "
                                             "is 20")
    code, _, err = run_cli(capsys, "--prompt", "Hi", "--prompt", "Hi there, how are you", "--max-seq-len", "3")
    assert code == 2 and error_line(err) == "error: prompt 2 has 6 tokens but --max-seq-len is 3"


def test_a_chats_blank_message_is_refused(capsys, monkeypatch):
    """--chat or --interactive with an empty or blank --prompt (an unset shell variable) is refused at once, as a
    plain empty prompt is; before, the chat answered an empty message."""
    stdin_of(monkeypatch, "")
    for n, flags in ((1, ["--chat", "--prompt", ""]), (2, ["--interactive", "--prompt", "Hi", "--prompt", " \n"])):
        code, _, err = run_cli(capsys, *flags, "--checkpoint", "/nonexistent.gguf")
        assert code == 2 and f"prompt {n} is empty: a chat's message needs some text" in error_line(err), err


def test_interactive_turns_are_lines_and_a_backslash_goes_on_in_the_next(monkeypatch):
    """Each line of standard input is a message, blank ones skipped; one ending in a backslash goes on in the next
    (llama.cpp's rule), with a newline there; the last line needs no newline, nor a continued one a next line."""
    stdin_of(monkeypatch, "one\\\ntwo\n\n  \nthree\nfour\\")
    assert list(engine.typed_turns()) == ["one\ntwo", "three", "four\n"]
    read, write = os.pipe()  # \r\n lines, which sys.stdin keeps as they are on Linux
    os.write(write, b"one\\\r\ntwo\r\nthree\r\n")
    os.close(write)
    monkeypatch.setattr(sys, "stdin", os.fdopen(read, newline="\n"))
    assert list(engine.typed_turns()) == ["one\ntwo", "three"]


def test_interactive_turns_are_utf8_without_a_byte_order_mark_and_a_bad_byte_costs_one_message(monkeypatch, capsys):
    """Standard input is read as UTF-8 whatever the locale, as a prompt file is: a leading byte order mark (Windows'
    `type file | ...`) is no part of the first message, and a message with a byte that is not UTF-8 is named and not
    sent, the others are (before: a strict locale's decoder ended the chat with a traceback's last line, the lines
    before it in the same read unanswered; another sent the byte as U+FFFD)."""
    read, write = os.pipe()
    os.write(write, b"\xef\xbb\xbfHello\nab\xffcd\nBye \xc3\xa9\n")
    os.close(write)
    monkeypatch.setattr(sys, "stdin", os.fdopen(read, encoding="latin-1", errors="strict"))  # another locale's
    assert list(engine.typed_turns()) == ["Hello", "Bye \u00e9"]
    assert "warning: this message is not UTF-8 text (byte 0xff at character 2): convert it" in capsys.readouterr().err
    stdin_of(monkeypatch, "")
    read, write = os.pipe()  # UTF-16 piped in: its byte order mark, then lines of NULs and letters
    os.write(write, "Hello\nBye\n".encode("utf-16") + b"\n")
    os.close(write)
    monkeypatch.setattr(sys, "stdin", os.fdopen(read))
    assert list(engine.typed_turns()) == []  # (before: "\x00B\x00y\x00e\x00" sent)
    err = capsys.readouterr().err  # once, not for each line and the last newline's "\x00" too
    assert err == ("warning: standard input is UTF-16 text, not UTF-8: convert it, e.g. with iconv -f utf-16 -t "
                   "utf-8; the chat ends\n")


TURNS = "import engine\nfor m in engine.typed_turns(): print('got', len(m), repr(m[-12:]), flush=True)"


@contextlib.contextmanager
def turns_at_a_terminal(piped=False):
    """typed_turns() in a process whose standard input is a new terminal, and its output too (its error stream
    dropped), or else a pipe (its error stream the terminal). Yields (type, wait_for, seen): type(bytes) is the user
    typing; wait_for(text, times=1) waits until the terminal (or the pipe) has shown text that many times; seen holds
    all they showed."""
    readline = pytest.importorskip("readline")
    if "libedit" in (readline.__doc__ or ""):
        pytest.skip("libedit's readline binds other keys")
    try:
        main, sub = os.openpty()
    except OSError as e:
        pytest.skip(f"no terminal to open: {e}")
    env = {**os.environ, "TERM": "xterm", "INPUTRC": "/dev/null"}  # (not the user's key bindings)
    proc = subprocess.Popen([sys.executable, "-c", TURNS], cwd=ROOT, stdin=sub, env=env,
                            stdout=subprocess.PIPE if piped else sub, stderr=sub if piped else subprocess.DEVNULL)
    os.close(sub)
    seen = bytearray()

    def drain(fd):  # what the terminal (or pipe) shows, read as it comes until it closes
        with contextlib.suppress(OSError):  # EIO once the process has closed its end
            while chunk := os.read(fd, 65536):
                seen.extend(chunk)
    readers = [threading.Thread(target=drain, args=(fd,), daemon=True) for fd in
               (main, *([proc.stdout.fileno()] if piped else []))]
    for reader in readers:
        reader.start()

    def wait_for(text, times=1):
        deadline = time.monotonic() + 120
        while seen.count(text.encode()) < times:
            assert time.monotonic() < deadline and proc.poll() is None, f"no {text!r} in {bytes(seen[-300:])!r}"
            time.sleep(0.05)
    try:
        yield functools.partial(os.write, main), wait_for, seen
        os.write(main, b"\x04")  # Ctrl-D: the chat ends
        assert proc.wait(timeout=60) == 0
        assert piped or seen.endswith(b"> \r\n")  # and the shell's prompt comes on a line of its own
    finally:
        proc.kill()
        for reader in readers:
            reader.join(timeout=10)
        os.close(main)


def test_interactive_turns_at_a_terminal_are_read_by_readline():
    """At a terminal GNU readline reads a message: a pasted line of 6004 characters arrives whole (the terminal's own
    line editing kept 4095 bytes and dropped the rest without a word), Left moves the cursor and Up recalls the last
    message (before: their escape codes went to the model as text), and Ctrl-D ends the chat."""
    with turns_at_a_terminal() as (type_, wait_for, _):
        wait_for("> ")
        for i in range(0, 6004, 500):  # as a paste arrives
            type_((("x" * 6000 + " END")[i:i + 500]).encode())
            time.sleep(0.02)
        type_(b"\r")
        wait_for("got 6004 'xxxxxxxx END'")
        type_(b"Frnace" + b"\x1b[D" * 3 + b"?\r")  # three times Left, then "?"
        wait_for("got 7 'Frn?ace'")
        type_(b"\x1b[A\r")  # Up: the last message again
        wait_for("got 7 'Frn?ace'", times=2)


def test_a_line_the_terminal_may_have_cut_is_not_sent():
    """Standard input a terminal, standard output a pipe (`engine.py --interactive | tee log`): the terminal's own
    line editing reads the lines, which keeps 4095 bytes of each; a line that long is named and not sent (before: its
    first 4095 bytes were, without a word), and the next one is."""
    with turns_at_a_terminal(piped=True) as (type_, wait_for, seen):
        wait_for("> ")
        for i in range(0, 5000, 500):
            type_(b"x" * 500)
            time.sleep(0.02)
        type_(b"\r")
        wait_for("it may be cut; not sent")
        type_(b"short\r")
        wait_for("got 5 'short'")
    assert b"got 4095" not in seen


def test_a_second_chat_reads_on_from_standard_input(monkeypatch):
    """A library caller's second chat in one process (the first stopped early) reads on where the first stopped;
    before, setting standard input's encoding again after a read raised io.UnsupportedOperation. Input read before
    in another encoding stays in it."""
    stdin_of(monkeypatch, "one\ntwo\n")
    assert next(engine.typed_turns()) == "one" and list(engine.typed_turns()) == ["two"]
    stdin_of(monkeypatch, "one\ntwo\n")
    assert sys.stdin.readline() == "one\n" and list(engine.typed_turns()) == ["two"]


def test_interactive_reads_its_turns_from_an_open_standard_input(capsys, monkeypatch):
    stdin_of(monkeypatch, "")
    assert "give a first one with --prompt" in error_line(run_cli(capsys, "--interactive", "--prompt-file", "-")[2])
    monkeypatch.setattr(sys, "stdin", None)
    assert "standard input, which is closed" in error_line(run_cli(capsys, "--interactive")[2])


@pytest.mark.usefixtures("gguf_path")  # the default model: skipped when it is not installed
def test_verbose_prompt_prints_what_the_model_reads(capsys, monkeypatch, tok):
    """--verbose-prompt: each prompt of a batch as the model reads it (here the chat template with an empty system
    message) and its token count; with --interactive, what each turn prefills. On stderr: the answers stay alone."""
    code, out, err = run_cli(capsys, "--chat", "--system", "", "--prompt", "Hi", "--prompt", "Yo", "--verbose-prompt",
                             "--max-new-tokens", "2")
    for i, text in enumerate(["Hi", "Yo"]):
        ids = tok.encode_chat([{"role": "system", "content": ""}, {"role": "user", "content": text}])
        assert f"prompt {i + 1}, {len(ids)} tokens: {tok.decode(ids)!r}\n" in err and "<|im_start|>" not in out
    stdin_of(monkeypatch, "Bye\n")
    code, _, err = run_cli(capsys, "--interactive", "--prompt", "Hi", "--verbose-prompt", "--max-new-tokens", "2")
    first = tok.encode_chat([{"role": "user", "content": "Hi"}])
    assert code == 0 and f"turn 1, {len(first)} tokens new: {tok.decode(first)!r}\n" in err, err
    assert re.search(r"turn 2, \d+ tokens new: '.*<\|im_start\|>user\\nBye<\|im_end\|>", err), err


def test_a_closed_standard_output_is_refused_before_the_work(capsys, monkeypatch):
    """`>&-`: print drops every answer silently, and the run ended with status 0; now an error, before the load."""
    monkeypatch.setattr(sys, "stdout", None)
    code, _, err = run_cli(capsys, "--prompt", "hi", "--checkpoint", "/nonexistent.gguf")
    assert code == 2 and error_line(err) == "error: standard output is closed: the answers would have nowhere to go"


@pytest.mark.usefixtures("gguf_path")  # the default model: skipped when it is not installed
def test_the_batch_keeps_the_command_lines_order(capsys, tmp_path, monkeypatch):
    """--prompt and --prompt-file mixed: the batch, and its outputs, in the order given (before: every --prompt
    first, then the files)."""
    (tmp_path / "b.txt").write_text("from a file")
    record_prompts(monkeypatch)
    code, out, _ = run_cli(capsys, "--prompt", "first", "--prompt-file", str(tmp_path / "b.txt"), "--prompt", "last")
    heads = [line for line in out.splitlines() if line.startswith("--- ")]
    assert code == 0 and heads == ["--- 'first'", "--- 'from a file'", "--- 'last'"]


@pytest.mark.usefixtures("gguf_path")  # the default model: skipped when it is not installed
def test_a_fraction_of_a_batchs_cache_is_noted_as_typed(capsys):
    """Prompts of different lengths share one cache, so a fraction gives a short prompt the long one's K: noted,
    with the budget as the user wrote it (1/4, not 0.25)."""
    code, _, err = run_cli(capsys, "--prompt", "hi", "--prompt", "a longer prompt than that", "--budget", "1/4",
                           "--max-new-tokens", "1")
    assert code == 0 and "note: --budget 1/4 is of the batch's cache (" in err
    for dense in (["--budget", "99/100"], ["--budget", "1/4", "--n-dense", "30"]):  # K covers the cache; no layer
        code, _, err = run_cli(capsys, "--prompt", "hi", "--prompt", "a longer prompt than that", *dense,
                               "--max-new-tokens", "1")  # is sparse: the fraction picks nothing
        assert code == 0 and "dense" in err and "is of the batch's cache" not in err, dense


@pytest.mark.usefixtures("gguf_path")  # the default model: skipped when it is not installed
def test_prompt_file_drops_one_trailing_newline(capsys, tmp_path):
    """`echo TEXT > FILE` reads as TEXT, as with llama.cpp's -f (and a CRLF ending too, which text mode reads as "\n",
    and a file starting with a byte order mark):
    the same tokens and answer as --prompt TEXT. Only one newline goes: a blank line at the end stays in the prompt."""
    text, runs = "The capital of France is", []
    for i, ending in enumerate((None, b"\n", b"\r\n", b"\n\n")):
        bom = b"\xef\xbb\xbf" * (ending == b"\r\n")  # a Windows editor's byte order mark: no part of the prompt
        (tmp_path / f"{i}.txt").write_bytes(bom + text.encode() + (ending or b""))
        prompt = ["--prompt", text] if ending is None else ["--prompt-file", str(tmp_path / f"{i}.txt")]
        code, out, err = run_cli(capsys, *prompt, "--max-new-tokens", "3", "--dense")
        assert code == 0, err
        runs.append((out, err.split("prefill: ")[1].split(" in ")[0]))
    assert runs[1] == runs[2] == runs[0] == (runs[0][0], "5 tokens") and runs[3][1] == "6 tokens"


def test_a_prompt_file_reads_with_standard_input_closed(tmp_path, monkeypatch):
    """`engine --prompt-file p.txt <&-`: a named file needs no standard input; only "-" does."""
    (path := tmp_path / "p.txt").write_text("The capital of France is\n")
    monkeypatch.setattr(sys, "stdin", None)
    assert engine.read_prompt_file(str(path)) == "The capital of France is"


@pytest.mark.usefixtures("gguf_path")  # the default model: skipped when it is not installed
@pytest.mark.parametrize("argv, words", [
    (["--prompt", "hi", "--prompt", ""], "prompt 2 is empty (0 tokens); give some text"),
    (["--prompt", "\x04"], "prompt 1 is empty (0 tokens; the tokenizer knows none of its characters)"),
    (["--prompt", "caf\udce9 \u00e9"], "argument --prompt: not UTF-8 text (byte 0xe9 at character 3): convert it"),
    (["--prompt", "hi", "--tokenizer", "llama3"], "does not belong to this checkpoint"),  # ids up to 128000
    (["--prompt", "hi", "--max-seq-len", "100000"], "--max-seq-len 100000 exceeds the model's context of 8192 tokens"),
])
def test_prompts_the_model_cannot_take(capsys, monkeypatch, argv, words):
    """Each refused before the weights load (a GGUF's metadata has the context and the vocabulary)."""
    argv = [package_file("llama_models", "llama3", "tokenizer.model") if a == "llama3" else a for a in argv]
    monkeypatch.setattr(engine, "from_checkpoint", lambda *a, **k: 1 / 0)
    code, _, err = run_cli(capsys, *argv, "--max-new-tokens", "1")
    assert code == 2 and words in error_line(err)


@pytest.mark.usefixtures("gguf_path")  # the default model: skipped when it is not installed
def test_a_meta_checkpoints_vocabulary_is_checked_once_its_weights_load(capsys, monkeypatch):
    """params.json may leave the vocabulary to the weights: such a checkpoint's tokenizer is checked after the load."""
    tiny = tiny_model()  # 512 tokens; the prompt's ids reach 4649
    monkeypatch.setattr(engine, "checkpoint_metadata", lambda path: (1024, None))  # as a Meta checkpoint's
    monkeypatch.setattr(engine, "from_checkpoint", lambda *a, **k: tiny)
    code, _, err = run_cli(capsys, "--prompt", "The capital of France is", "--max-new-tokens", "1")
    assert code == 2 and "up to 4649 but the model has 512 tokens: the tokenizer does not belong" in error_line(err)


@pytest.mark.usefixtures("gguf_path")  # the default model: skipped when it is not installed
def test_a_tokenizer_of_another_size_than_the_model_is_warned_of(capsys, tmp_path):
    """A foreign tokenizer whose ids all fit the model (256 bytes for SmolLM2's 49,152 tokens) ran and printed
    garbage without a word; the run goes on (a model may pad its rows), with a warning naming the file."""
    from tokenizer import _CHAR_TO_BYTE
    vocab = {c: b for c, b in _CHAR_TO_BYTE.items()}
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab, "merges": []},
                                                         "pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}))
    code, _, err = run_cli(capsys, "--prompt", "hi", "--tokenizer", str(tmp_path), "--max-new-tokens", "1")
    assert code == 0 and f"warning: the tokenizer has 256 tokens but the model 49152: is {tmp_path} this" in err
    code, _, err = run_cli(capsys, "--prompt", "hi", "--max-new-tokens", "1")
    assert code == 0 and "warning" not in err


@pytest.mark.usefixtures("gguf_path")  # the default model: skipped when it is not installed
def test_max_new_tokens_capped_by_the_cache_says_so(capsys):
    code, _, err = run_cli(capsys, "--prompt", "hi", "--max-seq-len", "3", "--max-new-tokens", "20")
    assert code == 0 and "at most 3 new tokens" in err  # 1 prompt token + 2 cached: the last is never cached
    assert "decode: 2 steps in" in err  # and 3 made: the prefill's and two steps


@pytest.mark.usefixtures("gguf_path")  # the default model: skipped when it is not installed
def test_n_dense_covering_every_layer_says_dense(capsys):
    code, _, err = run_cli(capsys, "--prompt", "hi", "--n-dense", "30", "--budget", "2", "--max-seq-len", "64",
                           "--max-new-tokens", "1")
    assert code == 0 and "dense decode: --n-dense 30 covers all 30 layers" in err
    assert "trained projections" not in err  # no layer would use them: no note that none fit --n-dense 30


@pytest.mark.usefixtures("gguf_path")  # the default model: skipped when it is not installed
def test_a_hash_weights_file_sets_the_bits_and_dense_layers_left_at_the_default(capsys, tmp_path, monkeypatch):
    """--rbit and --n-dense default to the file's; given and other than the file's, they are refused from its
    metadata before the weights load (before: after the load, minutes for an 8B model)."""
    shipped = os.path.join(engine.HERE, "weights", "smollm2-135m-r64.safetensors")
    code, _, err = run_cli(capsys, "--prompt", "hi", "--hash-weights", shipped, "--budget", "2",
                           "--max-new-tokens", "3")
    assert code == 0 and "budget 2 of up to 3 tokens, smollm2-135m-r64.safetensors" in err, err
    monkeypatch.setattr(engine, "from_checkpoint", lambda *a, **k: 1 / 0)  # refused before the weights load
    for rbit in ("256", "128"):  # given, even at 128 (HataArgs' default), --rbit is not replaced by the file's
        code, _, err = run_cli(capsys, "--prompt", "hi", "--hash-weights", shipped, "--rbit", rbit, "--max-new-tokens",
                               "2")
        assert code == 2 and f"have rbit=64 but rbit={rbit} was asked for; pass --rbit 64" in error_line(err)
    code, _, err = run_cli(capsys, "--prompt", "hi", "--hash-weights", shipped, "--n-dense", "3", "--budget", "2")
    assert code == 2 and "have n_dense=2 but n_dense=3 was asked for; pass --n-dense 2" in error_line(err)
    code, _, err = run_cli(capsys, "--prompt", "hi", "--hash-weights", str(tmp_path / "none.safetensors"))
    assert code == 2 and "hash weights file not found" in error_line(err) and "loaded" not in err


@pytest.mark.usefixtures("gguf_path")  # the default model: skipped when it is not installed
def test_the_start_line_names_the_default_model_without_its_path(capsys, gguf_path):
    """Its site-packages path made the first stderr line ~300 characters long; a checkpoint given is shown as given."""
    code, _, err = run_cli(capsys, "--prompt", "hi", "--max-new-tokens", "2")
    assert code == 0 and "loaded the default model (SmolLM2-135M-Instruct.Q4_1.gguf) in " in err
    assert gguf_path not in err
    code, _, err = run_cli(capsys, "--prompt", "hi", "--max-new-tokens", "2", "--checkpoint", gguf_path)
    assert code == 0 and f"loaded {gguf_path} in " in err


@pytest.mark.usefixtures("gguf_path")  # the default model: skipped when it is not installed
def test_settings_without_shipped_projections_say_why_they_are_random(capsys):
    code, _, err = run_cli(capsys, "--prompt", "hi", "--n-dense", "3", "--budget", "2", "--max-new-tokens", "3")
    assert code == 0 and "projections are for --n-dense 2 and --rbit 64, 128 or 256, not --n-dense 3 --rbit 128" in err
    assert "warning: seeded random projections (seed 0) make the hash codes" in err
    for flags in (["--budget", "2"], ["--n-dense", "3"]):  # the shipped ones; or none read (K covers the cache)
        code, _, err = run_cli(capsys, "--prompt", "hi", *flags, "--max-new-tokens", "2")
        assert code == 0 and "projections are for" not in err and "random projections" not in err
    code, _, err = run_cli(capsys, "--prompt", "hi", "--budget", "2", "--max-new-tokens", "3", "--hash-weights", "none")
    assert code == 0 and "budget 2 of up to 3 tokens, random projections (R = 128, --n-dense 2)" in err, err  # as asked
    assert "no hash weights given" not in err and "random projections (seed 0) make the hash codes" in err  # (given)


@pytest.mark.usefixtures("gguf_path")  # the default model: skipped when it is not installed
def test_bad_hash_weights_file(capsys, tmp_path, monkeypatch):
    """Another model's file is refused from the checkpoint's metadata, before its weights load."""
    bad = tmp_path / "proj.safetensors"
    save_file({"layers.2.hash_proj": torch.zeros(3, 64, 128)}, bad, metadata={"model": "llama dim=1", "rbit": "128",
                                                                       "n_dense": "2"})
    monkeypatch.setattr(engine, "from_checkpoint", lambda *a, **k: 1 / 0)  # not reached
    code, _, err = run_cli(capsys, "--prompt", "hi", "--hash-weights", str(bad), "--max-new-tokens", "1")
    assert code == 2 and "were made for 'llama dim=1', not this model" in error_line(err)
    monkeypatch.undo()
    for flags in (["--selector", "quest"], ["--n-dense", "30"]):  # a file the run does not read is only noted
        code, _, err = run_cli(capsys, "--prompt", "hi", "--hash-weights", str(bad), "--max-new-tokens", "1", *flags)
        assert code == 0, err


@pytest.mark.parametrize("argv, shown", [
    (["engine.py"], ["(default: 2048)", "file's own, else 128)", "(default: 200)", "(default: hash)", "(default: 0)"]),
    (["eval.py"], ["(default: 1/8 1/16 1/32 1/64)", "(default: 1024 2048 4096 8192)", "(default: 16:16)",
                  "Quest (default: 1/4)"]),  # budgets as fractions, as typed
    (["bench.py", "e2e"], ["(default: 1/64 2048)", "(default: llama-3.1-8b)", "(default: 32768 131072)"]),
    (["train_hash.py"], ["(default: 300)", "(default: 4096 8192)", "(default: 1e-06)", "seq-len) (default: 0.25)"]),
])
def test_help_shows_the_defaults_as_typed(capsys, argv, shown):  # and nothing argparse would print as a repr
    import bench, eval as ev, train_hash
    main = {"engine.py": engine.main, "eval.py": ev.main, "bench.py": bench.main, "train_hash.py": train_hash.main}
    with pytest.raises(SystemExit) as e:
        main[argv[0]](argv[1:] + ["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines at the terminal's width
    assert e.value.code == 0 and all(s in text for s in shown), text
    assert not any(s in text for s in ("(default: None)", "(default: False)", "(default: ==SUPPRESS==)", "(default: [",
                                       "(default: )"))  # (an empty list: --stop's)


def test_parse_budget():
    assert parse_budget("2048") == 2048 and isinstance(parse_budget("2048"), int)
    assert parse_budget("1/16") == 1 / 16 and parse_budget("0.25") == 0.25
    assert parse_budget("+2048") == 2048 and parse_budget(" 64 ") == 64  # as int() and positive_int read them
    assert parse_budget(str(10 ** 22 + 1)) == 10 ** 22 + 1  # as typed (before: 10^22, through a float)
    assert parse_budget("1") == 1 and isinstance(parse_budget("1"), int)
    for bad in ("0", "-1", "2.5", "nan", "inf", "1/0", "abc", "1e30", "2/1", "1_0/16", "0.2_5",  # (float reads _)
                "1/1", "1.0", "3/3"):  # 1 as a fraction or a float: not the count 1 as typed
        with pytest.raises(argparse.ArgumentTypeError, match="not a whole count >= 1 or a fraction in"):
            parse_budget(bad)


def test_file_settings_take_the_files_own_unless_a_flag_gives_them(tmp_path):
    """--rbit and --n-dense come from a --hash-weights file where they are not given (its n_dense 3, not the
    default 2, which then refused the user's own file), from the flags where given, else HataArgs' defaults."""
    args, path = PRESETS["tiny"], str(tmp_path / "p.safetensors")
    projs = {i: torch.randn(args.n_kv_heads, args.head_dim, 64) for i in range(3, args.n_layers)}
    save_hash_projections(path, projs, args, HataArgs(rbit=64, n_dense=3))
    assert engine.file_settings(path, None, None) == (64, 3)
    assert engine.file_settings(path, 128, 1) == (128, 1)  # the flags win (load_hash_projections then refuses)
    assert engine.file_settings(None, None, None) == (HataArgs.rbit, HataArgs.n_dense)


def test_a_model_that_outputs_nan_is_an_error_not_an_empty_answer():
    """NaN or inf weights (or a float16 overflow): greedy decoding printed nothing and exited 0, sampling failed in
    torch.multinomial; the prefill's logits are checked once."""
    model = tiny_model()
    model.setup_caches(1, 16)
    with torch.no_grad():
        model.layers[1].attention_norm.weight[3] = math.inf
    with pytest.raises(ValueError, match="the model's output for the prompt is NaN or inf: its weights hold NaN/inf"):
        engine.generate(model, [[1, 2, 3]], 4)


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    draws = {int(sample(logits, 1.0, 0.7, gen)) for _ in range(200)}
    assert draws == {0, 1}  # 0.5 + 0.3 reaches 0.7; tokens 2 and 3 are outside the nucleus
    assert int(sample(logits, 0.0)) == 0
    tie = torch.tensor([[1.0, 1.0, 0.0]])  # greedy is argmax, whose first index wins a tie: never a draw
    assert {int(sample(tie, 0.0, 1.0, gen)) for _ in range(50)} == {0}
    probs = torch.softmax(logits, -1)
    for k in (1, 2, 3):  # top_p exactly the mass of the first k tokens (0.8 and 0.95 are not exact in fp32)
        top = float(probs.cumsum(-1)[0, k - 1])  # as sample() sums them: already in descending order
        assert {int(sample(logits, 1.0, top, gen)) for _ in range(300)} == set(range(k)), k


def test_top_k_keeps_the_k_likeliest_and_their_ties():
    """top_k keeps the k highest logits (any tied with the k-th too), each row by its own k-th, before top_p; 0, or
    k >= V, keeps every token; greedy decoding ignores it."""
    logits = torch.log(torch.tensor([[0.1, 0.4, 0.2, 0.3], [0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1]]))
    gen = torch.Generator().manual_seed(0)
    draws = [sample(logits, 1.0, 1.0, gen, top_k=2).tolist() for _ in range(300)]
    assert {d[0] for d in draws} == {1, 3} and {d[1] for d in draws} == {0, 1, 2, 3}  # row 1: four tied at the top
    assert {d[2] for d in draws} == {0, 1, 2, 3}  # row 2: its k-th, 0.1, tied three ways (row 0's would keep 0 alone)
    assert {int(sample(logits[:1], 1.0, 1.0, gen, top_k=1)) for _ in range(50)} == {1}
    for k in (0, 4, 9):
        assert {int(sample(logits[:1], 1.0, 1.0, gen, top_k=k)) for _ in range(300)} == {0, 1, 2, 3}, k
    # top_p of the k kept, renormalised: 0.4 / 0.9 reaches 0.42 alone (of all four tokens it would take 0.4 + 0.3)
    assert {int(sample(logits[:1], 1.0, 0.42, gen, top_k=3)) for _ in range(300)} == {1}
    assert int(sample(logits[:1], 0.0, 1.0, gen, top_k=3)) == 1


@pytest.mark.usefixtures("gguf_path")  # the default model: skipped when it is not installed
def test_sampling_flags_reach_the_sampler(capsys, monkeypatch, tok):
    """--top-k, --min-p, --repetition-penalty and --repeat-last-n are passed to generate(), with --random-weights too;
    --ignore-eos makes the stop tokens banned ones."""
    seen, eos = [], tok.eos_ids
    monkeypatch.setattr(engine, "generate", lambda *a, **k: (seen.append(
        (k["top_k"], k["min_p"], k["repetition_penalty"], k["repeat_last_n"], k["stop_ids"], k["ban_ids"])),
        ([[1]], {"logprobs": None}))[1])
    monkeypatch.setattr(engine, "report_speed", lambda timing: None)
    run_cli(capsys, "--prompt", "hi", "--max-new-tokens", "2", "--temperature", "1", "--top-k", "5", "--min-p", "0.1",
            "--repetition-penalty", "1.3", "--repeat-last-n", "64")
    run_cli(capsys, "--prompt", "hi", "--max-new-tokens", "2", "--ignore-eos")
    run_cli(capsys, *TINY, "--prompt-len", "4", "--max-new-tokens", "2", "--temperature", "1", "--top-k", "7")
    assert seen == [(5, 0.1, 1.3, 64, eos, ()), (0, 0.0, 1.0, None, (), eos), (7, 0.0, 1.0, None, (), ())]


@pytest.mark.usefixtures("gguf_path")  # the default model: skipped when it is not installed
def test_special_reads_special_token_text_as_the_tokens(capsys, monkeypatch):
    """--parse-special: '<|im_end|>' in a prompt is the token (2 in the default model's vocabulary); without it,
    text."""
    seen = record_prompts(monkeypatch)
    for flags in ([], ["--parse-special"]):
        assert run_cli(capsys, "--prompt", "Hi<|im_end|>", "--max-new-tokens", "2", *flags)[0] == 0
    (plain,), (special,) = seen
    assert 2 not in plain and special[-1] == 2 and special[:-1] == plain[:1]


def test_min_p_keeps_the_tokens_near_the_likeliest():
    """min_p 0.35 of the likeliest's 0.5: 0.3 stays, 0.15 and 0.05 go; after the temperature (at 0.5 the
    probabilities sharpen to 0.25 / 0.09 / 0.0225 over 0.3625: 0.3 is 0.36 of the top, 0.15 is 0.09)."""
    logits, gen = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])), torch.Generator().manual_seed(0)
    assert {int(sample(logits, 1.0, 1.0, gen, min_p=0.35)) for _ in range(300)} == {0, 1}
    assert {int(sample(logits, 1.0, 1.0, gen, min_p=0.0)) for _ in range(600)} == {0, 1, 2, 3}
    assert {int(sample(logits, 0.5, 1.0, gen, min_p=0.35)) for _ in range(300)} == {0, 1}
    assert {int(sample(logits, 0.5, 1.0, gen, min_p=0.37)) for _ in range(300)} == {0}
    exact = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))  # 0.25 is exactly 0.5 of the top: kept ("at least")
    assert {int(sample(exact, 1.0, 1.0, gen, min_p=0.5)) for _ in range(300)} == {0, 1, 2}
    rows = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.04, 0.03, 0.9, 0.03]]))  # each row by its own top (the
    # batch's 0.9 would cut row 0 at 0.315, its 0.3 too)
    drawn = torch.stack([sample(rows, 1.0, 1.0, gen, min_p=0.35) for _ in range(300)])  # (300, 2)
    assert set(drawn[:, 0].tolist()) == {0, 1} and set(drawn[:, 1].tolist()) == {2}


def favour_0_1_2(monkeypatch):
    """Every forward's logits, for each row: token 0 at 1.0, 1 at 0.9, 2 at 0.85, the other 509 at -1 (returned)."""
    logits = torch.full((512,), -1.0)
    logits[:3] = torch.tensor([1.0, 0.9, 0.85])
    monkeypatch.setattr(engine, "prefill", lambda model, tokens, *a, **k: logits.expand(len(tokens), 512).clone())
    monkeypatch.setattr(engine, "decode_one_token", lambda model, cur, pos: logits.expand(len(cur), 512).clone())
    return logits


def test_the_repetition_penalty_covers_each_prompt_and_its_reply_not_the_padding(monkeypatch):
    """Logits favour token 0 (1.0), then 1 (0.9), then 2 (0.85): at penalty 2 a sequence takes the first it does
    not hold yet, and then 0 again (0.5 against 0.45 and 0.425; a held token's -1 falls to -2). Row 1's prompt is one
    token, padded with 0s that are not its own; row 0's holds 0. Penalty 1 changes nothing."""
    favour_0_1_2(monkeypatch)
    model = tiny_model()
    model.setup_caches(2, 16)
    assert engine.generate(model, [[0, 3, 3], [3]], 4, repetition_penalty=2.0)[0] == [[1, 2, 0, 0], [0, 1, 2, 0]]
    assert engine.generate(model, [[0, 3, 3], [3]], 2)[0] == [[0, 0], [0, 0]]
    model.setup_caches(1, 16)  # below 1 it favours what the sequence holds: 2's 0.85 becomes 1.7
    assert engine.generate(model, [[2]], 2, repetition_penalty=0.5)[0] == [[2, 2]]
    # a prompt whose first token the caches hold already: the penalty counts it too (0 held: 1 comes first)
    assert engine.generate(model, [[0, 3, 3]], 2, start=1, repetition_penalty=2.0)[0] == [[1, 2]]
    assert engine.penalize(torch.tensor([2.0, -2.0, 2.0, -2.0]), torch.tensor([True, True, False, False]),
                           2.0).tolist() == [1.0, -4.0, 2.0, -2.0]
    # a penalty that overflows gives the largest finite logit: sampling draws held tokens only (before: NaN, an error)
    big = torch.finfo(torch.float32).max
    for penalty, held in ((1e-40, 10.0), (1e40, -1.0)):
        assert engine.penalize(torch.tensor([held, 0.5]), torch.tensor([True, False]), penalty).tolist() == [
            math.copysign(big, held), 0.5]
    assert engine.penalize(torch.tensor([0.0, 10.0]), torch.tensor([True, True]), 1e-50).tolist() == [0.0, big]  # 0/0
    top2 = torch.tensor([[3.0, 2.0, 1.0]])  # a temperature past fp32's range with top-k: -inf / inf was NaN
    assert engine.sample(top2, 1e300, top_k=2, generator=torch.Generator().manual_seed(0)).item() in (0, 1)
    model.setup_caches(1, 16)
    assert engine.generate(model, [[1, 2]], 3, temperature=0.7, repetition_penalty=1e-40,
                           generator=torch.Generator().manual_seed(0))[0][0][0] in (1, 2)


def test_repeat_last_n_penalizes_the_last_n_tokens_and_banned_ids_are_never_drawn(monkeypatch):
    """favour_0_1_2's logits, penalty 2 over the last 3 tokens of prompt and reply (--repeat-last-n): each
    step's penalized set is exactly those tokens (all of a shorter prompt's), so a token that left the window is free
    again (over all tokens, row 0 would take 0 from its third new token on). Banned ids (--ignore-eos): never drawn."""
    favour_0_1_2(monkeypatch)
    masks, penalize = [], engine.penalize
    monkeypatch.setattr(engine, "penalize", lambda x, seen, p: masks.append(seen.clone()) or penalize(x, seen, p))
    model, prompts = tiny_model(), [[5, 6, 7, 8, 0], [9]]
    model.setup_caches(2, 32)
    new = engine.generate(model, prompts, 6, repetition_penalty=2.0, repeat_last_n=3)[0]
    assert new == [[1, 2, 0, 0, 1, 2], [0, 1, 2, 0, 0, 1]]
    assert len(masks) == 6  # the prefill's pick and 5 steps'
    for step, mask in enumerate(masks):
        for b, (prompt, reply) in enumerate(zip(prompts, new)):
            assert set(mask[b].nonzero()[:, 0].tolist()) == set((prompt + reply[:step])[-3:]), (step, b)
    assert engine.generate(model, prompts, 6, repetition_penalty=2.0)[0][0] == [1, 2, 0, 0, 0, 0]  # all tokens
    assert engine.generate(model, prompts, 6, repetition_penalty=2.0, repeat_last_n=10**12)[0][0] == [1, 2, 0, 0, 0, 0]
    assert engine.generate(model, prompts, 4, ban_ids=(0,))[0] == [[1, 1, 1, 1]] * 2
    assert engine.generate(model, prompts, 4, repetition_penalty=2.0, ban_ids=(0,))[0][1] == [1, 2, 1, 1]
    # token id 0 leaves the window too (the ring's -1 marks an empty slot, not id 0): a window of 1 over a prompt of 0
    # penalizes only the last token, so the reply alternates 1, 0 (were 0 kept penalized, 2 would come second)
    assert engine.generate(model, [[0], [0]], 4, repetition_penalty=2.0, repeat_last_n=1)[0] == [[1, 0, 1, 0]] * 2


def test_help_survives_a_percent_sign_in_a_default(capsys, monkeypatch):
    import eval as ev
    monkeypatch.setattr(ev, "HERE", "/tmp/100%d")  # --out-dir's default is under the checkout
    with pytest.raises(SystemExit):
        ev.main(["--help"])
    assert "(default: /tmp/100%d/report)" in " ".join(capsys.readouterr().out.split())


def test_generate_refuses_empty_prompts():
    model = tiny_model()
    model.setup_caches(2, 16)
    for prompts in ([], [[5, 6], []]):  # an empty one would sample from uninitialised logits
        with pytest.raises(ValueError, match="at least one prompt, each of at least one token"):
            engine.generate(model, prompts, 3)
    for prompts, n in (([[5, 512], [6]], 3), ([[-1, 5], [6]], 3), ([[5, 6], [6]], -1)):  # (an IndexError; [[]])
        with pytest.raises(ValueError, match=r"max_new_tokens must be >= 0 and token ids in \[0, 512\)"):
            engine.generate(model, prompts, n)
    engine.prefill(model, torch.tensor([[5, 6], [7, 8]]), torch.tensor([2, 2]))
    with pytest.raises(ValueError, match="prefill after 2 cached positions needs 2 or more tokens, got 1"):
        engine.prefill(model, torch.tensor([[7], [8]]), torch.tensor([1, 1]), start=2)  # (taken for a decode step)


def test_generate_keeps_no_autograd_graph():
    """Called from a script in grad mode, prefill and generate still build no autograd graph: before, every cache
    write linked into one graph that held each step's activations (memory growing with every token)."""
    model = tiny_model()
    model.setup_caches(1, 16)
    assert torch.is_grad_enabled() and model.output.weight.requires_grad
    logits = engine.prefill(model, torch.tensor([[3, 4, 5]]), torch.tensor([3]))
    engine.generate(model, [[3, 4, 5]], 4)
    cache = model.layers[0].attention.kv_cache
    assert not (logits.requires_grad or cache.k.requires_grad or cache.v.requires_grad)


@pytest.mark.parametrize("chunk, device", [(4096, "cpu"), (4, "cpu"), (3, "cpu"), (4, "cuda")])
def test_a_prefill_after_cached_positions_continues_them(chunk, device, monkeypatch):
    """5 tokens, then 6 more at start=5 (in chunks of 4 or 3 too: 4 + 2, 3 + 3): the logits of one prefill of all 11,
    and generate from there decodes the tokens of one generate over all 11 (with a repetition penalty too, over all
    11), counting its steps past the budget from the cache's 11 positions (budget 8: every step selects; from the 6
    new tokens alone, two would not). On CUDA through the Triton kernels and the CUDA graph, captured at the continued
    positions."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = tiny_model(HataArgs(budget=8, n_dense=1), device=device)
    tokens, lengths = torch.arange(3, 14, device=device)[None], torch.tensor([11, 5, 6], device=device)[:, None]
    model.setup_caches(1, 32)
    whole = engine.prefill(model, tokens, lengths[0], chunk=chunk)
    model.setup_caches(1, 32)
    engine.prefill(model, tokens[:, :5], lengths[1], chunk=chunk)
    torch.testing.assert_close(engine.prefill(model, tokens[:, 5:], lengths[2], chunk=chunk, start=5), whole,
                               atol=1e-4 if device == "cuda" else 1e-5, rtol=0)  # (CUDA: TF32 matmuls may differ)
    ids = tokens[0].tolist()
    for penalty in (1.0, 1.5):  # the penalty counts the cached tokens too (before: only the 6 new ones)
        model.setup_caches(1, 32)
        want, _ = engine.generate(model, [ids], 8, repetition_penalty=penalty)
        model.setup_caches(1, 32)
        engine.generate(model, [ids[:5]], 1)
        sparse_steps = count_sparse_steps(monkeypatch)  # (both runs selecting: else dense == dense would pass)
        got, timing = engine.generate(model, [ids], 8, start=5, repetition_penalty=penalty)
        assert got == want and timing["prefill_tokens"] == 6 and timing["selecting_steps"] == 7, penalty
        assert device == "cuda" or len(sparse_steps) == 7 * len(model.sparse_layers())  # (CUDA: graph replays)
        monkeypatch.undo()
        assert timing["decode_steps"] == 7
    with pytest.raises(ValueError, match="11 \\+ 30 tokens need 40 cache slots"):
        engine.generate(model, [ids], 30, start=5)
    with pytest.raises(ValueError, match="at least one token past the 10 the caches hold \\(2, for a dense prefill"):
        engine.generate(model, [ids], 4, start=10)  # one token: a decode step, not a prefill


def test_generate_equals_a_full_forward_each_step():
    """Greedy generate (a batch of two lengths, through the cache) against a fresh forward over the whole sequence
    for every new token. A random model's tokens turn on every position: a step at the wrong one (its K/V over the
    previous token's) changed them here, while the default model's greedy text stayed the same. The lengths are 6
    apart: the shorter row decoding at the longer's positions (over its padding) gave the same tokens 2 apart."""
    model = tiny_model()
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15, 16, 17]]
    model.setup_caches(2, 16)
    new, _ = engine.generate(model, prompts, 6)
    for prompt, tokens in zip(prompts, new):
        seq = list(prompt)
        for _ in range(6):
            model.setup_caches(1, len(seq))
            with torch.inference_mode():
                seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
        assert tokens == seq[len(prompt):], prompt


def test_timing_counts_the_steps_past_the_budget(capsys, monkeypatch):
    """Step s of a 3-token prompt attends to 4 + s keys: with K = 6, steps 3.. select (4 of 7); stderr says so.
    A dense model has no budget to count against."""
    model = tiny_model(HataArgs(budget=6, n_dense=1))
    model.setup_caches(1, 16)
    sparse_steps = count_sparse_steps(monkeypatch)
    _, timing = engine.generate(model, [[3, 4, 5]], 8)
    assert (timing["decode_steps"], timing["budget"], timing["selecting_steps"]) == (7, 6, 4)
    assert len(sparse_steps) == 4 * len(model.sparse_layers())  # the steps counted are the steps the model selected
    engine.report_speed(timing)
    err = capsys.readouterr().err
    assert "7 steps in" in err and "; 4 of them with more cached keys than the budget of 6 tokens (the others" in err
    engine.report_speed({**timing, "selecting_steps": 7})  # all of them: no others to speak of
    assert capsys.readouterr().err.endswith("; 7 of them with more cached keys than the budget of 6 tokens\n")
    engine.report_speed({**timing, "selecting_steps": 0})  # "0 of them ... (the others ...)" read oddly
    assert "; every step attended to every key: none had more cached keys than the budget of 6 tokens\n" in \
        capsys.readouterr().err
    engine.report_speed({**timing, "decode_steps": 0, "selecting_steps": 0})  # no steps: nothing to count
    err = capsys.readouterr().err
    assert "decode: no steps (" in err and "every step" not in err
    for cut, whose in ((1, "1 sequence ended at its"), (2, "2 sequences ended at their")):
        engine.report_speed({**timing, "cut": cut})
        assert f"; {whose} new-token limit, not at a stop" in capsys.readouterr().err
    dense = tiny_model()
    dense.setup_caches(1, 16)
    assert engine.generate(dense, [[3, 4, 5]], 8)[1]["selecting_steps"] is None


def test_prefill_refuses_lengths_outside_the_prompts_and_short_chunks():
    """A length of 0 or past the padded width would get no row of logits (uninitialised memory came back); a chunk
    under 3 tokens could leave a 1-token chunk. Errors, not asserts (python -O drops those)."""
    model = tiny_model()
    model.setup_caches(2, 16)
    tokens = torch.arange(3, 8).repeat(2, 1)  # (2, 5)
    for lengths in ([5, 0], [5, 6], [-1, 3]):
        with pytest.raises(ValueError, match=rf"prompt lengths must lie in 1..5 .*got \[{lengths[0]}, {lengths[1]}\]"):
            engine.prefill(model, tokens, torch.tensor(lengths))
    with pytest.raises(ValueError, match="prefill chunks of at least 3 tokens, got 2"):
        engine.prefill(model, tokens, torch.tensor([5, 5]), chunk=2)
    with torch.inference_mode():  # but a prompt of 2 tokens (or 1) is one chunk of its own length, not refused
        whole = engine.prefill(model, tokens[:, :2], torch.tensor([2, 2]), chunk=4096)
        assert torch.equal(engine.prefill(model, tokens[:, :2], torch.tensor([2, 2]), chunk=2), whole)


@pytest.mark.parametrize("lengths", [[5], [9], [6], [10], [9, 2, 6, 1]])  # 4 + 1, 8 + 1: a 1-token last chunk
def test_chunked_prefill_stays_dense(lengths):
    """Chunks of 4 give the logits of one pass even when 1 token would be left over for the last chunk (the
    model takes a 1-token forward for a decode step, which the sparse layers, budget 2 here, attend sparsely), and
    each sequence of a right-padded batch gets the logits at its own last token, whichever chunk holds it."""
    model = tiny_model(HataArgs(budget=2, n_dense=1))
    T = max(lengths)
    tokens = torch.arange(3, 3 + T).repeat(len(lengths), 1)  # (B, T)
    logits = []
    for chunk in (4096, 4, 3, max(lengths)):  # chunks of 3 (10 = 3 + 3 + 2 + 2), one chunk the whole prompt
        model.setup_caches(len(lengths), 16)
        with torch.inference_mode():
            logits.append(engine.prefill(model, tokens, torch.tensor(lengths), chunk=chunk))
    for other in logits[1:]:
        torch.testing.assert_close(other, logits[0], atol=1e-5, rtol=0)
    assert all(not torch.allclose(logits[0][0], logits[0][b]) for b in range(1, len(lengths)))  # rows differ


PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13]]  # a batch of two lengths for the tiny model


def free_run(model, n=10):
    """(the tiny model's n greedy tokens for each of PROMPTS, a token that ends row 0 only), the caches set up again
    for the next run."""
    model.setup_caches(2, 32)
    free, _ = engine.generate(model, PROMPTS, n)
    stop = next(t for t in free[0] if t not in free[1])
    model.setup_caches(2, 32)
    return free, stop


def test_generate_ends_a_sequence_where_stop_when_says():
    """stop_when sees each sequence's new tokens so far (host copies; a finished one's -1s are not its tokens): here
    row 0 ends at its 2nd token and row 1 at its 4th, and neither counts as cut by max_new_tokens."""
    model, prompts, seen = tiny_model(), PROMPTS, []
    free, stop = free_run(model, 8)  # stop ends row 0, and a stop_when that never fires keeps it so
    got, timing = engine.generate(model, prompts, 8, stop_when=lambda ids: seen.append(list(ids)) or
                                  len(ids) == (2 if ids[:2] == free[0][:2] else 4))
    assert got == [free[0][:2], free[1][:4]] and timing["decode_steps"] == 3 and timing["cut"] == 0
    assert free[1][:4] in seen and free[0][:3] not in seen and all(t >= 0 for ids in seen for t in ids)
    model.setup_caches(2, 32)
    got, timing = engine.generate(model, prompts, 8, stop_ids={stop}, stop_when=lambda ids: False)
    assert got == [free[0][:free[0].index(stop) + 1], free[1]] and timing["cut"] == 1


def test_stop_strings_cut_the_text_where_it_first_shows_one(capsys, tok):
    """--stop strings: StopStrings finds them in the newest tokens' text; the streamer prints up to the first one,
    holding back text that may begin one (released when it does not); a batch's answers are cut the same way."""
    stops = engine.StopStrings(tok, ["Q:", "\n\n"])
    assert stops.cut("a Q b\n\nQ: c") == "a Q b" and stops.cut("no stop") == "no stop"
    assert stops.unsure("a Q") == 1 and stops.unsure("b\n") == 1 and stops.unsure("a Q b") == 0
    assert engine.StopStrings(tok, ["\n\nQ"]).unsure("a\n\n") == 2  # the longest start of one it could be
    x, ab = tok.encode("xab", bos=False)  # 20 ids of no text (past the vocabulary) inside "xa": found (before: not)
    assert engine.StopStrings(tok, ["xa"])([x] + [tok.vocab_size] * 20 + [ab])
    assert not engine.StopStrings(tok, ["xa"])([x] + [tok.vocab_size] * 20)
    euro = [tok.enc.encode_single_token(bytes([b])) for b in "€".encode()] + tok.encode("a", bos=False)
    assert tok.decode(euro) == "€a" and engine.StopStrings(tok, ["€a"])(euro)  # byte tokens: 3 for one character
    streamer = engine.Streamer(tok, stops)
    for t in tok.encode("Paris. Q", bos=False):  # ends in what may begin "Q:": held back, then shown at the end
        streamer(torch.tensor([t]))
    streamer.finish()
    assert capsys.readouterr().out == "Paris. Q\n"
    text = "Paris. Q is a letter. Q"
    for end, printed in ((": next", "Paris. Q is a letter. "), ("ueen", text + "ueen")):
        ids = tok.encode(text + end, bos=False)
        assert stops(ids) is (end == ": next") and not stops(ids[:-3])
        streamer = engine.Streamer(tok, stops)
        for t in ids:
            streamer(torch.tensor([t]))
        streamer.finish()
        assert capsys.readouterr().out == printed + "\n"
        assert engine.reply_text(tok, ids, stops) == printed


def test_generate_stops_each_sequence_at_its_stop_token(capsys):
    model, prompts = tiny_model(), PROMPTS
    free, stop = free_run(model)
    got, timing = engine.generate(model, prompts, max_new_tokens=10, stop_ids={stop})
    assert got == [free[0][:free[0].index(stop) + 1], free[1]] and timing["decode_steps"] == 9
    assert timing["cut"] == 1 and engine.generate(model, prompts, 10)[1]["cut"] is None  # no stop ids: nothing cut
    engine.report_speed(timing)  # why the other one ended
    assert "; 1 sequence ended at its new-token limit, not at a stop\n" in capsys.readouterr().err
    assert timing["decode_tokens"] == len(got[0]) - 1 + 9  # a finished sequence's idle steps are not its tokens
    stops = {free[0][2], free[1][3]}  # both stop now: the loop ends at the later stop, not at max_new_tokens
    ends = [next(i for i, t in enumerate(row) if t in stops) for row in free]
    model.setup_caches(2, 32)
    got, timing = engine.generate(model, prompts, max_new_tokens=10, stop_ids=stops)
    assert got == [row[:end + 1] for row, end in zip(free, ends)] and timing["decode_steps"] == max(ends) <= 3
    assert timing["cut"] == 0


def test_command_line_settings_reach_hata_args():
    args = engine.build_parser().parse_args(["--prompt", "x", "--budget", "1/8", "--sink", "3", "--recent", "5",
                                             "--use-norm", "--n-dense", "1", "--rbit", "64", "--selector", "oracle"])
    assert engine.hata_args(args) == HataArgs(rbit=HataArgs.rbit, budget=1 / 8, n_dense=1, n_sink=3, n_recent=5,
                                              use_norm=True, selector="oracle")  # oracle: no codes, --rbit unused
    args.selector = "hash"
    assert engine.hata_args(args) == HataArgs(rbit=64, budget=1 / 8, n_dense=1, n_sink=3, n_recent=5, use_norm=True)


def test_sampled_rows_do_not_depend_on_their_neighbours():
    """With row_generators a prompt samples the same tokens alone (seed s + i) as at row i of a batch (seed s),
    and two copies of one prompt in a batch draw different samples."""
    model = tiny_model()
    prompts, seed = [[5, 6, 7], [9, 10, 11, 12, 13], [5, 6, 7]], 2 ** 64 - 2  # row 2's seed wraps to 0
    model.setup_caches(3, 32)
    both, _ = engine.generate(model, prompts, 12, temperature=1.5, generator=engine.row_generators(seed, 3, "cpu"))
    for i, prompt in enumerate(prompts):
        model.setup_caches(1, 32)
        alone, _ = engine.generate(model, [prompt], 12, temperature=1.5,
                                   generator=engine.row_generators((seed + i) % 2 ** 64, 1, "cpu"))
        assert alone == [both[i]], i
    assert both[0] != both[2]
    with pytest.raises(ValueError, match="shorter"):  # a generator for every row, not fewer
        sample(torch.zeros(2, 5), 1.0, 1.0, engine.row_generators(0, 1, "cpu"))


def test_status_lines(capsys):
    oracle = HataArgs(selector="oracle", budget=4, hash_weights="w/proj.safetensors")
    assert "proj" not in engine.describe_policy(oracle, 64, 4)  # oracle and Quest read no projections
    assert "proj.safetensors" in engine.describe_policy(HataArgs(budget=4, hash_weights="w/proj.safetensors"), 64, 4)
    assert "--sink 1 + --recent 3 fill the budget of 4 tokens: a fixed window" in engine.describe_policy(
        HataArgs(budget=4, n_sink=1, n_recent=3), 64, 4)
    assert "hash selector, budget 16 (--sink 4, --recent 0 of them) of up to 64 tokens" in engine.describe_policy(
        HataArgs(budget=16, n_sink=4), 64, 4)  # (before: the line did not say they were taken)
    quest = [engine.describe_policy(HataArgs(budget=K, selector="quest"), 64, 4) for K in (8, 16)]
    assert quest == ["sparse decode: Quest pages (a baseline), budget 8 of up to 64 tokens (less than one 16-token "
                     "page: part of the best page each step)", "sparse decode: Quest pages (a baseline), budget 16 of "
                     "up to 64 tokens"]
    engine.report_speed({"prefill_s": 0.5, "prefill_tokens": 3, "decode_s": 0.0, "decode_steps": 0, "decode_tokens": 0})
    assert "decode: no steps (each sequence ended with its first token" in capsys.readouterr().err
    engine.report_speed({"prefill_s": 0.5, "prefill_tokens": 1, "decode_s": 0.1, "decode_steps": 1, "decode_tokens": 1})
    assert "prefill: 1 token in 0.50s (2.0 tok/s); decode: 1 step in 0.10s (10.0 tok/s, 100.0 ms/step)" in \
        capsys.readouterr().err
    engine.report_speed({"prefill_s": 0.5, "prefill_tokens": 8, "decode_s": 0.1, "decode_steps": 2, "decode_tokens": 7})
    assert "; decode: 2 steps in 0.10s (70.0 tok/s, 50.0 ms/step)" in capsys.readouterr().err  # tokens of a batch
    engine.report_speed({"prefill_s": 0.5, "graph_s": 0.25, "prefill_tokens": 2, "decode_s": 0.1, "decode_steps": 1,
                         "decode_tokens": 1})  # CUDA: the graph's capture is timed apart from the prefill
    assert "prefill: 2 tokens in 0.50s (4.0 tok/s); CUDA graph capture 0.25s; decode: 1 step" in capsys.readouterr().err


def test_status_line_names_the_selector():
    """HATA is the hash selector; the oracle and Quest are named as what they are (an upper bound, a baseline)."""
    line = {s: engine.describe_policy(HataArgs(budget=20, selector=s), 64, 4) for s in ("hash", "oracle", "quest")}
    assert line["hash"] == ("HATA decode: hash selector, budget 20 of up to 64 tokens, random projections (R = 128, "
                            "--n-dense 2)")
    assert line["oracle"] == ("sparse decode: oracle selector (exact top-K, an upper bound), budget 20 of up to 64 "
                              "tokens")
    assert line["quest"] == "sparse decode: Quest pages (a baseline), budget 20 of up to 64 tokens"
    assert "HATA" not in engine.describe_policy(HataArgs(budget=64, selector="quest"), 64, 4)  # covers the cache
    assert engine.describe_policy(HataArgs(budget=20, use_norm=True), 64, 4).endswith("(R = 128, --n-dense 2, "
                                                                                      "--use-norm)")  # said, too


def test_the_default_cache_holds_the_positions_the_steps_use_so_a_sparse_label_means_selecting_steps(capsys):
    """Prompt + new tokens - 1 positions: the cache held one more that no step used, so a budget of that many minus
    one was labelled HATA decode while every step attended to every key."""
    tiny = [*TINY, "--prompt-len", "3", "--max-new-tokens", "4"]
    for budget, start, end in [("6", "covers the whole 6-token cache: all dense", "every step attended to every key"),
                               ("5", "budget 5 of up to 6 tokens", "1 of them with more cached keys than the budget"),
                               ("1/2", "budget 3 of up to 6 tokens", "3 of them with more cached keys than")]:
        code, _, err = run_cli(capsys, *tiny, "--budget", budget)
        assert code == 0 and start in err and "decode: 3 steps in" in err and end in err, err


def test_generate_refuses_more_tokens_than_the_cache_holds(capsys):
    """Prompt + new tokens - 1 positions are cached (the last token is sampled, never fed back); one more is an
    error before any work, not an index past the cache (on CUDA, a write out of bounds)."""
    model = tiny_model()
    model.setup_caches(1, 8)
    assert len(engine.generate(model, [[1, 2, 3]], max_new_tokens=6)[0][0]) == 6  # 3 + 6 - 1 = 8 slots: fits
    with pytest.raises(ValueError, match=r"3 \+ 7 tokens need 9 cache slots \(the last new token is never "
                                         r"cached\); the cache has 8"):
        engine.generate(model, [[1, 2, 3]], max_new_tokens=7)
    with pytest.raises(ValueError, match="^9 \\+ 0 tokens need 9 cache slots; the cache"):  # the prompt must fit
        engine.generate(model, [list(range(9))], max_new_tokens=0)
    code, _, err = run_cli(capsys, *TINY, "--prompt-len", "10", "--max-seq-len", "12", "--max-new-tokens", "10")
    assert code == 0 and "at most 3 new tokens: the cache holds 12 tokens and the prompt 10" in err  # as run() does
    assert "prefill: 10 tokens in" in err and "decode: 2 steps in" in err
    code, _, err = run_cli(capsys, *TINY, "--prompt-len", "1024")
    assert code == 0 and "at most 1 new token: the cache holds 1024 tokens" in err  # 1024 + 200 > 1024
    code, _, err = run_cli(capsys, *TINY)  # the default: half
    assert code == 0 and "1 random prompt of 512 tokens" in err and "at most" not in err  # of the context, not 1024
    for cache, prompt in (("100", "50 tokens"), ("1", "1 token")):  # of the cache asked for, where it is given
        code, _, err = run_cli(capsys, *TINY, "--max-seq-len", cache)
        assert code == 0 and f"1 random prompt of {prompt};" in err
    args = argparse.Namespace(max_seq_len=None, max_new_tokens=5)  # a real prompt: its length, not a flag
    with pytest.raises(ValueError, match="^the prompt has 2000 tokens but the model's context is 1024 tokens$"):
        engine.cache_size(args, 2000, 1024)
    code, _, err = run_cli(capsys, *TINY, "--prompt-len", "2000")
    assert code == 2 and error_line(err) == "error: --prompt-len is 2000 but the model's context is 1024 tokens"
    code, _, err = run_cli(capsys, *TINY, "--prompt-len", "20", "--max-seq-len", "12")
    assert code == 2 and error_line(err) == "error: --prompt-len is 20 but --max-seq-len is 12"
    code, _, err = run_cli(capsys, *TINY, "--max-seq-len", "2000")
    assert code == 2 and error_line(err) == "error: --max-seq-len 2000 exceeds the model's context of 1024 tokens"
    code, _, err = run_cli(capsys, *TINY, "--prompt-len", "10", "--max-seq-len", "1024", "--max-new-tokens", "2")
    assert code == 0 and "decode: 1 step in" in err  # the whole context is a cache size
    for bad in ("0", "-4"):  # before: 0 was read as unset, -4 reached torch.zeros
        code, _, err = run_cli(capsys, *TINY, "--max-seq-len", bad)
        assert code == 2 and "--max-seq-len: must be a whole number >= 1" in err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_decode_equals_eager():
    """The captured CUDA-graph step gives the eager step's tokens and their log-probabilities (read from the graph's
    output before the next replay): HATA's Triton kernels, sequences of different lengths, up to the cache's last slot
    (7 + 10 - 1 = 16). The capture is timed apart from the prefill."""
    model = tiny_model(HataArgs(budget=4, n_dense=1), device="cuda")
    prompts, out, timings, logprobs = [[5, 6, 7, 8, 9, 10, 11], [3, 4, 5]], [], [], []
    for graph in (False, True):
        model.setup_caches(2, 16)
        with torch.inference_mode():
            new, timing = engine.generate(model, prompts, max_new_tokens=10, cuda_graph=graph, logprobs=True)
        out.append(new)
        timings.append(timing["graph_s"])
        logprobs.append(torch.tensor(timing["logprobs"]))  # (2, 10)
    assert out[0] == out[1] and [len(t) for t in out[0]] == [10, 10]
    torch.testing.assert_close(logprobs[1], logprobs[0], atol=1e-5, rtol=0)  # (fp32 logits)
    assert timings[0] is None and timings[1] > 0
    for layer in model.layers[1:]:  # the captured threshold kernel set where each row's next window starts
        assert (layer.attention.hash_cache.anchor >= 1).all()


def ctrl_c_at_step(monkeypatch, n):  # decode steps raise KeyboardInterrupt at the n-th call (clear the list: again)
    step, calls = engine.decode_one_token, []

    def interrupted_step(*args):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return step(*args)
    monkeypatch.setattr(engine, "decode_one_token", interrupted_step)
    return calls


def test_logprobs_are_the_models_own_for_each_new_token(monkeypatch):
    """generate(logprobs=True): each new token's log-probability under the model's logits (favour_0_1_2's), before
    the sampling settings (a repetition penalty of 2 here, which draws 1 and 2 too); each sequence's list ends at its
    stop token, and so does an Interrupted's (Ctrl-C in the 4th step). Not asked for: None."""
    logp = favour_0_1_2(monkeypatch).log_softmax(-1)
    expected = lambda rows: [pytest.approx(logp[row].tolist(), abs=1e-6) for row in rows]  # each token's log_softmax
    model = tiny_model()
    model.setup_caches(2, 16)
    new, timing = engine.generate(model, [[0, 3, 3], [3]], 5, stop_ids={2}, repetition_penalty=2.0, logprobs=True)
    assert new == [[1, 2], [0, 1, 2]]
    assert timing["logprobs"] == expected(new)
    assert engine.generate(model, [[3], [3]], 2)[1]["logprobs"] is None
    ctrl_c_at_step(monkeypatch, 4)
    with pytest.raises(engine.Interrupted) as stopped:
        engine.generate(model, [[0, 3, 3], [3]], 8, stop_ids={4}, repetition_penalty=2.0, logprobs=True)
    assert stopped.value.new == [[1, 2, 0, 0], [0, 1, 2, 0]]
    assert stopped.value.logprobs == expected(stopped.value.new)


def test_ctrl_c_in_generate_raises_with_the_tokens_so_far(monkeypatch):
    """Ctrl-C in the decode loop (here in the 3rd step) raises Interrupted holding each sequence's new tokens so far:
    the prefill's and two steps', those of an uninterrupted generate; a sequence that stopped before holds its own."""
    model = tiny_model()
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
    model.setup_caches(2, 16)
    whole, _ = engine.generate(model, prompts, 6)
    calls = ctrl_c_at_step(monkeypatch, 3)
    for stop in ((), [whole[1][1]]):
        calls.clear()
        model.setup_caches(2, 16)
        with pytest.raises(engine.Interrupted) as caught:
            engine.generate(model, prompts, 6, stop)
        assert caught.value.new == [whole[0][:3], whole[1][:3 - len(stop)]], stop


def test_after_ctrl_c_the_prompt_and_each_step_but_the_last_stay_cached(monkeypatch):
    """What a chat's next turn reuses after an Interrupted (converse): the prompt and the positions of each decode step
    but the last, whose step the Ctrl-C may have cut half way (here its position's K/V and codes are spoilt in every
    layer). Continued from there, the next turn decodes what a fresh cache does (a sparse layer reads the codes)."""
    model = tiny_model(HataArgs(budget=4, n_dense=1))
    model.setup_caches(1, 24)
    calls, step = [], engine.decode_one_token

    def half_done_step(model, cur, input_pos):
        calls.append(1)
        if len(calls) == 3:
            for layer in model.layers:
                layer.attention.kv_cache.k[:, :, int(input_pos[0]):] = float("nan")
                if layer.attention.hash_cache is not None:
                    layer.attention.hash_cache.codes[:, :, int(input_pos[0]):] = -1
            raise KeyboardInterrupt
        return step(model, cur, input_pos)
    monkeypatch.setattr(engine, "decode_one_token", half_done_step)
    prompt = [5, 6, 7, 8]
    with pytest.raises(engine.Interrupted) as caught:
        engine.generate(model, [prompt], 6)
    monkeypatch.setattr(engine, "decode_one_token", step)
    held, new = prompt + caught.value.new[0][:-1], prompt + caught.value.new[0] + [9, 10]
    start = engine.continue_at(held, new)
    assert start == len(held) == 6
    continued, _ = engine.generate(model, [new], 5, start=start)
    model.setup_caches(1, 24)
    assert continued == engine.generate(model, [new], 5)[0]


@pytest.mark.usefixtures("gguf_path")  # the default model: skipped when it is not installed
def test_ctrl_c_shows_the_answers_so_far(capsys, monkeypatch, tmp_path):
    """Ctrl-C while a batch decodes shows each prompt's answer so far, then ends the run (status 130); one prompt's
    streamed text ends its line, and its --prompt-cache is written (as a chat's first turn's)."""
    calls = ctrl_c_at_step(monkeypatch, 5)
    code, out, err = run_cli(capsys, "--prompt", "The capital of France is", "--prompt", "Once upon a time",
                             "--max-new-tokens", "50", "--dense")
    answers = out.split("--- ")[1:]
    assert code == 130 and "interrupted" in err and "prefill:" not in err, err
    assert len(answers) == 2 and all(a.split("\n", 1)[1].strip() for a in answers), out
    calls.clear()
    code, out, err = run_cli(capsys, "--prompt", "The capital of France is", "--max-new-tokens", "50", "--dense",
                             "--prompt-cache", str(tmp_path / "p.cache"))
    assert code == 130 and out.strip() and out.endswith("\n") and "interrupted" in err, (out, err)
    assert "the prompt's 5 tokens written" in err  # the prompt was prefilled whole
    calls.clear()
    stdin_of(monkeypatch, "")  # a chat's first turn too
    code, out, err = run_cli(capsys, "--interactive", "--prompt", "Hi", "--prompt-cache", str(tmp_path / "c.cache"))
    assert code == 0 and "(reply stopped)" in err and "written to" in err, err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_kept_cuda_graph_serves_the_next_turn():
    """generate's `graphs` (a chat's turns): the second generate on the same caches, continued after the first's
    cached tokens, replays the first's captured step (no capture of its own) and decodes the eager step's tokens."""
    model = tiny_model(HataArgs(budget=4, n_dense=1), device="cuda")
    first, out = [5, 6, 7, 8, 9, 10, 11], []
    for graph in (False, True):
        graphs = {}
        model.setup_caches(1, 40)
        new, timing = engine.generate(model, [first], 6, cuda_graph=graph, graphs=graphs)
        turn = first + new[0][:-1] + [12, 13, 14]  # the cache holds 7 + 5 (the last new token is never cached)
        again, later = engine.generate(model, [turn], 8, cuda_graph=graph, graphs=graphs, start=len(first) + 5)
        out.append((new, again))
        assert [timing["graph_s"] is None, later["graph_s"] is None, len(graphs)] == [not graph, True, graph]
    assert out[0] == out[1] and [len(t) for t in out[0][1]] == [8]
    graphs = {}
    model.setup_caches(1, 40)
    _, timing = engine.generate(model, [first], 1, graphs=graphs)  # the prefill's token only: no step to capture
    assert timing["graph_s"] is None and graphs == {}


def test_sampling_temperature():
    """softmax(logits / T): at T = 0.5 the token of probability 0.6 is drawn with probability 0.36 / 0.52."""
    logits, n = torch.log(torch.tensor([[0.6, 0.4]])), 4000
    gen = torch.Generator().manual_seed(0)
    share = sum(int(sample(logits, 0.5, 1.0, gen)) == 0 for _ in range(n)) / n
    p = 0.36 / 0.52
    assert abs(share - p) < 4 * math.sqrt(p * (1 - p) / n)  # 4 standard deviations: 0.029
    for tiny in (1e-39, 1e-50, 5e-324):  # under fp32's smallest normal: T is clamped to it, no x / 0
        assert sample(torch.tensor([[0.0, 1.0, 3.0]]), tiny).tolist() == [2]
        assert sample(torch.tensor([[0.0, 1.0, 3.0]]), 1.0, top_p=tiny).tolist() == [2]  # 0 in fp32: the top stays


@pytest.mark.usefixtures("gguf_path")
def test_another_checkpoint_runs_with_the_default_models_file_gone(tmp_path, monkeypatch):
    """The default model's package installed but its .gguf deleted (to save its 93 MB): another checkpoint is not
    the default model, and needs no file of it (a sparse run on it failed with the deleted file's [Errno 2])."""
    monkeypatch.setattr(engine, "default_checkpoint", lambda: str(tmp_path / "gone.gguf"))
    (mine := tmp_path / "mine.gguf").write_bytes(b"GGUF")
    assert not engine.is_default_model(str(mine))
    assert engine.shipped_hash_weights(HataArgs(budget=0.5), str(mine)) is None


@pytest.mark.usefixtures("gguf_path")
def test_the_default_model_named_gets_its_trained_projections(capsys, gguf_path, tmp_path):
    """--checkpoint naming the default model's own file (or its directory, or a link to it, or a folder holding only
    a link to it) loads the shipped projections, as leaving --checkpoint out does, and so does a copy of its bytes;
    another file or folder does not (they were trained on this model)."""
    (tmp_path / "link.gguf").symlink_to(gguf_path)
    assert engine.is_default_model(None) and engine.is_default_model(gguf_path)
    assert engine.is_default_model(str(tmp_path / "link.gguf")) and not engine.is_default_model(__file__)
    assert engine.is_default_model(os.path.dirname(gguf_path)) and engine.is_default_model(str(tmp_path))
    (hf := tmp_path / "hf").mkdir()
    (hf / "config.json").write_text("{}")
    assert not engine.is_default_model(str(hf))
    shutil.copyfile(gguf_path, copy := tmp_path / "copy.gguf")  # a copy of the same bytes is the same model
    shutil.copyfile(gguf_path, changed := hf / "changed.gguf")  # (hf: now a Hugging Face GGUF folder)
    with open(changed, "r+b") as f:
        f.seek(os.path.getsize(changed) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 1]))
    assert engine.is_default_model(str(copy)) and not engine.is_default_model(str(changed))
    assert not engine.is_default_model(str(hf))  # its one .gguf is another model's
    code, _, err = run_cli(capsys, "--prompt", "The capital of France is", "--max-new-tokens", "2", "--budget", "1/2",
                           "--checkpoint", gguf_path)
    assert code == 0 and "smollm2-135m-r128.safetensors" in err and "random projections" not in err


def test_prefill_progress_bar_for_a_long_prompt(capsys, monkeypatch):
    """A bar on stderr (tqdm), a step per layer of each chunk, for a prompt of PROGRESS_TOKENS or more (before: only
    for more than one chunk, so a 3000-token prompt on a CPU was seconds of silence); the logits are the same."""
    model = tiny_model(HataArgs(budget=2, n_dense=1))  # 4 layers
    tokens, lengths = torch.arange(3, 13)[None], torch.tensor([10])
    logits = []
    for chunk, at_least, bar in ((4, 10, "/12 ["), (16, 10, "/4 ["), (16, 11, None)):  # chunks 4 + 4 + 2, or one
        monkeypatch.setattr(engine, "PROGRESS_TOKENS", at_least)
        model.setup_caches(1, 16)
        logits.append(engine.prefill(model, tokens, lengths, chunk=chunk, progress=True))
        err = capsys.readouterr().err
        assert ("prefill 10 tokens:" in err and bar in err) if bar else "prefill" not in err, err
    for other in logits[1:]:
        torch.testing.assert_close(other, logits[0], atol=1e-5, rtol=0)


def test_prefill_removes_its_progress_hooks_after_an_error(monkeypatch):
    """A prefill stopped by an error (or Ctrl-C) in a layer leaves no progress hooks on the model (before: every
    later forward synchronized and drew on the dead bar)."""
    model = tiny_model()
    model.setup_caches(1, 16)
    monkeypatch.setattr(engine, "PROGRESS_TOKENS", 1)
    monkeypatch.setattr(model.layers[2], "forward", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        engine.prefill(model, torch.arange(3, 13)[None], torch.tensor([10]), progress=True)
    assert not any(layer._forward_hooks for layer in model.layers)


def test_decode_progress_bar_for_a_batch(capsys, monkeypatch):
    """generate(progress=True) draws a decode bar on stderr, with the sequences finished, unless on_token streams
    the tokens; without progress (bench, eval, tests) it draws nothing. The tokens are the same either way."""
    monkeypatch.setattr(engine, "tqdm", functools.partial(tqdm, mininterval=0))  # every step redraws, however fast
    model, prompts = tiny_model(), PROMPTS
    free, stop = free_run(model)
    assert free[0].index(stop) < 8 and capsys.readouterr().err == ""  # before the last step
    runs = {"bar": dict(progress=True), "streamed": dict(progress=True, on_token=lambda tokens: None), "quiet": {}}
    for name, kwargs in runs.items():
        model.setup_caches(2, 32)
        got, _ = engine.generate(model, prompts, max_new_tokens=10, stop_ids={stop}, **kwargs)
        err = capsys.readouterr().err
        assert got == [free[0][:free[0].index(stop) + 1], free[1]]
        if name == "bar":  # it wipes itself at the end: what follows starts on a clean line
            assert "decode:" in err and "/10 [" in err and "1/2 finished" in err and err.endswith("\r"), err
        else:
            assert err == "", (name, err)


@pytest.mark.usefixtures("gguf_path")  # the default model: skipped when it is not installed
def test_batch_shows_a_decode_bar_and_a_single_prompt_streams(capsys):
    """A batch prints nothing on stdout until every sequence ends, so a bar on stderr shows the decode going; a
    single prompt streams its tokens to stdout and draws no bar."""
    for prompts, bar in ((["Hello", "The capital of France is"], True), (["Hello"], False)):
        argv = [a for p in prompts for a in ("--prompt", p)]
        code, out, err = run_cli(capsys, *argv, "--max-new-tokens", "3", "--dense")
        assert code == 0 and ("decode:" in err and "/3 [" in err) == bar, err
        assert out.count("--- ") == (len(prompts) if bar else 0) and out.endswith("\n")  # the shell's prompt after it


def test_interrupt_and_cpu_compile_notes(capsys, monkeypatch):
    """Ctrl-C ends with one line and status 130 instead of a traceback; --compile on the CPU says it is for CUDA."""
    monkeypatch.setattr(engine, "run", lambda args: (_ for _ in ()).throw(KeyboardInterrupt))
    code, _, err = run_cli(capsys, "--prompt", "hi")
    assert code == 130 and err.strip() == "interrupted"
    model = tiny_model()
    args = argparse.Namespace(compile=True, offload=False, kv_gpu_gb=None)
    monkeypatch.setattr(model, "compile_pointwise", lambda: None)
    engine.setup(model, args, 1, 16, 8)
    assert "--compile is for CUDA" in capsys.readouterr().err


def test_closed_pipe_ends_quietly():
    """`engine.py ... | head`: the reader stops, and the run ends with status 141 and nothing on stderr (before: an
    error line, then Python's own complaint when its exit flushed stdout)."""
    proc = subprocess.Popen([sys.executable, "-c", ANSWERS], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.read(10)
    proc.stdout.close()  # as head does after its bytes
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 141 and err == b""


def test_answers_are_flushed_as_they_come(monkeypatch):
    """A streamed token must reach a pipe at once, not when Python's buffer fills."""
    calls = []
    out = types.SimpleNamespace(write=calls.append, flush=lambda: calls.append("flush"))
    monkeypatch.setattr(sys, "stdout", out)
    engine.show("tok")
    assert "".join(calls[:-1]) == "tok" and calls[-1] == "flush"


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full here")
def test_a_full_standard_output_is_named():
    """Answers written to a full disk (here /dev/full) said only "error: [Errno 28] No space left on device"."""
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-c", ANSWERS], cwd=ROOT, stdout=full, stderr=subprocess.PIPE,
                              timeout=60)
    assert proc.returncode == 2
    assert proc.stderr == b"error: cannot write standard output: [Errno 28] No space left on device\n"


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANSWERS = ("import sys, engine\n"  # a run that writes answers until its output fails
           "def run(args):\n"
           "    while True:\n"
           "        engine.show('token ' * 100 + '\\n')\n"
           "sys.exit(engine.cli(run, None))\n")


def test_sigterm_ends_a_run_in_one_word_and_leaves_no_scratch_file(tmp_path):
    """SIGTERM (kill, a job's time limit) while a file is written: status 143 and one word, the file as it was and no
    scratch file beside it (before: the process died at once and left its hidden .tmp file for good). In a child
    process: where it is not handled, SIGTERM would end pytest too."""
    (path := tmp_path / "out.txt").write_text("before")
    script = ("import os, signal, sys, time, engine\n"
              "def write(tmp):\n"
              "    open(tmp, 'w').write('half')\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "    time.sleep(30)\n"
              f"sys.exit(engine.cli(lambda args: engine.write_whole({str(path)!r}, write), None))\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, timeout=60)
    assert (proc.returncode, proc.stderr) == (143, b"\nterminated\n")
    assert os.listdir(tmp_path) == ["out.txt"] and path.read_text() == "before"
    before = signal.getsignal(signal.SIGTERM)
    assert engine.cli(lambda args: None, None) == 0 and signal.getsignal(signal.SIGTERM) is before  # (put back)


@pytest.mark.usefixtures("gguf_path")
def test_batch_headers_mark_a_cut_prompt(capsys, monkeypatch):
    """Each output of a batch is headed by its prompt's first 60 characters, with … where the prompt goes on."""
    long, short = "a" * 61, "b" * 60
    record_prompts(monkeypatch)
    code, out, _ = run_cli(capsys, "--prompt", long, "--prompt", short, "--max-new-tokens", "2")
    assert code == 0 and f"--- {'a' * 60!r}…\n" in out and f"--- {short!r}\n" in out


@pytest.mark.parametrize("argv, ignored", [
    (["--dense", "--hash-weights", "w.safetensors"], "--hash-weights (--dense reads no hash codes)"),
    (["--selector", "quest", "--hash-weights", "w.st"], "--hash-weights (--selector quest reads no hash codes)"),
    (["--top-p", "0.9"], "--top-p (--temperature 0 decodes greedily)"),
    (["--top-p", "0.9", "--temperature", "1"], None),
    (["--top-k", "40", "--top-p", "0.9"], "--top-k, --top-p (--temperature 0 decodes greedily)"),
    (["--min-p", "0.1"], "--min-p (--temperature 0 decodes greedily)"),
    (["--min-p", "1", "--temperature", "1"], None),  # 1 is in range: the likeliest tokens only
    (["--interactive", "--system", "x"], None),  # an --interactive chat takes the system message
    (["--repetition-penalty", "1.2"], None),  # greedy decoding takes it too
    (["--repeat-last-n", "64"], "--repeat-last-n (--repetition-penalty 1 penalizes nothing)"),
    (["--repeat-last-n", "64", "--repetition-penalty", "1.2"], None),
    (["--dense", "--budget", "1/4", "--sink", "4", "--use-norm", "--n-dense", "3", "--selector", "oracle", "--recent",
      "2", "--rbit", "64"], "--budget, --selector, --n-dense, --sink, --recent (--dense: no sparse layer); --rbit, "
     "--use-norm (--dense reads no hash codes)"),
    (["--dense", "--budget", "2048"], None),  # given, but at its default
    (["--dense", "--rbit", "128"], "--rbit (--dense reads no hash codes)"),  # no default: a file's own, else 128
    (["--selector", "quest", "--rbit", "100"], "--rbit (--selector quest reads no hash codes)"),  # not refused
    (["--selector", "oracle", "--use-norm"], "--use-norm (--selector oracle reads no hash codes)"),
    (["--rbit", "64", "--use-norm"], None),
    (["--preset", "tiny", "--prompt-len", "8", "--seed", "3"],  # no --random-weights
     "--seed (nothing is drawn at random); --preset, --prompt-len (they shape a --random-weights run)"),
    (["--seed", "3", "--temperature", "0.7"], None),
    (["--keep-first"], "--keep-first (only --interactive forgets)"),
    (["--keep-first", "--interactive"], None),
    (["--logprobs"], "--logprobs (only --json prints them)"),
    (["--logprobs", "--json"], None),
])
def test_flags_that_change_nothing_say_so(capsys, argv, ignored):
    """HATA's settings with --dense, the hash selector's with another selector (an --rbit they read nothing of is
    not refused), and top-p with greedy decoding: a note that says why, not silence; a flag at its default value is
    no news."""
    code, _, err = run_cli(capsys, "--prompt", "hi", "--checkpoint", "/nonexistent.gguf", *argv)
    assert code == 2 and "checkpoint not found" in error_line(err)
    assert f"note: ignored in this run: {ignored}\n" in err if ignored else "note" not in err


def test_random_weights_notes_the_flags_it_ignores(capsys, tmp_path):
    """--random-weights reads no checkpoint, tokenizer or text: those flags get the note, and --prompt only sets the
    batch size, as the start line says."""
    (tmp_path / "p.txt").write_text("hi")
    code, _, err = run_cli(capsys, *TINY, "--prompt-len", "8", "--max-new-tokens", "2", "--dense", "--checkpoint",
                           str(tmp_path), "--tokenizer", "t.json", "--chat", "--prompt-file", str(tmp_path / "p.txt"),
                           "--prompt", "a", "--prompt", "b", "--interactive", "--parse-special", "--stop", "x",
                           "--keep-first", "--ignore-eos", "--verbose-prompt")
    assert code == 0, err
    assert ("note: ignored in this run: --checkpoint, --tokenizer, --chat, --prompt-file, --interactive, "
            "--parse-special, --stop, --keep-first, --ignore-eos, --verbose-prompt (--random-weights decodes random "
            "tokens)\n") in err
    assert "2 random prompts of 8 tokens (one per --prompt, its text unused)" in err
    code, _, err = run_cli(capsys, *TINY, "--prompt-len", "8", "--max-new-tokens", "2", "--dense", "--seed", "3")
    assert code == 0 and "note" not in err and "1 random prompt of 8 tokens; dense decode" in err  # (--seed draws it)
    code, _, err = run_cli(capsys, *TINY, "--prompt-len", "8", "--max-new-tokens", "4", "--budget", "4")  # sparse,
    assert code == 0 and "random projections (R = 128" in err and "warning" not in err, err  # said once, no warning
    shipped = os.path.join(engine.HERE, "weights", "smollm2-135m-r128.safetensors")  # trained for other weights
    code, _, err = run_cli(capsys, "--random-weights", "--preset", "smollm2-135m", "--prompt-len", "8",
                           "--max-new-tokens", "3", "--device", "cpu", "--budget", "4", "--hash-weights", shipped)
    assert code == 0 and "--hash-weights (random weights take random projections)" in err, err  # before: refused
    assert "random projections (R = 128, --n-dense 2)" in err  # once the random model and its caches were built
    code, _, err = run_cli(capsys, *TINY, "--prompt-len", "8", "--max-new-tokens", "2", "--dense", "--hash-weights",
                           shipped)
    assert code == 0 and "note: ignored in this run: --hash-weights (--dense reads no hash codes)\n" in err  # once


def test_random_weights_note_logprobs_once(capsys):
    """--random-weights prints no reply: --logprobs is noted for that reason alone, not a second time for --json."""
    code, _, err = run_cli(capsys, *TINY, "--prompt-len", "8", "--max-new-tokens", "2", "--dense", "--logprobs")
    assert code == 0 and "note: ignored in this run: --logprobs (--random-weights decodes random tokens)\n" in err, err


def test_threads_sets_torchs_threads(capsys, monkeypatch):
    set_to = []
    monkeypatch.setattr(torch, "set_num_threads", set_to.append)
    argv = [*TINY, "--prompt-len", "8", "--max-new-tokens", "2"]
    assert run_cli(capsys, *argv, "--threads", "1")[0] == 0 and set_to == [1]
    assert run_cli(capsys, *argv)[0] == 0 and set_to == [1]  # unset: torch's own
    code, _, err = run_cli(capsys, *argv, "--threads", "0")
    assert code == 2 and "--threads: must be a whole number >= 1, got '0'" in error_line(err)


@pytest.mark.parametrize("n_gpus", [0, 1])
def test_every_scripts_device_defaults_as_engines(monkeypatch, n_gpus):
    """cuda where the machine has one, the CPU otherwise: engine.py, eval.py and train_hash.py alike."""
    import eval as ev
    import train_hash as th
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n_gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n_gpus)
    want = "cuda" if n_gpus else "cpu"
    assert [m.build_parser().parse_args([]).device for m in (engine, ev, th)] == [want] * 3


def test_a_tiny_temperature_subtracts_the_max_before_dividing():
    """logits / T past fp32's largest value (5 / 1.2e-38 is inf): the max is subtracted first, so the top token is
    drawn, not a NaN from inf - inf inside the softmax."""
    gen = torch.Generator().manual_seed(0)
    for logits, top in (([[0.0, 1.0, 5.0]], 2), ([[-7.0, 40.0, 39.0]], 1)):
        assert sample(torch.tensor(logits), 1e-39, 1.0, gen).tolist() == [top]
        assert sample(torch.tensor(logits), 1e-39, 0.5, gen).tolist() == [top]


def test_a_tuple_of_row_generators_draws_as_the_list_does():
    logits = torch.zeros(2, 50)
    draws = [sample(logits, 1.0, 1.0, kind(engine.row_generators(7, 2, "cpu"))).tolist() for kind in (list, tuple)]
    assert draws[0] == draws[1]


def test_generate_with_no_new_tokens_and_a_cpu_batchs_timing():
    """max_new_tokens 0 (the capacity check allows it): empty answers and no steps, not a crash in torch.stack or
    -1 tokens per sequence; prefill_tokens counts each prompt's own tokens, not the padded width; on the CPU there is
    no CUDA graph (graph_s None: report_speed would print a capture time)."""
    model = tiny_model()
    model.setup_caches(2, 8)
    new, timing = engine.generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=0)
    assert new == [[], []] and (timing["decode_steps"], timing["decode_tokens"]) == (0, 0)
    model.setup_caches(2, 8)
    new, timing = engine.generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=3)
    assert [len(t) for t in new] == [3, 3] and (timing["prefill_tokens"], timing["decode_tokens"]) == (5, 4)
    assert timing["graph_s"] is None


@pytest.mark.parametrize("prompt", [[5, 6], [1, 2, 3]])
def test_token_id_0_is_a_token_of_the_answer(monkeypatch, prompt):
    """-1 marks a finished sequence's steps; 0 is a token like any other (a vocabulary's first entry)."""
    model = tiny_model()
    model.setup_caches(1, 8)
    monkeypatch.setattr(engine, "sample", lambda logits, *a: torch.zeros(len(logits), dtype=torch.long))
    new, timing = engine.generate(model, [prompt], max_new_tokens=3)
    assert new == [[0, 0, 0]] and timing["decode_tokens"] == 2


def test_selecting_steps_with_a_budget_below_the_prompt(monkeypatch):
    """K = 2 under a 3-token prompt: every step selects, and no more steps than were run are counted."""
    model = tiny_model(HataArgs(budget=2, n_dense=1))
    model.setup_caches(1, 16)
    sparse_steps = count_sparse_steps(monkeypatch)
    _, timing = engine.generate(model, [[3, 4, 5]], 5)
    assert (timing["decode_steps"], timing["budget"], timing["selecting_steps"]) == (4, 2, 4)
    assert len(sparse_steps) == 4 * len(model.sparse_layers())


def test_on_token_streams_minus_one_for_a_finished_sequence():
    """A batch streamed through on_token: each step's tokens, -1 in a row whose sequence has stopped."""
    model, prompts, streamed = tiny_model(), PROMPTS, []
    free, stop = free_run(model)
    end = free[0].index(stop)
    assert end < 8  # before the last step
    engine.generate(model, prompts, max_new_tokens=10, stop_ids={stop}, on_token=lambda t: streamed.append(t.tolist()))
    assert [s[0] for s in streamed] == free[0][:end + 1] + [-1] * (9 - end)
    assert [s[1] for s in streamed] == free[1]


def test_a_single_non_finite_logit_is_an_error_too():
    """One token's logit NaN (an inf in its output row), the others finite: refused as when every logit is NaN; one
    logit inf (one inf weight), with a repetition penalty, whose clamp would make it finite: refused too."""
    model = tiny_model()
    model.setup_caches(1, 16)
    with torch.no_grad():
        model.output.weight[5] = math.inf
    with pytest.raises(ValueError, match="the model's output for the prompt is NaN or inf"):
        engine.generate(model, [[1, 2, 3]], 4)
    with torch.no_grad():
        model.output.weight[5] = 0.0
        model.output.weight[5, 0] = math.inf
    with pytest.raises(ValueError, match="the model's output for the prompt is NaN or inf"):
        engine.generate(model, [[1, 2, 3]], 4, repetition_penalty=1.3)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_decode_step_whose_output_is_nan_is_an_error_unless_its_row_has_finished(monkeypatch, temperature):
    """The logits of every decode step are checked, not only the prefill's (a float16 overflow may come later):
    greedy went on with argmax's pick of a NaN, sampling failed in torch.multinomial. The token drawn from them is
    not streamed. A row that has stopped decodes on unseen, so its NaN is no error."""
    model, real = tiny_model(), engine.decode_one_token
    steps = []

    def spoilt_at_3(row):  # decode_one_token, with `row`'s logits NaN from the third decode step on
        def step(model, cur, ends):
            logits = real(model, cur, ends)
            steps.append(None)
            if len(steps) >= 3:
                logits[row] = math.nan
            return logits
        return step

    def kw():  # a generator a row: row 0's draws do not depend on row 1's logits
        return dict(temperature=temperature, generator=engine.row_generators(0, 2, "cpu"))
    model.setup_caches(2, 32)
    free, _ = engine.generate(model, [[1, 2, 3], [4, 5]], 8, **kw())
    monkeypatch.setattr(engine, "decode_one_token", spoilt_at_3(1))
    streamed = []
    with pytest.raises(ValueError, match="the model's output at decode step 3 is NaN or inf: its weights hold"):
        engine.generate(model, [[1, 2, 3], [4, 5]], 8, on_token=lambda t: streamed.append(t.tolist()), **kw())
    assert len(streamed) == 3
    steps.clear()
    with pytest.raises(ValueError, match="at decode step 3 is NaN or inf"):  # the last step's too: its token is the 4th
        engine.generate(model, [[1, 2, 3], [4, 5]], 4, **kw())
    steps.clear()
    new, _ = engine.generate(model, [[1, 2, 3], [4, 5]], 8, stop_ids={free[1][1]}, **kw())  # row 1 stops at step 1
    assert new == [free[0], free[1][:2]]


def test_forced_positions_are_checked_against_the_whole_caches_budget(capsys):
    """A 16-token prompt + 4 new tokens: a 19-token cache. A budget of exactly 19 covers it (dense: --sink 25 runs);
    a fraction is of the cache, not of the prompt: 1/4 is K = 5, which --recent 5 fits and --recent 6 does not."""
    tiny = [*TINY, "--prompt-len", "16", "--max-new-tokens", "4"]
    code, _, err = run_cli(capsys, *tiny, "--budget", "19", "--sink", "25")
    assert code == 0 and "covers the whole 19-token cache" in err, err
    code, _, err = run_cli(capsys, *tiny, "--budget", "1/4", "--recent", "5")
    assert code == 0 and "fill the budget of 5 tokens" in err, err
    code, _, err = run_cli(capsys, *tiny, "--budget", "1/4", "--recent", "6")
    assert code == 2 and "exceed the budget of 5 tokens" in error_line(err)


def test_count_and_seed_types_accept_their_whole_range(monkeypatch):
    assert engine.positive_int("+5") == 5 and engine.positive_int(" 7 ") == 7
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert engine.thread_count("8") == 8  # 4 per core
    with pytest.raises(argparse.ArgumentTypeError, match="must be at most 8"):
        engine.thread_count("9")
    for ok in ("-1", str(-2 ** 63), str(2 ** 64 - 1), "0"):
        assert engine.torch_seed(ok) == int(ok)
    with pytest.raises(argparse.ArgumentTypeError, match="outside -2\\^63"):
        engine.torch_seed(str(-2 ** 63 - 1))


def test_an_empty_system_message_replaces_the_templates_own(capsys, monkeypatch, tok):
    """--system "" is a system message given (empty), not --system left out: the template's default one goes."""
    seen = record_prompts(monkeypatch)
    code, _, err = run_cli(capsys, "--chat", "--system", "", "--prompt", "hi", "--max-new-tokens", "2")
    user = {"role": "user", "content": "hi"}
    assert code == 0 and seen == [[tok.encode_chat([{"role": "system", "content": ""}, user])]], err
    assert seen[0][0] != tok.encode_chat([user])  # the template's default system message


@pytest.mark.usefixtures("gguf_path")  # the default model: skipped when it is not installed
def test_a_fraction_is_noted_only_where_the_batchs_cache_decides_it(capsys):
    """The note on --budget 1/4 is for a batch of different lengths sized by its longest prompt: a single prompt's
    own cache, or a cache that --max-seq-len fixes, gets none."""
    batch = ["--prompt", "hi", "--prompt", "a longer prompt than that", "--max-seq-len", "64"]
    for argv in (["--prompt", "hi"], batch):
        code, _, err = run_cli(capsys, *argv, "--budget", "1/4", "--max-new-tokens", "4")
        assert code == 0 and "HATA decode" in err and "is of the batch's cache" not in err, err


@pytest.mark.usefixtures("gguf_path")  # the default model: skipped when it is not installed
def test_a_batch_of_prompts_of_one_length_gets_no_fraction_note(capsys, monkeypatch):
    """The note on --budget 1/4 is for prompts of different lengths (a shorter one alone would get a smaller K);
    a batch whose prompts have one length gets the K each would alone."""
    record_prompts(monkeypatch)
    for prompts, noted in ((["a", "b"], False), (["a", "a longer prompt than that"], True)):
        argv = [arg for p in prompts for arg in ("--prompt", p)]
        code, _, err = run_cli(capsys, *argv, "--budget", "1/4", "--max-new-tokens", "4")
        assert code == 0 and ("is of the batch's cache" in err) == noted, err


@pytest.mark.usefixtures("gguf_path")  # the default model: skipped when it is not installed
def test_batch_answers_leave_out_their_stop_token(capsys, monkeypatch):
    """A batch's answers print at the end, each without the stop token that ended it (SmolLM2 decodes id 2 as
    <|im_end|>)."""
    record_prompts(monkeypatch, [[504, 2], [504]])
    code, out, _ = run_cli(capsys, "--prompt", "a", "--prompt", "b", "--max-new-tokens", "2")
    assert code == 0 and out == "--- 'a'\nThe\n--- 'b'\nThe\n", out


def json_lines(out):
    return [json.loads(line) for line in out.splitlines()]


def test_json_prints_each_reply_and_why_it_ended(capsys, monkeypatch, tok):
    """--json: one line a prompt, when all are done (one prompt too: not streamed): its text without the stop token or
    from the --stop string on; finish_reason "stop" at a stop token or string, "length" at --max-new-tokens;
    prompt_tokens as the model read them (the chat template's too), completion_tokens as drawn, a stop token too."""
    seen = record_prompts(monkeypatch, [[504, 2], [504, 504]])  # 2: <|im_end|>
    code, out, err = run_cli(capsys, "--prompt", "a", "--prompt", "b c", "--max-new-tokens", "2", "--json", "--chat")
    n_a, n_bc = map(len, seen[0])
    assert code == 0 and n_a > 20 and json_lines(out) == [
        {"index": 0, "text": "The", "finish_reason": "stop", "prompt_tokens": n_a, "completion_tokens": 2},
        {"index": 1, "text": tok.decode([504, 504]), "finish_reason": "length", "prompt_tokens": n_bc,
         "completion_tokens": 2}], err
    record_prompts(monkeypatch, [[504]])
    code, out, err = run_cli(capsys, "--prompt", "a", "--max-new-tokens", "3", "--json", "--stop", "he")
    assert code == 0 and json_lines(out) == [
        {"index": 0, "text": "T", "finish_reason": "stop", "prompt_tokens": 1, "completion_tokens": 1}], err


@pytest.mark.usefixtures("gguf_path")  # the default model's tokenizer: skipped when it is not installed
def test_json_after_ctrl_c_prints_the_replies_so_far(capsys, monkeypatch):
    """Ctrl-C while decoding: each reply so far as a JSON line, "interrupted" where neither a stop nor
    --max-new-tokens ended it (a Ctrl-C can land after a reply's last token); status 130."""
    def generate(*args, **kwargs):
        raise engine.Interrupted([[504, 2], [504], [504, 504]])
    monkeypatch.setattr(engine, "generate", generate)
    code, out, err = run_cli(capsys, "--prompt", "a", "--prompt", "b", "--prompt", "c", "--max-new-tokens", "2",
                             "--json")
    assert code == 130 and [(r["text"], r["finish_reason"]) for r in json_lines(out)] == [
        ("The", "stop"), ("The", "interrupted"), ("TheThe", "length")] and err.endswith("interrupted\n"), err


@pytest.mark.usefixtures("gguf_path")  # the default model's tokenizer: skipped when it is not installed
def test_json_logprobs_are_each_replys_own_in_a_batch_and_after_ctrl_c(capsys, monkeypatch):
    """--json --logprobs with a batch: each line's token_ids and logprobs are its own row's (not the first's), and
    after Ctrl-C too (the Interrupted's log-probabilities, not dropped)."""
    new, lps = [[504, 2], [504, 504]], [[-0.5, -0.25], [-1.5, -2.0]]

    def generate(*args, logprobs=False, **kwargs):
        assert logprobs
        return new, {"logprobs": lps}
    monkeypatch.setattr(engine, "generate", generate)
    monkeypatch.setattr(engine, "report_speed", lambda timing: None)
    argv = ("--prompt", "a", "--prompt", "b", "--max-new-tokens", "2", "--json", "--logprobs")
    code, out, err = run_cli(capsys, *argv)
    assert code == 0 and [(r["token_ids"], r["logprobs"]) for r in json_lines(out)] == list(zip(new, lps)), err

    def interrupted(*args, logprobs=False, **kwargs):
        raise engine.Interrupted([[504, 2], [504]], [[-0.5, -0.25], [-1.5]])
    monkeypatch.setattr(engine, "generate", interrupted)
    code, out, err = run_cli(capsys, *argv)
    assert code == 130 and [(r["token_ids"], r["logprobs"], r["finish_reason"]) for r in json_lines(out)] == [
        ([504, 2], [-0.5, -0.25], "stop"), ([504], [-1.5], "interrupted")], out


def test_json_is_refused_in_a_chat_turn_by_turn(capsys):
    code, _, err = run_cli(capsys, "--prompt", "a", "--json", "--interactive")
    assert code == 2 and "--json prints a batch's replies" in error_line(err)


@pytest.mark.usefixtures("gguf_path")  # the default model: skipped when it is not installed
def test_json_text_is_the_streamed_text(capsys, tok):
    """The real model, greedy: the JSON line's text is what the same run streams, its "length" at the limit."""
    argv = ("--prompt", "The capital of France is", "--max-new-tokens", "6")
    code, streamed, err = run_cli(capsys, *argv)
    assert code == 0, err
    code, out, err = run_cli(capsys, *argv, "--json")
    assert code == 0 and json_lines(out) == [{"index": 0, "text": streamed[:-1], "finish_reason": "length",
                                              "prompt_tokens": 5, "completion_tokens": 6}], err
    code, out, err = run_cli(capsys, *argv, "--json", "--logprobs")
    (line,) = json_lines(out)
    assert code == 0 and tok.decode(line["token_ids"]) == line["text"] and len(line["logprobs"]) == 6, err
    assert all(-20 < lp < 0 for lp in line["logprobs"]), line


@pytest.mark.usefixtures("gguf_path")  # the default model: skipped when it is not installed
def test_logprobs_are_asked_of_generate_only_with_json(capsys, monkeypatch):
    """--logprobs without --json prints nothing of them (a note says so): generate is not asked to compute them."""
    asked = []

    def generate(model, prompts, *args, logprobs=False, **kwargs):
        asked.append(logprobs)
        return [[504]] * len(prompts), {"logprobs": [[-0.5]] * len(prompts) if logprobs else None}
    monkeypatch.setattr(engine, "generate", generate)
    monkeypatch.setattr(engine, "report_speed", lambda timing: None)
    for flags, want in ((["--logprobs"], False), (["--logprobs", "--json"], True)):
        code, _, err = run_cli(capsys, "--prompt", "a", "--max-new-tokens", "2", *flags)
        assert code == 0 and asked[-1] == want, (flags, err)


def test_json_lines_are_ascii(capsys, monkeypatch, tok):
    """--json escapes non-ASCII text (\\u00e9), so a line reads back the same through any terminal's encoding."""
    ids = tok.encode(" café", bos=False)
    record_prompts(monkeypatch, [ids])
    code, out, err = run_cli(capsys, "--prompt", "a", "--max-new-tokens", str(len(ids)), "--json")
    assert code == 0 and out.isascii() and json_lines(out)[0]["text"] == " café", (out, err)


@pytest.mark.usefixtures("gguf_path")  # the default model: skipped when it is not installed
def test_a_batchs_rows_sample_with_the_seed_plus_their_index(capsys, monkeypatch):
    """--seed s: prompt i of a batch draws from its own generator seeded s + i (as it would alone with --seed s + i),
    with the --temperature and --top-p given."""
    seen = []

    def generate(model, prompts, max_new, stop_ids, temperature, top_p, generator, **kwargs):
        seen.append((temperature, top_p, [g.initial_seed() for g in generator]))
        return [[504]] * len(prompts), {"logprobs": None}
    monkeypatch.setattr(engine, "generate", generate)
    monkeypatch.setattr(engine, "report_speed", lambda timing: None)
    code, _, err = run_cli(capsys, "--prompt", "a", "--prompt", "b", "--prompt", "c", "--temperature", "0.7",
                           "--top-p", "0.9", "--seed", "5", "--max-new-tokens", "2")
    assert code == 0 and seen == [(0.7, 0.9, [5, 6, 7])], err


def test_a_token_id_equal_to_the_models_vocabulary_size_is_refused(capsys):
    tok = types.SimpleNamespace(vocab_size=512)
    with pytest.raises(ValueError, match="token ids up to 512 but the model has 512 tokens"):
        engine.check_vocab(tok, [[3], [0, 512]], 512, "t")
    engine.check_vocab(tok, [[3], [0, 511]], 512, "t")  # the last id fits
    engine.check_vocab(types.SimpleNamespace(vocab_size=256), [[3]], 512, "t")  # half the rows: a model may pad them
    assert capsys.readouterr().err == ""
    engine.check_vocab(types.SimpleNamespace(vocab_size=255), [[3]], 512, "t")
    assert "warning: the tokenizer has 255 tokens but the model 512: is t this" in capsys.readouterr().err


def test_rbit_takes_1024_bits_at_most():
    args = engine.build_parser().parse_args(["--prompt", "x", "--rbit", "1024"])
    assert engine.hata_args(args).rbit == 1024
    args.rbit = 1056
    with pytest.raises(ValueError, match="--rbit must be a multiple of 32 .* in \\[32, 1024\\], got 1056"):
        engine.hata_args(args)


def test_top_p_1_draws_from_the_whole_distribution(monkeypatch):
    """top_p 1.0 truncates nothing: tokens after a head whose fp32 mass already rounds to 1 keep their (tiny)
    probability (a nucleus pass would drop them: the mass before them compares >= 1)."""
    seen, multinomial = [], torch.multinomial
    monkeypatch.setattr(torch, "multinomial", lambda p, n, generator=None: seen.append(p.clone()) or
                        multinomial(p, n, generator=generator))
    assert sample(torch.tensor([[0.0, -18.0, -19.0]]), 1.0, 1.0).tolist() == [0]
    assert len(seen) == 1 and bool((seen[0] > 0).all()), seen


def test_top_p_keeps_the_first_of_tokens_tied_at_its_cut():
    """Tokens of equal probability at the nucleus's edge: the one of the lowest id stays (a stable sort), the same
    on every device, not whichever an unstable sort puts first."""
    logits = torch.zeros(1, 20)
    logits[0, 10] = 3.0  # e^3 / (e^3 + 19) = 0.514 of the mass: 0.53 needs one more, of 19 tied
    gen = torch.Generator().manual_seed(0)
    assert {int(sample(logits, 1.0, 0.53, gen)) for _ in range(200)} == {0, 10}


@pytest.mark.parametrize("device, offload", [("cpu", False), ("cuda", False), ("cuda", True)])
def test_a_prompt_cache_serves_a_prompt_that_starts_the_same(tmp_path, device, offload):
    """save_prompt_cache, then load_prompt_cache into fresh caches: a prompt that starts with the saved tokens prefills
    only the rest, and decodes the tokens of a fresh run (HATA with a budget of 4: its codes are made again from the
    loaded keys). A prompt that shares 10 continues after them; a smaller cache takes what it holds. On CUDA through
    the Triton kernels and the CUDA graph, and with the sparse layers' K/V in host memory (offload.py)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from offload import apply_offload
    model = tiny_model(HataArgs(budget=4, n_dense=1), device=device)
    if offload:
        apply_offload(model, 1, 40)
    path, first = str(tmp_path / "p.safetensors"), list(range(5, 25))
    model.setup_caches(1, 40)
    engine.generate(model, [first], 4)
    engine.save_prompt_cache(path, model, first, [])
    for prompt, shared in ((first + [30, 31, 32], 20), (first[:10] + [40, 41, 42], 10), (first[:19], 17)):
        model.setup_caches(1, 40)
        want, _ = engine.generate(model, [prompt], 8)
        model.setup_caches(1, 40)
        held = engine.load_prompt_cache(path, model)
        assert held == first and engine.continue_at(held, prompt) == shared
        got, timing = engine.generate(model, [prompt], 8, start=shared)
        assert got == want and timing["prefill_tokens"] == len(prompt) - shared, prompt
    if offload:
        assert type(model.layers[-1].attention.kv_cache).__name__ == "HostKVCache"
        apply_offload(model, 1, 12)
    model.setup_caches(1, 12)
    assert engine.load_prompt_cache(path, model) == first[:12]
    assert engine.check_prompt_cache(path, None, torch.float32)["format"] == engine.PROMPT_CACHE  # before the load
    assert [engine.continue_at(held, ids) for held, ids in (([], [5]), ([], [5, 6, 7]), ([5], [5]), ([5, 6], [5, 7]),
                                                             ([5, 6, 7, 8], [5, 6, 7]))] == [0, 0, 0, 0, 1]
    assert engine.load_prompt_cache(str(tmp_path / "none"), model) == []  # no file yet: nothing cached


def test_write_safetensors_writes_what_safetensors_reads():
    """A tensor at a time, in safetensors' layout: the library reads back each tensor (of every dtype the caches take,
    and the tokens' int64) and the metadata; a tensor that is not what the header said is an error."""
    import tempfile
    tensors = {"tokens": torch.tensor([3, 1, 4]), "a": torch.randn(2, 3, 5), "b": torch.randn(7).half(),
               "c": torch.randn(1, 1, 3).bfloat16(), "d": torch.randn(4, 6)[:, ::2], "e": torch.tensor(2.5),
               "f": torch.zeros(0, 3)}  # d: not contiguous; e: no dimension; f: no elements
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "t.safetensors")
        for x in ("1" * n for n in range(1, 9)):  # headers of every length mod 8
            engine.write_safetensors(path, {k: (v.dtype, v.shape, lambda v=v: v) for k, v in tensors.items()}, {"x": x})
            with open(path, "rb") as f:  # the data starts 8-byte aligned, as save_file writes it
                assert int.from_bytes(f.read(8), "little") % 8 == 0
            with safe_open(path, "pt") as f:
                assert f.metadata() == {"x": x} and sorted(f.keys()) == sorted(tensors)
                assert all(torch.equal(f.get_tensor(k), v) and f.get_tensor(k).dtype == v.dtype
                           for k, v in tensors.items())
        for bad in ((torch.float32, (2, 3, 4)), (torch.float16, (2, 3, 5))):
            with pytest.raises(ValueError, match=r"write_safetensors: a is torch.float32 \(2, 3, 5\), its header says"):
                engine.write_safetensors(path, {"a": (*bad, lambda: tensors["a"])}, {})


def test_a_bfloat16_prompt_cache_keeps_its_dtype(tmp_path):
    """A bf16 model's prompt cache holds bf16 K/V (the model's dtype, named in the file) and loads them back exactly."""
    model = tiny_model(dtype=torch.bfloat16)
    model.setup_caches(1, 16)
    engine.generate(model, [list(range(5, 15))], 2)
    engine.save_prompt_cache(path := str(tmp_path / "p.cache"), model, list(range(5, 15)), [])
    with safe_open(path, "pt") as f:
        assert f.metadata()["dtype"] == "torch.bfloat16" and f.get_tensor("layers.0.k").dtype == torch.bfloat16
    k = model.layers[3].attention.kv_cache.k[0, :, :10].clone()
    model.setup_caches(1, 16)
    assert engine.load_prompt_cache(path, model) == list(range(5, 15))
    assert torch.equal(model.layers[3].attention.kv_cache.k[0, :, :10], k) and k.abs().sum() > 0


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss counts KiB on Linux (bytes on macOS)")
def test_a_prompt_cache_is_written_one_layer_at_a_time():
    """Host memory while a prompt cache is written (its own process, for the peak) rises by about one layer's K, not
    by the whole K/V (safetensors' save_file: a copy of every tensor, then of their bytes: 241 MiB here, and with two
    copies alive at once, 113; now 50, on a 2-core CPU VM)."""
    import tempfile
    script = """if True:
        import resource, sys, torch, engine
        from model import ModelArgs, Transformer
        model = Transformer(ModelArgs(dim=256, n_layers=2, n_heads=2, n_kv_heads=2, vocab_size=64, ffn_dim=64,
                                      max_seq_len=65536))
        model.setup_caches(1, 65536)
        for layer in model.layers:  # touched: pages in host memory, as a prefill leaves them
            layer.attention.kv_cache.k.normal_(), layer.attention.kv_cache.v.normal_()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        engine.save_prompt_cache(sys.argv[1], model, [5] * 65000, [])
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)"""
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run([sys.executable, "-c", script, os.path.join(tmp, "p.cache")], cwd=ROOT, text=True,
                             capture_output=True)
        assert out.returncode == 0 and os.path.getsize(os.path.join(tmp, "p.cache")) > 4 * 65000 * 256 * 4, out.stderr
    kv = 2 * 2 * 65536 * 256 * 4  # layers x (K, V) x positions x Hkv * D x 4 bytes: 256 MiB
    assert int(out.stdout) < kv * 3 / 8, (int(out.stdout) / 2**20, out.stderr)  # one layer's K: kv / 4


def saved_prompt_cache(tmp_path):
    """(the tiny model, a prompt-cache file of its K/V for tokens 5, 6, 7 at tmp_path/good, that file's metadata)."""
    model = tiny_model()
    model.setup_caches(1, 16)
    good = str(tmp_path / "good")
    engine.save_prompt_cache(good, model, [5, 6, 7], [])
    with safe_open(good, "pt") as f:
        return model, good, f.metadata()


def test_a_prompt_cache_file_of_another_kind_is_refused_and_kept(tmp_path):
    """Not safetensors, a safetensors file of something else, K/V in another dtype (named as the flag that fits), of
    another model's settings (RoPE's theta), of other weights (one layer's K rows), a tensor missing, a link to
    nothing: each one error naming the file, which stays as it was. A link to a cache is written through."""
    model, good, meta = saved_prompt_cache(tmp_path)
    tensors = load_file(good)
    del tensors["layers.3.v"]
    save_file(tensors, tmp_path / "cut", meta)
    (tmp_path / "text").write_bytes(b"not a cache")
    save_file({"x": torch.zeros(2)}, tmp_path / "other")
    os.symlink(tmp_path / "gone", tmp_path / "dangling")
    theta = tiny_model()
    theta.args = dataclasses.replace(theta.args, rope_theta=100.0)
    k_rows = tiny_model()
    with torch.no_grad():
        k_rows.layers[0].attention.wqkv.weight[64:96] += 1  # the K rows (H * D = 64 query rows first)
    cases = [("text", None, "is no prompt cache: not a .safetensors file"),
             ("other", None, "is a .safetensors file but no prompt cache"),
             ("good", tiny_model(dtype=torch.bfloat16),
              "holds K/V in torch.float32, not torch.bfloat16: run with --dtype float32, or name another file"),
             ("good", tiny_model(dtype=torch.float64), "holds K/V in torch.float32, not"),
             ("good", theta, "holds another model's K/V"),
             ("good", k_rows, "holds the K/V of a model of this shape but other weights"),
             ("cut", None, "is corrupt"), ("dangling", None, "is a link to .*gone, which does not exist")]
    for name, other, message in cases:
        before = (tmp_path / name).read_bytes() if name != "dangling" else None
        (other or model).setup_caches(1, 16)
        with pytest.raises(ValueError, match=message + ".*this one is kept"):
            engine.load_prompt_cache(str(tmp_path / name), other or model)
        assert name == "dangling" or (tmp_path / name).read_bytes() == before, name
    vocab = model.args.vocab_size  # (an id past it: a later run's prompt cache overwrote the file)
    for name, change in (("int32 tokens", {"tokens": tensors["tokens"].int()}),
                         ("a token past the vocabulary", {"tokens": tensors["tokens"] + vocab}),
                         ("a negative token", {"tokens": tensors["tokens"] * 0 - 1}),
                         ("an extra tensor", {"x": torch.zeros(1)}),
                         ("bf16 K/V", {"layers.0.k": load_file(good)["layers.0.k"].bfloat16()})):
        save_file({**load_file(good), **change}, tmp_path / "bad", meta)
        with pytest.raises(ValueError, match="is corrupt.*this one is kept"):
            engine.load_prompt_cache(str(tmp_path / "bad"), model)
    (nan := load_file(good)["layers.2.v"])[0, 1, 0] = float("nan")  # (before: the prompt's logits NaN, "its weights")
    save_file({**load_file(good), "layers.2.v": nan}, tmp_path / "nan", meta)
    with pytest.raises(ValueError, match="is corrupt: its K/V hold NaN or inf; .*this one is kept"):
        engine.load_prompt_cache(str(tmp_path / "nan"), model)
    empty = {name: x[:, :0] if x.dim() == 3 else x[:0] for name, x in load_file(good).items()}
    save_file(empty, tmp_path / "empty", meta)
    with pytest.raises(ValueError, match="is corrupt"):
        engine.load_prompt_cache(str(tmp_path / "empty"), model)
    for tokens in ({}, {"tokens": torch.tensor(5)}):  # a Meta model's check (no shape yet; cache_serves reads them)
        save_file({**{k: v for k, v in tensors.items() if k != "tokens"}, **tokens}, tmp_path / "no tokens", meta)
        with pytest.raises(ValueError, match="is corrupt: it holds no list of tokens; .*this one is kept"):
            engine.check_prompt_cache(str(tmp_path / "no tokens"), None, torch.float32)
    digest = engine.weights_digest(model)  # every tensor counts, and a GGUF's RoPE factors
    for name, w in model.state_dict().items():
        with torch.no_grad():
            w.view(-1)[0] += 1
            assert engine.weights_digest(model) != digest, name
            w.view(-1)[0] -= 1
    model.rope_factors = torch.ones(8)
    assert engine.weights_digest(model) != digest
    os.symlink(good, tmp_path / "link")
    engine.save_prompt_cache(str(tmp_path / "link"), model, [5, 6, 8], [5, 6, 7])
    assert os.path.islink(tmp_path / "link") and load_file(good)["tokens"].tolist() == [5, 6, 8]


def test_an_unreadable_prompt_cache_is_named_as_unreadable_not_as_another_kind(tmp_path, monkeypatch):
    """A prompt cache its user may not read is named so, and kept (before: "is no prompt cache: not a .safetensors
    file, or a cut one (No such file or directory: ...)", safetensors' words for a file it cannot open)."""
    model, good, _ = saved_prompt_cache(tmp_path)
    unreadable(monkeypatch, good)
    for check in (lambda: engine.check_prompt_cache(good, model.args, torch.float32),
                  lambda: engine.load_prompt_cache(good, model)):
        with pytest.raises(PermissionError, match=f"Permission denied: '{re.escape(good)}'"):
            check()
    monkeypatch.undo()
    assert load_file(good)["tokens"].tolist() == [5, 6, 7]


def test_prompt_cache_runs(capsys, tmp_path, monkeypatch, tok):
    """--prompt-cache: the first run writes its prompt's K/V; a second whose prompt goes on from it prefills only its
    own new tokens and prints what a run without the file prints; a prompt the file holds already is not written
    again. An --interactive chat's first turn sent is kept the same way. A batch and a folder are refused at once."""
    path, base = str(tmp_path / "doc.cache"), "The capital of France is a city that"
    flags = ("--max-new-tokens", "6", "--budget", "4", "--prompt-cache", path)
    code, _, err = run_cli(capsys, "--prompt", base, *flags)
    assert code == 0 and "prompt cache: the prompt's 8 tokens written to" in err and "reused" not in err, err  # no file
    code, want, err = run_cli(capsys, "--prompt", base + " has many", *flags[:-2])
    assert code == 0 and want, err  # the reference: the same prompt without the cache file
    code, out, err = run_cli(capsys, "--prompt", base + " has many", *flags)
    assert code == 0 and out == want and "the K/V of 8 tokens read" in err and "prefill: 2 tokens" in err, err
    assert "prompt cache: 8 of the prompt's 10 tokens reused" in err
    assert "written to" in err and "in place of" not in err  # the longer prompt replaces the file's, going on from it
    code, out, err = run_cli(capsys, "--prompt", base, *flags)
    assert code == 0 and "written to" not in err and "prefill: 2 tokens" in err, err  # (at least 2: see generate)
    stdin_of(monkeypatch, "")
    code, _, err = run_cli(capsys, "--interactive", "--prompt", "Hi", "--prompt", "More", *flags)
    assert code == 0 and err.count("written to") == 1, err  # the first turn's prompt, not each turn's
    assert load_file(path)["tokens"].tolist() == tok.encode_chat([{"role": "user", "content": "Hi"}])
    stdin_of(monkeypatch, "")
    code, _, err = run_cli(capsys, "--interactive", "--prompt", "Hi", *flags)
    assert code == 0 and "written to" not in err and "prefill: 2 tokens" in err, err
    assert err.count("tokens reused") == 1  # the first turn's
    code, _, err = run_cli(capsys, "--prompt", "Paris is", *flags)  # no token in common: none reused, said so
    assert code == 0 and "prompt cache: 0 of the prompt's 2 tokens reused" in err and "prefill: 2 tokens" in err, err
    n_hi = len(tok.encode_chat([{"role": "user", "content": "Hi"}]))  # the file's, more than the cache's 7
    assert f"the K/V of 7 tokens (of the file's {n_hi}: the cache holds 7) read" in err, err
    assert f"2 tokens written to {path}, in place of another prompt's K/V\n" in err, err  # said to be replaced
    stdin_of(monkeypatch, "word " * 40 + "\nHello\n")  # a first message too long is not sent: the next is kept
    code, _, err = run_cli(capsys, "--interactive", "--max-seq-len", "40", *flags)
    assert code == 0 and "not sent" in err and err.count("written to") == 1, err
    assert load_file(path)["tokens"].tolist() == tok.encode_chat([{"role": "user", "content": "Hello"}])
    code, _, err = run_cli(capsys, "--prompt", "a", "--prompt", "b", *flags)
    assert code == 2 and "give one prompt, not a batch" in err
    for folder in (str(tmp_path), str(tmp_path / "new") + "/"):
        code, _, err = run_cli(capsys, "--prompt", "a", "--prompt-cache", folder)
        assert code == 2 and "is a folder: name a file" in err
    (tmp_path / "notes.txt").write_text("my notes")  # refused before the weights load, and kept
    code, _, err = run_cli(capsys, "--prompt", "a", "--prompt-cache", str(tmp_path / "notes.txt"))
    assert code == 2 and "is no prompt cache" in err and "loaded" not in err
    assert (tmp_path / "notes.txt").read_text() == "my notes"
    with safe_open(path, "pt") as f:  # another model's settings: refused before the weights load too
        meta = f.metadata()
    save_file(load_file(path), tmp_path / "other.cache", {**meta, "model": meta["model"].replace("dim=576", "dim=5")})
    code, _, err = run_cli(capsys, "--prompt", "a", "--prompt-cache", str(tmp_path / "other.cache"))
    assert code == 2 and "holds another model's K/V" in err and "loaded" not in err, err
    code, _, err = run_cli(capsys, "--prompt", "a", "--prompt-cache", "/dev/null/p.cache")  # a folder takes no file
    assert code == 2 and "--prompt-cache: cannot write in /dev/null" in err and "loaded" not in err, err
    code, _, err = run_cli(capsys, "--prompt", "a", "--prompt-cache", str(tmp_path / ("p" * 300)))  # (after the run)
    assert code == 2 and "cannot write in" in err and "a name of 300 bytes" in err and "loaded" not in err, err


def test_a_read_only_file_is_refused_before_the_work(tmp_path, monkeypatch):
    """A file that open() would not write (0444, for a user other than root) fails check_writable, as write_whole
    would fail at the save; a writable one, and a new name, pass."""
    (ro := tmp_path / "ro.json").write_text("kept")
    (rw := tmp_path / "rw.json").write_text("old")
    read_only(monkeypatch, ro)
    with pytest.raises(OSError, match=f"^--out: {re.escape(str(ro))} is read-only$"):
        engine.check_writable(str(ro), "--out")
    engine.check_writable(str(rw), "--out")
    engine.check_writable(str(tmp_path / "new.json"), "--out")
    assert ro.read_text() == "kept"


@pytest.mark.usefixtures("gguf_path")  # the default model: skipped when it is not installed
def test_a_prompt_cache_that_serves_is_read_where_no_file_can_be_written(capsys, tmp_path, monkeypatch):
    """A --prompt-cache that serves the prompt as it is needs no writable folder (a read-only mount, faked: root
    writes anywhere); one to be rewritten is refused before the weights load (before: after). The folder checked is
    where a link leads, where the file is written (before: the link's, and a read-only target failed after the
    answer). A named pipe is refused (safe_open waited on it forever)."""
    os.mkdir(tmp_path / "ro")
    path, link, base = str(tmp_path / "ro" / "doc.cache"), str(tmp_path / "doc.cache"), "The capital of France is"
    flags = ("--max-new-tokens", "2", "--prompt-cache", link)
    assert run_cli(capsys, "--prompt", base, *flags[:-1], path)[0] == 0
    os.symlink(path, link)
    checked = []

    def read_only(path, flag):
        checked.append(folder := os.path.dirname(path))
        raise OSError(f"{flag}: cannot write in {folder} (Read-only file system)")
    monkeypatch.setattr(engine, "check_writable", read_only)
    code, out, err = run_cli(capsys, "--prompt", base, *flags)
    assert code == 0 and out and "the K/V of" in err and not checked, err
    code, out, err = run_cli(capsys, "--prompt", base + " a city", *flags)
    assert code == 2 and not out and f"cannot write in {tmp_path / 'ro'} (Read-only" in err and "loaded" not in err
    os.mkfifo(fifo := tmp_path / "fifo")  # a writer that comes if it is opened, so that a regression fails, not hangs
    threading.Thread(target=lambda: os.close(os.open(fifo, os.O_WRONLY)), daemon=True).start()
    code, _, err = run_cli(capsys, "--prompt", base, "--prompt-cache", str(fifo))
    assert code == 2 and "is not a file (a device or a pipe)" in err and "loaded" not in err, err


def test_an_answer_the_terminals_encoding_cannot_show_prints_with_question_marks(monkeypatch):
    """A character standard output's encoding lacks (PYTHONIOENCODING=latin-1, a latin-1 terminal) prints as "?";
    before, the encoder's error ended the run, and a batch lost every answer."""
    out = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(out, encoding="latin-1"))
    assert engine.cli(lambda args: engine.show("\u65e5\u672c caf\u00e9\n"), None) == 0
    sys.stdout.flush()
    assert out.getvalue() == "?? caf\u00e9\n".encode("latin-1")


@pytest.mark.usefixtures("gguf_path")  # the default model: skipped when it is not installed (it failed there)
def test_a_prompt_cache_is_kept_only_for_a_whole_prompt_and_plans_a_continued_prefill(capsys, monkeypatch, tmp_path):
    """A chat's first turn stopped by Ctrl-C in its prefill (a plain KeyboardInterrupt, not Interrupted) writes no
    file: its K/V may be half made. The memory and offload plans of a run with --prompt-cache count a continued
    prefill's copy."""
    plans = []

    def generate(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(engine, "generate", generate)
    monkeypatch.setattr(engine, "check_cache_memory", lambda model, *plan: plans.append(plan))
    stdin_of(monkeypatch, "")
    code, _, err = run_cli(capsys, "--interactive", "--prompt", "Hi", "--prompt-cache", str(tmp_path / "c"),
                           "--max-seq-len", "64")
    assert code == 0 and "(reply stopped)" in err and "written" not in err and not os.path.exists(tmp_path / "c")
    assert plans == [(1, 64, 64, True)]
    code, _, err = run_cli(capsys, "--prompt", "Hi there", "--prompt-cache", str(tmp_path / "c"))
    assert code == 130 and plans[-1][-1] is True, err


# From a mutation run of engine.py's generation and chat (2026-12-06)

def test_generate_names_the_cached_positions_when_too_few_tokens_follow_them():
    """A prompt of only start + 1 tokens is refused in generate's own words (2 past the cached ones), not prefill's."""
    model = tiny_model()
    model.setup_caches(1, 16)
    with pytest.raises(ValueError, match=r"at least one token past the 2 the caches hold \(2, for a dense prefill\)"):
        engine.generate(model, [[5, 6, 7]], 2, start=2)


def test_stop_when_is_handed_token_id_0(monkeypatch):
    """stop_when sees every new token, 0 included (only -1 marks a finished row's steps): here it ends at the 2nd."""
    model = tiny_model()
    model.setup_caches(1, 8)
    monkeypatch.setattr(engine, "sample", lambda logits, *a: torch.zeros(len(logits), dtype=torch.long))
    seen = []
    new, timing = engine.generate(model, [[1, 2, 3]], 4, stop_when=lambda ids: seen.append(list(ids)) or len(ids) == 2)
    assert new == [[0, 0]] and seen == [[0], [0, 0]] and timing["cut"] == 0


def test_selecting_steps_count_the_positions_cached_before_start(monkeypatch):
    """After 4 cached positions and 2 prompt tokens, step s attends to 7 + s keys: with K = 8, 2 of 4 steps select."""
    model = tiny_model(HataArgs(budget=8, n_dense=1))
    model.setup_caches(1, 32)
    prompt = [3, 4, 5, 6, 7, 8]
    engine.generate(model, [prompt], 1)  # the caches hold the prompt
    sparse_steps = count_sparse_steps(monkeypatch)
    _, timing = engine.generate(model, [prompt], 5, start=4)
    assert (timing["decode_steps"], timing["budget"], timing["selecting_steps"]) == (4, 8, 2)
    assert len(sparse_steps) == 2 * len(model.sparse_layers())


def test_min_p_1_and_top_p_1_are_in_their_ranges(capsys):
    """--min-p 1 (only tokens as likely as the likeliest) and --top-p 1 pass the checks: the run goes on."""
    for flag, value in (("--min-p", "1"), ("--top-p", "1"), ("--min-p", "0")):
        code, _, err = run_cli(capsys, "--prompt", "hi", "--checkpoint", "/nonexistent.gguf", "--temperature", "1",
                               flag, value)
        assert code == 2 and "checkpoint not found" in error_line(err), err


def test_a_stop_string_spelled_in_byte_tokens_is_found(tok):
    """StopStrings looks back over enough tokens for byte pieces (3 for a €): '€€' in 6 byte tokens is found, and a
    look-back that opens inside a character (its last bytes decode to U+FFFD, not text) looks further; a character's
    bytes cut at either end of the look-back are not a U+FFFD of the text (--stop $'\\ufffd'), while one the model
    writes is, at the reply's start or in a run of them."""
    euro = [tok.enc.encode_single_token(bytes([b])) for b in "€".encode()]
    ids = tok.encode("Price:", bos=False) + euro * 2
    assert tok.decode(ids) == "Price:€€" and engine.StopStrings(tok, ["€€"])(ids)
    assert not engine.StopStrings(tok, ["€€"])(ids[:-1])
    emoji = [tok.enc.encode_single_token(bytes([b])) for b in "😀".encode()]  # 8 ids of no text after it, then "!"
    ids = tok.encode("Hi ", bos=False) + emoji + [tok.vocab_size] * 8 + tok.encode("!", bos=False)
    assert tok.decode(ids) == "Hi 😀!" and engine.StopStrings(tok, ["😀!"])(ids)  # before: the look-back opened
    assert not engine.StopStrings(tok, ["😀!"])(ids[:-1])  # inside the emoji, whose 3 last bytes read as 3 U+FFFD
    letters = [tok.encode(c, bos=False)[0] for c in "abcdefg"]  # the look-back: 8 ids, the emoji's last byte first
    for cut in (ids[:5], ids[:6] + letters):  # the emoji's first 3 bytes at the end, its last byte at the start
        assert "\ufffd" in tok.decode(cut[-8:]) and not engine.StopStrings(tok, ["\ufffd"])(cut)  # no U+FFFD in text
    for text in ("a\ufffdb", "\ufffdb and more", "x" + "\ufffd" * 30):  # as the model writes it: found
        assert engine.StopStrings(tok, ["\ufffd"])(tok.encode(text, bos=False)), text


def test_keep_first_without_a_system_message_keeps_the_first_reply(capsys, monkeypatch, tok):
    """--keep-first with no --system (the template's own): the first message and its own reply stay, whole later
    exchanges go (stub replies R1, R2, ...: R1 is still sent after a forgetting, R2 not)."""
    calls, _, _ = stub_replies(monkeypatch, tok, lambda n, on_token: tok.encode(f"R{n}", bos=False))
    stdin_of(monkeypatch, "A\nB\nC\nD\nE\n")
    code, _, err = run_cli(capsys, "--interactive", "--prompt", "Doc", "--max-new-tokens", "8", "--max-seq-len", "80",
                           "--keep-first")
    last = tok.decode(calls[-1][0])
    assert code == 0 and "forgets" in err and "Doc" in last and "R1" in last and "R2" not in last, (last, err)


def test_the_streamer_shows_the_text_before_a_stop_that_ends_in_the_start_of_another(capsys, tok):
    """A stop ("\\n") found in the step after text that may begin another ("Q:"): the text before it is shown whole."""
    stops = engine.StopStrings(tok, ["Q:", "\n"])
    streamer, ids = engine.Streamer(tok, stops), tok.encode("Paris. Q\nmore", bos=False)  # ' Q' held, then '\n'
    for t in ids:
        streamer(torch.tensor([t]))
    streamer.finish()
    assert capsys.readouterr().out == "Paris. Q\n" and engine.reply_text(tok, ids, stops) == "Paris. Q"


@pytest.mark.parametrize("stops", [None, ["zzz"]])
def test_a_ctrl_c_raised_in_the_streamers_write_does_not_show_its_text_twice(capsys, monkeypatch, tok, stops):
    """On a terminal, Ctrl-C's KeyboardInterrupt can surface inside print, after the token's text went out: finish()
    (the rest of the reply) must not show that text again ("with a^C a")."""
    writes = []

    def show(text):  # writes, then is interrupted at the third token's text
        print(text, end="")
        writes.append(text)
        if len(writes) == 3:
            raise KeyboardInterrupt
    monkeypatch.setattr(engine, "show", show)
    streamer = engine.Streamer(tok, stops and engine.StopStrings(tok, stops))
    ids = tok.encode("Once upon a time", bos=False)
    with pytest.raises(KeyboardInterrupt):
        for t in ids:
            streamer(torch.tensor([t]))
    streamer.finish()
    assert capsys.readouterr().out == tok.decode(ids[:3]) + "\n"


# From a mutation run of engine.py's setup and command-line paths (2026-12-06)

def test_a_prompt_that_fills_the_cache_gets_the_prefills_one_token(capsys):
    """A prompt exactly as long as --max-seq-len fits: the prefill's token is all it has room for (the last token is
    never cached), and a note says so; one token more of prompt is refused."""
    tiny = [*TINY, "--max-seq-len", "8", "--max-new-tokens", "4"]
    code, _, err = run_cli(capsys, *tiny, "--prompt-len", "8")
    assert code == 0 and "note: at most 1 new token: the cache holds 8 tokens and the prompt 8" in err, err
    assert "decode: no steps" in err
    code, _, err = run_cli(capsys, *tiny, "--prompt-len", "9")
    assert code == 2 and "--prompt-len is 9 but --max-seq-len is 8" in error_line(err)


def test_plural_is_singular_for_one_alone():
    """"0 tokens", "1 token", "2 tokens"; an irregular plural is taken as given."""
    assert [engine.plural(n) for n in (0, 1, 2)] == ["0 tokens", "1 token", "2 tokens"]
    assert [engine.plural(n, "query", "queries") for n in (0, 1, 3)] == ["0 queries", "1 query", "3 queries"]


@pytest.mark.usefixtures("gguf_path")  # the default model: skipped when it is not installed
def test_the_shipped_projections_are_only_the_default_models(capsys):
    """The repository's projections were trained on SmolLM2-135M: the default model gets the file of its --rbit,
    another checkpoint none (and no note: it has no shipped ones to miss), nor does a selector that reads no codes."""
    weights = os.path.join(engine.HERE, "weights")
    assert engine.shipped_hash_weights(HataArgs(budget=4)) == os.path.join(weights, "smollm2-135m-r128.safetensors")
    assert engine.shipped_hash_weights(HataArgs(budget=4, rbit=64)) == os.path.join(weights,
                                                                                     "smollm2-135m-r64.safetensors")
    assert engine.shipped_hash_weights(HataArgs(budget=4), __file__) is None  # (a file of another size: not read)
    assert engine.shipped_hash_weights(HataArgs(budget=4, selector="quest")) is None
    assert capsys.readouterr().err == ""


def test_a_cuda_devices_free_memory_counts_what_pytorch_holds_unused(monkeypatch):
    """On CUDA, the driver's free bytes and the bytes PyTorch has reserved but not handed out (it makes new tensors
    there): 1000 + (300 - 200); on the CPU, the host's available memory. (CUDA is pretended: no GPU is needed.)"""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (1000, 8000))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 300)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 200)
    monkeypatch.setattr(engine, "host_available", lambda: 5000)
    assert engine.device_free(torch.device("cuda:0")) == 1100 and engine.device_free(torch.device("cpu")) == 5000


def test_random_weights_are_sized_in_their_dtype(monkeypatch):
    """The size check of --random-weights counts the dtype's bytes a value: Llama-3.1-8B's shape takes 29.9 GiB in
    float32 and half that in bfloat16 (which a 24 GiB host holds)."""
    monkeypatch.setattr(engine, "host_available", lambda: 1000)
    for dtype, gib in ((torch.float32, "29.9"), (torch.bfloat16, "15.0")):
        with pytest.raises(ValueError, match=rf"the llama-3.1-8b shape's weights take {gib} GiB in {dtype} but cpu"):
            engine.random_model("llama-3.1-8b", None, "cpu", dtype)


def test_random_prompts_default_to_half_the_cache_and_come_from_the_seed(capsys, monkeypatch):
    """--random-weights without --prompt-len: half the cache (--max-seq-len, else the preset's context of 1024),
    leaving room to decode; the prompt's tokens are drawn from --seed: the same seed draws the same, another others."""
    seen = record_prompts(monkeypatch)
    tiny = [*TINY, "--max-new-tokens", "2", "--dense"]
    for flags, n in ((["--max-seq-len", "64"], 32), ([], 512)):
        code, _, err = run_cli(capsys, *tiny, *flags)
        assert code == 0 and f"1 random prompt of {n} tokens;" in err and [len(p) for p in seen[-1]] == [n], err
    for seed in ("3", "3", "4"):
        assert run_cli(capsys, *tiny, "--prompt-len", "16", "--seed", seed)[0] == 0
    assert seen[-3] == seen[-2] != seen[-1]


def test_random_prompts_default_to_at_most_1024_tokens(capsys, monkeypatch):
    """Half the cache, up to 1024 tokens: a preset of a 4096-token context gets 1024, not 2048."""
    monkeypatch.setitem(PRESETS, "tiny", dataclasses.replace(PRESETS["tiny"], max_seq_len=4096))
    seen = record_prompts(monkeypatch)
    code, _, err = run_cli(capsys, *TINY, "--max-new-tokens", "2", "--dense")
    assert code == 0 and "1 random prompt of 1024 tokens;" in err and [len(p) for p in seen[-1]] == [1024], err


def test_the_status_line_names_a_recent_window_without_a_sink():
    """The positions always attended are named whichever of --sink and --recent gives them."""
    assert "hash selector, budget 16 (--sink 0, --recent 4 of them) of up to 64 tokens" in engine.describe_policy(
        HataArgs(budget=16, n_recent=4), 64, 4)
    assert "(--sink" not in engine.describe_policy(HataArgs(budget=16), 64, 4)


def test_a_socket_as_standard_input_is_one_stream_too(capsys, monkeypatch):
    """A socket read as standard input (a service's, or `socat ... -`) holds one prompt, as a pipe does: "-" and
    /dev/fd/N naming it twice are refused before either is read."""
    ours, theirs = socket.socketpair()
    with ours, theirs, ours.makefile() as stdin:
        monkeypatch.setattr(sys, "stdin", stdin)
        key = engine.stream_key("-")
        assert key is not None and key == engine.stream_key(f"/dev/fd/{ours.fileno()}")
        monkeypatch.setattr(engine, "read_prompt_file", lambda path: pytest.fail(f"{path} read before the check"))
        code, _, err = run_cli(capsys, "--prompt-file", "-", "--prompt-file", f"/dev/fd/{ours.fileno()}")
        assert code == 2 and "--prompt-file names standard input (or one pipe) twice" in error_line(err)


def test_a_prompt_cache_serves_every_prompt_it_starts(tmp_path):
    """cache_serves: a file whose tokens start with the prompt's holds the prompt's K/V (it is read, not rewritten,
    so no writable folder is needed), a longer file too; a prompt that goes on past the file's, or differs, not."""
    model = tiny_model()
    model.setup_caches(1, 16)
    ids = list(range(5, 15))
    engine.generate(model, [ids], 2)
    engine.save_prompt_cache(path := str(tmp_path / "p.cache"), model, ids, [])
    served = [engine.cache_serves(path, p) for p in (ids, ids[:3], ids + [20], ids[:3] + [20])]
    assert served == [True, True, False, False]


def test_a_name_as_long_as_the_file_system_takes_is_writable(tmp_path):
    """check_writable refuses a name longer than the folder's file system takes (NAME_MAX: 255 bytes on most), not a
    name of that many bytes, which opens."""
    most = os.pathconf(tmp_path, "PC_NAME_MAX")
    engine.check_writable(str(tmp_path / ("p" * most)), "--out")
    (tmp_path / ("p" * most)).write_text("fits")
    with pytest.raises(OSError, match=f"^--out: cannot write in .*a name of {most + 1} bytes, p"):
        engine.check_writable(str(tmp_path / ("p" * (most + 1))), "--out")


def test_a_prompt_caches_weights_digest_counts_the_rope_factors():
    """A GGUF's RoPE factors (rope_freqs) turn every key: models alike but for them have other digests, so one's
    prompt cache is refused by the other. (The check in test_a_prompt_cache_file_of_another_kind_is_refused_and_kept
    passes without them: its weights come back from + 1 - 1 rounded.)"""
    model = tiny_model()
    digests = [engine.weights_digest(model)]
    for factors in (torch.full((8,), 2.0), torch.full((8,), 4.0)):
        model.rope_factors = factors
        digests.append(engine.weights_digest(model))
    assert len(set(digests)) == 3 and engine.weights_digest(model) == digests[-1]


def test_a_prompt_cache_whose_k_or_v_has_another_shape_is_refused(tmp_path):
    """A K/V tensor whose shape is not (n_kv_heads, the file's tokens, head_dim) is named corrupt and the file kept:
    one KV head would be copied into every head of the cache (broadcast), positions past the file's tokens would be
    taken as theirs, and too few positions or another head_dim would fail without naming the file."""
    model, good, meta = saved_prompt_cache(tmp_path)
    k = load_file(good)["layers.1.k"]  # (Hkv, 3, D) = (2, 3, 16)
    for what, bad in (("one KV head", k[:1]), ("a position more", torch.cat([k, k[:, :1]], 1)),
                      ("a position less", k[:, :2]), ("another head_dim", torch.cat([k, k], 2))):
        save_file({**load_file(good), "layers.1.k": bad.contiguous()}, tmp_path / "bad", meta)
        before = (tmp_path / "bad").read_bytes()
        model.setup_caches(1, 16)
        with pytest.raises(ValueError, match="is corrupt: it lacks a tensor of this model's, or one has another shape"):
            engine.load_prompt_cache(str(tmp_path / "bad"), model)
        assert (tmp_path / "bad").read_bytes() == before, what


def test_stop_strings_drop_the_u_fffd_of_a_character_cut_by_byte_tokens_one_a_byte():
    """A sentencepiece tokenizer (Llama 2's byte fallback) decodes each byte of a cut character to its own U+FFFD, as
    this stub does: a look-back ending in a 4-byte character's first 3 bytes holds no U+FFFD of the text (all 3 go);
    one opening in its last 3 bytes drops those 3 but not a U+FFFD the model wrote after them; the reply's own start
    drops none."""
    tok = type("Bytes", (), {"decode": lambda self, ids: re.sub(
        "[\udc80-\udcff]", "\ufffd", bytes(ids).decode(errors="surrogateescape"))})()
    stops, emoji, fffd = engine.StopStrings(tok, ["\ufffd"]), list("😀".encode()), list("\ufffd".encode())
    assert stops.tail == 8 and tok.decode(emoji[:3]) == tok.decode(emoji[1:]) == "\ufffd" * 3
    assert not stops(list(b"abcde") + emoji[:3])  # 8 ids: the emoji's first bytes end the look-back
    assert stops(list(b"a") + emoji + fffd + list(b"xy"))  # the look-back: the emoji's last 3 bytes, then U+FFFD
    assert stops(emoji[1:] + list(b"abcde"))  # 8 ids, the whole reply: its own stray bytes are its text


def test_chat_forgetting_at_its_boundaries_rounds_each_half_down(capsys, monkeypatch, tok):
    """With stub replies ("Hello": each exchange 13 tokens here): a reply's room is half the cache rounded down (59: 29,
    so a 31-token chat is sent whole, leaving exactly that); a forgetting that lands on exactly half the cache says it
    went down to half the cache; --keep-first's target, half the room past the first exchange, rounds down too (here
    3 exchanges go, where rounding up would forget 2)."""
    calls, rooms, turn = stub_replies(monkeypatch, tok)
    chat = lambda *asked: turn(*[m for text in asked[:-1] for m in (text, "Hello")], asked[-1])
    assert [len(chat(*"H" * k)) for k in (1, 2, 3, 4, 5)] == [18, 31, 44, 57, 70]
    flags = ["--interactive", "--system", "Be brief.", "--prompt"]
    stdin_of(monkeypatch, "H\n")
    code, _, err = run_cli(capsys, *flags, "H", "--max-new-tokens", "100", "--max-seq-len", "59")
    assert code == 0 and [c for c, _ in calls] == [chat("H"), chat("H", "H")] and "forgets" not in err, err
    assert rooms == [42, 29], rooms  # (the second: exactly the half it was left)
    calls.clear()
    stdin_of(monkeypatch, "H\nH\n")  # limit 43: the 44-token chat goes down to 31, exactly half of 62
    code, _, err = run_cli(capsys, *flags, "H", "--max-new-tokens", "20", "--max-seq-len", "62")
    assert code == 0 and [c for c, _ in calls] == [chat("H"), chat("H", "H"), chat("H", "H")], err
    assert "forgets its oldest exchange, down to half the cache, to leave this and later replies room" in err, err
    calls.clear()
    n = len(turn("Doc", "Hello"))  # keep: n + (62 - n) // 2 (limit 82 - 20), which 44 tokens pass
    assert len(chat("Doc", "C", "D")) == n + (62 - n) // 2 + 1 == n + (62 - n + 1) // 2
    stdin_of(monkeypatch, "A\nB\nC\nD\n")
    code, _, err = run_cli(capsys, *flags, "Doc", "--max-new-tokens", "20", "--max-seq-len", "81", "--keep-first")
    assert code == 0 and calls[-1][0] == chat("Doc", "D"), [len(c) for c, _ in calls]
    assert "forgets its 3 oldest exchanges after the first, down to half the room past it" in err, err
