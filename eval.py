"""Does HATA keep the model's answers? Retrieval, perplexity and agreement, sparse selectors against dense.

    python eval.py --quick                      # small sizes; tests/test_eval.py runs its pieces
    python eval.py --text book.txt --name book  # book.txt's held-out part (train_hash.py's split) as the
                                                # haystack and the text; writes report/book_*
    (the full run and its results: EVAL.md)

Every score comes *out of the sparse decode path* (model.py, `Attention.sparse_decode`):
- retrieval (RULER-style, Hsieh et al. 2024): a 5-digit pass key (single), or the key of one name among four
  (multi-key), at a depth of 0-100% of the haystack, RULER's noise sentences or prose. Prompts are completions
  ("... The pass key is "): this small model fails as a chat even densely past ~1K tokens (tried before this was
  built). Score: exact match of the generated digits; a selector keeps a share of the samples dense gets right.
- perplexity: NLL of the last N tokens of held-out 8K windows, fed one by one after a prefill of the rest.
- agreement: the same pass; the share of positions where a selector's argmax equals dense's.

Prefill is dense and the same for every selector: each batch is prefilled once, then `Transformer.set_hata`
switches the policy (rehashing the cached keys) and each (selector, budget) decodes from the prefill's end,
overwriting only later positions. The prefill stops one token short, so even the first answer token is sparse.
Budgets are fractions f of the cache capacity C = the context length: K = ceil(f * C) tokens per KV head.
"""
import argparse
import contextlib
from datetime import datetime, timezone
from functools import partial
import hashlib
import itertools
import json
import math
import os
import random
import re
import shlex
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from engine import (Parser, check_writable, checkpoint_label, cli, decode_one_token, default_checkpoint, device_name,
                    file_settings, frac, note_ignored, parse_budget, path_name, plural, positive_int, prefill,
                    refuse_negative, shipped_hash_weights, show, thread_count, torch_seed, write_png, write_text)
from model import (HataArgs, check_rbit, checkpoint_metadata, from_checkpoint, key_signature, load_hash_projections,
                   write_whole)
from tokenizer import Tokenizer
from train_hash import (BUDGETS, HELD_OUT, HERE, check_hash_files, load_corpus, refuse_repeats, refuse_to_replace,
                        split_corpus, token_windows)
N_DIGITS = 5  # digits of a pass key; also the cache's slack: an answer of up to N_DIGITS + 1 tokens fits, and
# one of up to N_DIGITS tokens is decoded one step further (an answer followed by a digit is another number)
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
         "memorize it. I will quiz you about it at the end.\n\n")
NAMES = ("Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Irene", "Jack", "Laura", "Martin")
TASKS, HAYSTACKS = ("single", "multikey"), ("noise", "prose")
DEPTHS = tuple(i / 10 for i in range(11))


# --------------------------------------------------------------------------------------------------------------
# Selectors and policies: a policy is (selector name, budget fraction or None, HataArgs or None = dense)

def check_labels(budgets):  # two budgets with one label would share their results' keys (those sort together)
    fs = sorted(set(budgets))
    for a, b in zip(fs, fs[1:]):
        if frac(a) == frac(b):
            raise ValueError(f"budgets {a} and {b} are both labelled {frac(a)}: give one of them")


def pkey(name, f):  # a policy's key in the results: "dense", or "<selector> <p>/<q>" like "hata-trained 1/64"
    return name if f is None else f"{name} {frac(f)}"


def forced_only(name, f, C):  # "... sS [rR]": its sink + recent positions fill the whole budget at context C
    m = re.search(r" s(\d+)(?: r(\d+))?$", name)
    return m is not None and int(m[1]) + int(m[2] or 0) >= HataArgs(budget=f).budget_tokens(C)


def selectors(hash_weights, quest, which=("oracle", "trained", "random", "quest"), sink=0, **hata):
    """name -> HataArgs keywords (the budget is added per policy). quest: [(n_sink, n_recent)]; `sink`: the
    first positions oracle and HATA always select (none by default); `hata`: rbit and n_dense, for every one."""
    tag, kw = (f" s{sink}", dict(n_sink=sink, **hata)) if sink else ("", hata)
    out = {"oracle" + tag: dict(selector="oracle", **kw)} if "oracle" in which else {}
    if hash_weights and "trained" in which:
        out["hata-trained" + tag] = dict(selector="hash", hash_weights=hash_weights, **kw)
    if "random" in which:  # seeded Gaussian projections: plain LSH
        out["hata-random" + tag] = dict(selector="hash", hash_weights=None, **kw)
    for q_sink, q_recent in quest if "quest" in which else ():  # Quest's own sink and recent window
        out[f"quest s{q_sink} r{q_recent}"] = dict(selector="quest", n_sink=q_sink, n_recent=q_recent, **hata)
    return out


def policies(sels, budgets, quest_budgets=()):
    """Dense once, then every selector at every budget; Quest also at `quest_budgets` (it needs larger ones)."""
    pols = [("dense", None, None)]
    for name, kw in sels.items():
        fs = sorted(set(budgets) | set(quest_budgets if kw["selector"] == "quest" else ()), reverse=True)
        pols += [(name, f, HataArgs(budget=f, **kw)) for f in fs]
    return pols


# --------------------------------------------------------------------------------------------------------------
# Shared machinery: one dense prefill, then a decode per policy

@torch.inference_mode()
def decode(model, tokens, pos0, steps, expect=None):
    """Run `steps` decode steps under the model's current policy from positions pos0 (B,). Step i feeds
    tokens[:, i] while tokens (B, n_fed) has one (teacher forcing), else the argmax of step i - 1 (greedy).
    Returns the argmax (B, steps) and the log-probabilities (B, n_fed - 1) the steps gave to tokens[:, 1:].
    With `expect` (B, steps), greedy decoding stops once every sequence has left it, token by token, and each row
    is cut after its own first token off it, whatever its batch decoded on (an answer written in other tokens than
    the key's own is scored wrong; the steps not run or cut are -1)."""
    B, n_fed = tokens.shape
    top = torch.full((B, steps), -1, dtype=torch.long, device=tokens.device)
    logp, cur = [], tokens[:, 0]
    for i in range(steps):
        logits = decode_one_token(model, cur, pos0 + i)  # (B, V)
        top[:, i] = logits.argmax(-1)  # (B,) greedy choice, also what agreement compares
        if i + 1 < n_fed:
            cur = tokens[:, i + 1]
            logp.append(logits.log_softmax(-1).gather(1, cur[:, None])[:, 0])  # (B,) log p of the next fed token
        else:
            cur = top[:, i]
        if expect is not None and bool((top[:, :i + 1] != expect[:, :i + 1]).any(1).all()):
            break  # every row has left its answer: the rest of the steps would be cut anyway
    if expect is not None:  # as if each row ran alone: its batch may have decoded on past the row's first miss
        off = top != expect  # (B, steps) bool: True where it differs from the answer
        top = top.masked_fill(off.cumsum(1) > off.long(), -1)  # (B, steps): -1 after each row's first miss
    return top, torch.stack(logp, 1) if logp else torch.zeros(B, 0)


