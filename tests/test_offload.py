"""offload.py: the same tokens with the sparse layers' K/V in host memory as with the whole cache on the device;
the memory plan (cap, refusals); the staged fetch against the ref. On the CPU host memory plays the far memory and
the Triton kernels run in the interpreter; the GPU tests (pinned host memory read through UVA) skip without CUDA."""
import argparse
import math
import re

import pytest
import torch

import hata_kernels as hk
import offload
from engine import PREFILL_CHUNK, decode_one_token, generate, plural, prefill, random_model, setup
from model import KVCache, HataArgs
from offload import (GiB, HostKVCache, apply_offload, gather_rows, host_available, host_buffer, plan_offload,
                     staged_sparse_attention)
from tests.helpers import count_sparse_steps

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
HATA = HataArgs(budget=8, n_dense=1)  # tiny preset: layers 1-3 decode sparsely, 8 of up to 64 positions


def tiny(device="cpu", hata=HATA):
    return random_model("tiny", hata, device, torch.float32)


def decode(model, prompts, steps, chunk, capacity=64):
    """Chunked prefill, then greedy decode steps; returns (tokens (B, steps), logits (steps, B, V))."""
    dev = model.output.weight.device
    model.setup_caches(len(prompts), capacity)
    tokens = torch.zeros(len(prompts), max(map(len, prompts)), dtype=torch.long, device=dev)
    for b, p in enumerate(prompts):
        tokens[b, :len(p)] = torch.tensor(p)
    lengths = torch.tensor([len(p) for p in prompts], device=dev)
    out, logits = [], []
    with torch.inference_mode():
        logits.append(prefill(model, tokens, lengths, chunk=chunk))
        for step in range(steps):
            out.append(logits[-1].argmax(-1))
            if step < steps - 1:
                logits.append(decode_one_token(model, out[-1], lengths + step))
    return torch.stack(out, 1), torch.stack(logits)


PROMPTS = [list(range(3, 40)), list(range(100, 120))]  # 37 and 20 tokens: different lengths in one batch


@pytest.mark.parametrize("chunk", [4096, 16])  # a fresh prefill; chunks that attend over the cache with a mask
def test_offload_gives_the_same_tokens_cpu(chunk, capsys, monkeypatch):
    model = tiny()
    ref_tokens, ref_logits = decode(model, PROMPTS, 10, chunk)
    plan = apply_offload(model, 2, 64)
    assert plan.layers == [1, 2, 3]
    sparse_steps = count_sparse_steps(monkeypatch)  # the offloaded layers select (K = 8 < S): not all of K/V read
    tokens, logits = decode(model, PROMPTS, 10, chunk)
    assert len(sparse_steps) == 9 * 3  # 9 decode steps of the 3 sparse layers
    assert isinstance(model.layers[0].attention.kv_cache, KVCache)  # dense layers stay where they were
    assert all(isinstance(model.layers[i].attention.kv_cache, HostKVCache) for i in plan.layers)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    model.set_hata(HataArgs(budget=8, n_dense=2))  # layer 1 is now dense, its K/V still in host memory
    assert "layers [1] keep their K/V in host memory" in capsys.readouterr().err


@pytest.mark.parametrize("hata, steps, partial", [
    (HATA, 10, True),  # a cap that keeps layer 1 on the device: the plan offloads layers 2 and 3 only
    (HataArgs(budget=8, n_dense=1, use_norm=True, n_sink=2, n_recent=2), 10, False),  # key norms, forced positions
    (HATA, 28, False)])  # decoding up to the cache's last position (37 + 27 = 64)
def test_offload_gives_the_same_tokens_for_other_plans_policies_and_a_full_cache(hata, steps, partial, monkeypatch):
    model = tiny(hata=hata)
    ref_tokens, ref_logits = decode(model, PROMPTS, steps, 16)
    layer, codes = model.cache_bytes(2, 64)
    plan = apply_offload(model, 2, 64, kv_gpu_gb=(3 * layer + codes) / GiB if partial else None)
    assert plan.layers == ([2, 3] if partial else [1, 2, 3])
    sparse_steps = count_sparse_steps(monkeypatch)
    tokens, logits = decode(model, PROMPTS, steps, 16)
    assert len(sparse_steps) == (steps - 1) * 3  # every decode step of every sparse layer selected
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)


