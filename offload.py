"""Decode with the KV cache of HATA's sparse layers in host memory: only the selected rows cross PCIe.

A HATA decode step reads the hash code of every cached token but the keys and values of only the K
tokens it selects, so a sparse layer's K/V cache can live in page-locked host memory while its hash codes, and the
dense layers' caches, stay on the GPU. `apply_offload(model, B, S_max, kv_gpu_gb=None)` plans which sparse layers
to offload and installs `HostKVCache` as their `Attention.kv_cache_cls`; call it before `model.setup_caches`, which
then allocates those caches in host memory only. model.py learns nothing else about offload (but for a warning
when `set_hata` gives an offloaded layer a policy that reads every key).

How the GPU reaches host memory: page-locked host memory (here an ordinary tensor registered with cudaHostRegister)
is mapped into the GPU's unified address space (UVA) at its host address, so a kernel can load and store it
directly, over PCIe.
`host_buffer` wraps such memory as a CUDA tensor over the same bytes, and Attention.forward runs unchanged:
  decode   the new K/V row is stored through the view by the cache_write kernel inside the CUDA graph (no host sync);
           the selection runs on the GPU from the codes (and norms); sparse_decode_attention's split kernel gathers
           the selected rows straight from host memory (zero-copy) and attends on the GPU.
  prefill  the rows are written through the view as the chunks go; a fresh prefill (every sequence from position
           0) attends over the new k, v themselves, on the GPU; a later chunk over a GPU copy of positions 0 through
           its own last one, made for that layer and dropped after it (host syncs are fine in prefill; the copy is
           at most one layer's K/V, which --kv-gpu-gb counts).
The other way to fetch, copying the selected rows into a small GPU staging buffer first (`gather_rows`, then the
ordinary kernel over the buffer: `staged_sparse_attention`), moves the same bytes; `python bench.py offload` times
both (BENCHMARKS.md). On the CPU the "far" memory is ordinary host memory and the views are the host tensors
themselves, so the same code runs (and is tested) without a GPU; engine.py takes --offload only on CUDA.
"""
import math
import mmap
import os
import sys
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import triton
import triton.language as tl

from hata_kernels import _INTERPRET, _check, _check_triton_head_dim, sparse_decode_attention
from model import KVCache, write_kv

GiB = 2**30


# --------------------------------------------------------------------------------------------------------------
# Host memory the GPU can address

class _Mapped:
    """Page-locks a host tensor where it lies and describes it by __cuda_array_interface__, so that
    torch.as_tensor(self, device=cuda) wraps its bytes as a CUDA tensor. Registered memory is mapped into the GPU's
    address space at the same address under UVA (CUDA runtime API, "Unified Addressing"). cudaHostRegister takes
    the bytes as they are, where torch's pin_memory would round each allocation up to a power of two (2 GiB for each
    1.5 GiB layer: 60 GiB instead of 45 for Llama-3.1-8B's 30 sparse layers at B=3, 128K). Every view holds this
    object, and it holds the host tensor: the memory lives as long as any view, and is unregistered before it is
    freed."""

    def __init__(self, host):
        nbytes = host.numel() * host.element_size()
        if err := int(torch.cuda.cudart().cudaHostRegister(host.data_ptr(), nbytes, 3)):  # portable | mapped
            raise RuntimeError(f"cannot page-lock {nbytes / GiB:.2f} GiB of host memory (cudaError {err}); "
                               "lower --max-seq-len or the batch")
        self.host = host
        self.__cuda_array_interface__ = {"shape": tuple(host.shape), "typestr": f"<i{host.element_size()}",
                                         "data": (host.data_ptr(), False), "strides": None, "version": 2}

    def __del__(self):
        try:
            torch.cuda.cudart().cudaHostUnregister(self.host.data_ptr())
        except Exception:  # the CUDA runtime may be gone at interpreter exit, and the process's memory with it
            pass