@torch.inference_mode()
def run_policies(model, tokens, n_prefill, steps, capacity, pols, expect=None, bar=None):
    """tokens (B, T): prefill the first n_prefill densely, once; then for each policy decode `steps` steps
    feeding tokens[:, n_prefill:] (a tqdm `bar` moves one a policy), the sparse ones stopping at `expect` (decode);
    dense decodes every step, so what it wrote is kept whole (scored the same: a cut keeps the first token off the
    answer, and parse_digits reads only the first digits). Returns {(name, budget): (argmax (B, steps), logp
    (B, T - n_prefill - 1))}."""
    B, dev = tokens.shape[0], model.output.weight.device
    tokens, expect = tokens.to(dev), None if expect is None else expect.to(dev)
    model.setup_caches(B, capacity)
    pos0 = torch.full((B,), n_prefill, device=dev)  # (B,) prefill's prompt lengths = decode's first position
    prefill(model, tokens[:, :n_prefill], pos0, progress=True)
    model.warned_random_projections = True  # hata-random is random by design: no warning
    out = {}
    for name, f, hata in pols:
        model.set_hata(hata)
        out[(name, f)] = tuple(t.cpu() for t in decode(model, tokens[:, n_prefill:], pos0, steps,
                                                        None if hata is None else expect))
        if bar is not None:
            bar.update()
    model.set_hata(None)  # leave the model dense
    return out


# --------------------------------------------------------------------------------------------------------------
# Text: RULER's noise sentences, held-out prose (train_hash.py's corpus split), or the user's files

class Haystack:
    """A long token stream and where its sentences end (needles go only between sentences)."""

    def __init__(self, tok, text, what="the haystack text"):
        self.ids, self.what = tok.encode(text, bos=False), what
        self.ends = [i + 1 for i, t in enumerate(self.ids) if tok.decode([t]).rstrip().endswith((".", "!", "?"))]
        if not self.ends:  # (an empty --text, or spaces only: said so)
            raise ValueError(f"{what} is empty" if not text.strip() else f"{what} has no sentence end (. ! ?), so no "
                             "place between sentences for a needle")

    def piece(self, n, rng):
        """n consecutive tokens starting after a sentence end, and the sentence ends in them (0; n if it is one)."""
        if len(self.ids) < n:
            raise ValueError(f"{self.what} has {len(self.ids)} tokens, fewer than the {n} needed; give more text")
        s = rng.choice([0] + [e for e in self.ends if e + n <= len(self.ids)])
        return self.ids[s:s + n], [0] + [e - s for e in self.ends if s < e <= s + n]


# --------------------------------------------------------------------------------------------------------------
# Retrieval

def continuation(tok, text):
    """text's ids as they continue a sentence (after '.'): encoded alone, a sentencepiece model would open them with
    its word-start '▁', a second space before ' The pass key' and a stray one before '\n\n'."""
    alone, full = tok.encode(".", bos=False), tok.encode("." + text, bos=False)
    return full[len(alone):] if full[:len(alone)] == alone else tok.encode(text, bos=False)  # '.' + '\n' merged


def retrieval_prompt(tok, hay, task, length, depth, rng):
    """A prompt of exactly `length` tokens: intro, haystack with the needle(s), completion question.
    Returns (ids, answer digits, the answer's tokens as they follow the prompt). The target needle sits at the
    sentence boundary nearest to `depth`."""
    key = str(rng.randrange(10 ** (N_DIGITS - 1), 10 ** N_DIGITS))
    if task == "single":
        needles = [(depth, f" The pass key is {key}. Remember it. {key} is the pass key.")]
        question = "\n\nThe pass key is "
    else:
        names = rng.sample(NAMES, 4)
        needles = [(depth, f" The pass key for {names[0]} is {key}.")]
        needles += [(rng.random(), f" The pass key for {n} is {rng.randrange(10 ** (N_DIGITS - 1), 10 ** N_DIGITS)}.")
                    for n in names[1:]]
        question = f"\n\nThe pass key for {names[0]} is "
    # the question, and the answer as it continues the question: encoded alone, sentencepiece would give the key
    # a leading '▁' (the question's last token); a tokenizer that joins a space to digits takes the space from it
    after, asked = continuation(tok, question + key), continuation(tok, question)
    n = next((i for i, (x, y) in enumerate(zip(after, asked)) if x != y), len(asked))  # the common prefix
    head, tail, answer = tok.encode(INTRO), after[:n], after[n:]
    needle_ids = [(d, continuation(tok, t)) for d, t in needles]  # the prompt's only BOS (if any) leads head
    n_hay = length - len(head) - len(tail) - sum(len(ids) for _, ids in needle_ids)
    if n_hay < 0:
        raise ValueError(f"a {task} retrieval prompt needs more than {length} tokens; raise --contexts")
    piece, ends = hay.piece(n_hay, rng)
    at = [min(ends, key=lambda e: abs(e - d * n_hay)) for d, _ in needle_ids]
    body, last = [], 0
    for a, (_, ids) in sorted(zip(at, needle_ids), key=lambda x: x[0]):
        body += piece[last:a] + ids
        last = a
    return head + body + piece[last:] + tail, key, answer  # exactly `length` tokens


def parse_digits(text):
    """The first run of digits in generated text ('' if none): ' 71432.' -> '71432'."""
    return (re.findall(r"\d+", text) or [""])[0]