def assert_offload_changes_nothing(B, run):
    """run(model) of a tiny model with its caches on the device, then offloaded: the same logits."""
    model, logits = tiny(), []
    for offload in (False, True):
        if offload:
            apply_offload(model, B, 64)
        model.setup_caches(B, 64)
        with torch.inference_mode():
            logits.append(run(model))
    torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=0)


def test_offload_prefill_from_an_explicit_zero_position():
    """forward with input_pos = 0 (a mask over S_max) and T > 1: the host cache's prefill answers with k, v
    themselves, which the mask is cut to; then a chunk at 5 over the GPU copy of positions 0-4."""
    tokens = torch.tensor([list(range(3, 10))])  # (1, 7)
    assert_offload_changes_nothing(1, lambda model: torch.cat([
        model(tokens[:, :5], input_pos=torch.tensor([0])), model(tokens[:, 5:], input_pos=torch.tensor([5]))], 1))


def test_host_cache_answers_a_prefill_with_its_own_or_copied_rows():
    """A fresh prefill attends over k, v themselves (no copy: the plan budgets none for a one-chunk prompt); a
    later chunk over a copy of the rows up to its end, never the host memory itself (on CUDA: read over PCIe); a
    decode step over the host memory (a copy would cross PCIe whole every step, and its length sync the host)."""
    cache = HostKVCache(1, 2, 16, 4, torch.float32)

    def copied(out):  # K and V in storage of their own, not the host memory's
        return all(o.untyped_storage().data_ptr() != h.untyped_storage().data_ptr()
                   for o, h in zip(out, (cache.k, cache.v)))
    k, v = torch.randn(2, 1, 2, 5, 4).unbind(0)
    out = cache.update(torch.arange(5)[None], k, v)
    assert out[0] is k and out[1] is v
    k2, v2 = torch.randn(2, 1, 2, 3, 4).unbind(0)
    out = cache.update(torch.arange(5, 8)[None], k2, v2)
    assert torch.equal(out[0], torch.cat([k, k2], 2)) and torch.equal(out[1], torch.cat([v, v2], 2))
    assert copied(out)
    out = cache.update(torch.tensor([[8]]), k2[:, :, :1], v2[:, :, :1])  # a decode step: the host memory itself
    assert out[0] is cache.k and out[1] is cache.v and torch.equal(cache.k[:, :, 8], k2[:, :, 0])
    k3, v3 = torch.randn(2, 1, 2, 7, 4).unbind(0)
    out = cache.update(torch.arange(9, 16)[None], k3, v3)  # to S_max: a contiguous slice (.contiguous() would keep it)
    assert torch.equal(out[0][:, :, 9:], k3) and torch.equal(out[1][:, :, 9:], v3)
    assert copied(out)


def test_host_buffer_on_the_cpu_is_zeroed_where_freed_memory_held_nan():
    """Rows never written are read too (masked out, times zero): host memory that held NaN before must come back as
    zeros, not as whatever the allocator hands out (glibc hands a freed block of the same size straight back)."""
    for _ in range(20):
        junk = torch.full((2, 1, 2, 37, 16), math.nan)
        del junk
        buf = host_buffer((2, 1, 2, 37, 16), torch.float32, torch.device("cpu"))
        assert torch.equal(buf, torch.zeros(2, 1, 2, 37, 16))


