"""Speed harness: decode latency, dense attention vs the HATA step, against the memory floor.

    python bench.py attention [--shapes llama8b default] [--seqlens 8192 32768 131072] [--batches 1 8] [--rbit 128]
    python bench.py offload [--preset llama-3.1-8b] [--seqlen 131072] [--budget 2048]
    python bench.py e2e [--preset llama-3.1-8b] [--seqlens 32768 131072] [--batches 1 4] [--prefill-len 32768]
                        [--budgets 1/64 2048] [--compile] [--profile]      (`bench.py MODE --help`: every flag)
    python bench.py cpu [--seqlens 16 1024 4096 8192] [--budget 512 or 1/16] (no GPU needed)

`attention` times one layer's decode attention (the decode step of a sparse layer):
  dense  torch SDPA, q (B, H, 1, D) against the whole cache (enable_gqa)
  HATA   hash the new key and the query heads, write the key's code, fused score + counting select, sparse
         split-K attention over the selected rows (hata_kernels.py)
Both sides run as captured CUDA graphs, the L2 is flushed with a large read before every run, and each
HATA result is checked against the refs before it is timed. Prints a markdown table (medians) and plots latency
and speedup against the context length (report/bench_attention.png for the default points, else only to --plot;
cpu plots its own the same way, e2e only with --compile).
The byte floor counts what the step must read: the codes, the selected K/V rows, the projection, q, the new key; over
the fastest read seen in the same run: a plain read of 512 MiB (Timer.read_bw) or dense SDPA's cache read.
`offload` times whole decode steps of a preset with random weights and the KV cache in host memory (offload.py):
HATA offloaded vs HATA on the GPU vs every row fetched from host memory; then one layer's fetch, zero-copy vs staged.
`e2e` times whole decode steps of a preset with random weights, each a CUDA graph, dense vs HATA at each budget,
then prefills with and without key hashing (one causal pass; the engine's chunks); with --profile, where one
replay of each step spends its time.
`cpu` times the default model's decode steps on the CPU (real weights, fp32 or --dtype bfloat16), dense vs HATA,
alternating.
"""
import datetime
import math
import os
import platform
import statistics
import sys
import time

import torch

import hata_kernels as hk
from model import PRESETS, HataArgs, check_rbit, checkpoint_metadata, from_checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))
BUDGETS = [1 / 64, 2048]              # HATA's K: a fraction of the context, or tokens (attention; e2e's default)
SHAPES = {                            # name: (H, Hkv, D)
    "llama8b": (32, 8, 128),          # Llama-3.1-8B
    "default": (9, 3, 64),            # the default model (SmolLM2-135M shapes)
}


# ----------------------------------------------------------------------------------------------------------
# timing: CUDA graphs, L2 flushed by a read, medians


def event_ms(fn):
    """Milliseconds of one call of fn on the GPU, between two CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def fill_random_kv(model):
    """Random K/V in every layer's cache (no prefill needed): dense attention costs the same whatever the values;
    HATA's threshold takes its fast path on random codes, which real keys can leave (BENCHMARKS.md)."""
    for layer in model.layers:
        layer.attention.kv_cache.k.normal_()
        layer.attention.kv_cache.v.normal_()


def random_caches(model, B, S):  # dense first: setup_caches re-applies the policy (HATA: hash caches of B x S too)
    model.set_hata(None)
    model.setup_caches(B, S)
    fill_random_kv(model)


def kernel_kind(name):
    """A GPU kernel's part of a decode step, from its name: 'HATA' (hata_kernels.py's Triton kernels of the sparse
    step), 'SDPA' (torch's flash, memory-efficient or cuDNN attention), 'GEMV/GEMM' (cuBLAS, CUTLASS), or 'other'
    (norms, RoPE, SiLU, casts, cache writes, hata_kernels' cache_write too: dense steps run it as well)."""
    if name.startswith(("_hash_encode", "_hamming_score", "_select_topk", "_topk_", "_sparse_attn")):
        return "HATA"
    if any(w in name.lower() for w in ("flash", "fmha", "attention", "sdpa")):
        return "SDPA"
    if any(w in name.lower() for w in ("gemv", "gemm", "cutlass", "xmma", "splitkreduce", "cublas", "nvjet")):
        return "GEMV/GEMM"
    return "other"


def kernel_census(replay):
    """One replay of a captured step under torch.profiler: ({kind: ms}, {HATA kernel: ms}), kernel times summed.
    (The profiler slows the replay and what runs after it: time steps before taking a census. Its kernel times
    run a little longer than unprofiled ones, so a step with no gaps can show a small negative one.)"""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        replay()
        torch.cuda.synchronize()
    kinds, hata = {}, {}
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        if us > 0 and not e.key.startswith("cuda"):  # kernels, not runtime calls
            kind = kernel_kind(e.key)
            kinds[kind] = kinds.get(kind, 0.0) + us / 1e3
            if kind == "HATA":  # "_topk_score_kernel" -> "score", "_sparse_attn_merge_kernel" -> "merge"
                short = e.key.split("_kernel")[0].lstrip("_").removeprefix("topk_").removeprefix("sparse_attn_")
                hata[short] = us / 1e3
    return kinds, hata