def retrieval_specs(counts, seed):
    """{context: n samples} -> [(context, task, haystack, depth, seed)]. Sample i cycles tasks with period 2,
    haystacks 4 and depths 11: every 11 consecutive samples cover the 11 depths once, and tasks and haystacks
    stay balanced. Seeds are 2**32 apart: seed 0's streams are the committed runs', and no other seed's meets them
    below ~4M tokens of context (with `seed + 1000 * C + i`, seed N's sample i was seed 0's sample i + N)."""
    return [(C, TASKS[i % 2], HAYSTACKS[(i // 2) % 2], DEPTHS[i % len(DEPTHS)], seed * 2 ** 32 + 1000 * C + i)
            for C, n in counts.items() for i in range(n)]


def pad_answers(answers):
    """The answers' tokens (B, steps): as many steps as the longest takes (a tokenizer may group digits), -1 after."""
    return torch.tensor([a + [-1] * (max(map(len, answers)) - len(a)) for a in answers])


def run_retrieval(model, tok, hays, specs, pols, batch, log=None, deadline=math.inf):
    """Prefill each batch of same-length prompts once, decode the answer under every policy; a batch expected to
    end after `deadline` (time.time()) is skipped. Returns one record per sample: spec, answer, {policy: correct}."""
    # lengths interleave (batch i of n runs (i + 1/2) / n of the way): saved or cut-short results cover each length
    groups = []
    for C in sorted({s[0] for s in specs}):
        same = [s for s in specs if s[0] == C]
        n = -(-len(same) // batch)  # batches of this length: ceil(len(same) / batch)
        groups += [((i + 0.5) / n, C, same[i * batch:(i + 1) * batch]) for i in range(n)]
    records, took = [], {}  # took: context -> seconds its last batch took
    bar = tqdm(total=len(groups) * len(pols), desc="retrieval", unit="policy")  # batches x policies
    for _, _, group in sorted(groups):
        C, t0 = group[0][0], time.time()
        # expected time: this length's last batch, else another's scaled by the length (prefill is superlinear)
        guess = took.get(C) or max((t * (C / c) ** 1.2 for c, t in took.items()), default=0)
        if t0 + guess > deadline:
            bar.total -= len(pols)  # skipped: the bar counts what runs
            bar.refresh()
            continue
        prompts = [retrieval_prompt(tok, hays[h], task, C - N_DIGITS, d, random.Random(sd))
                   for _, task, h, d, sd in group]
        tokens = torch.tensor([ids for ids, _, _ in prompts])  # (B, C - N_DIGITS): the cache holds the answer too
        expect = pad_answers([answer for _, _, answer in prompts])  # (B, steps): one per token of the answer
        if expect.shape[1] > N_DIGITS + 1:  # the prompt is C - N_DIGITS tokens, and prefill stops one short
            raise ValueError(f"the tokenizer spends {expect.shape[1]} tokens on a {N_DIGITS}-digit key; the cache "
                             f"leaves room for {N_DIGITS + 1}: retrieval cannot score it (use --tasks perplexity)")
        # one step past the longest answer where the cache has room: a digit after the key makes another number
        expect = F.pad(expect, (0, int(expect.shape[1] <= N_DIGITS)), value=-1)  # (B, steps + 1) if the cache has room
        out = run_policies(model, tokens, tokens.shape[1] - 1, expect.shape[1], C, pols, expect, bar)
        for b, ((_, task, h, d, sd), (_, key, answer)) in enumerate(zip(group, prompts)):
            rows = {pkey(name, f): [t for t in top[b].tolist() if t >= 0] for (name, f), (top, _) in out.items()}
            got = {k: parse_digits(tok.decode(row)) for k, row in rows.items()}
            # right: the key's own tokens, then no digit; the text alone could read right from another split of the
            # digits ('12345' as one token where the key's are '123' '45': the first token off it, which is kept)
            records.append({"context": C, "task": task, "haystack": h, "depth": d, "answer": key, "seed": sd,
                            "correct": {k: got[k] == key and rows[k][:len(answer)] == answer for k in rows},
                            "dense_output": got["dense"]})
        took[C] = time.time() - t0
        if log:
            log(records)
    bar.close()
    if len(records) < len(specs):
        print(f"time limit: {len(records)} of {len(specs)} retrieval samples done", file=sys.stderr)
    return records


def kept(records, key):
    """(share of the dense-correct samples that `key` also gets right (nan if none), number of them)."""
    base = [r for r in records if r["correct"]["dense"]]
    return sum(r["correct"][key] for r in base) / len(base) if base else math.nan, len(base)


# --------------------------------------------------------------------------------------------------------------
# Perplexity and agreement: one teacher-forced decode pass per policy gives both

def run_teacher_forced(model, windows, n_score, pols, batch, log=None):
    """NLL of the last n_score tokens of each window (W, C) under every policy, and top-1 agreement with dense.
    Returns {policy key: {"nll": mean NLL, "ppl": exp(nll), "agree": share of positions, "positions": count}};
    log(the result so far) after every batch."""
    C, tops, nlls, res = windows.shape[1], {}, {}, {}
    bar = tqdm(total=-(-len(windows) // batch) * len(pols), desc="perplexity", unit="policy")  # batches x policies
    for i in range(0, len(windows), batch):  # prefill stops a token short: step 0 feeds it, predicting the first scored
        out = run_policies(model, windows[i:i + batch], C - n_score - 1, n_score, C, pols, bar=bar)
        for (name, f), (top, logp) in out.items():
            tops.setdefault(pkey(name, f), []).append(top)  # (b, n_score) argmax at each scored position
            nlls.setdefault(pkey(name, f), []).append(-logp)  # (b, n_score) NLL of the last n_score tokens
        dense_top = torch.cat(tops["dense"])  # (windows so far, n_score)
        for k in tops:
            nll = torch.cat(nlls[k]).double().mean().item()
            res[k] = {"nll": nll, "ppl": math.exp(nll), "positions": dense_top.numel(),
                      "agree": (torch.cat(tops[k]) == dense_top).double().mean().item()}
        if log:
            log(res)
    bar.close()
    return res


# --------------------------------------------------------------------------------------------------------------
# Report: markdown tables and one plot

def load_results(path):
    """An earlier run's results file; one clear error for a corrupt or foreign one."""
    try:
        with open(path, encoding="utf-8") as f:
            results = json.load(f)
    except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, a 5000-digit number, nesting 10^5 deep
        raise ValueError(f"{path} is not a JSON file eval.py wrote ({e})") from None
    except FileNotFoundError:
        raise FileNotFoundError(f"results file not found: {path}") from None
    except IsADirectoryError:
        files = os.path.join(path, "*.json")
        raise ValueError(f"{path} is a directory; pass the results files in it ({files})") from None
    if not (isinstance(results, dict) and {"command", "selectors", "budgets", "seconds"} <= set(results)):
        raise ValueError(f"{path} is not a results file of eval.py")
    number = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
    if not (isinstance(results["budgets"], list) and all(number(f) and 0 < f < 1 for f in results["budgets"])
            and isinstance(results["selectors"], list) and all(isinstance(s, str) for s in results["selectors"])
            and isinstance(results["seconds"], dict) and all(map(number, results["seconds"].values()))):
        raise ValueError(f"{path}: its budgets (fractions in (0, 1)), selectors (names) or seconds are damaged")
    if results.get("perplexity") and "ppl_context" not in results:  # the report states the perplexity's context
        raise ValueError(f"{path} has perplexity results but no ppl_context (an older file): add \"ppl_context\": N")
    whole = lambda x: type(x) is int and x >= 0
    counts = ("ppl_context", "retrieval_planned", "perplexity_planned", "noise_context")
    started = results.get("started", [])  # when each of its runs started (files before 2026-12-06: none)
    if not (isinstance(results["command"], str) and all(whole(results[k]) for k in counts if k in results)
            and isinstance(started, list) and all(isinstance(t, str) for t in started)):
        raise ValueError(f"{path}: its command or start times (text), ppl_context or planned counts (whole numbers) "
                         "are damaged")
    recs, ppl = results.get("retrieval", []), results.get("perplexity", {})  # what report() and merge() read
    fields = {"context", "task", "haystack", "depth", "answer", "correct"}
    if not (isinstance(recs, list) and all(isinstance(r, dict) and fields <= set(r) and isinstance(r["correct"], dict)
                                           and "dense" in r["correct"] and whole(r["context"]) and number(r["depth"])
                                           and all(isinstance(r[k], str) for k in ("task", "haystack", "answer"))
                                           and type(r.get("seed", 0)) is int  # (merge's keys: hashable)
                                           and all(type(c) is bool for c in r["correct"].values()) for r in recs)
            and isinstance(ppl, dict) and (not ppl or "dense" in ppl)
            and all(isinstance(v, dict) and {"nll", "ppl", "agree", "positions"} <= set(v) and number(v["ppl"])
                    and v["ppl"] > 0 and all(map(number, (v["nll"], v["agree"], v["positions"])))
                    for v in ppl.values())):
        raise ValueError(f"{path}: a retrieval or perplexity record lacks what the report reads (a damaged file?)")
    return results


def merge(runs):
    """One results dict from several runs of one setup (model and its weights, held-out text, rbit where both runs
    have a HATA selector, n_dense: else refused). Retrieval samples are joined by their spec: runs over the same
    samples add selectors, runs with another seed add samples; a sample counts once every policy has run on it; where
    two runs hold the same policy's result, the first run's counts (where their trained projections differ, none of
    the second's). Perplexity runs must share their windows (the same dense pass) and context, which the merge
    records."""
    ppl_contexts = {r["ppl_context"] for r in runs if r.get("perplexity")}  # a retrieval-only run records one too
    if len(ppl_contexts) > 1:
        raise ValueError(f"the runs' perplexity contexts differ ({sorted(ppl_contexts)}): not the same windows")
    if len({r.get("needle_rule", 1) for r in runs if r.get("retrieval")}) > 1:  # 2: none mid-sentence (2026-12-03)
        raise ValueError("the runs place needles by different rules (before 2026-12-03 the ones at depth 100% went "
                         "mid-sentence): one sample's spec would join two prompts")
    noise = {r.get("noise_context", max(x["context"] for x in r["retrieval"])) for r in runs if r.get("retrieval")}
    if len(noise) > 1:  # a seed's piece of the noise haystack depends on the haystack's size
        raise ValueError(f"the runs' noise haystacks were sized for different contexts ({sorted(noise)}): one "
                         "sample's spec would join two prompts")
    planned = max((r.get("perplexity_planned", 0) for r in runs if r.get("perplexity")), default=0)  # (one pass)
    # a run with hata-trained: "hata-trained", or with --sink 4 "hata-trained s4"
    out, trained = runs[0], lambda x: any(s.split(" ")[0] == "hata-trained" for s in x["selectors"])
    for r in runs[1:]:
        out.pop("retrieval_planned", None)  # one run's plan: a merge of runs has none
        out.pop("retrieval_cut", None)
        known = {k: out.get(k) or r.get(k) for k in ("model", "weights", "text")}  # older files lack some: any
        hashes = lambda x: any(s.startswith("hata-") for s in x["selectors"])  # else its rbit reads no codes
        rbit = next((x.get("rbit", 128) for x in (out, r) if hashes(x)), None)  # (files before 2026-12-06: 128)
        setup = lambda x: tuple(x.get(k) or v for k, v in known.items()) + (x.get("rbit", 128) if hashes(x) else rbit,
                                                                            x.get("n_dense", 2))
        if setup(r) != setup(out):
            raise ValueError(f"the runs differ in model, weights, text, rbit or n_dense ({setup(out)}, {setup(r)}): "
                             "their rows would mix two setups")
        out["rbit"] = rbit
        if trained(r) and not trained(out):  # the first run to bring it: its file
            out["hash_weights"], out["hash_digest"] = r.get("hash_weights"), r.get("hash_digest")
        files = out.get("hash_weights"), r.get("hash_weights")
        same = (out["hash_digest"] == r["hash_digest"] if out.get("hash_digest") and r.get("hash_digest")
                else files[0] == files[1])  # by content: one file by two paths (relative, the default's) is one
        if trained(out) and trained(r) and not same:
            why = f"{files[0]} changed between the runs" if files[0] == files[1] else f"hata-trained is {files[0]}'s"
            print(f"note: {why}; {files[1]}'s results are left out (one file a row)", file=sys.stderr)
            for correct in [x["correct"] for x in r.get("retrieval", [])] + [r.get("perplexity", {})]:
                for k in [k for k in correct if k.startswith("hata-trained ")]:
                    del correct[k]
        out["selectors"] += [s for s in r["selectors"] if s not in out["selectors"]]
        out["budgets"] = sorted(set(out["budgets"]) | set(r["budgets"]))
        check_labels(out["budgets"])
        out["command"] += " ; " + r["command"]
        out["started"] = out.get("started", []) + r.get("started", [])
        out["seconds"] = {k: out["seconds"].get(k, 0) + r["seconds"].get(k, 0) for k in out["seconds"] | r["seconds"]}
        if r.get("perplexity"):
            a, b = (out.get("perplexity") or r["perplexity"])["dense"], r["perplexity"]["dense"]  # ({}: none)
            if a["positions"] != b["positions"] or abs(a["nll"] - b["nll"]) > 1e-4:
                raise ValueError(f"the runs' dense perplexity passes differ ({a['positions']} positions, NLL "
                                 f"{a['nll']:.4f}; {b['positions']}, {b['nll']:.4f}): other windows, or a run stopped")
            out["perplexity"] = {**r["perplexity"], **out.get("perplexity", {})}
        both = out.get("retrieval", []) + r.get("retrieval", [])
        seeded = all("seed" in x for x in both)  # older files' samples have none
        if not seeded and any("seed" in x for x in both):
            print("note: a run without sample seeds (before 2026-12-05): samples are joined by context, task, "
                  "haystack, depth and key alone", file=sys.stderr)  # (two seeds' prompts of one key would join)
        key = lambda x: (x["context"], x["task"], x["haystack"], x["depth"], x["answer"], x["seed"] if seeded else 0)
        joined = {key(x): x for x in out.get("retrieval", [])}
        for x in r.get("retrieval", []):
            y = joined.setdefault(key(x), x)
            if y["correct"]["dense"] != x["correct"]["dense"]:
                raise ValueError(f"the runs' dense answers differ on {key(x)}")
            y["correct"] = {**x["correct"], **y["correct"]}
        out.update({k: v for k, v in known.items() if v})
        out["retrieval"] = list(joined.values())
    out.pop("perplexity_planned", None)
    if planned:  # the perplexity runs share their dense pass, so their plan too
        out["perplexity_planned"] = planned
    recs = out.get("retrieval", [])
    every = set().union(*(x["correct"] for x in recs))
    out["retrieval"] = [x for x in recs if set(x["correct"]) == every]  # a table needs every policy on every sample
    if lacking := len(recs) - len(out["retrieval"]):
        none = ("; so no retrieval table (the runs share no sample: merge runs of one --seed, --contexts and --samples)"
                if not out["retrieval"] else "")
        print(f"note: {lacking} of {len(recs)} retrieval samples lack some policy's result: left out{none}",
              file=sys.stderr)
    if ppl_contexts:
        out["ppl_context"] = ppl_contexts.pop()
    if noise:
        out["noise_context"] = noise.pop()
    return out


def report(results):
    """Markdown tables of everything in `results` (retrieval records and/or perplexity results); a budget a
    selector did not run shows as '-'."""
    names, budgets = results["selectors"], sorted(results["budgets"], reverse=True)
    md, recs, ppl = [], results.get("retrieval"), results.get("perplexity")
    head = lambda cols: ["| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
    planned = results.get("retrieval_planned", 0)  # more than ran: --minutes cut the run, or it stopped early
    why = "the --minutes limit cut the rest" if results.get("retrieval_cut") else "the run stopped before the rest"
    if not recs and planned:  # no batch ran
        md += [f"### Retrieval: 0 samples (of {planned}: {why})", ""]
    if recs:
        ran, contexts = recs[0]["correct"], sorted({r["context"] for r in recs})
        acc = lambda rs, k: f"{100 * sum(r['correct'][k] for r in rs) / len(rs):.0f}%" if rs else "-"
        pct = lambda share, digits: "-" if math.isnan(share) else f"{100 * share:.{digits}f}%"  # nan: none to keep
        cut = f" (of {planned}: {why})" if planned > len(recs) else ""
        md += [f"### Retrieval: {plural(len(recs), 'sample')}{cut}; dense accuracy", ""]
        md += head(["context", "samples"] + [f"{t} / {h}" for t in TASKS for h in HAYSTACKS] + ["all"])
        for C in contexts + [None]:
            rs = [r for r in recs if C in (None, r["context"])]
            cells = [acc([r for r in rs if (r["task"], r["haystack"]) == (t, h)], "dense") for t in TASKS
                     for h in HAYSTACKS]
            md.append(f"| {C or 'all'} | {len(rs)} | " + " | ".join(cells) + f" | {acc(rs, 'dense')} |")
        md += ["", "### Retrieval: share of the dense-correct samples each selector keeps (its accuracy in brackets)",
               ""] + head(["selector"] + [frac(f) for f in budgets])
        for name in names:
            cells = [f"{pct(kept(recs, k)[0], 1)} ({acc(recs, k)})" + "†" * any(forced_only(name, f, C)
                                                                                for C in contexts)
                     if k in ran else "-" for f, k in zip(budgets, [pkey(name, f) for f in budgets])]
            md.append(f"| {name} | " + " | ".join(cells) + " |")
        md += ["", "Kept share by context length (of n dense-correct samples):", ""]
        md += head(["selector", "budget"] + [str(C) for C in contexts])
        for name in names:
            for f in (f for f in budgets if pkey(name, f) in ran):
                cells = [f"{pct(k, 0)} of {n}" + "†" * forced_only(name, f, C) for C in contexts
                         for k, n in [kept([r for r in recs if r["context"] == C], pkey(name, f))]]
                md.append(f"| {name} | {frac(f)} | " + " | ".join(cells) + " |")
        md.append("")
    if ppl:
        d, planned = ppl["dense"], results.get("perplexity_planned", 0)
        cut = f" (of {planned}: the run stopped before the rest)" if planned > d["positions"] else ""
        md += [f"### Perplexity and top-1 agreement: {d['positions']} teacher-forced positions{cut}, context "
               f"{results['ppl_context']}; dense perplexity {d['ppl']:.3f} (NLL {d['nll']:.4f})", ""]
        md += head(["selector"] + [f"ppl {frac(f)}" for f in budgets] + [f"agree {frac(f)}" for f in budgets])
        for name in names:
            ks = [pkey(name, f) for f in budgets]
            cells = [f"{ppl[k]['ppl']:.3f} ({100 * (ppl[k]['ppl'] / d['ppl'] - 1):+.1f}%)"
                     + "†" * forced_only(name, f, results["ppl_context"]) if k in ppl else "-"
                     for f, k in zip(budgets, ks)]
            cells += [f"{100 * ppl[k]['agree']:.1f}%" if k in ppl else "-" for k in ks]
            md.append(f"| {name} | " + " | ".join(cells) + " |")
        md.append("")
    if any("†" in line for line in md):
        md += ["† sink + recent positions fill (or exceed) the budget at some of these contexts: a fixed window.", ""]
    return "\n".join(md)


def plot(results, path):
    """The report's figure at `path` (PNG): a panel per measure (retrieval kept, perplexity ratio, agreement) against
    the budget, a line per selector, dense's dashed. Returns False, writing nothing, if no panel has data."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogFormatter
    plt.switch_backend("Agg")
    panels, recs, ppl = [], results.get("retrieval"), results.get("perplexity")
    if recs and not kept(recs, "dense")[1]:  # a share of none: no retrieval panel (the table says so too)
        print("no retrieval plot: dense answered no sample right", file=sys.stderr)
    elif recs:  # (the last item: the contexts at which the tables' † is checked)
        panels.append(("retrieval: dense-correct samples kept (%)", "linear", recs[0]["correct"],
                       lambda k: 100 * kept(recs, k)[0] if k != "dense" else 100, {r["context"] for r in recs}))
    if ppl:
        panels.append(("perplexity / dense perplexity", "log", ppl, lambda k: ppl[k]["ppl"] / ppl["dense"]["ppl"],
                       {results["ppl_context"]}))
        panels.append(("top-1 agreement with dense (%)", "linear", ppl, lambda k: 100 * ppl[k]["agree"],
                       {results["ppl_context"]}))
    budgets = sorted(results["budgets"], reverse=True)
    panels = [p for p in panels if any(pkey(name, f) in p[2] for name in results["selectors"] for f in budgets)]
    if not panels:  # every retrieval batch was past the time limit, and no perplexity (or no policy's results)
        print("nothing to plot", file=sys.stderr)
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    any_fixed = False  # a hollow point anywhere: the legend says what it means
    for ax, (title, yscale, ran, score, contexts) in zip(axes[0], panels):
        for i, name in enumerate(results["selectors"]):  # each its own shape, smaller in turn: equal scores hide none
            fs = [f for f in budgets if pkey(name, f) in ran]
            line, = ax.plot([1 / f for f in fs], [score(pkey(name, f)) for f in fs], marker="osD^v<>"[i % 7],
                            ms=9 - 6 * i / max(1, len(results["selectors"]) - 1), label=name)
            fixed = [f for f in fs if any(forced_only(name, f, C) for C in contexts)]  # the tables' †: hollow
            any_fixed |= bool(fixed)
            ax.plot([1 / f for f in fixed], [score(pkey(name, f)) for f in fixed], linestyle="none",
                    marker=line.get_marker(), ms=line.get_markersize(), color=line.get_color(), mfc="white")
        ax.axhline(score("dense"), color="gray", linestyle="--", label="dense")
        ax.set_xscale("log", base=2)
        ax.set_xticks([1 / f for f in budgets], [frac(f) for f in budgets])
        ax.set(title=title, xlabel="budget K / context", yscale=yscale)
        if yscale == "log":  # plain 1.1, 1.2 (a ratio near 1 labels minor ticks, by default as 1.1x10^0)
            ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
            ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=8, title="hollow: sink + recent fill the budget (†)" * any_fixed, title_fontsize=7)
    fig.tight_layout()
    write_png(path, fig)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------------------------------
# Command line

def parse_quest(text):  # 'n_sink:n_recent' -> (n_sink, n_recent)
    if not re.fullmatch(r"\d+:\d+", text):
        raise argparse.ArgumentTypeError(f"Quest {text!r} must be n_sink:n_recent, like 16:16")
    return tuple(int(x) for x in text.split(":"))


def parse_frac(text):  # engine's budget parser, but its errors offer token counts, which eval's budgets never are
    with contextlib.suppress(argparse.ArgumentTypeError):
        if 0 < (f := float(parse_budget(text))) < 1:
            return f
    raise argparse.ArgumentTypeError(f"budget {text!r} must be a fraction of the context in (0, 1), like 1/16")


def build_parser():
    p = Parser(prog="eval.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes: minutes on 2 CPU cores")
    p.add_argument("--checkpoint", type=path_name, help="GGUF file or checkpoint directory (default: "
                   "SmolLM2-135M-Instruct)")
    p.add_argument("--text", type=path_name, nargs="+", help="text files; train_hash.py's held-out part is used "
                   "(default: its corpus)")
    p.add_argument("--hash-weights", type=path_name, help="trained projections (default: the default model's shipped "
                   "file of --rbit, --n-dense, else none; 'none': no trained)")
    p.add_argument("--budgets", type=parse_frac, nargs="+", default=list(BUDGETS), help="fractions like 1/16")
    p.add_argument("--selectors", nargs="+", choices=("oracle", "trained", "random", "quest"),
                   default=["oracle", "trained", "random", "quest"], help="which to compare with dense")
    p.add_argument("--sink", type=int, default=0, help="first positions oracle and HATA always select")
    p.add_argument("--rbit", type=int,  # checked as engine.py's: only where a HATA selector reads codes
                   help=f"hash bits (default: a --hash-weights file's own, else {HataArgs.rbit})")
    p.add_argument("--n-dense", type=int,
                   help=f"first layers dense, for every selector (default: a --hash-weights file's own, else "
                        f"{HataArgs.n_dense})")
    p.add_argument("--quest", type=parse_quest, nargs="+", default=[(16, 16)],
                   help="Quest rows, sink:recent (default: 16:16)")
    p.add_argument("--quest-budgets", type=parse_frac, nargs="*", default=[1 / 4], help="extra budgets for Quest")
    p.add_argument("--tasks", nargs="+", choices=("retrieval", "perplexity"), default=["retrieval", "perplexity"],
                   help="pass-key retrieval (kept answers); perplexity and agreement with dense on held-out text")
    p.add_argument("--contexts", type=positive_int, nargs="+", default=[1024, 2048, 4096, 8192], help="context lengths")
    p.add_argument("--samples", type=positive_int, nargs="+", default=SAMPLES,
                   help="per --contexts length (one count: for each; default lengths alone get their own counts)")
    p.add_argument("--batch", type=positive_int, default=4, help="sequences prefilled and decoded together")
    p.add_argument("--ppl-context", type=positive_int, default=8192, help="window length of the perplexity text")
    p.add_argument("--ppl-docs", type=positive_int, default=4, help="perplexity windows (one per document first)")
    p.add_argument("--ppl-tokens", type=positive_int, default=256, help="scored tokens at the end of each window")
    p.add_argument("--seed", type=torch_seed, default=0,
                   help="seed of the retrieval samples: pass keys, names, distractors, haystack pieces")
    p.add_argument("--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (fp32 either way)")
    p.add_argument("--threads", type=thread_count, default=1, help="torch threads (2 spin on 2 busy cores: 30x slower)")
    p.add_argument("--minutes", type=float, default=math.inf, help="time limit (skips late retrieval) (default: none)")
    p.add_argument("--name", type=path_name, help="output file prefix (default: eval, or eval_quick with --quick)")
    p.add_argument("--out-dir", type=path_name, default=os.path.join(HERE, "report"),
                   help="where the results and plots go")
    p.add_argument("--overwrite", action="store_true", help="replace the results of an earlier run of this --name")
    p.add_argument("--report", type=path_name, metavar="JSON", nargs="+",
                   help="only rebuild the report from results files")
    return p


SAMPLES = [120, 100, 56, 28]  # --samples' default: argparse leaves this very list where the flag is not given (run())
QUICK = dict(contexts=[1024, 2048], samples=[4, 4], ppl_context=1024, ppl_docs=2, ppl_tokens=32, quest_budgets=[])


def parse_args(argv=None):  # --quick's sizes as its defaults: a flag given explicitly is kept, even at the usual one
    p = build_parser()
    p.set_defaults(**QUICK if p.parse_known_args(argv)[0].quick else {})
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    args.command = shlex.join(sys.argv[1:] if argv is None else argv)  # the results' "command"
    return cli(run, args)


RUN_ONLY = ("--checkpoint", "--text", "--hash-weights", "--budgets", "--selectors", "--sink", "--rbit", "--n-dense",
            "--quest", "--quest-budgets", "--tasks", "--batch", "--seed", "--device", "--threads", "--minutes")
TASK_FLAGS = {"retrieval": ("--contexts", "--samples", "--minutes", "--seed"),
              "perplexity": ("--ppl-context", "--ppl-docs", "--ppl-tokens")}


def run(args):  # args from parse_args, which applies --quick's sizes
    name = args.name or ("eval_quick" if args.quick else "eval")
    defaults = build_parser()
    defaults.set_defaults(**QUICK if args.quick else {})  # --quick's sizes are not flags given
    fresh = not args.report  # a run, not a report rebuilt from results files
    note_ignored(args, defaults, [(RUN_ONLY + sum(TASK_FLAGS.values(), ()), args.report,
                                   "--report rebuilds the report from results files")]
                 + [(flags, fresh and task not in args.tasks, f"no {task} task") for task, flags in TASK_FLAGS.items()]
                 + [(("--hash-weights",), fresh and "trained" not in args.selectors, "no trained selector"),
                    (("--quest", "--quest-budgets"), fresh and "quest" not in args.selectors, "no quest selector"),
                    (("--sink",), fresh and not {"oracle", "trained", "random"} & set(args.selectors),
                     "no oracle or HATA selector: Quest's are --quest"),
                    (("--rbit",), fresh and not {"trained", "random"} & set(args.selectors),
                     "no HATA selector: oracle and Quest read no hash codes")])
    json_path = os.path.join(args.out_dir, f"{name}_results.json")
    so_far = os.path.join(args.out_dir, f"{name}_results.partial.json")  # a run's results until it ends
    own = os.path.realpath(json_path) in map(os.path.realpath, args.report or [])  # --report rebuilding from it
    outputs = [os.path.join(args.out_dir, f"{name}_{end}") for end in ("results.md", "scores.png")]  # the report's
    for path in [so_far] * fresh + [json_path] * (not own) + outputs:  # now, not after the work
        check_writable(path, "--out-dir / --name")
    scratch = args.quick and not args.name  # eval_quick_*: replaced run after run
    refuse_to_replace([json_path] + [so_far] * fresh, own or scratch or args.overwrite, "--name / --out-dir")
    refuse_to_replace(outputs, True, "--name / --out-dir")  # replaced with the results, but not where a folder stands
    if args.report:
        if own and len(args.report) > 1:  # a merge written over one of its inputs would compound on every rerun
            raise ValueError(f"--report would overwrite its input {json_path} with the merge; give --name or --out-dir")
        refuse_repeats(args.report, "--report")  # its samples and seconds twice
        runs = [load_results(path) for path in args.report]
        # a file's copy, a run's partial file beside its final one, a merge beside one of its runs: seconds twice
        for j, i in itertools.combinations(range(len(runs)), 2):
            if runs[i] == runs[j] or set(runs[i].get("started", [])) & set(runs[j].get("started", [])):
                raise ValueError(f"{args.report[i]} holds the same run as {args.report[j]} (a copy, its partial file "
                                 "or a merge of it): give each run once")
        results = merge(runs)
        return write_report(results, args.out_dir, name, None if own else json_path)
    lengths = {"--ppl-context": [args.ppl_context] if "perplexity" in args.tasks else [],
               "--contexts": args.contexts if "retrieval" in args.tasks else []}  # of the tasks that run
    if lengths["--contexts"] and min(args.contexts) < 128:
        raise ValueError(f"--contexts {min(args.contexts)} is too short: retrieval needs --contexts >= 128 (~100 "
                         "tokens of intro, needles and question)")
    samples = defaults.get_default("samples")  # (or --quick's): the very list args holds where --samples is not given
    counts = dict(zip(defaults.get_default("contexts"), samples))
    if args.samples is samples and all(c in counts for c in args.contexts):  # default lengths alone: their own counts
        args.samples = [counts[c] for c in args.contexts]
    if lengths["--contexts"] and args.samples is samples:  # a length of no default count
        raise ValueError(f"--contexts {' '.join(str(c) for c in args.contexts if c not in counts)}: no default "
                         f"--samples count for it (the defaults are for {' '.join(map(str, counts))}); give "
                         "--samples N for every length, or one count per length")
    if lengths["--contexts"] and len(args.samples) not in (1, len(args.contexts)):
        raise ValueError(f"--samples gives {len(args.samples)} counts for {len(args.contexts)} --contexts lengths: "
                         "give one count per length, or one for them all")
    args.samples = args.samples * len(args.contexts) if len(args.samples) == 1 else args.samples
    if lengths["--contexts"] and max(args.samples) > 1000:  # (and a count like 10**17 built its list for ever)
        raise ValueError(f"--samples {max(args.samples)}: at most 1000 a context length (sample i of length C draws "
                         "from seed 1000 * C + i, plus --seed * 2**32, which must stay below the next length's)")
    if lengths["--contexts"] and len(set(args.contexts)) < len(args.contexts):
        raise ValueError(f"--contexts {' '.join(map(str, args.contexts))} repeats a length: give each once")
    if lengths["--ppl-context"] and args.ppl_tokens > args.ppl_context - 2:  # run_teacher_forced's prefill: C - n - 1
        raise ValueError(f"--ppl-tokens {args.ppl_tokens} must be at most --ppl-context - 2 ({args.ppl_context - 2}): "
                         "the scored tokens follow a prompt of at least one token, which predicts the first of them")
    if lengths["--contexts"] and not args.minutes > 0:
        raise ValueError(f"--minutes {args.minutes}: retrieval needs --minutes > 0")
    fs = sorted(set(args.budgets) | set(args.quest_budgets if "quest" in args.selectors else []))
    # a step whose cache holds at most K keys decodes densely (K >= S in the model, as any top-K would): refused where
    # every scored step would (the last sees C - 1 keys), noted where the first would (C - n: --ppl-tokens, the key's)
    first = ([(C, C - args.ppl_tokens) for C in lengths["--ppl-context"]]
             + [(C, C - N_DIGITS) for C in lengths["--contexts"]])
    for (C, S), f in itertools.product(first, fs):
        if (K := HataArgs(budget=f).budget_tokens(C)) >= C - 1:
            raise ValueError(f"budget {frac(f)} of a {C}-token context keeps every key a scored step sees "
                             f"({C - 1} at most): it would decode densely under a sparse label")
        if K >= S:
            steps = "first scored step" if K == S else f"first {K - S + 1} scored steps"
            print(f"note: budget {frac(f)} of a {C}-token context is {K} tokens, which covers the keys of the "
                  f"{steps} of each window or sample: decoded densely (budgets of at most {frac((S - 1) / C)}, "
                  f"{S - 1} tokens, keep every scored step sparse)", file=sys.stderr)
    refuse_negative(sink=args.sink, n_dense=args.n_dense)
    check_labels(args.budgets + args.quest_budgets)
    trained = "trained" in args.selectors and args.hash_weights != "none"  # the default model's shipped file by default
    hashing = {"trained", "random"} & set(args.selectors)  # else --rbit is noted as ignored, not checked (engine's)
    rbit, n_dense = file_settings(args.hash_weights if trained else None, args.rbit if hashing else None, args.n_dense)
    hata = dict(rbit=rbit, n_dense=n_dense)  # the flags', else the projection file's
    if args.rbit is not None and hashing:  # a bad one now, named as the flag, not after the first policy
        check_rbit(args.rbit, "--rbit")
    checked = HataArgs(**hata)
    weights = (args.hash_weights or shipped_hash_weights(checked, args.checkpoint)) if trained else None
    left_out = "trained" in args.selectors and not weights  # were it the only one, the table would be empty
    if left_out and set(args.selectors) == {"trained"}:
        raise ValueError("only dense would run: no trained projections; give --hash-weights FILE or more selectors")
    torch.set_num_threads(args.threads)
    checkpoint = args.checkpoint or default_checkpoint()
    context, shape = checkpoint_metadata(checkpoint)  # before the text is read and the model loads
    for flag, Cs in lengths.items():
        if Cs and max(Cs) > context:
            raise ValueError(f"{flag} {max(Cs)} exceeds the model's context of {context} tokens")
    if left_out:  # (after the checkpoint's check: a missing one is named alone, not as one without projections)
        print("note: no trained projections; the hata-trained selector is left out", file=sys.stderr)
    files = [weights] * bool(weights)
    if shape:  # another model's projections, other bits, an --n-dense past the layers (a Meta checkpoint's: later)
        check_hash_files(files, n_dense, shape, checked)
    sels = selectors(weights, args.quest, args.selectors, args.sink, **hata)
    pols = policies(sels, args.budgets, args.quest_budgets)
    longest = max(sum(lengths.values(), []))  # the longest context of the tasks that run
    far = next((n for n, _, h in pols[1:] if max(h.n_sink, h.n_recent) > longest), None)  # pols[0]: dense, no window
    if far:
        raise ValueError(f"{far}: its sink or recent window is longer than any context; lower --sink or --quest")
    tok = Tokenizer.from_path(checkpoint)
    docs = split_corpus(load_corpus(args.text))[1]  # what train_hash.py holds out of the same text
    if lengths["--contexts"]:  # the haystacks (perplexity alone takes any text, with sentence ends or without)
        # sized by the model's context, not --contexts: a sample's seed picks its piece of this one haystack
        noise = NOISE * (4 * context // len(tok.encode(NOISE)) + 2)
        prose = HELD_OUT + " of --text" * bool(args.text)  # (the default corpus has sentence ends)
        hays = {"noise": Haystack(tok, noise), "prose": Haystack(tok, "\n\n".join(t for _, t in docs), prose)}
        if len(hays["prose"].ids) < max(args.contexts):  # before the model, not after perplexity
            raise ValueError(f"{prose} has {len(hays['prose'].ids)} tokens, fewer than --contexts "
                             f"{max(args.contexts)}; give more --text")
    if lengths["--ppl-context"]:  # before the model: too little text is one line, not a wait and a traceback
        windows = token_windows(tok, docs, args.ppl_context, args.ppl_docs, what=HELD_OUT, flag="--ppl-context")
    model = from_checkpoint(checkpoint, None, device=args.device)
    if not shape:  # (a Meta checkpoint's, known from its weights)
        check_hash_files(files, n_dense, model.args, checked)
    if weights:  # a file trained on other weights of this shape: one line now, not after the first prefill
        load_hash_projections(weights, model.args, checked, key_signature(model, n_dense))
    rbit = hata["rbit"] if any(kw["selector"] == "hash" for kw in sels.values()) else None  # (None: no codes read)
    print(f"loaded {checkpoint_label(args.checkpoint)} ({model.args.describe()}); " + f"R = {rbit}, " * bool(rbit)
          + f"{hata['n_dense']} dense layers" + (f", hata-trained: {weights}" if weights else ""), file=sys.stderr)
    hash_digest = None
    if weights:  # the projection file's bytes, as merge compares them
        with open(weights, "rb") as f:
            hash_digest = digest([f.read()])
    results = {"command": "python eval.py " + args.command, "started": [datetime.now(timezone.utc).isoformat()],
               "selectors": list(sels), "budgets": sorted({f for _, f, _ in pols if f}), "hash_weights": weights,
               "checkpoint": checkpoint, "hash_digest": hash_digest,
               "ppl_context": args.ppl_context, "seconds": {}, "model": model.args.describe(), "needle_rule": 2, **hata,
               "rbit": rbit,  # a merge compares it only between runs with a HATA selector
               "noise_context": context,  # the noise haystack's size (before 2026-12-05: the longest --contexts)
               "weights": digest(t.numpy().tobytes() for t in key_signature(model, 0).values()),  # another checkpoint
               "text": digest(text.encode() for _, text in docs)}  # other --text: a merge refuses to join them
    deadline, written = time.time() + 60 * args.minutes, []

    def save(task, t0, res):  # the task's results so far, after every batch
        results[task], results["seconds"][task] = res, round(time.perf_counter() - t0)
        write_json(so_far, results)
        written.append(task)  # (so_far is this run's only once a write succeeds)
    try:
        if "perplexity" in args.tasks:  # first: its cost is fixed, while retrieval can stop at the time limit
            results["perplexity_planned"] = windows.shape[0] * args.ppl_tokens  # a file saved midway holds fewer
            run_teacher_forced(model, windows, args.ppl_tokens, pols, args.batch,
                               partial(save, "perplexity", time.perf_counter()))
        if "retrieval" in args.tasks:
            specs = retrieval_specs(dict(zip(args.contexts, args.samples)), args.seed)
            results["retrieval_planned"] = len(specs)  # a file saved midway holds fewer: the run stopped early
            records = run_retrieval(model, tok, hays, specs, pols, args.batch,
                                    partial(save, "retrieval", time.perf_counter()), deadline)
            results["retrieval_cut"] = len(records) < len(specs)  # only --minutes skips samples of a finished run
    except BaseException:  # Ctrl-C or an error: the batches so far are in so_far (this run's), say where
        if written:
            print(f"\nresults so far: {so_far} (eval.py --report reads it; a rerun of --name {name} with "
                  "--overwrite replaces it: give another --name to keep it)", file=sys.stderr)
        raise
    write_report(results, args.out_dir, name, json_path, so_far)


def digest(chunks):  # a run's weights or held-out text, as a merge compares them
    return hashlib.sha256(b"\0".join(chunks)).hexdigest()[:16]


def write_json(path, results):  # whole or not at all: it holds every batch so far
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1)
    write_whole(path, write)


def write_report(results, out_dir, name, json_path=None, partial_path=None):
    """The results to json_path (if given; then the run's partial file goes), the report's markdown, then its plot:
    each file whole, none until the report is built, and a plot that fails costs neither. An earlier plot of this
    name that this report does not redraw goes too (it would stand beside results it does not show)."""
    md, png = report(results), os.path.join(out_dir, f"{name}_scores.png")
    if json_path:
        write_json(json_path, results)
        if partial_path and os.path.exists(partial_path):  # (none if no batch ran)
            os.remove(partial_path)
    write_text(os.path.join(out_dir, f"{name}_results.md"), f"Command: `{results['command']}`; seconds: "
                                                            f"{results['seconds']}\n\n{md}\n")
    show(md + "\n")  # (before the plot: one that fails costs no table either; a failed write names stdout)
    if os.path.exists(png):  # an earlier run's: gone first, as an error or Ctrl-C in the plot would leave it
        os.remove(png)
    plotted = plot(results, png)
    also = f" and {png}" if plotted else ""
    print(f"wrote {out_dir}/{name}_results.md{also} (results: {name}_results.json)", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