def test_cap_offloads_only_what_does_not_fit():
    model = tiny()
    layer = 2 * 1 * 2 * 256 * 16 * 4  # K + V of one layer: B=1, Hkv=2, S_max=256, D=16, fp32
    codes = 3 * 1 * 2 * (256 * 16 + 4)  # 128-bit codes of the 3 sparse layers, and their rows' int32 anchors
    cap = (3 * layer + codes) / GiB  # room for three layers' K/V on the GPU: two kept, and a prefill chunk's copy
    plan = plan_offload(model, 1, 256, kv_gpu_gb=cap)
    assert plan.layers == [2, 3] and plan.layer_bytes == layer and plan.gpu_bytes == 2 * layer + codes
    assert "+ 0.00 GiB while a later prefill chunk copies one back" in str(plan)
    assert plan_offload(model, 1, 256, kv_gpu_gb=(3 * layer + codes - 1) / GiB).layers == [1, 2, 3]
    assert plan_offload(model, 1, 256, kv_gpu_gb=(4 * layer + codes) / GiB).layers == []  # all fit: no copy
    none = str(plan_offload(model, 1, 256, kv_gpu_gb=100))
    assert none.startswith("offload: K/V of 0 sparse layers in host") and "copies" not in none
    one = plan_offload(model, 1, 256, kv_gpu_gb=cap, copy_len=0)  # a one-chunk prompt: no copy, one layer fewer
    assert one.layers == [3] and one.gpu_bytes == 3 * layer + codes and "copies" not in str(one)
    with pytest.raises(ValueError, match=rf"needs {layer + codes} bytes .* offloaded \(dense layers, hash codes\), "):
        plan_offload(model, 1, 256, kv_gpu_gb=(layer + codes - 1) / GiB, copy_len=0)
    copy = 2 * 1 * 2 * 20 * 16 * 4  # a 20-token prompt's copy holds its 20 positions, not the layer's 256
    part = plan_offload(model, 1, 256, kv_gpu_gb=(3 * layer + codes + copy) / GiB, copy_len=20)
    assert part.layers == [3] and part.copy_bytes == copy and part.gpu_bytes == 3 * layer + codes
    assert plan_offload(model, 1, 256, kv_gpu_gb=(3 * layer + codes + copy - 1) / GiB, copy_len=20).layers == [2, 3]
    assert plan_offload(model, 1, 256, kv_gpu_gb=(3 * layer + codes + copy) / GiB).layers == [2, 3]  # a whole copy
    with pytest.raises(ValueError, match=f"needs {2 * layer + codes} bytes on the GPU") as e:
        plan_offload(model, 1, 256, kv_gpu_gb=(2 * layer + codes - 1) / GiB)  # the dense layer and one copy: no
    assert "\n" not in str(e.value)
    for bad in (0, -1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="--kv-gpu-gb must be a positive number of GiB"):
            plan_offload(model, 1, 256, kv_gpu_gb=bad)
    normed = tiny(hata=HataArgs(budget=8, n_dense=1, use_norm=True))  # + an fp32 key norm a token and KV head
    assert plan_offload(normed, 1, 256, kv_gpu_gb=100).gpu_bytes == 4 * layer + codes + 3 * 1 * 2 * 256 * 4


def test_the_engine_reserves_a_chunk_copy_only_for_a_longer_prompt(capsys):
    """A prompt of one prefill chunk never copies an offloaded layer back, so --kv-gpu-gb offloads one layer fewer."""
    layer, codes = 2 * 1 * 2 * 256 * 16 * 4, 3 * 1 * 2 * (256 * 16 + 4)  # as above
    args = argparse.Namespace(compile=False, offload=False, kv_gpu_gb=(3 * layer + codes) / GiB)
    for prompt_len, n in ((PREFILL_CHUNK, 1), (PREFILL_CHUNK + 1, 2)):  # (only the prompt's chunk count matters
        setup(tiny(), args, 1, 256, prompt_len)  # here, not that it is longer than this 256-position cache)
        assert f"K/V of {plural(n, 'sparse layer')} in host memory" in capsys.readouterr().err


def test_generate_prefills_in_longer_chunks_where_they_fit(monkeypatch):
    """generate takes fewer, longer chunks (LONG_CHUNK's) if the device has room for one and, where layers are
    offloaded and a later chunk comes, for the copy up to the cached positions' end (a continued prefill's too: each
    later chunk copies an offloaded layer's K/V up to its end back, over PCIe on CUDA); else the PREFILL_CHUNK that
    the cache check made room for. The tokens are the same."""
    monkeypatch.setattr("engine.PREFILL_CHUNK", 8)
    monkeypatch.setattr("engine.LONG_CHUNK", 16)
    model, widths = tiny(), []
    model.register_forward_pre_hook(lambda _, args: widths.append(args[0].shape[1]))  # tokens (B, T) a forward
    work, ref = model.forward_bytes(2, 16, 37), None  # PROMPTS pad to 37 tokens
    for free, chunks in ((work - 1, [8, 8, 8, 8, 5]), (work, [16, 16, 5])):  # every layer on the device: no copy
        monkeypatch.setattr("engine.device_free", lambda device: free)
        model.setup_caches(2, 64)
        widths.clear()
        out, _ = generate(model, PROMPTS, 3)
        ref = ref or out
        assert out == ref and widths == chunks + [1, 1], free
    apply_offload(model, 2, 64)
    copy = 2 * 2 * 2 * 37 * 16 * 4  # K and V of 2 sequences x 2 KV heads x 37 positions x 16, fp32
    room = work + copy
    for free, start, chunks in ((room, 0, [16, 16, 5]), (room - 1, 0, [8, 8, 8, 8, 5]), (None, 0, [16, 16, 5]),
                                (room, 4, [16, 15, 2]), (room - 1, 4, [8, 8, 8, 7, 2])):  # None: unknown
        monkeypatch.setattr("engine.device_free", lambda device: free)
        model.setup_caches(2, 64)
        if start:  # a continued prefill: 4 positions cached, its 33 tokens copy up to position 37 as above
            generate(model, [p[:start] for p in PROMPTS], 1)
        widths.clear()
        assert generate(model, PROMPTS, 3, start=start)[0] == ref and widths == chunks + [1, 1], (free, start)
    monkeypatch.setattr("engine.LONG_CHUNK", 40)  # 37 tokens in one chunk: no copy to make room for
    monkeypatch.setattr("engine.device_free", lambda device: model.forward_bytes(2, 37, 37))
    model.setup_caches(2, 64)
    widths.clear()
    assert generate(model, PROMPTS, 3)[0] == ref and widths == [37, 1, 1]