class Timer:
    def __init__(self, reps):
        self.reps = reps
        self.flush_buf = torch.empty(256 * 2**20, dtype=torch.int32, device="cuda").random_()  # 1 GiB >> 60 MB L2
        self.sink = torch.zeros((), dtype=torch.int64, device="cuda")

    def graph(self, fn):
        """Capture fn (a few launches) in a CUDA graph after a warm-up."""
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        return g

    def time(self, *fns):
        """Median milliseconds of one replay of each fn's graph (or of a graph given), L2 flushed before each. Several
        fns' replays alternate, so a drifting GPU slows each alike. One fn: a number; several: a list."""
        graphs = [fn if isinstance(fn, torch.cuda.CUDAGraph) else self.graph(fn) for fn in fns]
        ts = [[] for _ in fns]
        for g in graphs:
            g.replay()
        for _ in range(self.reps):
            for g, t in zip(graphs, ts):
                self.sink += self.flush_buf.sum(dtype=torch.int32)  # flush the L2 with a read: no dirty lines
                t.append(event_ms(g.replay))
        medians = [statistics.median(t) for t in ts]
        return medians[0] if len(fns) == 1 else medians

    def read_bw(self):
        """Bytes/s of a plain read in this run: the sum of the flush buffer's first half (512 MiB, which the flush's
        second half evicts from the L2), in int32 (4.13-4.21 TB/s on the H200; in int64, torch's default, 0.76)."""
        half = self.flush_buf[: self.flush_buf.numel() // 2]
        return half.nbytes / self.time(lambda: half.sum(dtype=torch.int32)) * 1e3


# ----------------------------------------------------------------------------------------------------------
# attention mode


def check_hata(q, k_cache, v_cache, k_new, codes, lengths, proj, budget, q_codes, idx, out):
    """Each HATA result against its ref, in the same run, before timing. Codes may differ only where an
    fp32 projection is within rounding of zero (summation order): allow one differing word."""
    for x, c in ((k_new, codes[:, :, -1]), (q, q_codes)):
        differ = (c != hk.hash_encode_ref(x[:, :, None], proj)[:, :, 0]).sum().item()
        assert differ <= 1, f"hash codes differ from the ref in {differ} words"
    ref = hk.hamming_topk_ref(q_codes, codes, lengths, budget)
    assert torch.equal(torch.sort(idx, -1).values, torch.sort(ref, -1).values), "hamming_topk != ref"
    ref_out = hk.sparse_decode_attention_ref(q.double(), k_cache, v_cache, idx)  # fp64 q: selected K/V rows upcast
    torch_out = hk.sparse_decode_attention_ref(q, k_cache, v_cache, idx)
    err = (out.double() - ref_out).abs().max().item()
    err_torch = (torch_out.double() - ref_out).abs().max().item()
    assert err <= 2 * err_torch + 1e-5, f"attention error {err} > 2 * {err_torch} + 1e-5"


def bench_attention(args):
    check_rbit(args.rbit, "--rbit")
    refuse_all_dense(BUDGETS, {S: S for S in args.seqlens}, None)
    Ks = {S: sorted({HataArgs(budget=b).budget_tokens(S) for b in BUDGETS}) for S in args.seqlens}
    print_header(args.mode)
    torch.manual_seed(0)
    timer = Timer(args.reps)
    dtype = torch.bfloat16
    rows = []
    for shape in args.shapes:
        H, Hkv, D = SHAPES[shape]
        for S in args.seqlens:
            for B in args.batches:
                if B == args.batches[0] and (dense_Ks := [K for K in Ks[S] if K >= S]):
                    print(f"  S={fmt_s(S)} K={', '.join(map(str, dense_Ks))}: K >= S, the model decodes densely; "
                          "not timed", flush=True)
                for budget in (K for K in Ks[S] if K < S):
                    rows.append(r := bench_one(timer, shape, H, Hkv, D, S, B, budget, args.rbit, dtype))
                    print(f"  {shape} S={fmt_s(S)} B={B} K={budget}: dense {r['dense_ms']:.4f} ms, HATA "
                          f"{r['hata_ms']:.4f} ms", flush=True)
                    torch.cuda.empty_cache()
    read = timer.read_bw()
    sdpa = add_floors(rows, read)
    print(f"Read bandwidth: a 512 MiB sum {read / 1e12:.2f} TB/s, dense SDPA's cache read up to "
          f"{sdpa / 1e12:.2f} TB/s; the floors are over the faster.\n")
    print(f"{table(rows)}\n\n{breakdown_table(rows)}\n")
    floor_us = timer.time(lambda: timer.sink.add_(0)) * 1e3
    print(f"A graph of one trivial kernel (a scalar add) measures {floor_us:.1f} us the same way: every per-kernel "
          "time above includes that launch floor.")
    panels = []
    for shape in args.shapes:
        ms, speedup = {}, {}
        for r in (r for r in rows if r["shape"] == shape):
            for k in budget_labels(r["budget"], r["S"], BUDGETS):
                speedup.setdefault(f"B={r['B']}, {k}", []).append((r["S"], r["dense_ms"] / r["hata_ms"]))
                if k in budget_labels(r["budget"], r["S"], BUDGETS[:1]):  # the latency panel: the first budget
                    ms.setdefault(f"dense, B={r['B']}", []).append((r["S"], r["dense_ms"]))
                    ms.setdefault(f"HATA, B={r['B']}, {k}", []).append((r["S"], r["hata_ms"]))
        panels += [(f"{shape}: one layer's decode attention", "ms (median)", "log", ms, None),
                   (f"{shape}: speedup of HATA over dense", "dense ms / HATA ms", "linear", speedup, 1)]
    plot_speed(args.plot, panels)


def budget_label(b):
    """A budget argument as a line label: tokens 'K = 2048', a fraction of S 'K = S/64' or 'K = 0.3 S'."""
    if b >= 1:
        return f"K = {int(b)}"
    return f"K = S/{round(1 / b)}" if math.isclose(1 / b, round(1 / b)) else f"K = {b:g} S"  # 1/(1/49): 49.00..01


def refuse_all_dense(budgets, caches, flag):  # caches {S: S_max}; no budget below any S: HATA's rows would be dense
    if not any(HataArgs(budget=b).budget_tokens(S_max) < S for b in budgets for S, S_max in caches.items()):
        raise ValueError(f"no budget ({', '.join(map(budget_label, budgets))}) is below any of --seqlens "
                         f"{' '.join(map(str, caches))}: the model would decode every step densely; give a longer "
                         f"--seqlens{f' or a smaller {flag}' if flag else ''}")


def budget_labels(K, S, budgets):
    """The budget arguments (fractions of S or token counts) that give K tokens at context S, as line labels."""
    return [budget_label(b) for b in budgets if HataArgs(budget=b).budget_tokens(S) == K]


def plot_speed(path, panels):
    """panels: [(title, ylabel, yscale, {line label: [(S, y), ...]}, reference y or None)], side by side, the
    context length S on a log2 axis. Writes a PNG (none for path None)."""
    if path is None:
        return
    import matplotlib.pyplot as plt
    plt.switch_backend("Agg")
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (title, ylabel, yscale, lines, ref) in zip(axes[0], panels):
        for i, (label, pts) in enumerate(lines.items()):  # each its own marker, smaller in turn: equal lines (K =
            if pts:  # S/64 and K = 2048 at 128K) hide none; a line with no points (HATA where K covers every S): none
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="osD^v<>"[i % 7],
                        ms=9 - 5 * i / max(1, len(lines) - 1), label=label)
        if ref is not None:
            ax.axhline(ref, color="gray", linestyle="--")
        xs = sorted({x for pts in lines.values() for x, _ in pts})
        ax.set_xscale("log", base=2)
        ax.set_yscale(yscale)
        ax.set_xticks(xs, [fmt_s(x) for x in xs])
        ax.set(title=title, xlabel="context S (tokens)", ylabel=ylabel)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    from engine import write_png
    write_png(path, fig)
    plt.close(fig)
    print(f"\nwrote {path}")