def host_buffer(shape, dtype, device):
    """A zeroed tensor in host memory as seen from `device`: on CUDA a view over page-locked host memory (the same
    bytes, read and written through PCIe by ordinary kernels); on the CPU the host tensor itself."""
    if device.type == "cpu":
        return torch.zeros(shape, dtype=dtype)  # zeros: masked-out rows are read too, and must not be NaN
    n = math.prod(shape) * dtype.itemsize
    pages = -(-n // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages of its own: two registrations never share one
    raw = torch.zeros(pages + mmap.PAGESIZE, dtype=torch.uint8)
    skip = -raw.data_ptr() % mmap.PAGESIZE  # (-p) % PAGESIZE: the bytes from p up to the next page boundary
    host = raw[skip:skip + pages]  # (pages,) bytes from a page boundary
    with torch.cuda.device(device):  # the current device sees the view (another would copy it)
        view = torch.as_tensor(_Mapped(host), device=device)  # described as ints: numpy has no bfloat16
    assert view.data_ptr() == host.data_ptr(), "torch copied the host memory instead of viewing it"
    return view[:n].view(dtype).view(shape)


class HostKVCache(nn.Module):
    """`Attention.kv_cache_cls` of an offloaded layer: KVCache's interface, K and V in host memory."""

    def __init__(self, B, Hkv, S_max, D, dtype, device=None, max_bytes=None):
        super().__init__()
        nbytes = 2 * B * Hkv * S_max * D * dtype.itemsize  # K and V
        if max_bytes is not None and nbytes > max_bytes:
            raise ValueError(f"an offloaded layer's K/V would take {nbytes} bytes of host memory, but the offload "
                             f"plan allowed {max_bytes}: call apply_offload again for this batch and length")
        device = torch.device(device or "cpu")
        kv = host_buffer((2, B, Hkv, S_max, D), dtype, device)  # one allocation, one registration
        # plain attributes, not buffers: model.to() must never copy them onto the GPU
        self.k, self.v = kv[0], kv[1]  # (B, Hkv, S_max, D) each, in host memory

    def update(self, pos, k, v):
        """pos (B, T); k, v (B, Hkv, T, D) on the model's device. Returns what Attention.forward attends over."""
        write_kv(k, v, self.k, self.v, pos)  # store kernels writing through PCIe: no host sync, graph-safe
        T = k.shape[2]
        if T == 1:  # decode: forward reads only the selected rows (or every row, if this layer decodes densely)
            return self.k, self.v
        if bool((pos[:, 0] == 0).all()):  # fresh prefill: positions 0..T-1 are exactly k, v
            return k, v
        end = int(pos.max()) + 1  # a later prefill chunk: forward attends up to here (Transformer.forward's S)
        # on CUDA: one GPU copy, read over PCIe. A clone, not .contiguous(): a slice to S_max is contiguous already,
        # and .contiguous() would return the host view itself, which attention would then read over PCIe
        clone = partial(torch.clone, memory_format=torch.contiguous_format)
        return clone(self.k[:, :, :end]), clone(self.v[:, :, :end])  # (B, Hkv, S, D) each


# --------------------------------------------------------------------------------------------------------------
# The memory plan

@dataclass
class OffloadPlan:
    layers: list  # indices of the layers whose K/V live in host memory
    layer_bytes: int  # K + V of one layer
    gpu_bytes: int  # what the KV cache keeps on the GPU: the other layers' K/V and the sparse layers' codes (if any)
    host_bytes: int  # what the offloaded layers take in host memory
    copy_bytes: int = 0  # a later prefill chunk's GPU copy of one offloaded layer (none for a fresh one-chunk prompt)

    def __str__(self):
        n = len(self.layers)
        return (f"offload: K/V of {n} sparse layer{'s' * (n != 1)} in host memory ({self.host_bytes / GiB:.2f} GiB); "
                f"KV cache on the GPU {self.gpu_bytes / GiB:.2f} GiB (the layers kept there, hash codes)"
                + (f", + {self.copy_bytes / GiB:.2f} GiB while a later prefill chunk copies one back"
                   if self.copy_bytes else ""))


CGROUP_FILES = [("memory.max", "memory.current", "inactive_file "),  # v2: cap, use, reclaimable page cache
                ("memory.high", "memory.current", "inactive_file "),  # v2's throttle: past it the kernel reclaims hard
                ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file ")]  # v1
HOST_KEEP_SHARE, HOST_KEEP_MIN = 0.1, GiB  # of the available host memory, what offload leaves to the rest


def host_available(meminfo="/proc/meminfo", cgroup=None):
    """Bytes of host memory available now: MemAvailable, or less where this process's cgroup (a container, a
    systemd or Slurm scope) or one above it caps memory below that (its cap - its use + its reclaimable page cache;
    cgroup v2's memory.max and memory.high, or v1's limit); None (unknown) where /proc/meminfo is missing."""
    try:
        with open(meminfo) as f:
            free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None
    for path in [cgroup] if cgroup else _own_cgroups():
        while path != os.path.dirname(path):  # this cgroup, then each one above it (a file missing: no cap there)
            for cap_file, used_file, cache in CGROUP_FILES:
                try:
                    with open(f"{path}/{cap_file}") as f, open(f"{path}/{used_file}") as g, \
                            open(f"{path}/memory.stat") as h:
                        cap, used = f.read().strip(), int(g.read())
                        reclaimable = next(int(line.split()[1]) for line in h if line.startswith(cache))
                    if cap != "max":  # v2's "no cap"; v1 writes it as ~2^63, which min() ignores
                        free = max(0, min(free, int(cap) - used + reclaimable))
                except (OSError, ValueError, StopIteration):
                    pass
            path = os.path.dirname(path)
    return free


def _own_cgroups(table="/proc/self/cgroup"):
    """This process's memory cgroups as directories: v2's ("0::/path" in /proc/self/cgroup) and v1's memory
    controller ("4:memory:/path"); a hybrid system has both."""
    try:
        with open(table) as f:
            lines = [parts for line in f if len(parts := line.rstrip("\n").split(":", 2)) == 3]
    except OSError:
        return []
    return ([f"/sys/fs/cgroup{path}" for n, _, path in lines if n == "0"] +
            [f"/sys/fs/cgroup/memory{path}" for _, kinds, path in lines if "memory" in kinds.split(",")])


def copy_bytes(layer_bytes, max_seq_len, copy_len=None):
    """Bytes of a later prefill chunk's GPU copy of an offloaded layer (HostKVCache.update: its K/V up to the chunk's
    end): copy_len positions of max_seq_len (None: all; 0: a one-chunk prompt, which makes no copy)."""
    return layer_bytes * min(max_seq_len if copy_len is None else copy_len, max_seq_len) // max_seq_len


def plan_offload(model, max_batch_size, max_seq_len, kv_gpu_gb=None, host_limit=None, copy_len=None):
    """Which sparse layers to offload so that the KV cache's GPU part fits kv_gpu_gb (None: offload every sparse
    layer). Refuses with one line an offload that gains nothing (no sparse layer, a budget covering the cache, a
    selector other than hash), a GPU part that cannot fit, and host memory (host_limit, default what host_available()
    finds less HOST_KEEP_*) that cannot hold the offloaded layers. copy_len: the prompt's positions that a later
    prefill chunk copies back from an offloaded layer (copy_bytes; engine.py: chunk_copy's)."""
    args, hata = model.args, model.hata
    sparse = [i for i, layer in enumerate(model.layers) if layer.attention.hata is not None]
    if not sparse and kv_gpu_gb is None:  # (with a cap, a dense model is only checked against it)
        raise ValueError("nothing to offload: no layer decodes sparsely (--dense, or --n-dense covers every layer)")
    layer_bytes, code_bytes = model.cache_bytes(max_batch_size, max_seq_len)
    all_gpu = args.n_layers * layer_bytes + code_bytes  # the whole KV cache on the GPU
    copy = copy_bytes(layer_bytes, max_seq_len, copy_len)
    if kv_gpu_gb is None:  # --offload: every sparse layer
        n, fix = len(sparse), "drop --offload"
    else:  # --kv-gpu-gb: the fewest sparse layers that bring the GPU part under the cap
        if not (math.isfinite(kv_gpu_gb) and kv_gpu_gb > 0):
            raise ValueError(f"--kv-gpu-gb must be a positive number of GiB, got {kv_gpu_gb}")
        cap = int(min(kv_gpu_gb * GiB, 2 ** 62))  # (1e300 GiB: no cap, not an overflow)
        # A prefill chunk after the first attends over a GPU copy of an offloaded layer's K/V (HostKVCache.update),
        # so while any layer is offloaded the cap holds that copy too (a whole layer's for a prompt that fills it).
        n = 0 if all_gpu <= cap else min(len(sparse), math.ceil((all_gpu + copy - cap) / layer_bytes))
        fix = f"raise --kv-gpu-gb to {math.ceil((all_gpu + 1) / GiB * 1000) / 1000:g} (nothing offloaded)"  # up
    if n and hata.budget_tokens(max_seq_len) >= max_seq_len:  # (with --kv-gpu-gb too: such layers never select)
        raise ValueError(f"offloading gains nothing: the budget covers the whole {max_seq_len}-token cache, so every "
                         f"step is dense and would read all of K/V from host memory; lower --budget or {fix}")
    if n and hata.selector != "hash":
        raise ValueError(f"offload fetches only the rows HATA's hash codes select; the {hata.selector} selector "
                         f"reads every key each step, all of it over PCIe: use --selector hash, or {fix}")
    copy = copy if n else 0  # (nothing offloaded: nothing copied back)
    gpu = all_gpu - n * layer_bytes + copy  # the KV cache's GPU part at its largest
    if kv_gpu_gb is not None and gpu > cap:
        chunk = " and a later prefill chunk's copy of one offloaded layer" * bool(copy)
        held = (f"even with all {n} sparse layers offloaded (dense layers, hash codes{chunk})" if sparse else
                "and no layer decodes sparsely, so none can be offloaded")
        raise ValueError(f"the KV cache needs {gpu} bytes on the GPU {held}, but --kv-gpu-gb {kv_gpu_gb} allows {cap} "
                         "bytes; raise it, or lower --max-seq-len or the batch")
    layers = sparse[len(sparse) - n:]  # the last ones: any would do, every layer costs the same
    need, where = n * layer_bytes, "are available"
    found = host_available() if host_limit is None else None  # (None: no /proc/meminfo, not checked)
    if found is not None:
        # page-locked memory cannot be swapped or reclaimed: leave the machine some room
        host_limit = int(max(0, found - max(HOST_KEEP_SHARE * found, HOST_KEEP_MIN)))
        where = (f"may be pinned ({found / GiB:.2f} GiB available; {HOST_KEEP_SHARE:.0%}, at least "
                 f"{HOST_KEEP_MIN / GiB:g} GiB, stays free)")
    if host_limit is not None and not need <= host_limit:  # (a NaN cap refuses too)
        raise ValueError(f"offloading the K/V of {n} layers needs {need} bytes of host memory ({need / GiB:.2f} "
                         f"GiB) but {host_limit} bytes ({host_limit / GiB:.2f} GiB) {where}; lower "
                         f"--max-seq-len or the batch")
    return OffloadPlan(layers, layer_bytes, all_gpu - n * layer_bytes, need, copy)


def apply_offload(model, max_batch_size, max_seq_len, kv_gpu_gb=None, host_limit=None, copy_len=None):
    """Plan, then make the planned layers allocate their K/V in host memory at the next setup_caches (call it
    before setup_caches so the GPU never holds them). Returns the plan."""
    plan = plan_offload(model, max_batch_size, max_seq_len, kv_gpu_gb, host_limit, copy_len)
    host_cache = partial(HostKVCache, max_bytes=plan.layer_bytes)  # a larger setup_caches needs a new plan
    for i, layer in enumerate(model.layers):
        layer.attention.kv_cache_cls = host_cache if i in plan.layers else KVCache
    return plan


def offload_from_args(model, args, max_batch_size, max_seq_len, copy_len=None):
    """engine.py's hook, before setup_caches: --offload offloads every sparse layer, --kv-gpu-gb GiB only as many
    as the cap needs (copy_len: see plan_offload). Prints the plan to stderr."""
    if args.offload or args.kv_gpu_gb is not None:
        print(apply_offload(model, max_batch_size, max_seq_len, args.kv_gpu_gb, copy_len=copy_len), file=sys.stderr)


# --------------------------------------------------------------------------------------------------------------
# The staged fetch (bench.py offload compares it): copy the selected rows into a GPU buffer, then attend there

@triton.jit
def _gather_rows_kernel(
    k_ptr, v_ptr, idx_ptr, ks_ptr, vs_ptr,  # k/v (B, Hkv, S_max, D) far, idx (B, Hkv, K), ks/vs (B, Hkv, K, D)
    Hkv, K,
    skb, skh, sks, svb, svh, svs,
    D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)                                           # b * stride may pass 2^31
    h = pid_bh % Hkv
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                                # (BLOCK_N,) slots
    d = tl.arange(0, D)                                                        # (D,)
    rows = tl.load(idx_ptr + pid_bh * K + n, mask=n < K, other=-1)             # (BLOCK_N,) int32
    used = rows >= 0                                                           # (BLOCK_N,); k, v: (BLOCK_N, D)
    rows = tl.where(used, rows, 0).to(tl.int64)
    k = tl.load(k_ptr + b * skb + h * skh + rows[:, None] * sks + d[None, :], mask=used[:, None], other=0.0)
    v = tl.load(v_ptr + b * svb + h * svh + rows[:, None] * svs + d[None, :], mask=used[:, None], other=0.0)
    out = (pid_bh.to(tl.int64) * K + n)[:, None] * D + d[None, :]              # (BLOCK_N, D) staging offsets
    tl.store(ks_ptr + out, k, mask=n[:, None] < K)
    tl.store(vs_ptr + out, v, mask=n[:, None] < K)


def gather_rows(k_far, v_far, idx, use_triton=None):
    """Copy the K/V rows that idx selects out of far (host) memory into buffers on idx's device (the kernel where
    idx is on CUDA, unless use_triton says). k_far, v_far (B, Hkv, S_max, D), unit stride along D; idx (B, Hkv, K)
    int32 in [0, S_max) (not checked: a host sync), -1 = unused. Returns k_sel, v_sel (B, Hkv, K, D) (zeros in
    unused slots) and local (B, Hkv, K) int32, their own index: local[..., n] = n where idx holds a row, else -1."""
    _check(idx.dim() == 3 and idx.dtype == torch.int32 and k_far.dim() == 4 and v_far.shape == k_far.shape
           and k_far.shape[:2] == idx.shape[:2] and k_far.stride(3) == v_far.stride(3) == 1,  # (the kernel's reads)
           f"gather_rows: k_far, v_far must be (B, Hkv, S_max, D), unit stride along D, and idx (B, Hkv, K) int32; "
           f"got {tuple(k_far.shape)}, {tuple(v_far.shape)} (strides {k_far.stride()}, {v_far.stride()}) and "
           f"{idx.dtype} {tuple(idx.shape)}")
    (B, Hkv, K), D = idx.shape, k_far.shape[-1]
    local = torch.where(idx >= 0, torch.arange(K, dtype=torch.int32, device=idx.device), -1)  # (B, Hkv, K) int32
    if use_triton is None:
        use_triton = idx.is_cuda
    if not use_triton:  # torch's gather
        gi = idx.clamp(min=0).long()[..., None].expand(B, Hkv, K, D)  # (B, Hkv, K, D)
        keep = (idx >= 0)[..., None]  # (B, Hkv, K, 1) bool: zeros, whatever row 0 holds (a NaN * 0 is NaN)
        return torch.where(keep, k_far.gather(2, gi), 0), torch.where(keep, v_far.gather(2, gi), 0), local
    _check_triton_head_dim(D, "gather_rows")  # (tl.arange's tile: else the interpreter's or compiler's own error)
    k_sel, v_sel = (torch.empty(B, Hkv, K, D, dtype=t.dtype, device=idx.device) for t in (k_far, v_far))  # staging
    block_n = 64 if not _INTERPRET else max(16, min(64, triton.next_power_of_2(K)))
    _gather_rows_kernel[(triton.cdiv(K, block_n), B * Hkv)](
        k_far, v_far, idx.contiguous(), k_sel, v_sel, Hkv, K, *k_far.stride()[:3], *v_far.stride()[:3],
        D=D, BLOCK_N=block_n)
    return k_sel, v_sel, local


def staged_sparse_attention(q, k_far, v_far, idx):
    """sparse_decode_attention with the staged fetch: q (B, H, D) -> (B, H, D)."""
    k_sel, v_sel, local = gather_rows(k_far, v_far, idx)
    return sparse_decode_attention(q, k_sel, v_sel, local)