def test_plan_counts_the_codes_set_hata_keeps():
    """Hash codes stay on the GPU only where they are read: the plan counts what setup_caches allocates, so a cap
    that holds every layer's K/V fits the oracle, or a K that covers the cache, without offloading (or refusing)."""
    layer = 2 * 1 * 2 * 256 * 16 * 4  # K + V of one layer: B=1, Hkv=2, S_max=256, D=16, fp32
    for hata, codes in ((HataArgs(budget=8, n_dense=1), 3 * 2 * (256 * 16 + 4)), (HataArgs(budget=256, n_dense=1), 0),
                        (HataArgs(budget=8, n_dense=1, selector="oracle"), 0)):
        model = tiny(hata=hata)
        assert plan_offload(model, 1, 256, kv_gpu_gb=(4 * layer + codes) / GiB).layers == []
        assert plan_offload(model, 1, 256, kv_gpu_gb=100).gpu_bytes == 4 * layer + codes
        model.setup_caches(1, 256)
        assert sum(b.nbytes for block in model.layers if block.attention.hash_cache is not None
                   for b in block.attention.hash_cache.buffers()) == codes


def test_host_memory_counts_a_containers_cap(tmp_path):
    (tmp_path / "meminfo").write_text("MemTotal: 100 kB\nMemAvailable:   50 kB\n")
    meminfo, cg = str(tmp_path / "meminfo"), tmp_path / "cg"
    assert host_available(meminfo, str(cg)) == 50 * 1024  # no cgroup files
    cg.mkdir()
    (cg / "memory.current").write_text("10000\n")
    (cg / "memory.stat").write_text("anon 6000\nfile 4000\nactive_file 1000\ninactive_file 3000\n")
    for cap, want in (("max\n", 50 * 1024), ("30000\n", 23000), ("900000\n", 50 * 1024), ("5000\n", 0)):
        (cg / "memory.max").write_text(cap)  # cap - used + reclaimable page cache, at most MemAvailable, at least 0
        assert host_available(meminfo, str(cg)) == want
    (cg / "memory.max").write_text("max\n")
    for high, want in (("20000\n", 13000), ("max\n", 50 * 1024)):  # memory.high, v2's throttle, caps as well
        (cg / "memory.high").write_text(high)
        assert host_available(meminfo, str(cg)) == want
    (cg / "memory.high").unlink()
    assert host_available(str(tmp_path / "none"), str(cg)) is None  # unknown; a full cgroup's 0 is above
    leaf = cg / "step_0" / "task_0"  # a Slurm job's cap sits above the task's cgroup, which has none
    leaf.mkdir(parents=True)
    for name, text in (("memory.max", "max\n"), ("memory.current", "100\n"), ("memory.stat", "inactive_file 0\n")):
        (leaf / name).write_text(text)
    (cg / "memory.max").write_text("30000\n")
    assert host_available(meminfo, str(leaf)) == 23000
    v1 = tmp_path / "memory" / "docker" / "abc"  # cgroup v1: its own file names; no cap is written as ~2^63
    v1.mkdir(parents=True)
    (v1 / "memory.usage_in_bytes").write_text("10000\n")
    (v1 / "memory.stat").write_text("cache 4000\ninactive_file 1\ntotal_inactive_file 3000\n")
    for cap, want in (("9223372036854771712\n", 50 * 1024), ("30000\n", 23000)):
        (v1 / "memory.limit_in_bytes").write_text(cap)
        assert host_available(meminfo, str(v1)) == want