def bench_one(timer, shape, H, Hkv, D, S, B, budget, R, dtype):
    dev = "cuda"
    G = H // Hkv
    k_cache = torch.randn(B, Hkv, S, D, device=dev, dtype=dtype)              # (B, Hkv, S, D)
    v_cache = torch.randn(B, Hkv, S, D, device=dev, dtype=dtype)              # (B, Hkv, S, D)
    q = torch.randn(B, H, D, device=dev, dtype=dtype)                         # (B, H, D)
    proj = torch.randn(Hkv, D, R, device=dev)                                 # (Hkv, D, R) fp32
    codes = hk.hash_encode(k_cache, proj)                                     # (B, Hkv, S, W) int32, the prefill
    lengths = torch.full((B,), S, device=dev, dtype=torch.int64)              # (B,)
    k_new = k_cache[:, :, -1]                                                 # (B, Hkv, D) the step's new key
    scale = 1.0 / math.sqrt(D)

    # the HATA step as explicit launches into fixed buffers, so each kernel can also be timed alone; the 0, 0 of
    # the select are n_sink, n_recent (HataArgs' defaults, as e2e's steps)
    W = R // 32
    q_codes = torch.empty(B, H, 1, W, device=dev, dtype=torch.int32)          # (B, H, 1, W)
    idx, topk_launches = hk._hamming_topk_launches(q_codes[:, :, 0], codes, lengths, budget, 0, 0)
    out, attn_launches = hk._sparse_attention_launches(q, k_cache, v_cache, idx, scale)
    pos = lengths - 1                                                         # (B,) the new key's slot
    stages = [("hash", lambda: hk._hash_encode_into(q[:, :, None], proj, q_codes, key=(k_new, pos, codes)))]
    stages += topk_launches + attn_launches

    def hata_step():
        for _, launch in stages:
            launch()

    # correctness first, on this very data (the new key's code spoiled first, so the check sees the kernel write it)
    codes[:, :, -1].bitwise_not_()
    hata_step()
    torch.cuda.synchronize()
    check_hata(q, k_cache, v_cache, k_new, codes, lengths, proj, budget, q_codes[:, :, 0], idx, out)
    written = (q_codes, codes[:, :, -1], idx, out)  # what the step writes: the new key's code too
    checked, graph = [t.clone() for t in written], timer.graph(hata_step)  # the timed path: this graph
    for t in written:  # poisoned: one replay must write them again, as the checked launches did
        t.fill_(-1 if t.dtype == torch.int32 else math.nan)
    graph.replay()
    assert all(map(torch.equal, checked, written)), "the HATA step's graph replay differs from the check"

    q4 = q[:, :, None]                                                        # (B, H, 1, D)

    def dense():
        return torch.nn.functional.scaled_dot_product_attention(q4, k_cache, v_cache, enable_gqa=True)

    dense_ms, hata_ms = timer.time(dense, graph)
    per_kernel = {name: timer.time(launch) for name, launch in stages}

    esize = k_cache.element_size()
    hata_bytes, dense_bytes = floor_bytes(B, Hkv, G, D, S, W, budget, esize)  # budget < S: bench_attention's rows
    return dict(shape=shape, B=B, S=S, budget=budget, dense_ms=dense_ms, hata_ms=hata_ms,
                hata_bytes=hata_bytes, dense_bytes=dense_bytes,
                per_kernel=per_kernel, kernel_bytes=kernel_bytes(B, Hkv, G, D, S, W, budget, esize))


def add_floors(rows, read):
    """Each row's floors (ms) over the fastest read seen in the run: `read`, a plain read's bytes/s, or dense SDPA's
    over its whole cache, which can beat a torch reduction (H200: 4.53-4.63 against 4.13-4.21 TB/s). Returns SDPA's
    best."""
    sdpa = max(r["dense_bytes"] / r["dense_ms"] * 1e3 for r in rows)
    bw = max(read, sdpa)
    for r in rows:
        r["floor_ms"], r["dense_floor_ms"] = r["hata_bytes"] / bw * 1e3, r["dense_bytes"] / bw * 1e3
    return sdpa