def test_host_memory_skips_damaged_files(tmp_path):
    """A /proc/meminfo without MemAvailable (old kernels, some containers) is unknown; a cgroup file that is empty
    or lacks its line caps nothing: neither is an exception out of the plan."""
    (tmp_path / "meminfo").write_text("MemTotal: 1000 kB\n")
    assert host_available(str(tmp_path / "meminfo"), str(tmp_path / "none")) is None
    (tmp_path / "meminfo").write_text("MemTotal: 100 kB\nMemAvailable: 50 kB\n")
    (cg := tmp_path / "cg").mkdir()
    for current, stat in (("", "inactive_file 0\n"), ("50\n", "anon 5\n")):  # empty; no inactive_file line
        for name, text in (("memory.max", "100\n"), ("memory.current", current), ("memory.stat", stat)):
            (cg / name).write_text(text)
        assert host_available(str(tmp_path / "meminfo"), str(cg)) == 50 * 1024


def test_offload_refuses_selectors_that_read_every_key():
    for selector in ("oracle", "quest"):
        model = random_model("tiny", HataArgs(budget=4, n_dense=1, selector=selector), "cpu", torch.float32)
        with pytest.raises(ValueError, match=f"the {selector} selector reads every key"):
            plan_offload(model, 1, 64, host_limit=GiB)
        assert plan_offload(model, 1, 64, kv_gpu_gb=100).layers == []  # nothing offloaded: nothing to refuse


def test_offload_refuses_a_budget_that_covers_the_cache(capsys):
    """K >= the cache: every step is dense, all of an offloaded layer's K/V over PCIe. Refused whether every sparse
    layer would go (--offload) or a cap asks for some (--kv-gpu-gb); and set_hata warns about layers already out."""
    model = tiny(hata=HataArgs(budget=64, n_dense=1))
    layer = 2 * 1 * 2 * 64 * 16 * 4  # K + V of one layer: B=1, Hkv=2, S_max=64, D=16, fp32
    for cap, fix in ((None, "drop --offload"), (3 * layer / GiB, "raise --kv-gpu-gb to 0.001 (nothing offloaded)"),
                     (1e-9, "raise --kv-gpu-gb to 0.001")):  # a cap too small for any plan: this, not the bytes
        with pytest.raises(ValueError, match=re.escape(f"64-token cache, so every step is dense and would read all of "
                                                       f"K/V from host memory; lower --budget or {fix}")):
            plan_offload(model, 1, 64, kv_gpu_gb=cap, host_limit=GiB)
    assert plan_offload(model, 1, 64, kv_gpu_gb=100).layers == []  # it all fits: nothing to refuse
    assert plan_offload(model, 1, 64, kv_gpu_gb=0.001).layers == []  # so does the cap advised: rounded up, not down
    model = tiny()  # K = 8: layers 1-3 out, and no warning
    apply_offload(model, 1, 64)
    model.setup_caches(1, 64)
    assert "host memory" not in capsys.readouterr().err
    model.set_hata(HataArgs(budget=64, n_dense=1))
    assert "layers [1, 2, 3] keep their K/V in host memory" in capsys.readouterr().err


def test_own_cgroups_v2_v1_and_hybrid(tmp_path):
    table = tmp_path / "cgroup"
    table.write_text("9:name=systemd:/\n4:cpuacct,memory:/docker/abc\n3:cpu:/\nbroken\n0::/user.slice/x\n")
    assert offload._own_cgroups(str(table)) == ["/sys/fs/cgroup/user.slice/x", "/sys/fs/cgroup/memory/docker/abc"]
    assert offload._own_cgroups(str(tmp_path / "none")) == []
    table.write_text("5:name=nomemory:/x\n6:memory_extra:/y\n0::/z\n")  # named hierarchies, not the controller
    assert offload._own_cgroups(str(table)) == ["/sys/fs/cgroup/z"]


def test_refuses_when_host_memory_is_too_small(monkeypatch):
    with pytest.raises(ValueError, match=r"needs 196608 bytes of host memory .* but 1000 bytes") as e:
        apply_offload(tiny(), 1, 256, host_limit=1000)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"needs 196608 bytes of host memory"):
        apply_offload(tiny(), 1, 256, host_limit=float("nan"))  # no limit to compare with: refused, not let through
    # What host_available() finds is not all pinned: 10% of it, and at least 1 GiB, stays free for the machine.
    for found, room in ((GiB + 196608, 196608), (10 * GiB, 9 * GiB), (GiB + 196607, 196607), (GiB // 2, 0), (0, 0)):
        monkeypatch.setattr(offload, "host_available", lambda: found)
        if room >= 196608:
            assert apply_offload(tiny(), 1, 256).host_bytes == 196608
        else:
            with pytest.raises(ValueError, match=rf"but {room} bytes .* may be pinned \(.* GiB available; 10%"):
                apply_offload(tiny(), 1, 256)
    monkeypatch.setattr(offload, "host_available", lambda: None)  # unknown (no /proc/meminfo): not checked, as the
    assert apply_offload(tiny(), 1, 256).host_bytes == 196608  # engine's cache check does; a full cgroup's 0 is
    # refused (before: read as unknown, so a container with no memory left was let pin more)
    assert apply_offload(tiny(), 1, 256, kv_gpu_gb=1e300).layers == []  # no cap in effect: an overflow before
    layer = 2 * 1 * 2 * 256 * 16 * 4  # K + V of one layer: B=1, Hkv=2, S_max=256, D=16, fp32
    for hata in (None, HataArgs(budget=8, n_dense=4)):  # --dense, or n_dense covering all 4 layers
        with pytest.raises(ValueError, match="nothing to offload: no layer decodes sparsely"):
            apply_offload(tiny(hata=hata), 1, 256)
        plan = apply_offload(tiny(hata=hata), 1, 256, kv_gpu_gb=4 * layer / GiB)  # a cap they fit: nothing to do
        assert plan.layers == [] and plan.gpu_bytes == 4 * layer
        with pytest.raises(ValueError, match=f"needs {4 * layer} bytes on the GPU and no layer decodes sparsely, so "
                                             f"none can be offloaded, but .* allows {4 * layer - 1} bytes"):
            apply_offload(tiny(hata=hata), 1, 256, kv_gpu_gb=(4 * layer - 1) / GiB)
    with pytest.raises(ValueError, match="the budget covers the whole 8-token cache, so every step is dense"):
        apply_offload(tiny(), 1, 8)  # K = 8 >= S_max: reading every row over PCIe, for nothing
    model = tiny()
    apply_offload(model, 1, 256, host_limit=10 ** 6)
    model.setup_caches(1, 128)  # smaller than planned: fine
    with pytest.raises(ValueError, match="the offload plan allowed 65536: call apply_offload again"):
        model.setup_caches(2, 256)  # twice the plan's host memory, never checked against what is available


def far_inputs(device, B=2, H=6, Hkv=3, S=37, K=13, D=16, dtype=torch.float32):
    """q, far k/v in host memory (as seen from device), idx with unused slots and a sequence that selects nothing
    (its row 0, which the unused slots read, holds inf and NaN: they must not reach an output)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, D, generator=g).to(device, dtype)
    k, v = host_buffer((B, Hkv, S, D), dtype, device), host_buffer((B, Hkv, S, D), dtype, device)
    k.copy_(torch.randn(B, Hkv, S, D, generator=g))
    v.copy_(torch.randn(B, Hkv, S, D, generator=g))
    idx = torch.stack([torch.randperm(S, generator=g)[:K] for _ in range(B * Hkv)]).view(B, Hkv, K).int()
    idx[0, 1, 9:] = -1
    idx[1, 2] = -1
    k[1, 2, 0], v[1, 2, 0] = math.inf, math.nan
    return q, k, v, idx.to(device)


def check_staged(device, **sizes):
    q, k, v, idx = far_inputs(device, **sizes)
    k_sel, v_sel, local = gather_rows(k, v, idx, use_triton=True)
    ref_k, ref_v, ref_local = gather_rows(k, v, idx, use_triton=False)
    assert torch.equal(k_sel, ref_k) and torch.equal(v_sel, ref_v) and torch.equal(local, ref_local)
    assert not ref_k[1, 2].any() and not ref_v[1, 2].any()  # zeros in unused slots (a multiply kept NaN * 0)
    out = staged_sparse_attention(q, k, v, idx)
    ref = hk.sparse_decode_attention_ref(q.double(), k.double(), v.double(), idx)
    err_torch = (hk.sparse_decode_attention_ref(q, k, v, idx).double() - ref).abs().max()
    assert (out.double() - ref).abs().max() <= 2 * err_torch + 1e-5


@pytest.mark.skipif(torch.cuda.is_available(), reason="the Triton interpreter is on only without CUDA (conftest)")
def test_staged_fetch_uses_the_kernel_by_default_for_device_indices(monkeypatch):
    """use_triton=None: the kernel wherever idx is on the GPU (staged_sparse_attention, bench.py), not the torch ref.
    On the CPU an idx that reports is_cuda stands in for one."""
    class DeviceIdx(torch.Tensor):
        is_cuda = property(lambda self: True)
    kernel, launches = offload._gather_rows_kernel, []
    monkeypatch.setattr(offload, "_gather_rows_kernel", type("Counted", (), {
        "__getitem__": lambda self, grid: launches.append(grid) or kernel[grid]})())
    q, k, v, idx = far_inputs(torch.device("cpu"))
    got = gather_rows(k, v, idx.as_subclass(DeviceIdx))
    ref = gather_rows(k, v, idx, use_triton=False)
    assert len(launches) == 1 and all(torch.equal(a, b) for a, b in zip(got, ref))


def test_gather_rows_refuses_inputs_the_kernel_would_read_past():
    """idx of other heads than k_far's, a v of another shape, int64 idx or a k or v whose D is not of unit stride: one
    error, on both paths (before: the kernel read past k_far's heads, and the stride was an assert, gone under
    python -O)."""
    q, k, v, idx = far_inputs(torch.device("cpu"), S=37, K=13)
    for bad in ((k[:, :1], v[:, :1], idx), (k, v[:, :, :20], idx), (k, v, idx.long()),
                (k.transpose(2, 3).contiguous().transpose(2, 3), v, idx),
                (k, v.transpose(2, 3).contiguous().transpose(2, 3), idx)):
        for use_triton in (False, True):
            with pytest.raises(ValueError, match=r"gather_rows: k_far, v_far must be \(B, Hkv, S_max, D\), unit st"):
                gather_rows(*bad, use_triton=use_triton)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the Triton interpreter is on only without CUDA (conftest)")
def test_gather_kernel_reads_k_and_v_by_their_own_strides():
    """k and v of one shape but different layouts (v a slice of a longer cache): the kernel matches the torch path."""
    _, k, v, idx = far_inputs(torch.device("cpu"))
    longer = torch.zeros(2, 3, 50, 16)
    longer[:, :, :37] = v
    got = gather_rows(k, longer[:, :, :37], idx, use_triton=True)  # (B, Hkv, 37, D), strides of 50 positions
    ref = gather_rows(k, v, idx, use_triton=False)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the Triton interpreter is on only without CUDA (conftest)")
@pytest.mark.parametrize("S,K", [(37, 13), (150, 100)])  # K = 100: two blocks of slots
def test_staged_fetch_matches_ref_cpu(S, K, monkeypatch):
    """Under the interpreter; use_triton=True launches the kernel on the CPU too (else the check compared the ref
    with itself)."""
    kernel, launches = offload._gather_rows_kernel, []
    monkeypatch.setattr(offload, "_gather_rows_kernel", type("Counted", (), {
        "__getitem__": lambda self, grid: launches.append(grid) or kernel[grid]})())
    check_staged(torch.device("cpu"), S=S, K=K)
    assert len(launches) == 1


def test_the_gather_kernel_names_a_head_dim_it_cannot_tile():
    """D = 20 on the kernel path: the wrappers' own message (before: Triton's "arange's range must be a power of 2");
    the torch path takes any D."""
    _, k, v, idx = far_inputs(torch.device("cpu"), D=20)
    with pytest.raises(ValueError, match=r"gather_rows: Triton path needs D a power of two >= 16, got 20"):
        gather_rows(k, v, idx, use_triton=True)
    assert gather_rows(k, v, idx, use_triton=False)[0].shape[-1] == 20


# --------------------------------------------------------------------------------------------------------------
# GPU: pinned host memory read and written through UVA

@cuda
def test_host_buffer_is_host_memory_seen_from_the_gpu():
    view = host_buffer((3, 5, 16), torch.bfloat16, torch.device("cuda"))
    assert view.is_cuda
    x = torch.randn(3, 5, 16, device="cuda", dtype=torch.bfloat16)
    view[:, 1:4] = x[:, 1:4]  # a kernel storing through PCIe
    torch.cuda.synchronize()
    assert torch.equal(view.cpu()[:, 1:4], x[:, 1:4].cpu()) and not view[:, 0].any()
    free = torch.cuda.mem_get_info()[0]
    big = host_buffer((256, 2**20), torch.float32, torch.device("cuda"))  # 1 GiB that must not come from the GPU
    assert torch.cuda.mem_get_info()[0] > free - GiB // 2 and big.is_cuda


@cuda
def test_staged_fetch_matches_ref_cuda():
    check_staged(torch.device("cuda"))


@cuda
def test_offload_gives_the_same_tokens_cuda():
    """Through generate(): CUDA-graph decode with Triton kernels reading the selected rows from host memory."""
    model = tiny("cuda")
    ref_tokens, _ = decode(model, PROMPTS, 6, chunk=16)  # chunked prefill, eager decode
    with torch.inference_mode():
        ref, _ = generate(model, PROMPTS, 12)  # the caches of decode() are reused: same capacity
    apply_offload(model, 2, 64)
    tokens, _ = decode(model, PROMPTS, 6, chunk=16)
    assert type(model.layers[3].attention.kv_cache) is HostKVCache
    with torch.inference_mode():
        got, _ = generate(model, PROMPTS, 12)
    assert got == ref and torch.equal(tokens, ref_tokens)


def test_offload_a_chunk_at_mixed_positions():
    """A chunk (T > 1) whose sequences start at different positions, one of them 0: not a fresh prefill, so the
    host cache answers with its rows up to the chunk's end (the mask's S), not with the chunk's own k, v."""
    tokens = torch.tensor([list(range(3, 11)), list(range(20, 28))])  # (2, 8)
    def run(model):
        model(tokens[:, :5], input_pos=torch.tensor([0, 0]))  # both sequences: positions 0-4
        return model(tokens[:, 5:], input_pos=torch.tensor([0, 5]))  # (2, 3, V): from 0 and from 5
    assert_offload_changes_nothing(2, run)