def floor_bytes(B, Hkv, G, D, S, W, K, esize):
    """(the bytes a HATA step must read: every code, the K selected K and V rows, the G query heads and the new key
    of each KV head, and the fp32 projection (Hkv, D, R = 32 W), once for the whole batch; the bytes dense attention
    reads: the whole K and V caches)."""
    return (B * Hkv * (S * W * 4 + 2 * K * D * esize + (G + 1) * D * esize) + Hkv * D * 32 * W * 4,
            2 * B * Hkv * S * D * esize)


def kernel_bytes(B, Hkv, G, D, S, W, K, esize):
    """Bytes each streaming kernel must move (reads + writes), for its achieved bandwidth. A split is 64 selected rows
    (_sparse_attention_launches' block_n), its output per query head D fp32 values and an fp32 log-sum-exp."""
    rows = B * Hkv
    return {
        "topk.score": rows * S * (W * 4 + 2),                                # codes in, int16 keys out
        "topk.compact": rows * S * 2 + rows * K * 4,                         # keys in, indices out
        "attn.split": (rows * K * (2 * D * esize + 4)                        # gathered K, V rows + indices,
                       + rows * -(-K // 64) * G * (D + 1) * 4),              # fp32 o, lse (D + 1) per split out
    }


def fmt_s(S):
    return f"{S // 1024}K" if S % 1024 == 0 else str(S)


def table(rows):
    out = ["| shape | B | S | budget | dense ms | HATA ms | speedup | HATA floor ms | share of BW | "
           "dense vs its floor |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['shape']} | {r['B']} | {fmt_s(r['S'])} | {r['budget']} | {r['dense_ms']:.4f} | "
                   f"{r['hata_ms']:.4f} | {r['dense_ms'] / r['hata_ms']:.2f}x | {r['floor_ms']:.4f} | "
                   f"{100 * r['floor_ms'] / r['hata_ms']:.0f}% | {r['dense_ms'] / r['dense_floor_ms']:.2f}x |")
    return "\n".join(out)


def breakdown_table(rows):
    names = list(rows[0]["per_kernel"])
    out = ["Per kernel, each as its own graph (ms; achieved TB/s of the bytes it must move):", "",
           "| shape | B | S | budget | " + " | ".join(names) + " |", "|---|---|---|---|" + "---|" * len(names)]
    for r in rows:
        cells = []
        for n in names:
            ms = r["per_kernel"][n]
            b = r["kernel_bytes"].get(n)
            cells.append(f"{ms:.4f}" + (f" ({b / ms / 1e9:.2f})" if b else ""))
        out.append(f"| {r['shape']} | {r['B']} | {fmt_s(r['S'])} | {r['budget']} | " + " | ".join(cells) + " |")
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------------------
# offload mode


def bench_offload(args):
    """Decode step of a preset (random weights) at S_max = --seqlen, B = 1, with the caches filled directly with
    random K/V (no prefill; set_hata rehashes the keys), each mode as a CUDA graph: HATA all on the GPU, HATA with
    the sparse layers' K/V in host memory (offload.py), and every row fetched from host memory (a selection of
    S - 1 positions through the same path, the dense baseline). Then one layer's fetch: zero-copy vs staged."""
    import offload
    from engine import GraphedDecode, meta_model, random_model

    S, B, dev, hata, plan = args.seqlen, 1, "cuda", HataArgs(budget=args.budget), None  # plan: set once offloaded
    if S > (context := PRESETS[args.preset].max_seq_len):  # now, not after the GPU's timings
        raise ValueError(f"--seqlen {S} exceeds the {args.preset} context of {context} tokens")
    if (K := hata.budget_tokens(S)) >= S:
        raise ValueError(f"--budget {args.budget} ({K} tokens) must be below --seqlen {S}")
    if args.host_gb is not None and not 0 < args.host_gb < math.inf:
        raise ValueError(f"--host-gb must be a number of GiB > 0, got {args.host_gb}")  # (finite: int(inf) fails)
    host_limit = None if args.host_gb is None else int(args.host_gb * offload.GiB)
    try:  # the plan's host-memory check before the weights are built
        offload.plan_offload(meta_model(PRESETS[args.preset], hata, torch.bfloat16), B, S, host_limit=host_limit)
    except ValueError as e:
        raise ValueError(f"{e} (here: --seqlen, or --host-gb)") from None
    print_header(args.mode)
    model = random_model(args.preset, hata, dev, torch.bfloat16)
    cur = torch.randint(0, model.args.vocab_size, (B,), device=dev)
    pos = torch.full((B,), S - 1, device=dev)  # the last slot: every step attends over all S positions

    def decode_ms(name, policy, steps):
        torch.manual_seed(1)  # the same random K/V whichever memory holds them
        fill_random_kv(model)
        model.set_hata(policy)  # rehash the random keys
        with torch.inference_mode():
            step = GraphedDecode(model, cur, pos)
            logits = step(model, cur, pos).clone()
            ms = event_ms(lambda: [step(model, cur, pos) for _ in range(steps)]) / steps
        print(f"  {name}, {plan or 'KV on the GPU'}: {ms:.3f} ms/step", flush=True)
        return ms, logits

    model.setup_caches(B, S)
    gpu_ms, gpu_logits = decode_ms("HATA", hata, args.steps)
    torch.cuda.empty_cache()
    plan = offload.apply_offload(model, B, S, host_limit=host_limit)
    model.setup_caches(B, S)  # frees the GPU caches, allocates the offloaded ones in host memory
    torch.cuda.empty_cache()
    off_ms, off_logits = decode_ms("HATA", hata, args.steps)
    diff = (off_logits - gpu_logits).abs().max().item()
    assert diff <= 0.05 * gpu_logits.abs().max().item(), f"offloaded logits differ from the GPU's by {diff}"
    all_ms, _ = decode_ms("every row", HataArgs(budget=S - 1), max(2, args.steps // 10))
    n_sparse = len(plan.layers)
    row = 2 * model.args.n_kv_heads * model.args.head_dim * 2  # K + V bytes of one token, one layer, bf16
    fetched = n_sparse * B * K * row
    print(f"\n{args.preset}, B={B}, S={fmt_s(S)}, budget {K}, bf16; {n_sparse} of {model.args.n_layers} layers "
          f"offloaded; max |logit diff| offload vs GPU {diff:.2e}\n")
    print("| mode | ms/step | tokens/s | vs HATA on GPU | bytes from host/step |\n|---|---|---|---|---|")
    for name, ms, nbytes in (("HATA, KV on GPU", gpu_ms, 0), ("HATA, KV offloaded", off_ms, fetched),
                             ("dense, KV offloaded (all rows fetched)", all_ms, n_sparse * B * (S - 1) * row)):
        print(f"| {name} | {ms:.2f} | {1000 / ms:.1f} | {gpu_ms / ms:.2f}x | {nbytes / 2**20:.0f} MiB |")
    rate = f"{fetched / (off_ms - gpu_ms) / 1e6:.1f} GB/s" if off_ms > gpu_ms else "n/a (the step was not slower)"
    print(f"\nHATA offloaded vs dense offloaded: {all_ms / off_ms:.1f}x faster; vs HATA on GPU: "
          f"{gpu_ms / off_ms:.2f} of its speed; fetch rate above the GPU step: {rate}\n")
    shape = model.args.n_heads, model.args.n_kv_heads, model.args.head_dim
    del model
    torch.cuda.empty_cache()
    bench_offload_fetch(args, S, K, *shape)


def bench_offload_fetch(args, S, K, H, Hkv, D, B=1):
    """One layer's attention at the preset's shapes over K random rows: from GPU memory, zero-copy from host
    memory, staged (gather into a GPU buffer, then attend), and the gather alone; every row; a DMA copy."""
    import offload
    timer = Timer(args.reps)
    dtype, dev = torch.bfloat16, torch.device("cuda")
    q = torch.randn(B, H, D, device=dev, dtype=dtype)                         # (B, H, D)
    k_gpu = torch.randn(B, Hkv, S, D, device=dev, dtype=dtype)                # (B, Hkv, S, D)
    v_gpu = torch.randn(B, Hkv, S, D, device=dev, dtype=dtype)
    k_host, v_host = (offload.host_buffer((B, Hkv, S, D), dtype, dev) for _ in range(2))  # mapped host memory
    k_host.copy_(k_gpu)
    v_host.copy_(v_gpu)
    idx = torch.rand(B * Hkv, S, device=dev).topk(K).indices.sort().values.int().view(B, Hkv, K)  # (B, Hkv, K)
    idx_all = torch.arange(S, device=dev, dtype=torch.int32).expand(B, Hkv, S).contiguous()      # (B, Hkv, S)
    ref = hk.sparse_decode_attention(q, k_gpu, v_gpu, idx)
    assert torch.equal(hk.sparse_decode_attention(q, k_host, v_host, idx), ref), "zero-copy != GPU"
    torch.testing.assert_close(offload.staged_sparse_attention(q, k_host, v_host, idx), ref)
    dma = torch.empty_like(k_gpu)
    sel, every = 2 * B * Hkv * K * D * 2, 2 * B * Hkv * S * D * 2
    rows = [("selected rows, K/V in GPU memory", lambda: hk.sparse_decode_attention(q, k_gpu, v_gpu, idx), sel),
            ("selected rows, zero-copy from host", lambda: hk.sparse_decode_attention(q, k_host, v_host, idx), sel),
            ("selected rows, staged (gather + attend)",
             lambda: offload.staged_sparse_attention(q, k_host, v_host, idx), sel),
            ("  gather alone", lambda: offload.gather_rows(k_host, v_host, idx), sel),
            ("every row, zero-copy from host", lambda: hk.sparse_decode_attention(q, k_host, v_host, idx_all), every),
            ("every row, SDPA reading host memory", lambda: torch.nn.functional.scaled_dot_product_attention(
                q[:, :, None], k_host, v_host, enable_gqa=True), every),
            ("DMA copy of K (cudaMemcpy host -> GPU)", lambda: dma.copy_(k_host), every // 2)]
    print(f"One layer, H={H} Hkv={Hkv} D={D}, S={fmt_s(S)}, K={K}, bf16 (median ms; GB/s of the rows fetched):\n")
    print("| fetch | ms | GB/s |\n|---|---|---|")
    for name, fn, nbytes in rows:
        ms = timer.time(fn)
        print(f"| {name} | {ms:.4f} | {nbytes / ms / 1e6:.1f} |")


# ----------------------------------------------------------------------------------------------------------
# e2e mode


def bench_e2e(args):
    """Whole-model decode tokens/s of a preset (random weights, bf16) at each context and batch: dense against HATA
    at each budget, every step a CUDA graph (engine.GraphedDecode), in one run, their replays alternating (Timer.time:
    each after an L2 flush; dense is timed beside each budget, so each row has its own). The caches are filled with
    random K/V instead of a prefill per context (as `fill_random_kv`: fast-path timings; set_hata rehashes the
    keys). Every sequence decodes at position S - 1, so each step attends over S tokens. Then prefill time at
    --prefill-len tokens, B = 1, without and with key hashing (HATA's only prefill cost), in one causal pass and in
    the chunks engine.prefill takes by default (a later chunk attends over the cache up to its end: model's
    causal_attention)."""
    from engine import GraphedDecode, prefill, random_model

    if (L := max(args.seqlens + [args.prefill_len])) > (context := PRESETS[args.preset].max_seq_len):
        raise ValueError(f"{L} tokens (--seqlens, --prefill-len) exceed the {args.preset} context of {context}")
    hashed = HataArgs(budget=1 / 64)  # the prefill timing's policy: codes exist only where K < the cache
    if not hashed.reads_codes(args.prefill_len):
        raise ValueError(f"--prefill-len {args.prefill_len}: too short for HATA to hash its keys (K = 1/64 of it)")
    refuse_all_dense(args.budgets, {S: S for S in args.seqlens}, "--budgets")
    print_header(args.mode)
    dev, model, timer = "cuda", random_model(args.preset, None, "cuda", torch.bfloat16), Timer(args.steps)
    a = model.args
    if args.compile:
        model.compile_pointwise()

    def graphed(B, S, policy):  # one decode step at position S - 1, captured (its .graph replays it)
        model.set_hata(policy)  # rehash the cached keys for this policy
        cur, pos = torch.randint(0, a.vocab_size, (B,), device=dev), torch.full((B,), S - 1, device=dev)
        with torch.inference_mode():
            return GraphedDecode(model, cur, pos)

    def sdpa_ms(B, S, masked):  # one layer's dense decode attention, the model's masked form or plain
        k = model.layers[0].attention.kv_cache.k
        q = torch.randn(B, a.n_heads, 1, a.head_dim, device=dev, dtype=k.dtype)
        mask = torch.zeros(B, 1, 1, S, device=dev, dtype=k.dtype) if masked else None
        return timer.time(lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, model.layers[0].attention.kv_cache.v, attn_mask=mask, enable_gqa=True))

    rows = []
    for S in args.seqlens:
        for B in args.batches:
            Ks = dict.fromkeys(HataArgs(budget=b).budget_tokens(S) for b in args.budgets)
            if dense_Ks := [K for K in Ks if K >= S]:  # the model would decode densely: no HATA row
                print(f"  S={fmt_s(S)} B={B} K={', '.join(map(str, dense_Ks))}: K >= S, dense; not timed", flush=True)
            if not (sparse_Ks := [K for K in Ks if K < S]):
                continue
            try:  # a point too big for this GPU (B=4 at 128K on an 80 GB H100) is named; the others are timed
                random_caches(model, B, S)
                dense_step = graphed(B, S, None)  # (a later set_hata leaves what its graph reads: the K/V caches)
                layer_ms = (sdpa_ms(B, S, True), sdpa_ms(B, S, False))
                for K in sparse_Ks:  # dense and HATA replays alternate, so a drifting GPU slows both alike
                    hata_step = graphed(B, S, HataArgs(budget=K))
                    dense, ms = timer.time(dense_step.graph, hata_step.graph)
                    rows.append((S, B, K, dense, ms, layer_ms))
                    print(f"  S={fmt_s(S)} B={B} K={K}: dense {dense:.2f} ms, HATA {ms:.2f} ms", flush=True)
            except torch.OutOfMemoryError:
                print(f"  S={fmt_s(S)} B={B}: out of GPU memory; not timed", flush=True)
            dense_step = hata_step = None  # free the big caches (and the graphs' memory) before the next size
            model.setup_caches(1, 16)
            torch.cuda.empty_cache()
    print(f"\n{args.preset} decode step (CUDA graph{', norms/MLP/RoPE compiled' if args.compile else ''}), bf16, "
          f"random weights, median of {args.steps} steps, dense and HATA alternating\n")
    print("| S | B | K | dense ms | dense tok/s | HATA ms | HATA tok/s | speedup | layer SDPA masked / plain ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for S, B, K, dense, ms, (masked, plain) in rows:
        print(f"| {fmt_s(S)} | {B} | {K} | {dense:.2f} | {1000 * B / dense:.1f} | {ms:.2f} | {1000 * B / ms:.1f} | "
              f"{dense / ms:.2f}x | {masked:.3f} / {plain:.3f} |")
    tps, speedup = {}, {}
    for S, B, K, dense, ms, _ in rows:
        for k in budget_labels(K, S, args.budgets):
            tps.setdefault(f"dense, B={B}", {})[S] = 1000 * B / dense
            tps.setdefault(f"HATA, B={B}, {k}", {})[S] = 1000 * B / ms
            speedup.setdefault(f"B={B}, {k}", {})[S] = dense / ms
    how = "--compile" if args.compile else "eager"
    plot_speed(args.plot, [(f"{args.preset}: decode tokens/s ({how})", "tokens/s", "log",
                            {n: list(v.items()) for n, v in tps.items()}, None),
                           (f"{args.preset}: speedup of HATA over dense ({how})", "dense ms / HATA ms", "linear",
                            {n: list(v.items()) for n, v in speedup.items()}, 1)])

    T, result = args.prefill_len, {}
    ways = {"one causal pass": {"chunk": T}, "the engine's chunks": {}}  # engine.prefill's own chunk size
    tokens, lengths = torch.randint(0, a.vocab_size, (1, T), device=dev), torch.tensor([T], device=dev)
    model.set_hata(None)
    model.setup_caches(1, T)
    for way, chunk in ways.items():  # dense and hashed alternate, so a drifting GPU slows both alike
        for rep in range(4):  # the first round warms up (compilation, allocator): medians of the other three
            for name, policy in (("dense", None), ("HATA (keys hashed)", hashed)):
                model.set_hata(policy, rehash=False)  # the prefill writes every code
                ms = event_ms(lambda: prefill(model, tokens, lengths, **chunk))  # (prefill: in inference mode)
                result.setdefault((name, way), []).extend([ms] if rep else [])
    result = {k: statistics.median(ts) for k, ts in result.items()}
    print()
    for way in ways:
        d, h = result["dense", way], result["HATA (keys hashed)", way]
        print(f"prefill {fmt_s(T)} tokens, B=1, {way}: dense {d:.1f} ms, with key hashing {h:.1f} ms "
              f"(overhead {100 * (h - d) / d:+.2f}%)")
    if args.profile:  # last: the profiler would slow the timings above
        print("\nWhere a step's time goes: kernel ms of one replay under torch.profiler, summed by kind; gaps = the "
              "step's median above - its kernels\n")
        print("| S | B | step | step ms | kernels ms | GEMV/GEMM | HATA kernels | SDPA | other | gaps |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for S, B in dict.fromkeys(r[:2] for r in rows):  # each context and batch: its caches once, dense once
            random_caches(model, B, S)
            same = [r for r in rows if r[:2] == (S, B)]
            for name, policy, step in [("dense", None, same[0][3])] + [(f"HATA K={K}", HataArgs(budget=K), ms)
                                                                       for _, _, K, _, ms, _ in same]:
                graph = graphed(B, S, policy)  # (kept: its graph reads its static inputs)
                kinds, hata = kernel_census(graph.graph.replay)
                parts = ", ".join(f"{n} {t:.2f}" for n, t in sorted(hata.items(), key=lambda x: -x[1]))
                print(f"| {fmt_s(S)} | {B} | {name} | {step:.2f} | {sum(kinds.values()):.2f} | "
                      f"{kinds.get('GEMV/GEMM', 0):.2f} | {kinds.get('HATA', 0):.2f}{f' ({parts})' if parts else ''} | "
                      f"{kinds.get('SDPA', 0):.2f} | {kinds.get('other', 0):.2f} | {step - sum(kinds.values()):.2f} |")
            model.setup_caches(1, 16)  # free the big caches before the next size
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------
# cpu mode


def bench_cpu(args):
    """Decode ms/token of the default model on the CPU (real weights in --dtype): dense against HATA at --budget with
    the shipped projections, at each context S: a step at position S - 1 of a cache one slot longer (a prefix of its
    cache, as every engine.py step before the last), with random K/V (the values do not change the cost). Dense and HATA
    alternate for --rounds rounds of --steps steps, so a noisy machine slows both alike; medians over all steps."""
    from engine import DTYPES, decode_one_token, default_checkpoint, shipped_hash_weights

    torch.set_num_threads(args.threads or torch.get_num_threads())
    if max(args.seqlens) > (context := checkpoint_metadata(default_checkpoint())[0]):  # before the weights load
        raise ValueError(f"--seqlens {max(args.seqlens)} exceed the default model's context, {context}")
    hata = HataArgs(budget=args.budget)
    caches = {S: min(S + 1, context) for S in args.seqlens}
    refuse_all_dense([args.budget], caches, "--budget")  # (before the weights load too)
    model = from_checkpoint(default_checkpoint(), dtype=DTYPES[args.dtype])
    print_header(args.mode)
    hata.hash_weights = shipped_hash_weights(hata)
    rows = []
    for S, S_max in caches.items():
        K = hata.budget_tokens(S_max)  # a fraction is of the cache, as in engine.py
        random_caches(model, 1, S_max)
        cur, pos = torch.tensor([1]), torch.tensor([S - 1])
        times = {"dense": [], "hata": []}
        with torch.inference_mode():
            for _ in range(args.rounds):
                for name, policy in (("dense", None), ("hata", hata if K < S else None)):
                    model.set_hata(policy)  # HATA: rehash the random keys
                    for i in range(args.steps + 1):  # the first step of a round warms up
                        t0 = time.perf_counter()
                        decode_one_token(model, cur, pos)
                        if i:
                            times[name].append(1000 * (time.perf_counter() - t0))
        dense, sparse = statistics.median(times["dense"]), statistics.median(times["hata"])
        rows.append((S, K, dense, sparse))
        print(f"  S={S}: dense {dense:.1f} ms, HATA {sparse:.1f} ms", flush=True)
    n = torch.get_num_threads()
    print(f"\ndefault model decode step, {args.dtype}, CPU ({n} thread{'s' * (n > 1)}), median of {args.rounds} x "
          f"{args.steps} steps; HATA: {budget_label(args.budget)}, R = {hata.rbit}, n_dense {hata.n_dense}\n\n"
          "| context | K | dense ms/token | HATA ms/token | speedup |\n|---|---|---|---|---|")
    for S, K, dense, sparse in rows:
        note = f"{dense / sparse:.2f}x" if K < S else "- (K >= S: dense)"
        print(f"| {S} | {K} | {dense:.1f} | {sparse:.1f} | {note} |")
    plot_speed(args.plot, [(f"default model decode on the CPU, {args.dtype}", "ms / token (median)", "linear",
                            {"dense": [(S, d) for S, _, d, _ in rows],
                             f"HATA, {budget_label(args.budget)}": [(S, h) for S, K, _, h in rows if K < S]}, None)])


# ----------------------------------------------------------------------------------------------------------
# command line


def print_header(mode):
    """Every mode's first line (the machine, the time, torch), after the checks that need no model (memory: later)."""
    device = torch.cuda.get_device_name() if mode != "cpu" else platform.processor() or platform.machine()
    print(f"# {device}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}")


def report_plot_path(args, mode_parser):
    """report/bench_MODE.png (committed for attention and e2e) is the plot of the mode's default points (`points`:
    contexts, batches, budgets, shapes, R, preset, dtype; e2e's with --compile, as the README shows it): a run of
    other points leaves it alone and draws nothing unless given --plot. Returns (path, None) or (None, the note to
    print after the run)."""
    points = ("shapes", "seqlens", "batches", "budgets", "budget", "preset", "rbit", "dtype")
    if getattr(args, "compile", True) and all(getattr(args, k) == mode_parser.get_default(k) for k in points
                                              if hasattr(args, k)):
        return os.path.join(HERE, "report", f"bench_{args.mode}.png"), None
    return None, (f"note: not the default points{' with --compile' if args.mode == 'e2e' else ''}, so this run "
                  f"did not draw report/bench_{args.mode}.png; --plot PATH draws it")


def build_parser():
    """The parser and its modes' subparsers (each mode's defaults are its plot's points)."""
    from engine import Parser, parse_budget, positive_int, thread_count  # argparse refuses 0, negatives, '1/0'
    parser = Parser(prog="bench.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    add_mode = lambda name, text: sub.add_parser(name, help=text, description=text)  # `bench.py MODE --help` too
    p = add_mode("attention", "one layer's decode attention: dense SDPA vs the HATA step (CUDA)")
    p.add_argument("--shapes", nargs="+", default=["llama8b", "default"], choices=sorted(SHAPES),
                   help="llama8b: H=32, Hkv=8, D=128; default: the default model's H=9, Hkv=3, D=64")
    p.add_argument("--seqlens", nargs="+", type=positive_int, default=[8192, 32768, 131072], help="cached tokens S")
    p.add_argument("--batches", nargs="+", type=positive_int, default=[1, 8], help="batch sizes B")
    p.add_argument("--rbit", type=positive_int, default=128, help="hash bits R")
    p.add_argument("--reps", type=positive_int, default=50, help="timed replays per measurement (median)")
    p = add_mode("offload", "decode tokens/s with the sparse layers' KV cache in host memory (CUDA)")
    p.add_argument("--preset", default="llama-3.1-8b", choices=sorted(PRESETS), help="shape (random weights)")
    p.add_argument("--seqlen", type=positive_int, default=131072, help="S_max; every step attends at S_max - 1")
    p.add_argument("--budget", type=parse_budget, default=2048, help="HATA's K: tokens or a fraction of --seqlen")
    p.add_argument("--steps", type=positive_int, default=20, help="timed decode steps per mode (dense: a tenth, >= 2)")
    p.add_argument("--reps", type=positive_int, default=20, help="timed replays per one-layer measurement (median)")
    p.add_argument("--host-gb", type=float,
                   help="host memory the offload plan may pin (default: what is available less max(10%%, 1 GiB))")
    p = add_mode("e2e", "whole-model decode tokens/s and prefill overhead, dense vs HATA (CUDA)")
    p.add_argument("--preset", default="llama-3.1-8b", choices=sorted(PRESETS), help="shape (random weights)")
    p.add_argument("--seqlens", nargs="+", type=positive_int, default=[32768, 131072], help="cached tokens S")
    p.add_argument("--batches", nargs="+", type=positive_int, default=[1, 4], help="batch sizes B")
    p.add_argument("--budgets", nargs="+", type=parse_budget, default=BUDGETS, help="fractions like 1/64, or tokens")
    p.add_argument("--steps", type=positive_int, default=20, help="timed steps (median), also one-layer SDPA's replays")
    p.add_argument("--prefill-len", type=positive_int, default=32768, help="prompt tokens of the prefill timing")
    p.add_argument("--compile", action="store_true", help="Transformer.compile_pointwise first (both sides)")
    p.add_argument("--profile", action="store_true", help="also a kernel census of one replay of each step")
    p = add_mode("cpu", "the default model's decode ms/token on the CPU, dense vs HATA")
    p.add_argument("--seqlens", nargs="+", type=positive_int, default=[16, 1024, 4096, 8192], help="cached tokens S")
    p.add_argument("--budget", type=parse_budget, default=512,
                   help="HATA's K: tokens, or a fraction of the cache like 1/16 (an S it covers decodes densely)")
    p.add_argument("--rounds", type=positive_int, default=3, help="alternating dense / HATA rounds")
    p.add_argument("--steps", type=positive_int, default=5, help="timed steps per round")
    p.add_argument("--threads", type=thread_count, help="torch threads (default: torch's choice; 1 when other work "
                   "keeps the cores busy, where 2 spin)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="the weights' and caches' (bfloat16: faster on CPUs with bf16 instructions)")
    for mode, p in sub.choices.items():
        if mode != "offload":
            e2e = " with --compile" if mode == "e2e" else ""
            p.add_argument("--plot", help=f"PNG to write (its folder made), replacing one there: a plot is remade from "
                                          f"its run, and the tables on stdout are the record (default: "
                                          f"report/bench_{mode}.png, for a run of the default points{e2e} only)")
    return parser, sub


def main(argv=None):
    from engine import check_writable, cli
    parser, sub = build_parser()
    args = parser.parse_args(argv)
    if args.mode != "cpu" and not torch.cuda.is_available():
        parser.error(f"bench.py {args.mode} needs a CUDA GPU; on the CPU, bench.py cpu times the default model")
    mode_parser, note = sub.choices[args.mode], None  # its errors point to `bench.py MODE --help`
    # each point once; contexts and batches ascending, so the tables' rows and the plots' lines run along S
    for name in ("seqlens", "batches", "shapes", "budgets"):
        if hasattr(args, name):
            once = list(dict.fromkeys(getattr(args, name)))
            setattr(args, name, sorted(once) if name in ("seqlens", "batches") else once)
    if args.mode != "offload" and args.plot is None:
        args.plot, note = report_plot_path(args, mode_parser)
    elif args.mode != "offload":  # checked before the timings: a folder named x.png, or one that takes no file
        if not args.plot.lower().endswith(".png") or os.path.isdir(args.plot):  # (a new folder is made, as eval's)
            mode_parser.error(f"--plot {args.plot!r}: give a .png file")
    if getattr(args, "plot", None):  # the default report/ too (a read-only checkout); offload draws none
        try:
            check_writable(args.plot, "--plot")
        except OSError as e:
            mode_parser.error(str(e))
    run = {"attention": bench_attention, "offload": bench_offload, "e2e": bench_e2e, "cpu": bench_cpu}[args.mode]
    status = cli(run, args)  # e.g. a context longer than the model's: one line
    if note and status == 0:  # after the table, not before a refused run
        print(note, file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