def test_a_large_host_keeps_a_tenth_free(monkeypatch):
    """Above 10 GiB available, the 10% share (not the 1 GiB floor) stays free."""
    monkeypatch.setattr(offload, "host_available", lambda: 20 * GiB)
    need = 3 * 2 * 1 * 2 * 2**25 * 16 * 4  # 3 sparse layers' K/V at S_max = 2^25: 24 GiB
    with pytest.raises(ValueError, match=rf"needs {need} bytes .* but {18 * GiB} bytes \(18.00 GiB\) may be pinned"):
        plan_offload(tiny(), 1, 2**25)
    monkeypatch.setattr(offload, "host_available", lambda: 13 * GiB)  # 11.7 GiB may be pinned: 12 GiB does not fit
    with pytest.raises(ValueError, match=r"but \d+ bytes \(11.70 GiB\) may be pinned"):
        plan_offload(tiny(), 1, 2**24)


def test_a_second_plan_brings_offloaded_layers_back():
    """apply_offload sets every layer's cache class: a plan that offloads nothing after one that offloaded layers 1-3
    leaves no layer in host memory."""
    model = tiny()
    assert apply_offload(model, 1, 64).layers == [1, 2, 3]
    assert apply_offload(model, 1, 64, kv_gpu_gb=100).layers == []
    model.setup_caches(1, 64)
    assert all(type(layer.attention.kv_cache) is KVCache for layer in model.layers)


def test_own_cgroups_keep_a_path_with_colons(tmp_path):
    """Only the first two colons of a /proc/self/cgroup line separate its fields: a cgroup's name may hold more."""
    table = tmp_path / "cgroup"
    table.write_text("4:memory:/kubepods/pod:a:b\n0::/user.slice/app:1\n")
    assert offload._own_cgroups(str(table)) == ["/sys/fs/cgroup/user.slice/app:1",
                                                "/sys/fs/cgroup/memory/kubepods/pod:a:b"]


def test_own_cgroups_take_only_hierarchy_0_as_v2(tmp_path):
    """Only the line of hierarchy 0 ("0::/path") is cgroup v2's; v1's hierarchies, number 1 too, are read only for
    their memory controller."""
    table = tmp_path / "cgroup"
    table.write_text("1:name=systemd:/init.scope\n2:cpu,cpuacct:/a\n0::/b\n")
    assert offload._own_cgroups(str(table)) == ["/sys/fs/cgroup/b"]


def test_caches_larger_than_the_plan_are_refused():
    """A plan is for its batch and length: a setup_caches one position longer than planned is refused, not given
    host memory the plan never counted."""
    model = tiny()
    apply_offload(model, 1, 256)
    with pytest.raises(ValueError, match=r"would take 65792 bytes of host memory, but the offload plan allowed 65536"):
        model.setup_caches(1, 257)
    model.setup_caches(1, 256)  # as planned
