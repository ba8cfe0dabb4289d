"""eval.py on tiny sizes: the digit scorer, the prompt builder, the kept-share arithmetic, and the shared
prefill/decode machinery against dense attention (the same functions the full run uses)."""
import copy
from datetime import datetime, timezone
import hashlib
import json
import math
import os
import random
import re
import shlex
import types

import pytest
import torch
import torch.nn.functional as F

import eval as ev
from engine import write_text
from model import PRESETS, Attention, HataArgs, Transformer, save_hash_projections
from tests.helpers import full_stdout, markdown_tables, random_ids, read_only, tiny_model
from tokenizer import Tokenizer

PROSE = ("It was a bright cold day in April, and the clocks were striking thirteen. The hallway smelt of boiled "
         "cabbage and old rag mats. At one end of it a coloured poster, too large for indoor display, had been "
         "tacked to the wall. It depicted simply an enormous face, more than a metre wide: the face of a man of "
         "about forty-five, with a heavy black moustache and ruggedly handsome features. Winston made for the "
         "stairs. It was no use trying the lift. Even at the best of times it was seldom working, and at present "
         "the electric current was cut off during daylight hours. ")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """As eval.py runs by default: one thread is much faster when other jobs share the 2 cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_parse_digits():
    assert ev.parse_digits("71432.") == "71432"
    assert ev.parse_digits(" 71432 is") == "71432"
    assert ev.parse_digits("714325") == "714325"  # a longer number is not the key
    assert ev.parse_digits("7143 2") == "7143"
    assert ev.parse_digits("the key") == ""


def test_prompt_has_exact_length_and_the_needle_at_its_depth(tok):
    hay = ev.Haystack(tok, ev.NOISE * 200)
    for task in ev.TASKS:
        for depth in (0.0, 0.5, 1.0):
            ids, key, answer = ev.retrieval_prompt(tok, hay, task, 1018, depth, random.Random(3))
            assert [tok.decode([t]) for t in answer] == list(key)  # SmolLM2: one token per digit
            text = tok.decode(ids)
            assert len(ids) == 1018 and len(key) == ev.N_DIGITS and key in text
            assert text.endswith(" is ")
            where = text.index(key) / len(text)  # (multikey: the asked name's needle, its key's only place)
            assert abs(where - depth) < 0.1, (task, depth, where)


def test_a_needles_depth_is_its_share_of_the_haystack(tok):
    """Depth d puts the needle at the sentence end nearest d of the haystack's tokens (not of the whole prompt, whose
    instructions and question come before and after it): measured between depth 0 and 1, in characters, within
    one short sentence of the noise (about 0.5% of it here)."""
    hay = ev.Haystack(tok, ev.NOISE * 200)
    at = {}
    for depth in (0.0, 0.25, 0.5, 0.9, 1.0):
        ids, key, _ = ev.retrieval_prompt(tok, hay, "single", 1018, depth, random.Random(3))
        at[depth] = tok.decode(ids).index(key)
    for depth in (0.25, 0.5, 0.9):
        assert abs((at[depth] - at[0.0]) / (at[1.0] - at[0.0]) - depth) < 0.02, (depth, at)


def test_needles_go_only_between_sentences(tok):
    """A piece's boundaries are its start and sentence ends: its end only when it ends a sentence, so a needle at
    depth 100% follows a sentence, not the middle of one."""
    hay = ev.Haystack(tok, ev.NOISE * 50)
    for seed in range(12):
        piece, ends = hay.piece(101, random.Random(seed))
        assert ends[0] == 0 and all(tok.decode(piece[:e]).rstrip().endswith(".") for e in ends[1:]), ends
        ids, key, _ = ev.retrieval_prompt(tok, hay, "single", 300, 1.0, random.Random(seed))
        text = tok.decode(ids)
        assert text[:text.index(f" The pass key is {key}")].rstrip().endswith("."), text
    with pytest.raises(ValueError, match="no sentence end"):  # --text without one: no place for a needle
        ev.Haystack(tok, "words and words " * 50)
    with pytest.raises(ValueError, match="^the haystack text is empty$"):  # not "no sentence end"
        ev.Haystack(tok, " \n")


def test_prompt_has_one_bos_at_its_start(tok):
    """A tokenizer that adds BOS (Llama 2, 3): the pieces are encoded without it, the prompt starts with one."""
    bos_tok = copy.copy(tok)
    bos_tok.add_bos = True
    hay = ev.Haystack(bos_tok, ev.NOISE * 200)
    ids, _, _ = ev.retrieval_prompt(bos_tok, hay, "multikey", 1018, 0.5, random.Random(3))
    assert len(ids) == 1018 and ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1 and tok.bos_id not in hay.ids


def test_answer_tokens_follow_the_question_with_sentencepiece(tmp_path):
    """Llama 2's sentencepiece encodes a key alone as '▁' '7' '1' ...; after the question's '▁' the model writes
    '7' '1' ... (split_digits, as Llama 2). The needle and the question continue the text: encoded alone, each had
    the word-start '▁' too (two spaces before ' The pass key', one before '\n\n')."""
    spm = pytest.importorskip("sentencepiece")
    (tmp_path / "corpus.txt").write_text("\n".join(f"{PROSE} {i} {i * 7919}." for i in range(200)))
    spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "tokenizer"),
                                   vocab_size=400, model_type="bpe", byte_fallback=True, split_digits=True,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False, bos_id=1,
                                   eos_id=2, unk_id=0, minloglevel=2)
    sp = Tokenizer.from_path(tmp_path)
    ids, key, answer = ev.retrieval_prompt(sp, ev.Haystack(sp, PROSE * 40), "single", 700, 0.5, random.Random(1))
    assert [sp.decode([t]) for t in answer] == list(key) and ids.count(sp.bos_id) == 1
    text = sp.decode(ids)
    assert f". The pass key is {key}. Remember it." in text and "  The" not in text and " \n" not in text
    assert text.endswith("\n\nThe pass key is ")


def test_seeds_draw_streams_no_other_seed_draws():
    """Seed 0's streams are the committed runs' (1000 C + i); another seed's never meet them, nor each other's."""
    counts = {1024: 200, 8192: 60}
    streams = {seed: [sd for *_, sd in ev.retrieval_specs(counts, seed)] for seed in (0, 1, 2)}
    assert streams[0][:2] == [1024000, 1024001] and streams[0][-1] == 8192059
    assert len(set().union(*streams.values())) == 3 * 260


def test_answers_take_as_many_steps_as_the_longest():  # a tokenizer may group digits, as Llama 3's does by three
    assert ev.pad_answers([[714, 32], [123]]).tolist() == [[714, 32], [123, -1]]


@pytest.mark.parametrize("after, correct", [("7", False), (".", True)])
def test_retrieval_decodes_one_step_past_the_answer(tok, monkeypatch, after, correct):
    """A key followed by a digit is another number: retrieval decodes one step past the answer (expected: -1),
    and the model's output there decides."""
    hays = {"noise": ev.Haystack(tok, ev.NOISE * 300)}
    answer = ev.retrieval_prompt(tok, hays["noise"], "single", 512 - ev.N_DIGITS, 0.5, random.Random(1))[2]
    seen = []
    def run_policies(model, tokens, n_prefill, steps, capacity, pols, expect, bar):
        seen.append(expect[0].tolist())
        return {("dense", None): (torch.tensor([(answer + tok.encode(after, bos=False))[:steps]]), None)}
    monkeypatch.setattr(ev, "run_policies", run_policies)
    recs = ev.run_retrieval(None, tok, hays, [(512, "single", "noise", 0.5, 1)], [("dense", None, None)], 1)
    assert seen == [answer + [-1]] and recs[0]["correct"]["dense"] is correct, recs[0]["dense_output"]
    assert recs[0]["seed"] == 1  # the sample's own, which a merge joins on


def test_each_sample_runs_the_prompt_its_spec_names(tok, monkeypatch):
    """run_retrieval builds each sample's prompt from its own spec: a record saying "prose, multikey, depth 0.9,
    seed s" ran that prompt (the other tests' stand-ins build the prompts themselves, or have one haystack)."""
    hays = {"noise": ev.Haystack(tok, ev.NOISE * 300), "prose": ev.Haystack(tok, PROSE * 60)}
    specs = [(512, t, h, d, sd) for sd, (t, h, d) in enumerate(
        [("single", "noise", 0.0), ("multikey", "prose", 0.9), ("single", "prose", 0.3), ("multikey", "noise", 1.0)],
        start=2 ** 32 + 512000)]
    seen = []
    def run_policies(model, tokens, n_prefill, steps, capacity, pols, expect, bar):
        seen.append(tokens[0].tolist())
        return {("dense", None): (expect.clamp(min=0), None)}
    monkeypatch.setattr(ev, "run_policies", run_policies)
    recs = ev.run_retrieval(None, tok, hays, specs, [("dense", None, None)], 1)
    assert seen == [ev.retrieval_prompt(tok, hays[h], t, C - ev.N_DIGITS, d, random.Random(sd))[0]
                    for C, t, h, d, sd in specs]
    assert [(r["task"], r["haystack"], r["depth"], r["seed"]) for r in recs] == [s[1:] for s in specs]


def test_a_key_longer_than_the_caches_slack_is_refused(monkeypatch):
    """The prompt is C - N_DIGITS tokens and prefill stops one short: an answer of N_DIGITS + 1 tokens fits, one
    more does not (it would decode past the cache)."""
    monkeypatch.setattr(ev, "run_policies", lambda *a: 1 / 0)  # what follows the check
    spec, pols = [(512, "single", "noise", 0.5, 1)], [("dense", None, None)]
    for n, stop, words in ((ev.N_DIGITS + 1, ZeroDivisionError, None),
                           (ev.N_DIGITS + 2, ValueError, f"spends {ev.N_DIGITS + 2} tokens on a 5-digit key")):
        monkeypatch.setattr(ev, "retrieval_prompt", lambda tok, hay, task, length, depth, rng: ([1] * length, "12345",
                                                                                              list(range(n))))
        with pytest.raises(stop, match=words):
            ev.run_retrieval(None, None, {"noise": None}, spec, pols, 1)


@pytest.mark.parametrize("top, correct, text", [([1, 2, 9], True, "12345"), ([3, -1, -1], False, "12345"),
                                                ([1, 4, -1], False, "1234")])
def test_a_key_written_in_other_tokens_than_its_own_is_wrong(monkeypatch, top, correct, text):
    """A tokenizer that groups digits can write the key '12345' as one token where its own are '123' '45': decode
    keeps that first token off the answer, whose text alone reads right (it scored right before)."""
    words = {1: "123", 2: "45", 3: "12345", 4: "4", 9: "."}
    tok = type("Tok", (), {"decode": lambda self, ids: "".join(words[i] for i in ids)})()
    monkeypatch.setattr(ev, "retrieval_prompt", lambda tok, hay, task, length, depth, rng: ([5] * length, "12345",
                                                                                          [1, 2]))
    monkeypatch.setattr(ev, "run_policies", lambda *a: {("dense", None): (torch.tensor([top]), None)})
    recs = ev.run_retrieval(None, tok, {"noise": None}, [(512, "single", "noise", 0.5, 1)], [("dense", None, None)], 1)
    assert recs[0]["correct"] == {"dense": correct} and recs[0]["dense_output"] == text


def test_a_rows_answer_is_cut_at_its_own_first_miss_whatever_its_batch(monkeypatch):
    """Greedy decoding with `expect` runs while any row still matches; each row is then cut after its own first
    token off its answer (before: row 0, off at its first token, decoded on beside row 1 and wrote the key, which
    scored right in that batch and wrong alone). A row's miss itself is kept: a digit after the key counts."""
    scripts = {0: [10, 7, 1, 4, 3, 2], 1: [7, 1, 4, 3, 2, 10], 2: [7, 1, 4, 3, 2, 9], 3: [7, 1, 5, 3, 2, 10]}
    monkeypatch.setattr(ev, "decode_one_token", lambda model, cur, pos: F.one_hot(torch.tensor(
        [scripts[r][int(pos[0]) - 100] for r in model]), 11).float())  # the model: the rows' scripts
    key = [7, 1, 4, 3, 2, -1]
    for rows in ([0], [0, 1], [2, 1], [3, 1]):  # (10: a space, 9: a digit; row 3 misses its third digit)
        top, _ = ev.decode(rows, torch.tensor([[r] for r in rows]), torch.full((len(rows),), 100), 6,
                           torch.tensor([key] * len(rows)))
        want = {0: [10] + [-1] * 5, 1: scripts[1], 2: scripts[2], 3: [7, 1, 5] + [-1] * 3}
        assert top.tolist() == [want[r] for r in rows], rows


def test_dense_decodes_every_step_so_its_whole_answer_is_kept(monkeypatch):
    """run_policies: the sparse policies stop at `expect`, dense does not (before: its recorded answer was cut after
    its first token off the key, '8' where it wrote '82293')."""
    seen = []
    monkeypatch.setattr(ev, "prefill", lambda *args, **kwargs: None)
    monkeypatch.setattr(ev, "decode", lambda model, tokens, pos0, steps, expect: seen.append(expect) or (
        torch.zeros(1, steps, dtype=torch.long), torch.zeros(1, 0)))
    weight = types.SimpleNamespace(weight=torch.zeros(1))
    model = types.SimpleNamespace(output=weight, setup_caches=lambda *args: None, set_hata=lambda hata: None)
    expect = torch.tensor([[1, 2, -1]])
    pols = [("dense", None, None), ("oracle", 0.5, HataArgs(selector="oracle", budget=0.5))]
    out = ev.run_policies(model, torch.ones(1, 5, dtype=torch.long), 4, 3, 8, pols, expect)
    assert seen[0] is None and torch.equal(seen[1], expect) and list(out) == [("dense", None), ("oracle", 0.5)]


def test_dense_passkey_with_a_bos_tokenizer(smol, tok):
    bos_tok = copy.copy(tok)
    bos_tok.add_bos = True
    hays = {"noise": ev.Haystack(bos_tok, ev.NOISE * 300)}
    recs = ev.run_retrieval(smol, bos_tok, hays, [(512, "single", "noise", 0.5, 1)], [("dense", None, None)], 1)
    assert recs[0]["correct"]["dense"], recs[0]["dense_output"]


def test_policies_run_quietly_and_leave_the_model_dense(tok, capsys):
    """hata-random is random by design: no warning about random projections; after the policies, every layer is
    dense again (the next prefill must not select)."""
    model = Transformer(PRESETS["tiny"])
    tokens = torch.tensor([tok.encode(PROSE)[:20]]) % model.args.vocab_size
    out = ev.run_policies(model, tokens, 16, 3, 24, [("hata-random", 1 / 8, HataArgs(budget=2))])
    assert out[("hata-random", 1 / 8)][0].shape == (1, 3) and "warning" not in capsys.readouterr().err
    assert all(layer.attention.hata is None for layer in model.layers)


def test_the_prefill_shows_its_progress(smol, tok, monkeypatch):
    """run_policies asks prefill for its bar (shown for prompts of engine.PROGRESS_TOKENS or more)."""
    asked, real = [], ev.prefill

    def prefill(*args, **kwargs):
        asked.append(kwargs.get("progress"))
        return real(*args, **kwargs)
    monkeypatch.setattr(ev, "prefill", prefill)
    ev.run_policies(smol, torch.tensor([tok.encode(PROSE)[:20]]), 19, 1, 24, [("dense", None, None)])
    assert asked == [True]


def test_kept_share_counts_only_dense_correct_samples():
    rows = [(True, True), (True, False), (True, True), (False, True)]  # (dense, selector) correct
    recs = [{"correct": {"dense": d, "sel 1/8": s}} for d, s in rows]
    assert ev.kept(recs, "sel 1/8") == (2 / 3, 3)
    assert math.isnan(ev.kept(recs[3:], "sel 1/8")[0])  # no dense-correct sample: no share, not 0%


def test_dense_passkey_at_1k_and_report(smol, tok, tmp_path):
    hays = {"noise": ev.Haystack(tok, ev.NOISE * 300)}
    specs = [(1024, "single", "noise", 0.5, 1), (1024, "multikey", "noise", 0.2, 2)]
    trained = f"{ev.HERE}/weights/smollm2-135m-r128.safetensors"
    pols = [("dense", None, None), ("oracle", 1 / 8, HataArgs(selector="oracle", budget=1 / 8))]
    pols += [("hata-trained", f, HataArgs(budget=f, hash_weights=trained)) for f in (1 / 16, 1 / 32)]
    recs = ev.run_retrieval(smol, tok, hays, specs, pols, batch=2)
    assert [r["correct"]["dense"] for r in recs] == [True, True], [r["dense_output"] for r in recs]
    assert [r["correct"]["oracle 1/8"] for r in recs] == [True, True]  # the exact top 1/8 keeps the key
    # the shipped codes find the key at K = 64 and 32 of 1024 (codes left at 0, a recent window, do not)
    assert [r["correct"][f"hata-trained {f}"] for r in recs for f in ("1/16", "1/32")] == [True] * 4
    results = {"command": "test", "selectors": ["oracle"], "budgets": [1 / 8], "ppl_context": 0, "seconds": {},
               "retrieval": recs}
    (tmp_path / "eval_test_results.json").write_text(text := json.dumps(results))
    assert ev.main(["--report", str(tmp_path / "eval_test_results.json"), "--out-dir", str(tmp_path),
                    "--name", "eval_test"]) == 0  # a rebuild from the results file itself: left as it is
    assert (tmp_path / "eval_test_results.json").read_text() == text
    md = (tmp_path / "eval_test_results.md").read_text()
    assert "| all | 2 |" in md and "| oracle | 100.0% (100%) |" in md
    assert (tmp_path / "eval_test_scores.png").stat().st_size > 10_000


def test_teacher_forced_pass_matches_a_dense_forward(smol, tok, monkeypatch):
    C, N = 192, 24
    windows = ev.token_windows(tok, [("prose", PROSE * 4)], C, 2)  # (2, C)
    full = [("dense", None, None), ("dense again", None, None)]
    # budget C - 1 covers every decode position (lengths <= C - 1): on the CPU such a step decodes densely (the
    # sparse path runs where K < the current length), so oracle and hash equal dense up to rounding; at C - N - 1
    # every scored step runs the sparse path and leaves out 1 to N keys of 168 to 191: close to dense
    full += [(name, None, HataArgs(selector=sel, budget=C - 1)) for name, sel in (("oracle", "oracle"),
                                                                                   ("hash", "hash"))]
    full += [(f"{sel} sparse", None, HataArgs(selector=sel, budget=C - N - 1)) for sel in ("oracle", "hash")]
    sparse_steps, real = [], Attention.sparse_decode
    monkeypatch.setattr(Attention, "sparse_decode", lambda self, *a: sparse_steps.append(1) or real(self, *a))
    res = ev.run_teacher_forced(smol, windows, N, full, batch=2)
    assert res["dense"]["positions"] == 2 * N
    assert res["dense again"]["agree"] == 1.0 and res["dense again"]["nll"] == res["dense"]["nll"]
    for name in ("oracle", "hash"):
        assert res[name]["agree"] == 1.0
        assert abs(res[name]["nll"] - res["dense"]["nll"]) < 1e-4
        sparse = res[f"{name} sparse"]
        assert sparse["agree"] >= 0.95 and abs(sparse["nll"] - res["dense"]["nll"]) < 0.01
    assert len(sparse_steps) == 2 * N * (smol.args.n_layers - HataArgs.n_dense)  # the two sparse policies' steps
    # the decode bookkeeping: the same NLL as one dense forward over the whole window
    smol.setup_caches(2, C)
    with torch.inference_mode():
        logp = smol(windows).log_softmax(-1)  # (2, C, V)
    ref = -logp[:, C - N - 1:C - 1].gather(2, windows[:, C - N:, None]).mean().item()
    assert abs(res["dense"]["nll"] - ref) < 1e-3


def test_teacher_forced_windows_score_the_last_tokens_as_one_forward():
    """The quick form of the test above, on the tiny preset: three windows of 20 in batches of 2 and 1, the last 5
    tokens scored: the NLL a dense forward over the whole window gives those 5 tokens (each predicted by the
    position before it), whichever batch a window was in."""
    model, windows, N = tiny_model(), random_ids(3, 20), 5
    res = ev.run_teacher_forced(model, windows, N, [("dense", None, None)], batch=2)
    assert res["dense"]["positions"] == 3 * N
    model.setup_caches(3, 20)
    with torch.inference_mode():
        logp = model(windows).log_softmax(-1)  # (3, 20, V)
    ref = -logp[:, -N - 1:-1].gather(2, windows[:, -N:, None]).double().mean().item()
    assert res["dense"]["nll"] == pytest.approx(ref, abs=1e-5)


def test_teacher_forced_scores_pool_every_batch(monkeypatch):
    """Four windows in batches of two: the NLL is the plain mean of every position's, and agreement is over all 12
    positions (a selector that agrees in the first batch only: 50%), not over the last batch."""
    def policies(model, tokens, n_prefill, steps, capacity, pols, bar=None):  # (B, steps) tokens and log-probs
        first, top = bool(tokens[0, 0] == 0), torch.zeros(2, steps, dtype=torch.long)
        return {("dense", None): (top, torch.full((2, steps), -1.0 if first else -2.0)),
                ("oracle", 0.5): (top if first else top + 1, torch.full((2, steps), -3.0))}
    monkeypatch.setattr(ev, "run_policies", policies)
    windows = torch.tensor([[0] * 8] * 2 + [[1] * 8] * 2)  # (4, 8)
    res = ev.run_teacher_forced(None, windows, 3, [("dense", None, None), ("oracle", 0.5, None)], batch=2)
    assert res["dense"] == {"nll": 1.5, "ppl": math.exp(1.5), "positions": 12, "agree": 1.0}
    assert res["oracle 1/2"] == {"nll": 3.0, "ppl": math.exp(3.0), "positions": 12, "agree": 0.5}


def test_merge_joins_selectors_over_the_same_samples():
    def run(sel, answers):
        recs = [{"context": 1024, "task": "single", "haystack": "noise", "depth": d, "answer": "12345",
                 "correct": {"dense": True, f"{sel} 1/8": a}} for d, a in zip((0.0, 0.5), answers)]
        return {"command": sel, "selectors": [sel], "budgets": [1 / 8], "seconds": {"retrieval": 1},
                "retrieval": recs}
    merged = ev.merge([run("oracle", [True, True]), run("hata-random", [True, False])])
    assert merged["selectors"] == ["oracle", "hata-random"] and len(merged["retrieval"]) == 2
    assert ev.kept(merged["retrieval"], "oracle 1/8")[0] == 1.0
    assert ev.kept(merged["retrieval"], "hata-random 1/8")[0] == 0.5
    more = run("oracle", [False, False])  # other samples (another seed), the same selector: added
    for x in more["retrieval"]:
        x["answer"] = "54321"
    assert ev.kept(ev.merge([run("oracle", [True, True]), more])["retrieval"], "oracle 1/8") == (0.5, 4)
    # a sample only some selectors ran on is left out
    assert len(ev.merge([run("oracle", [True, True]), run("hata-random", [True, True]), more])["retrieval"]) == 2
    other = run("quest", [True, True])
    other["retrieval"][0]["correct"]["dense"] = False
    with pytest.raises(ValueError, match="dense answers differ"):
        ev.merge([run("oracle", [True, True]), other])
    setup = {"model": "llama dim=576", "weights": "5e0f", "text": "a1b2"}  # another checkpoint of the same shape, or
    for key, value in (("n_dense", 3), ("model", "llama dim=64"), ("weights", "9d3c"), ("text", "77aa")):
        with pytest.raises(ValueError, match="differ in model, weights, text, rbit or n_dense"):  # other --text
            ev.merge([{**run("oracle", [True, True]), **setup}, {**run("quest", [True, True]), **setup, key: value}])
    merged = ev.merge([run("oracle", [True, True]), {**run("quest", [True, True]), "rbit": 128, **setup}])
    assert len(merged["selectors"]) == 2 and all(merged[k] == v for k, v in setup.items())  # (older files: any)
    # a run without a HATA selector records no rbit (older files: 128): it joins a run of any (before: refused)
    for a, b, both in ((None, 64, 64), (128, 64, 64), (None, None, None)):
        merged = ev.merge([{**run("oracle", [True, True]), "rbit": a}, {**run("hata-random", [True, True]), "rbit": b}])
        assert merged["rbit"] == both and merged["selectors"] == ["oracle", "hata-random"]
    with pytest.raises(ValueError, match="differ in model, weights, text, rbit or n_dense"):  # two that hash
        ev.merge([{**run("oracle", [True, True]), "rbit": None}, {**run("hata-random", [True, True]), "rbit": 64},
                  {**run("quest", [True, True]), "rbit": 128}, {**run("hata-trained", [True, True]), "rbit": 128}])


def test_merge_keeps_two_seeds_prompts_of_one_key_apart_and_notes_what_it_leaves_out(capsys):
    """Seeds 1 and 19 each draw a sample of one context, task, haystack, depth and key: two prompts, kept apart by
    the seed a record holds (before: joined as one sample, or "dense answers differ" where dense did). Files without
    seeds still join by the rest. Samples that lack a policy's result are left out with a note (before: silently,
    the whole table when two seeds ran different selectors)."""
    def run(sel, seed, dense=True):
        rec = {"context": 1024, "task": "single", "haystack": "prose", "depth": 0.7, "answer": "40698",
               "correct": {"dense": dense, f"{sel} 1/8": True}, **({"seed": seed} if seed is not None else {})}
        return {"command": sel, "selectors": [sel], "budgets": [1 / 8], "seconds": {}, "retrieval": [rec]}
    assert len(ev.merge([run("oracle", 1), run("oracle", 19, dense=False)])["retrieval"]) == 2
    assert len(ev.merge([run("oracle", 1), run("quest", 1)])["retrieval"]) == 1  # one sample, two selectors
    assert capsys.readouterr().err == ""
    assert len(ev.merge([run("oracle", None), run("quest", 1)])["retrieval"]) == 1  # an older file: no seeds
    assert "note: a run without sample seeds (before 2026-12-05)" in capsys.readouterr().err
    assert ev.merge([run("oracle", 1), run("quest", 19)])["retrieval"] == []
    assert capsys.readouterr().err == ("note: 2 of 2 retrieval samples lack some policy's result: left out; so no "
                                       "retrieval table (the runs share no sample: merge runs of one --seed, "
                                       "--contexts and --samples)\n")  # (before: the note alone)
    a, b = ({**run("oracle", 1), "ppl_context": 64, "perplexity": {"dense": {"positions": n, "nll": 3.0}}}
            for n in (8, 4))
    with pytest.raises(ValueError, match=r"passes differ \(8 positions, NLL 3.0000; 4, 3.0000\): other windows, or "
                                         "a run stopped"):
        ev.merge([a, b])


@pytest.mark.parametrize("sel", ["hata-trained", "hata-trained s4"])  # s4: --sink 4's row
def test_merge_notes_trained_rows_of_other_projections(capsys, sel):
    """Two runs of hata-trained with different --hash-weights: only the first run's results count, also on the
    samples only the second run holds (another seed: left out, not joined into the row), and the merge says so.
    The files are compared by their bytes' digest where both runs recorded one (one file by two paths is one)."""
    def run(weights, seeds=(0,), digest=None):
        recs = [{"context": 1024, "task": "single", "haystack": "noise", "depth": 0.5, "answer": "1", "seed": seed,
                 "correct": {"dense": True, f"{sel} 1/8": weights == "a.safetensors"}} for seed in seeds]
        ppl = {k: {"ppl": p, "agree": 1.0, "nll": 0.7, "positions": 8}
               for k, p in (("dense", 2.0), (f"{sel} 1/8", 2.5 if weights == "a.safetensors" else 3.5))}
        return {"command": weights, "selectors": [sel], "budgets": [1 / 8], "seconds": {}, "hash_digest": digest,
                "hash_weights": weights, "retrieval": recs, "ppl_context": 64, "perplexity": ppl}
    merged = ev.merge([run("a.safetensors"), run("b.safetensors", seeds=(0, 1))])
    assert [x["seed"] for x in merged["retrieval"]] == [0] and ev.kept(merged["retrieval"], f"{sel} 1/8")[0] == 1
    assert merged["perplexity"][f"{sel} 1/8"]["ppl"] == 2.5
    assert "hata-trained is a.safetensors's; b.safetensors's results are left out" in capsys.readouterr().err
    merged = ev.merge([run("a.safetensors", digest="d1"), {**run("/w/a.safetensors", (1,), "d1"), "command": "b"}])
    assert [x["seed"] for x in merged["retrieval"]] == [0, 1] and "left out" not in capsys.readouterr().err
    merged = ev.merge([run("a.safetensors", digest="d1"), {**run("a.safetensors", (1,), "d2"), "command": "b"}])
    assert [x["seed"] for x in merged["retrieval"]] == [0]  # one path, other bytes: the file changed in between
    assert "note: a.safetensors changed between the runs; a.safetensors's results are left out" in \
        capsys.readouterr().err
    # a first run without hata-trained: the file of the first run that brings it is the row's
    oracle = {k: v for k, v in run(None, seeds=(0, 1)).items() if k != "perplexity"}
    oracle.update(command="o", selectors=["oracle"])
    for x in oracle["retrieval"]:
        x["correct"] = {"dense": True, "oracle 1/8": True}
    merged = ev.merge([oracle, run("b.safetensors", digest="d2"), {**run("b.safetensors", (1,)), "command": "b2"}])
    assert [x["seed"] for x in merged["retrieval"]] == [0, 1]
    assert (merged["hash_weights"], merged["hash_digest"]) == ("b.safetensors", "d2")
    assert "left out" not in capsys.readouterr().err
    ev.merge([run("a.safetensors"), run("a.safetensors")])
    assert capsys.readouterr().err == ""


def test_merge_refuses_runs_whose_noise_haystacks_differ_in_size():
    """A sample's piece of the noise haystack depends on the haystack's size: since 2026-12-05 the model's context
    (recorded), before the run's longest --contexts (read from its records)."""
    rec = lambda C: {"context": C, "task": "single", "haystack": "noise", "depth": 0.5, "answer": "1", "seed": C,
                     "correct": {"dense": True, "oracle 1/8": True}}
    run = lambda Cs, **kw: {"command": "r", "selectors": ["oracle"], "budgets": [1 / 8], "seconds": {},
                            "retrieval": [rec(C) for C in Cs], **kw}
    assert ev.merge([run([1024, 8192]), run([2048], noise_context=8192)])["noise_context"] == 8192
    with pytest.raises(ValueError, match=r"noise haystacks were sized for different contexts \(\[2048, 8192\]\)"):
        ev.merge([run([1024, 2048]), run([2048], noise_context=8192)])


def test_merge_states_the_context_of_its_perplexity_runs():
    """Every run records --ppl-context, a retrieval-only one too: the merge takes the perplexity runs' context and
    refuses two of them with different contexts."""
    dense = {"dense": {"nll": 0.7, "ppl": 2.0, "agree": 1.0, "positions": 8}}
    retrieval = {"command": "r", "selectors": ["oracle"], "budgets": [1 / 8], "seconds": {}, "ppl_context": 8192}
    ppl = {**retrieval, "command": "p", "ppl_context": 1024, "perplexity": dense}
    assert ev.merge([copy.deepcopy(retrieval), copy.deepcopy(ppl)])["ppl_context"] == 1024
    assert ev.merge([copy.deepcopy(ppl), copy.deepcopy(retrieval)])["ppl_context"] == 1024
    empty = {**copy.deepcopy(retrieval), "perplexity": {}}  # (load_results takes it; before: a KeyError)
    assert ev.merge([empty, copy.deepcopy(ppl)])["perplexity"] == dense
    with pytest.raises(ValueError, match=r"perplexity contexts differ \(\[1024, 2048\]\)"):
        ev.merge([copy.deepcopy(ppl), {**copy.deepcopy(ppl), "ppl_context": 2048}])
    def oracle(p):  # two runs of one policy: the first run's result counts, as for retrieval
        return {**copy.deepcopy(ppl), "perplexity": {**dense, "oracle 1/8": {"nll": 0.8, "ppl": p, "agree": 0.9,
                                                                              "positions": 8}}}
    assert ev.merge([oracle(2.2), oracle(3.0)])["perplexity"]["oracle 1/8"]["ppl"] == 2.2
    other = {**copy.deepcopy(ppl), "perplexity": {"dense": {**dense["dense"], "nll": 0.9}}}  # the same positions
    with pytest.raises(ValueError, match=r"dense perplexity passes differ \(8 positions, NLL 0.7000; 8, 0.9000\)"):
        ev.merge([copy.deepcopy(ppl), other])  # other windows: their rows would not compare
    timed = [{**copy.deepcopy(retrieval), "seconds": {"retrieval": s, "perplexity": 1.5}} for s in (10, 7)]
    assert ev.merge(timed)["seconds"] == {"retrieval": 17, "perplexity": 3.0}  # the runs' times add up


def test_report_states_the_perplexity_increase_over_dense():
    ppl = {"dense": {"ppl": 2.0, "agree": 1.0, "nll": 0.69, "positions": 8},
           "oracle 1/8": {"ppl": 2.5, "agree": 0.875, "nll": 0.92, "positions": 8}}
    md = ev.report({"selectors": ["oracle"], "budgets": [1 / 8], "ppl_context": 1024, "perplexity": ppl})
    assert "| oracle | 2.500 (+25.0%) | 87.5% |" in md


def test_report_rows_read_their_own_context_and_plan(tmp_path):
    """The kept-share table splits by context; a finished perplexity run claims no cut; no † without a forced row;
    results.md's first line records the command and seconds."""
    recs = [{"context": C, "task": "single", "haystack": "noise", "depth": 0.5, "answer": "1",
             "correct": {"dense": True, "oracle 1/8": C == 2048}} for C in (1024, 2048)]
    ppl = {"dense": {"ppl": 2.0, "agree": 1.0, "nll": 0.69, "positions": 8},
           "oracle 1/8": {"ppl": 2.5, "agree": 0.875, "nll": 0.92, "positions": 8}}
    results = {"command": "c", "selectors": ["oracle"], "budgets": [1 / 8], "seconds": {"retrieval": 3},
               "ppl_context": 1024, "retrieval": recs, "perplexity": ppl, "perplexity_planned": 8}
    md = ev.report(results)
    assert "| oracle | 1/8 | 0% of 1 | 100% of 1 |" in md
    assert "stopped" not in md and "†" not in md
    ev.write_report(results, str(tmp_path), "x")
    assert (tmp_path / "x_results.md").read_text().startswith("Command: `c`; seconds: {'retrieval': 3}\n")
    recs[0]["correct"]["dense"] = False  # a context where dense answers nothing: no share to keep (before: "nan%")
    md = ev.report(results)
    assert "| oracle | 1/8 | - of 0 | 100% of 1 |" in md and "| oracle | 100.0% (50%) |" in md
    recs[1]["correct"]["dense"] = False
    assert "| oracle | - (50%) |" in ev.report(results) and "nan" not in ev.report(results)


def test_plot_draws_the_tables_numbers(monkeypatch):
    """Kept share in %, perplexity over dense's, each point at 1 / budget (on its tick)."""
    figs = []
    monkeypatch.setattr(ev, "write_png", lambda path, fig: figs.append(fig))
    recs = [{"context": 1024, "task": "single", "haystack": "noise", "depth": 0.5, "answer": "1",
             "correct": {"dense": True, "oracle 1/8": ok, "oracle 1/16": False}} for ok in (True, False)]
    ppl = {"dense": {"ppl": 2.0, "agree": 1.0, "nll": 0.69, "positions": 8},
           "oracle 1/8": {"ppl": 2.5, "agree": 0.5, "nll": 0.92, "positions": 8},
           "oracle 1/16": {"ppl": 3.0, "agree": 0.25, "nll": 1.1, "positions": 8}}
    assert ev.plot({"selectors": ["oracle"], "budgets": [1 / 8, 1 / 16], "retrieval": recs, "perplexity": ppl,
                    "ppl_context": 1024}, "x")
    kept, rel, agree = (ax.lines[0] for ax in figs[0].axes)
    assert list(kept.get_xdata()) == [8.0, 16.0] and list(kept.get_ydata()) == [50.0, 0.0]
    assert list(rel.get_ydata()) == [1.25, 1.5] and list(agree.get_ydata()) == [50.0, 25.0]


def test_merge_refuses_what_would_join_two_things_under_one_key():
    """Retrieval runs from before needles at depth 100% went between sentences (no needle_rule) do not join newer ones
    (one spec, two prompts); budgets whose labels collide (0.12345678901 and ...02) do not share their columns."""
    rec = {"context": 1024, "task": "single", "haystack": "noise", "depth": 1.0, "answer": "1",
           "correct": {"dense": True, "oracle 1/8": True}}
    run = {"command": "r", "selectors": ["oracle"], "budgets": [1 / 8], "seconds": {}, "retrieval": [rec]}
    new = {**copy.deepcopy(run), "needle_rule": 2}
    assert len(ev.merge([copy.deepcopy(new), copy.deepcopy(new)])["retrieval"]) == 1
    with pytest.raises(ValueError, match="place needles by different rules"):
        ev.merge([copy.deepcopy(run), new])
    with pytest.raises(ValueError, match="both labelled 0.123456789"):
        ev.merge([{**copy.deepcopy(new), "budgets": [f]} for f in (0.12345678901, 0.12345678902)])


def test_report_marks_budgets_the_sink_and_recent_fill():
    """Quest s16 r16 at 1/64 of 1K (K = 16) or 1/32 (K = 32) selects nothing of its own: marked. At 2K, 1/32 is
    64 tokens: unmarked; the context-length table marks each context apart."""
    recs = [{"context": C, "task": "single", "haystack": "noise", "depth": 0.5, "answer": "1",
             "correct": {"dense": True, "quest s16 r16 1/16": True, "quest s16 r16 1/32": False}} for C in (1024, 2048)]
    ppl = {k: {"ppl": 2.0, "agree": 1.0, "nll": 0.7, "positions": 8} for k in ("dense", "quest s16 r16 1/16",
                                                                              "quest s16 r16 1/32")}
    md = ev.report({"selectors": ["quest s16 r16"], "budgets": [1 / 16, 1 / 32], "ppl_context": 2048,
                    "retrieval": recs, "perplexity": ppl})
    assert "| 1024 | 1 | 100% | - | - | - | 100% |" in md  # no sample of the other three task / haystack pairs
    assert "| quest s16 r16 | 100.0% (100%) | 0.0% (0%)† |" in md
    assert "| quest s16 r16 | 1/32 | 0% of 1† | 0% of 1 |" in md and "| quest s16 r16 | 1/16 | 100% of 1 | 100%" in md
    assert "| quest s16 r16 | 2.000 (+0.0%) | 2.000 (+0.0%) |" in md
    assert md.count("† sink + recent positions fill (or exceed) the budget") == 1  # exceed: select_topk keeps K


def test_budget_labels_are_exact_fractions():
    """The committed results' labels stay "1/n"; other fractions are labelled as given, not rounded to 1/n."""
    assert [ev.frac(f) for f in ev.BUDGETS + (1 / 4,)] == ["1/8", "1/16", "1/32", "1/64", "1/4"]
    assert [ev.frac(f) for f in (2 / 3, 0.15, 0.3, 1 / 3, 3 / 1024)] == ["2/3", "3/20", "3/10", "1/3", "3/1024"]
    assert ev.pkey("oracle", 2 / 3) == "oracle 2/3" and ev.pkey("dense", None) == "dense"
    assert [ev.frac(f) for f in (0.1234567, 1 / 3e6)] == ["0.1234567", "3.333333333e-07"]  # no fraction this side


def test_selectors_share_the_files_rbit_and_n_dense():
    pols = ev.policies(ev.selectors("w.safetensors", [(16, 16)], sink=4, rbit=64, n_dense=3), [1 / 8])
    assert len(pols) == 5 and all((h.rbit, h.n_dense) == (64, 3) for _, _, h in pols[1:])


def test_report_says_when_the_time_limit_cut_retrieval():
    """A finished run that --minutes cut says so; a file saved midway (a run stopped by Ctrl-C or a crash) says
    only that the run stopped; a merge has no plan."""
    rec = {"context": 1024, "task": "single", "haystack": "noise", "depth": 0.5, "answer": "1",
           "correct": {"dense": True, "oracle 1/8": True}}
    results = {"command": "test", "selectors": ["oracle"], "budgets": [1 / 8], "seconds": {}, "retrieval": [rec] * 4}
    assert "### Retrieval: 4 samples; dense accuracy" in ev.report({**results, "retrieval_planned": 4})
    assert "### Retrieval: 4 samples (of 8: the --minutes limit cut the rest)" in ev.report(
        {**results, "retrieval_planned": 8, "retrieval_cut": True})
    assert "### Retrieval: 4 samples (of 8: the run stopped before the rest)" in ev.report(
        {**results, "retrieval_planned": 8})
    assert "### Retrieval: 1 sample (of 8: the run stopped before the rest)" in ev.report(
        {**results, "retrieval": [rec], "retrieval_planned": 8})  # (before: "1 samples")
    merged = ev.merge([{**results, "retrieval_planned": 8, "retrieval_cut": True}, copy.deepcopy(results)])
    assert "retrieval_planned" not in merged and "retrieval_cut" not in merged


def test_report_of_a_run_whose_limit_cut_every_retrieval_sample():
    results = {"command": "t", "selectors": ["oracle"], "budgets": [1 / 8], "seconds": {}, "retrieval_planned": 4,
               "retrieval_cut": True}
    assert "### Retrieval: 0 samples (of 4: the --minutes limit cut the rest)" in ev.report(results)


def test_results_are_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """The results file, rewritten after every batch, goes through a file beside it: a dump cut short (Ctrl-C, a
    full disk) leaves the earlier results as they were, and no scrap."""
    ev.write_json(path := str(tmp_path / "r.json"), {"batches": 1})
    def cut(obj, f, **kwargs):
        f.write('{"batches": ')
        raise KeyboardInterrupt
    monkeypatch.setattr(ev.json, "dump", cut)
    with pytest.raises(KeyboardInterrupt):
        ev.write_json(path, {"batches": 2})
    assert os.listdir(tmp_path) == ["r.json"] and json.loads(open(path).read()) == {"batches": 1}


def test_report_of_a_run_cut_before_any_result(tmp_path, capsys):
    results = {"command": "test", "selectors": ["oracle"], "budgets": [1 / 8], "seconds": {}, "retrieval": []}
    ev.write_report(results, str(tmp_path), "empty")
    err = capsys.readouterr().err  # and no plot is said to be written
    assert "nothing to plot" in err and "empty_scores.png" not in err and (tmp_path / "empty_results.md").exists()


FRACTION = "must be a fraction of the context in (0, 1)"  # never "a count": eval's budgets are no token counts


@pytest.mark.parametrize("argv, words", [(["--budgets", "16"], FRACTION), (["--budgets", "1/0"], FRACTION),
                                         (["--budgets", "0"], FRACTION), (["--budgets", "1/4", "-1/8"], FRACTION),
                                         (["--quest-budgets", "abc"], FRACTION),
                                         (["--batch", "0"], "--batch: must be a whole number >= 1, got '0'"),
                                         (["--ppl-tokens", "255", "--ppl-context", "256"],
                                          "at most --ppl-context - 2 (254)"),
                                         (["--quick", "--ppl-tokens", "2000"], "--ppl-context - 2 (1022)"),  # kept
                                         (["--quest", "16"], "must be n_sink:n_recent"),
                                         (["--quest", "16:16x"], "must be n_sink:n_recent"),
                                         (["--quest", "16:"], "must be n_sink:n_recent"),
                                         (["--budgets", "1"], FRACTION),  # one token is no fraction
                                         (["--contexts", "1024", "--samples", "4", "4"],
                                          "--samples gives 2 counts for 1 --contexts lengths: give one count per "
                                          "length, or one for them all"),
                                         (["--contexts", "127", "--samples", "1"], "retrieval needs --contexts >= 128"),
                                         (["--contexts", "128", "--samples", "1", "--budgets", "0.995"],
                                          "budget 199/200 of a 128-token context keeps every key a scored step sees "
                                          "(127 at most): it would decode densely under a sparse label"),
                                         (["--tasks", "perplexity", "--ppl-context", "256", "--ppl-tokens", "8",
                                           "--selectors", "quest", "--quest-budgets", "0.999"],
                                          "budget 999/1000 of a 256-token context keeps every key"),
                                         (["--tasks", "perplexity", "--ppl-context", "256", "--ppl-tokens", "8",
                                           "--budgets", "255/256"], "budget 255/256 of a 256-token context keeps"),
                                         (["--contexts", "128", "--samples", "1001"],
                                          "--samples 1001: at most 1000 a context length"),
                                         (["--contexts", "128", "256", "--samples", "4", "10" + "0" * 17],
                                          "--samples 1000000000000000000: at most 1000"),  # it built its list for ever
                                         (["--contexts", "40", "--samples", "1"],
                                          "--contexts 40 is too short: retrieval needs --contexts >= 128"),
                                         (["--minutes", "0"], "--minutes 0.0: retrieval needs --minutes > 0"),
                                         (["--sink", "-1"], "--sink -1: must be >= 0"),
                                         (["--seed", "1.5"], "--seed: must be a whole number, got '1.5'"),
                                         (["--n-dense", "-1"], "--n-dense -1: must be >= 0"),
                                         (["--device", "xyz"], "--device: 'xyz' names no device"),
                                         (["--selectors", "trained", "--hash-weights", "none"], "only dense would run"),
                                         (["--selectors", "trained", "--tasks", "perplexity"], "only dense would run"),
                                         (["--budgets", "0.12345678901", "0.12345678902"], "both labelled 0.123"),
                                         (["--budgets", "0.1234567890001", "--quest-budgets", "0.1234567890002"],
                                          "both labelled 0.123456789"),
                                         (["--contexts", "1024", "1024", "--samples", "4", "8"], "repeats a length"),
                                         (["--name", "/dev/null/x"], "--out-dir / --name: cannot write in /dev/null"),
                                         (["--name", "n" * 300], "(a name of 321 bytes, nnnn"),  # its .partial.json
                                         (["--rbit", "2048"], "--rbit must be a multiple of 32 (whole int32 code "
                                                               "words) in [32, 1024], got 2048"),
                                         (["--rbit", "0"], "--rbit must be a multiple of 32 (whole int32 code "
                                                            "words) in [32, 1024], got 0"),  # engine.py's words
                                         (["--text", "a.txt", ""], "--text: an empty path"),
                                         (["--name", ""], "--name: an empty path"),
                                         (["--threads", "100000"], "--threads: must be at most")])
def test_bad_flags_fail_before_loading(argv, words, capsys, tmp_path):
    try:  # argparse's own errors exit through SystemExit
        code = ev.main(argv + ["--checkpoint", "/nonexistent.gguf", "--out-dir", str(tmp_path)])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and words in err and "nonexistent" not in err


def test_a_run_that_fails_leaves_no_new_folder_behind(tmp_path, capsys):
    """--out-dir is tried by a scratch file in its nearest existing folder, not made: the run fails at the
    checkpoint and leaves nothing behind; the first save makes the folders it needs."""
    out = tmp_path / "new" / "deeper"
    assert ev.main(["--checkpoint", "/nonexistent.gguf", "--out-dir", str(out)]) == 2
    assert "nonexistent" in capsys.readouterr().err and os.listdir(tmp_path) == []
    write_text(str(out / "x.md"), "kept")
    assert (out / "x.md").read_text() == "kept"


def test_flags_are_checked_against_the_model_for_the_tasks_that_run(
        gguf_path, smol, tok, monkeypatch, capsys, tmp_path):
    """--n-dense must leave a sparse layer (else every selector is dense), checked from the checkpoint's metadata
    before the text and the weights load (before: after); a length is checked only if its task runs."""
    monkeypatch.setattr(ev, "from_checkpoint", lambda *a, **k: smol)
    monkeypatch.setattr(ev.Tokenizer, "from_path", lambda *a, **k: tok)
    monkeypatch.setattr(ev, "selectors", lambda *a, **k: 1 / 0)  # what follows the checks: must not be reached
    base = ["--selectors", "oracle", "--checkpoint", gguf_path, "--out-dir", str(tmp_path)]
    with monkeypatch.context() as m:
        m.setattr(ev, "load_corpus", lambda *a, **k: 1 / 0)
        assert ev.main(["--n-dense", "30"] + base) == 2
        assert "--n-dense 30 must be in [0, 30)" in capsys.readouterr().err
    with pytest.raises(ZeroDivisionError):  # every layer sparse: allowed
        ev.main(["--n-dense", "0"] + base)
    real_corpus = ev.load_corpus
    monkeypatch.setattr(ev, "from_checkpoint", lambda *a, **k: 1 / 0)  # the context: from the metadata, before it
    monkeypatch.setattr(ev, "load_corpus", lambda *a, **k: 1 / 0)  # and before the text (it asked for more)
    for argv, words in [(["--tasks", "retrieval", "--contexts", "1000", "9000", "--samples", "1", "1"],
                         "--contexts 9000 exceeds"),
                        (["--tasks", "perplexity", "--ppl-context", "8193"], "--ppl-context 8193 exceeds the "
                                                                            "model's context of 8192 tokens")]:
        assert ev.main(argv + base) == 2 and words in capsys.readouterr().err
    monkeypatch.setattr(ev, "from_checkpoint", lambda *a, **k: smol)
    monkeypatch.setattr(ev, "load_corpus", real_corpus)
    with pytest.raises(ZeroDivisionError):  # the checks pass: the other task's lengths and counts are not its own
        ev.main(["--tasks", "perplexity", "--contexts", "40", "--samples", "1", "2"] + base)


def test_a_short_haystack_fails_before_the_model_loads(gguf_path, tok, monkeypatch, capsys, tmp_path):
    """Retrieval's haystacks are checked against the longest context before anything runs, and so is the
    perplexity text against its windows."""
    monkeypatch.setattr(ev.Tokenizer, "from_path", lambda *a, **k: tok)
    monkeypatch.setattr(ev, "from_checkpoint", lambda *a, **k: 1 / 0)  # must not be reached
    (tmp_path / "short.txt").write_text(PROSE * 20)  # its held-out last fifth: ~500 tokens
    assert ev.main(["--text", str(tmp_path / "short.txt"), "--contexts", "1024", "--samples", "1", "--checkpoint",
                    gguf_path, "--out-dir", str(tmp_path)]) == 2
    assert "fewer than --contexts 1024; give more --text" in capsys.readouterr().err
    for text, words in (("", "is empty"), ("words without a sentence end " * 400, "has no sentence end (. ! ?)")):
        (tmp_path / "bad.txt").write_text(text)  # the file's held-out part is named, not "the haystack text"
        assert ev.main(["--text", str(tmp_path / "bad.txt"), "--contexts", "128", "--samples", "1", "--checkpoint",
                        gguf_path, "--out-dir", str(tmp_path)]) == 2
        assert f"the last fifth of each of fewer than five) of --text {words}" in capsys.readouterr().err
    (tmp_path / "plain.txt").write_text("words without a sentence end " * 400)  # no haystack: perplexity takes it
    ppl = ["--text", str(tmp_path / "plain.txt"), "--tasks", "perplexity", "--ppl-context", "256", "--ppl-tokens", "4",
           "--checkpoint", gguf_path, "--out-dir", str(tmp_path)]
    assert ev.main(ppl + ["--ppl-context", "2048"]) == 2  # its held-out fifth holds no window of 2048 tokens
    assert ("the held-out text (every fifth document, or the last fifth of each of fewer than five) holds 0 windows "
            "of 2048 tokens, 1 needed") in capsys.readouterr().err
    with pytest.raises(ZeroDivisionError):  # fewer windows than --ppl-docs: all of them, with a warning (before: an
        ev.main(ppl + ["--ppl-docs", "4"])  # error, so a book's held-out fifth of 3 windows of 8K could not run)
    assert "warning: only 1 window of 256 tokens; using all of them" in capsys.readouterr().err


def test_a_run_records_the_argv_it_was_given(gguf_path, smol, tok, monkeypatch, tmp_path, capsys):
    """The results' command is main's argv (quoted as a shell would need it), not the process's; the weights and the
    held-out text are recorded as digests, which a merge compares."""
    monkeypatch.setattr(ev, "from_checkpoint", lambda *a, **k: smol)
    monkeypatch.setattr(ev.Tokenizer, "from_path", lambda *a, **k: tok)
    (tmp_path / "my text.txt").write_text(PROSE * 10)
    argv = ["--tasks", "perplexity", "--selectors", "oracle", "--budgets", "1/8", "--text",
            str(tmp_path / "my text.txt"), "--ppl-context", "128", "--ppl-tokens", "4", "--ppl-docs", "1",
            "--checkpoint", gguf_path, "--out-dir", str(tmp_path), "--name", "argv"]
    assert ev.main(argv) == 0 and not (tmp_path / "argv_results.partial.json").exists()
    results = json.loads((tmp_path / "argv_results.json").read_text())
    assert results["command"] == "python eval.py " + shlex.join(argv) and "'" in results["command"]
    assert results["rbit"] is None and results["n_dense"] == HataArgs.n_dense  # oracle alone reads no hash codes
    (started,) = results["started"]  # when, in UTC: a merge knows the run by it
    assert 0 <= (datetime.now(timezone.utc) - datetime.fromisoformat(started)).total_seconds() < 600
    assert "context lengths" in ev.build_parser().format_help()  # --contexts: the cache, not the prompt (C - 5)
    (tmp_path / "other.txt").write_text(PROSE[::-1] * 10)  # and the weights and text it read: another text is
    argv = [str(tmp_path / "other.txt") if a.endswith("my text.txt") else "other" if a == "argv" else a for a in argv]
    assert ev.main(argv) == 0  # not joined to its rows by a merge
    other = json.loads((tmp_path / "other_results.json").read_text())
    assert other["weights"] == results["weights"] and other["text"] != results["text"]
    assert ev.main(["--report", str(tmp_path / "argv_results.json"), str(tmp_path / "other_results.json"),
                    "--out-dir", str(tmp_path), "--name", "both"]) == 2
    assert "differ in model, weights, text, rbit or n_dense" in capsys.readouterr().err


def test_a_finished_run_is_not_marked_cut_and_its_own_file_rebuilds_by_any_spelling(
        gguf_path, smol, tok, monkeypatch, tmp_path):
    """retrieval_cut is true only where --minutes skipped samples; --report given the run's own results file as a
    relative path rebuilds the report and leaves the file as it is (no --overwrite needed)."""
    monkeypatch.setattr(ev, "from_checkpoint", lambda *a, **k: smol)
    monkeypatch.setattr(ev.Tokenizer, "from_path", lambda *a, **k: tok)
    monkeypatch.setattr(ev, "run_retrieval", lambda model, tok, hays, specs, *a: [
        {"context": C, "task": t, "haystack": h, "depth": d, "seed": sd, "answer": "1",
         "correct": {"dense": True, "oracle 1/8": True}} for C, t, h, d, sd in specs])
    (tmp_path / "text.txt").write_text(PROSE * 10)
    assert ev.main(["--tasks", "retrieval", "--selectors", "oracle", "--budgets", "1/8", "--contexts", "128",
                    "--samples", "2", "--text", str(tmp_path / "text.txt"), "--checkpoint", gguf_path,
                    "--out-dir", str(tmp_path), "--name", "x"]) == 0
    text = (tmp_path / "x_results.json").read_text()
    assert json.loads(text)["retrieval_cut"] is False and json.loads(text)["retrieval_planned"] == 2
    monkeypatch.chdir(tmp_path)
    assert ev.main(["--report", "x_results.json", "--out-dir", str(tmp_path), "--name", "x"]) == 0
    assert (tmp_path / "x_results.json").read_text() == text


def test_a_samples_prompt_does_not_depend_on_the_other_contexts(gguf_path, smol, tok, monkeypatch, tmp_path):
    """The noise haystack is sized by the model's context, so a sample (context, task, depth, seed) gets the same
    prompt whatever the other --contexts are (a merge joins samples by that spec)."""
    monkeypatch.setattr(ev, "from_checkpoint", lambda *a, **k: smol)
    monkeypatch.setattr(ev.Tokenizer, "from_path", lambda *a, **k: tok)
    prompts = []
    def prompts_of(model, tok, hays, specs, *a):  # the prompts of the 128-token samples, instead of running them
        prompts.append([ev.retrieval_prompt(tok, hays[h], t, C - ev.N_DIGITS, d, random.Random(sd))[0]
                        for C, t, h, d, sd in specs if C == 128])
        return []
    monkeypatch.setattr(ev, "run_retrieval", prompts_of)
    (tmp_path / "text.txt").write_text(PROSE * 20)
    for contexts in (["128"], ["128", "256"]):
        assert ev.main(["--tasks", "retrieval", "--selectors", "oracle", "--budgets", "1/8", "--contexts", *contexts,
                        "--samples", *["4"] * len(contexts), "--text", str(tmp_path / "text.txt"),
                        "--checkpoint", gguf_path, "--out-dir", str(tmp_path), "--name", str(len(contexts))]) == 0
    assert len(prompts[0]) == 4 and prompts[0] == prompts[1]


def test_the_seed_flag_reaches_the_samples(gguf_path, smol, tok, monkeypatch, tmp_path):
    """--seed 7 draws seed 7's samples (the other --seed tests check its parsing and the note where it is unused)."""
    monkeypatch.setattr(ev, "from_checkpoint", lambda *a, **k: smol)
    monkeypatch.setattr(ev.Tokenizer, "from_path", lambda *a, **k: tok)
    got = []
    monkeypatch.setattr(ev, "run_retrieval", lambda model, tok, hays, specs, *a: got.extend(specs) or [])
    (tmp_path / "text.txt").write_text(PROSE * 20)
    assert ev.main(["--tasks", "retrieval", "--selectors", "oracle", "--budgets", "1/8", "--contexts", "128",
                    "--samples", "3", "--seed", "7", "--text", str(tmp_path / "text.txt"), "--checkpoint", gguf_path,
                    "--out-dir", str(tmp_path)]) == 0
    assert got == ev.retrieval_specs({128: 3}, 7) and got[0][4] == 7 * 2 ** 32 + 128000


def test_a_stopped_run_keeps_the_earlier_results_and_its_own_so_far(
        gguf_path, smol, tok, monkeypatch, tmp_path, capsys):
    """Until a run ends its results go to NAME_results.partial.json, so a run stopped midway (Ctrl-C, a crash) with
    --overwrite leaves the earlier NAME_results.json whole; the partial file's report (merged or not) says the run
    stopped, and the next run replaces the partial file only with --overwrite."""
    monkeypatch.setattr(ev, "from_checkpoint", lambda *a, **k: smol)
    monkeypatch.setattr(ev.Tokenizer, "from_path", lambda *a, **k: tok)
    real = ev.run_teacher_forced
    def stopped(model, windows, *a):  # the first batch's results, then Ctrl-C
        real(model, windows[:1], *a)
        raise KeyboardInterrupt
    monkeypatch.setattr(ev, "run_teacher_forced", stopped)
    (tmp_path / "text.txt").write_text(PROSE * 10)
    (tmp_path / "eval_results.json").write_text("kept")
    argv = ["--tasks", "perplexity", "--selectors", "oracle", "--budgets", "1/8", "--text", str(tmp_path / "text.txt"),
            "--ppl-context", "64", "--ppl-tokens", "4", "--ppl-docs", "2", "--batch", "1", "--checkpoint", gguf_path,
            "--out-dir", str(tmp_path), "--overwrite"]
    assert ev.main(argv) == 130
    assert f"results so far: {tmp_path / 'eval_results.partial.json'} (eval.py --report reads it; a rerun of --name " \
           "eval with --overwrite replaces it: give another --name to keep it)" in capsys.readouterr().err  # (before:
    # "a rerun ... needs --overwrite", which then lost them)
    assert (tmp_path / "eval_results.json").read_text() == "kept"
    partial = ev.load_results(str(tmp_path / "eval_results.partial.json"))
    for stop, code in ((RuntimeError("CUDA out of memory"), 2), (KeyboardInterrupt(), 130)):  # --overwrite, stopped
        monkeypatch.setattr(ev, "run_teacher_forced", lambda *a: (_ for _ in ()).throw(stop))  # before its first
        assert ev.main(argv) == code and "results so far" not in capsys.readouterr().err  # batch: the partial file is
        # the earlier run's, and is not named
    def failed(model, windows, *a):  # after its first batch, an error (not Ctrl-C): its results so far are named
        real(model, windows[:1], *a)
        raise RuntimeError("CUDA out of memory")
    monkeypatch.setattr(ev, "run_teacher_forced", failed)
    assert ev.main(argv) == 2 and "results so far: " in capsys.readouterr().err
    monkeypatch.setattr(ev, "write_json", lambda *a: (_ for _ in ()).throw(OSError("No space left on device")))
    assert ev.main(argv) == 2 and "results so far" not in capsys.readouterr().err  # its first write failed: the file
    # there is the earlier run's
    assert partial["perplexity"]["dense"]["positions"] == 4 and partial["perplexity_planned"] == 8
    assert "4 teacher-forced positions (of 8: the run stopped before the rest)" in ev.report(partial)
    retrieval = {"command": "r", "selectors": ["oracle"], "budgets": [1 / 8], "seconds": {}, "retrieval": []}
    assert "4 teacher-forced positions (of 8: the run stopped" in ev.report(ev.merge([retrieval, partial]))
    os.remove(tmp_path / "eval_results.json")
    capsys.readouterr()
    assert ev.main(argv[:-1]) == 2 and "eval_results.partial.json exists: pass --overwrite" in capsys.readouterr().err


def test_one_samples_count_serves_every_context(gguf_path, smol, tok, monkeypatch, tmp_path, capsys):
    """--samples with one count takes that many samples at each --contexts length; --contexts alone, with the
    default counts of other lengths, is refused, saying whose lengths the default counts are for. Default lengths
    alone get their default counts, --quick's too (before: refused)."""
    monkeypatch.setattr(ev, "from_checkpoint", lambda *a, **k: smol)
    monkeypatch.setattr(ev.Tokenizer, "from_path", lambda *a, **k: tok)
    seen = []
    monkeypatch.setattr(ev, "retrieval_specs", lambda counts, seed: seen.append(counts) or [])
    (tmp_path / "text.txt").write_text(PROSE * 20)
    argv = ["--tasks", "retrieval", "--selectors", "oracle", "--text", str(tmp_path / "text.txt"), "--checkpoint",
            gguf_path, "--out-dir", str(tmp_path), "--contexts", "128", "256"]
    assert ev.main(argv) == 2
    assert ("error: --contexts 128 256: no default --samples count for it (the defaults are for 1024 2048 4096 8192); "
            "give --samples N for every length, or one count per length\n") in capsys.readouterr().err
    assert ev.main(argv + ["--quick"]) == 2  # 2 lengths beside --quick's 2 counts: not paired by place (they were)
    assert "--contexts 128 256: no default --samples count" in capsys.readouterr().err
    assert ev.main(["--quick", "--contexts", "10"]) == 2  # the length first: a count would not help
    assert "--contexts 10 is too short: retrieval needs --contexts >= 128" in capsys.readouterr().err
    assert ev.main(argv + ["--samples", "3"]) == 0 and seen == [{128: 3, 256: 3}]
    (tmp_path / "text.txt").write_text(PROSE * 200)
    argv[-2:] = ["4096", "1024"]
    assert ev.main(argv + ["--overwrite"]) == 0 and seen[-1] == {4096: 56, 1024: 120}
    assert ev.main(argv[:-2] + ["1024", "--quick", "--overwrite"]) == 0 and seen[-1] == {1024: 4}
    assert ev.main(argv[:-2] + ["1024", "512", "--overwrite"]) == 2  # 512 has no default count: give them all
    assert "--contexts 512: no default --samples count for it" in capsys.readouterr().err
    (tmp_path / "text.txt").write_text(PROSE * 340)
    argv[-2:] = ["8192", "1024", "2048", "4096"]  # counts as many as the lengths: taken as given, in their order
    assert ev.main(argv + ["--samples", "120", "100", "56", "28", "--overwrite"]) == 0
    assert seen[-1] == {8192: 120, 1024: 100, 2048: 56, 4096: 28}
    assert ev.main(argv + ["--overwrite"]) == 0  # not given: the default lengths in any order keep their own counts
    assert seen[-1] == {8192: 28, 1024: 120, 2048: 100, 4096: 56}  # (before: 120 at 8192, positionally)


def test_a_hash_weights_file_sets_rbit_and_n_dense_where_not_given(gguf_path, smol, tok, monkeypatch, tmp_path, capsys):
    """As engine.py: --rbit and --n-dense default to the file's own (R = 64, 3 dense layers here); given, they must
    match it (load_hash_projections says so)."""
    monkeypatch.setattr(ev, "from_checkpoint", lambda *a, **k: smol)
    monkeypatch.setattr(ev.Tokenizer, "from_path", lambda *a, **k: tok)
    projs = {l: torch.randn(smol.args.n_kv_heads, smol.args.head_dim, 64) for l in range(3, smol.args.n_layers)}
    save_hash_projections(path := str(tmp_path / "p.safetensors"), projs, smol.args, HataArgs(rbit=64, n_dense=3))
    (tmp_path / "text.txt").write_text(PROSE * 10)
    argv = ["--tasks", "perplexity", "--selectors", "trained", "--budgets", "1/8", "--text", str(tmp_path / "text.txt"),
            "--ppl-context", "64", "--ppl-tokens", "4", "--ppl-docs", "1", "--hash-weights", path, "--checkpoint",
            gguf_path, "--out-dir", str(tmp_path)]
    assert ev.main(argv) == 0
    assert "R = 64, 3 dense layers, hata-trained: " + path in capsys.readouterr().err
    results = json.loads((tmp_path / "eval_results.json").read_text())
    assert (results["rbit"], results["n_dense"]) == (64, 3) and "hata-trained 1/8" in results["perplexity"]
    assert results["hash_digest"] == hashlib.sha256((tmp_path / "p.safetensors").read_bytes()).hexdigest()[:16]
    monkeypatch.setattr(ev, "from_checkpoint", lambda *a, **k: 1 / 0)  # refused from the metadata (before: after)
    assert ev.main(argv + ["--n-dense", "2", "--name", "other"]) == 2
    assert "pass --n-dense 3" in capsys.readouterr().err


def test_a_meta_checkpoints_n_dense_is_checked_once_its_weights_load(gguf_path, smol, tok, monkeypatch, tmp_path,
                                                                      capsys):
    """params.json may give no shape before the weights (checkpoint_metadata's None): --n-dense past the layers is
    refused once they load, before any text is scored (all 30 dense: every selector would be dense)."""
    monkeypatch.setattr(ev, "checkpoint_metadata", lambda path: (8192, None))
    monkeypatch.setattr(ev, "from_checkpoint", lambda *a, **k: smol)
    monkeypatch.setattr(ev.Tokenizer, "from_path", lambda *a, **k: tok)
    monkeypatch.setattr(ev, "run_teacher_forced", lambda *a, **k: 1 / 0)  # must not be reached
    (tmp_path / "text.txt").write_text(PROSE * 10)
    assert ev.main(["--tasks", "perplexity", "--selectors", "oracle", "--budgets", "1/8", "--text",
                    str(tmp_path / "text.txt"), "--ppl-context", "64", "--ppl-tokens", "4", "--ppl-docs", "1",
                    "--n-dense", "30", "--checkpoint", gguf_path, "--out-dir", str(tmp_path)]) == 2
    assert "--n-dense 30 must be in [0, 30)" in capsys.readouterr().err


def test_tables_that_cannot_be_shown_name_standard_output(tmp_path, monkeypatch):
    """Standard output that takes no write (a full disk under `> file`) is named as what failed, after the results and
    the markdown are written (before: "[Errno 28] No space left on device", which names no file)."""
    ppl = {"dense": {"ppl": 2.0, "agree": 1.0, "nll": 0.69, "positions": 8},
           "oracle 1/8": {"ppl": 2.5, "agree": 0.875, "nll": 0.92, "positions": 8}}
    results = {"command": "c", "selectors": ["oracle"], "budgets": [1 / 8], "seconds": {}, "ppl_context": 1024,
               "perplexity": ppl}
    full_stdout(monkeypatch)
    with pytest.raises(OSError, match=r"cannot write standard output: \[Errno 28\] No space left on device"):
        ev.write_report(results, str(tmp_path), "x", str(tmp_path / "x_results.json"))
    assert sorted(os.listdir(tmp_path)) == ["x_results.json", "x_results.md"]


def test_a_report_that_cannot_be_built_writes_nothing_and_a_plot_that_fails_costs_no_results(monkeypatch, tmp_path,
                                                                                              capsys):
    """A report that fails to build writes no file; a plot that fails (matplotlib on odd data) comes after the
    results and the markdown are written, and the table shown. Dense with no retrieval sample right has no plot (no
    share of none), where matplotlib's log axis failed, after a whole run, with the final results unwritten."""
    results = {"command": "test", "selectors": ["oracle"], "budgets": [1 / 8], "seconds": {}, "retrieval": []}
    (tmp_path / "a.json").write_text(json.dumps(results))
    for stage in ("report", "plot"):
        monkeypatch.setattr(ev, stage, lambda *a: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            ev.main(["--report", str(tmp_path / "a.json"), "--out-dir", str(tmp_path), "--name", "b"])
        monkeypatch.undo()
        if stage == "report":
            assert os.listdir(tmp_path) == ["a.json"]
    assert sorted(os.listdir(tmp_path)) == ["a.json", "b_results.json", "b_results.md"]
    (tmp_path / "b_results.partial.json").write_text("a run's results so far")  # gone once the results are written
    (tmp_path / "b_scores.png").write_bytes(b"an earlier run's plot")  # gone, though the new plot failed (before:
    capsys.readouterr()                                                  # it stood beside the new results)
    monkeypatch.setattr(ev, "plot", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        ev.write_report(results, str(tmp_path), "b", str(tmp_path / "b_results.json"),
                        str(tmp_path / "b_results.partial.json"))
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["a.json", "b_results.json", "b_results.md"]
    assert capsys.readouterr().out == ev.report(results) + "\n"  # the table is shown (before: not, as the plot failed)
    (tmp_path / "e_scores.png").mkdir()  # a folder where the plot would go: refused before anything is written
    assert ev.main(["--report", str(tmp_path / "a.json"), "--out-dir", str(tmp_path), "--name", "e"]) == 2
    assert "e_scores.png is a folder, where this run would write a file" in capsys.readouterr().err
    assert not (tmp_path / "e_results.json").exists()
    rec = {"context": 1024, "task": "single", "haystack": "noise", "depth": 0.5, "answer": "1",
           "correct": {"dense": False, "oracle 1/8": False}}
    (tmp_path / "c.json").write_text(json.dumps({**results, "retrieval": [rec] * 2}))
    assert ev.main(["--report", str(tmp_path / "c.json"), "--out-dir", str(tmp_path), "--name", "d"]) == 0
    assert "no retrieval plot: dense answered no sample right" in capsys.readouterr().err
    assert (tmp_path / "d_results.md").exists() and not (tmp_path / "d_scores.png").exists()
    rec["correct"]["dense"] = True  # budgets none of the records hold: no point to plot (the same failure)
    (tmp_path / "f.json").write_text(json.dumps({**results, "budgets": [0.5], "retrieval": [rec] * 2}))
    (tmp_path / "f_scores.png").write_bytes(b"an earlier run's plot")  # not left beside results it does not show
    assert ev.main(["--report", str(tmp_path / "f.json"), "--out-dir", str(tmp_path), "--name", "f"]) == 0
    assert "nothing to plot" in capsys.readouterr().err and (tmp_path / "f_results.md").exists()
    assert not (tmp_path / "f_scores.png").exists()


def test_settings_without_the_trained_selector_need_no_file(capsys, tmp_path):
    """--rbit 64 --n-dense 3 with oracle alone: no projection file is chosen or checked (it fails at the checkpoint)."""
    assert ev.main(["--rbit", "64", "--n-dense", "3", "--selectors", "oracle", "--checkpoint", "/nonexistent.gguf",
                    "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "nonexistent" in err and "hash weights" not in err and "no trained projections" not in err
    # a bad --rbit too: noted as ignored, as engine.py's is (before, noted, then refused)
    assert ev.main(["--rbit", "100", "--selectors", "oracle", "quest", "--checkpoint", "/nonexistent.gguf",
                    "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "nonexistent" in err and "--rbit (no HATA selector" in err and "multiple of 32" not in err
    assert ev.main(["--rbit", "0", "--selectors", "oracle", "--checkpoint", "/nonexistent.gguf",  # 0 too (was refused)
                    "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "nonexistent" in err and "--rbit (no HATA selector" in err and "whole number" not in err
    assert ev.main(["--selectors", "trained", "oracle", "--checkpoint", "/nonexistent.gguf", "--out-dir",
                    str(tmp_path)]) == 2  # not the default model: no projections, but the checkpoint's error alone
    err = capsys.readouterr().err
    assert "checkpoint not found: /nonexistent.gguf" in err and "no trained projections" not in err, err


@pytest.mark.usefixtures("gguf_path")  # the default model: skipped when it is not installed
def test_a_sink_or_window_past_every_context_is_refused_before_a_prefill(capsys, tmp_path, monkeypatch):
    """A --sink or --quest window longer than every context is refused before any work, the weights' load included
    (before: after it); a huge one overflowed in the kernels after the first prefill, with a traceback. One as long as
    the context is not refused."""
    monkeypatch.setattr(ev, "from_checkpoint", lambda *a, **k: 1 / 0)
    small = ["--tasks", "perplexity", "--ppl-context", "128", "--ppl-tokens", "8", "--ppl-docs", "1", "--budgets",
             "1/8", "--out-dir", str(tmp_path)]
    for flags, name in ((["--selectors", "oracle", "--sink", str(10 ** 30)], "oracle s" + str(10 ** 30)),
                        (["--selectors", "quest", "--quest", "0:129"], "quest s0 r129")):
        assert ev.main(flags + small) == 2
        err = capsys.readouterr().err
        assert f"error: {name}: its sink or recent window is longer than any context" in err, err
        assert not os.listdir(tmp_path)
    for flags in (["--selectors", "oracle", "--sink", "128"], ["--selectors", "quest", "--quest", "0:128"]):
        with pytest.raises(ZeroDivisionError):  # as long as the context, not longer: on to the weights' load
            ev.main(flags + small)


def test_default_and_given_flags_parse_to_what_run_uses():
    """argparse applies `type` to a string default only: list defaults must already be parsed values."""
    for argv, quest in (([], [(16, 16)]), (["--quest", "4:8", "0:0"], [(4, 8), (0, 0)])):
        args = ev.build_parser().parse_args(argv)
        assert args.quest == quest and list(ev.selectors("w.safetensors", args.quest)) == [
            "oracle", "hata-trained", "hata-random"] + [f"quest s{s} r{r}" for s, r in quest]
        assert all(0 < f < 1 for f in args.budgets + args.quest_budgets)


def test_the_docstrings_examples_pass_the_checks_in_a_fresh_clone(capsys, tmp_path):
    """Each `python eval.py ...` example of the module docstring gets past the checks (to the missing checkpoint
    here) beside the committed results of report/: none of them is in its way."""
    committed = ["eval_results.json", "eval_listwise_results.json"]
    for name in committed:
        assert os.path.isfile(os.path.join(ev.HERE, "report", name))
        (tmp_path / name).write_text("kept")
    examples = re.findall(r"^ *python eval\.py ([^#\n]*)", ev.__doc__, re.M)
    assert len(examples) == 2
    for line in examples:
        assert ev.main(shlex.split(line) + ["--checkpoint", "/nonexistent.gguf", "--out-dir", str(tmp_path)]) == 2
        assert "nonexistent" in capsys.readouterr().err
    assert all((tmp_path / name).read_text() == "kept" for name in committed)


def test_quick_sizes_are_defaults_that_given_flags_override():
    """--quick's small sizes fill only the flags not given; one given at the full run's default value stays."""
    quick = vars(ev.parse_args(["--quick"]))
    assert {k: quick[k] for k in ev.QUICK} == ev.QUICK
    args = ev.parse_args(["--quick", "--ppl-context", "8192", "--contexts", "1024", "2048", "4096", "8192",
                          "--samples", "1", "1", "1", "1"])
    assert (args.ppl_context, args.contexts, args.samples, args.ppl_docs) == (8192, [1024, 2048, 4096, 8192],
                                                                              [1, 1, 1, 1], ev.QUICK["ppl_docs"])
    assert ev.parse_args([]).ppl_context == 8192


@pytest.mark.parametrize("argv, ignored", [
    (["--report", "x.json", "--contexts", "512", "--threads", "2"],
     "--checkpoint, --threads, --contexts (--report rebuilds the report from results files)"),
    (["--tasks", "perplexity", "--samples", "3", "--selectors", "oracle", "--quest", "4:4", "--hash-weights", "w"],
     "--samples (no retrieval task); --hash-weights (no trained selector); --quest (no quest selector)"),
    (["--tasks", "perplexity", "--minutes", "5", "--seed", "3"], "--minutes, --seed (no retrieval task)"),
    (["--sink", "4", "--selectors", "quest"], "--sink (no oracle or HATA selector: Quest's are --quest)"),
    (["--sink", "4", "--selectors", "quest", "random"], None),
    (["--rbit", "64", "--selectors", "oracle", "quest"], "--rbit (no HATA selector: oracle and Quest read no hash "
     "codes)"),
    (["--rbit", "64", "--selectors", "oracle", "random"], None),
    (["--quick", "--tasks", "retrieval"], None)])  # --quick's sizes are not flags given
def test_flags_a_run_ignores_are_noted(argv, ignored, capsys, tmp_path):
    assert ev.main(argv + ["--checkpoint", "/nonexistent.gguf", "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"note: ignored in this run: {ignored}\n" in err if ignored else "ignored" not in err
    flags = {f for a in ev.build_parser()._actions for f in a.option_strings}
    assert set(ev.RUN_ONLY + sum(ev.TASK_FLAGS.values(), ())) < flags  # every one a real flag


def test_report_from_bad_files_names_them(capsys, tmp_path):
    """A file that is not JSON, not eval.py's, missing, from before ppl_context, or with a record the report cannot
    read: one error naming it, and the output file untouched. One file named twice would count its samples twice."""
    (tmp_path / "bad.json").write_text("{bad")
    (tmp_path / "other.json").write_text('{"a": 1}')
    (tmp_path / "eval_results.json").write_text("kept")  # the output a failed --report must not overwrite
    no_context = {"command": "t", "selectors": [], "budgets": [], "seconds": {}, "perplexity": {"dense": {}}}
    (tmp_path / "no_context.json").write_text(json.dumps(no_context))
    (tmp_path / "damaged.json").write_text(json.dumps({**no_context, "ppl_context": 64}))  # its record lacks "nll" ...
    rec = {"context": 1024, "task": "single", "haystack": "noise", "depth": 0.5, "answer": "1", "correct": {}}
    (tmp_path / "no_dense.json").write_text(json.dumps({**no_context, "perplexity": {}, "retrieval": [rec]}))
    base = {"command": "t", "selectors": ["oracle"], "budgets": [0.25], "seconds": {}}
    zero = {"ppl_context": 64, "perplexity": {"dense": {"nll": 0, "ppl": 0, "agree": 1, "positions": 4}}}
    for name, damage in [("none", {"budgets": None}), ("zero", {"budgets": [0, 0.25]}), ("one", {"budgets": [1.0]}),
                         ("five", {"selectors": 5}),
                         ("seconds", {"seconds": {"retrieval": "x"}}), ("ppl0", zero), ("command", {"command": 5}),
                         ("context", {"ppl_context": "64"}), ("planned", {"retrieval_planned": "8"}),
                         ("started", {"started": "2026-12-06"}), ("start", {"started": [1]}),
                         ("null", {"retrieval": None}), ("yes", {"retrieval": [{**rec, "correct": {"dense": "yes"}}]}),
                         ("at", {"retrieval": [{**rec, "context": None, "correct": {"dense": True}}]})]:
        (tmp_path / f"{name}_damaged.json").write_text(json.dumps({**base, **damage}))
    (tmp_path / "big.json").write_text('{"command": ' + "9" * 5000 + "}")  # (each of these a traceback before)
    (tmp_path / "deep.json").write_text("[" * 100000 + "]" * 100000)
    for name, words in [("none_damaged.json", "none_damaged.json: its budgets (fractions in (0, 1)), selectors"),
                        ("zero_damaged.json", "zero_damaged.json: its budgets"),
                        ("one_damaged.json", "one_damaged.json: its budgets"),
                        ("deep.json", "deep.json is not a JSON file eval.py wrote"),
                        ("five_damaged.json", "five_damaged.json: its budgets"),
                        ("seconds_damaged.json", "seconds_damaged.json: its budgets"),
                        ("ppl0_damaged.json", "ppl0_damaged.json: a retrieval or perplexity record lacks"),
                        *[(f"{n}_damaged.json", f"{n}_damaged.json: its command or start times (text), ppl_context "
                           "or planned counts") for n in ("command", "context", "planned", "started", "start")],
                        *[(f"{n}_damaged.json", f"{n}_damaged.json: a retrieval or perplexity record lacks")
                          for n in ("null", "yes", "at")],
                        ("big.json", "big.json is not a JSON file eval.py wrote (Exceeds the limit"),
                        ("bad.json", "bad.json is not a JSON file"), ("other.json", "not a results file of eval.py"),
                        ("none.json", f"results file not found: {tmp_path / 'none.json'}"),
                        (".", f"{tmp_path} is a directory; pass the results files in it ({tmp_path / '*.json'})"),
                        ("no_context.json", "has perplexity results but no ppl_context"),
                        ("damaged.json", "damaged.json: a retrieval or perplexity record lacks what the report reads"),
                        ("no_dense.json", "no_dense.json: a retrieval or perplexity record lacks")]:
        assert ev.main(["--report", str(tmp_path / name), "--out-dir", str(tmp_path), "--overwrite"]) == 2
        assert words in capsys.readouterr().err
    twice = [str(tmp_path / "no_dense.json"), str(tmp_path / ".." / tmp_path.name / "no_dense.json")]
    assert ev.main(["--report", *twice, "--out-dir", str(tmp_path), "--overwrite"]) == 2  # its samples twice
    assert "--report names one file more than once" in capsys.readouterr().err
    run = open(os.path.join(os.path.dirname(__file__), "..", "report", "eval_results.json")).read()  # a whole run
    for name in ("run.json", "copy.json"):  # ... and a copy of it: its seconds counted twice in the merge
        (tmp_path / name).write_text(run)
    (tmp_path / "other.json").write_text(json.dumps({**json.loads(run), "command": "another run"}))
    assert ev.main(["--report", *(str(tmp_path / n) for n in ("run.json", "other.json", "copy.json")), "--out-dir",
                    str(tmp_path), "--overwrite"]) == 2
    assert f"{tmp_path / 'copy.json'} holds the same run as {tmp_path / 'run.json'}" in capsys.readouterr().err
    assert (tmp_path / "eval_results.json").read_text() == "kept"
    (tmp_path / "b.json").write_text("kept too")
    ev.main(["--report", str(tmp_path / "eval_results.json"), str(tmp_path / "b.json"), "--out-dir", str(tmp_path)])
    assert "would overwrite its input" in capsys.readouterr().err  # the merge's own path among several inputs
    assert (tmp_path / "eval_results.json").read_text() == "kept"


def test_a_run_never_overwrites_earlier_results_unless_told(capsys, tmp_path):
    """The default --name and --out-dir are where the committed full run lies: a run refuses before loading the model,
    --overwrite lets it through (to the missing checkpoint here), and --quick's scratch results are replaced freely.
    --report of other files likewise."""
    (tmp_path / "eval_results.json").write_text("kept")
    (tmp_path / "eval_quick_results.json").write_text("kept")
    base = ["--tasks", "perplexity", "--selectors", "oracle", "--checkpoint", "/nonexistent.gguf", "--out-dir",
            str(tmp_path)]
    for argv in ([], ["--quick", "--name", "eval"]):  # --quick over a name given: refused as well
        assert ev.main(base + argv) == 2
        err = capsys.readouterr().err
        assert f"{tmp_path / 'eval_results.json'} exists: pass --overwrite" in err and "nonexistent" not in err
    for argv in (["--overwrite"], ["--quick"]):  # --quick replaces its own eval_quick_* freely
        assert ev.main(base + argv) == 2 and "nonexistent" in capsys.readouterr().err
    assert ev.main(base + ["--name", "other"]) == 2 and "nonexistent" in capsys.readouterr().err
    results = {"command": "test", "selectors": ["oracle"], "budgets": [1 / 8], "seconds": {}, "retrieval": []}
    (tmp_path / "a.json").write_text(json.dumps(results))
    report = ["--report", str(tmp_path / "a.json"), "--out-dir", str(tmp_path)]
    assert ev.main(report) == 2 and "eval_results.json exists" in capsys.readouterr().err
    assert (tmp_path / "eval_results.json").read_text() == "kept" and not (tmp_path / "eval_results.md").exists()
    assert ev.main(report + ["--overwrite"]) == 0
    assert json.loads((tmp_path / "eval_results.json").read_text()) == results
    assert ev.main(["--report", str(tmp_path / "eval_results.json"), "--out-dir", str(tmp_path)]) == 0  # a rebuild


def test_retrieval_decoding_goes_on_while_any_sequence_still_follows_its_answer(monkeypatch):
    """A batch stops decoding its answers only when every sequence has left its own (the steps not run are -1): one
    wrong sequence must not cut the others' digits short (they would read as -1, scored wrong); it is cut itself
    after its first miss."""
    expect = torch.tensor([[3, 4, 5], [3, 4, 5]])
    for right, want in (([True, False], [[3, 4, 5], [7, -1, -1]]), ([False, False], [[7, -1, -1], [7, -1, -1]])):
        def step(model, cur, pos):  # a right row writes its answer, a wrong one 7 from the first step
            logits = torch.zeros(2, 10)
            for b in range(2):
                logits[b, expect[b, int(pos[b])] if right[b] else 7] = 1
            return logits
        monkeypatch.setattr(ev, "decode_one_token", step)
        top, _ = ev.decode(None, torch.tensor([[1], [1]]), torch.zeros(2, dtype=torch.long), 3, expect)
        assert top.tolist() == want


def test_perplexity_is_the_mean_over_positions_whatever_the_batches(monkeypatch):
    """Three windows in batches of 2 and 1: the NLL is the mean over all 9 scored positions (a mean of the batches'
    means would weigh the short last batch's 3 positions as much as the first batch's 6)."""
    def policies(model, tokens, n_prefill, steps, capacity, pols, bar=None):  # -1 a position, then -4
        B = tokens.shape[0]
        return {("dense", None): (torch.zeros(B, steps, dtype=torch.long), torch.full((B, steps), -1.0 if B == 2
                                                                                       else -4.0))}
    monkeypatch.setattr(ev, "run_policies", policies)
    res = ev.run_teacher_forced(None, torch.zeros(3, 8, dtype=torch.long), 3, [("dense", None, None)], batch=2)
    assert res["dense"]["nll"] == pytest.approx((6 * 1 + 3 * 4) / 9)


class WordTok:
    """A toy tokenizer: a word with the space before it is one token (' 71432', as Llama 3 joins a space to
    digits), and sentence-ending punctuation with the newlines after it is one ('.\\n', as tiktoken vocabularies)."""
    bos_id, add_bos = None, False

    def __init__(self):
        self.ids, self.words = {}, []

    def encode(self, text, bos=None):
        out = []
        for w in re.findall(r" ?\w+|[.!?]\n*|\s|[^\w\s]", text):
            out.append(self.ids.setdefault(w, len(self.words)))
            if out[-1] == len(self.words):
                self.words.append(w)
        return out

    def decode(self, ids):
        return "".join(self.words[i] for i in ids)


def test_selectors_carry_the_sink_tag_and_their_own_settings():
    """--sink S: oracle and HATA rows are "... sS" and select the first S positions; Quest keeps its own
    sink:recent (not swapped, not the --sink); hata-random has no file, hata-trained needs one; Quest alone also
    runs at the --quest-budgets; `which` leaves the others out."""
    sels = ev.selectors("w.safetensors", [(4, 8)], sink=2, rbit=64, n_dense=3)
    assert list(sels) == ["oracle s2", "hata-trained s2", "hata-random s2", "quest s4 r8"]
    pols = {(name, f): h for name, f, h in ev.policies(sels, [1 / 8], [1 / 4])}
    assert set(pols) == {("dense", None), ("oracle s2", 1 / 8), ("hata-trained s2", 1 / 8), ("hata-random s2", 1 / 8),
                         ("quest s4 r8", 1 / 8), ("quest s4 r8", 1 / 4)} and pols[("dense", None)] is None
    got = {name: (h.selector, h.n_sink, h.n_recent, h.hash_weights) for (name, f), h in pols.items() if f == 1 / 8}
    assert got == {"oracle s2": ("oracle", 2, 0, None), "hata-trained s2": ("hash", 2, 0, "w.safetensors"),
                   "hata-random s2": ("hash", 2, 0, None), "quest s4 r8": ("quest", 4, 8, None)}
    assert list(ev.selectors(None, [(16, 16)])) == ["oracle", "hata-random", "quest s16 r16"]  # no file: no trained
    assert list(ev.selectors("w.safetensors", [(16, 16)], which=("random",))) == ["hata-random"]


def test_a_fixed_window_is_marked_only_where_it_fills_the_budget():
    """† where sink + recent >= K: quest s16 r16 at K = 32 (1/32 of 1K), not s16 r15 there; oracle s4 at K = 4."""
    assert ev.forced_only("quest s16 r16", 1 / 32, 1024) and not ev.forced_only("quest s16 r15", 1 / 32, 1024)
    assert ev.forced_only("oracle s4", 1 / 256, 1024) and not ev.forced_only("oracle s3", 1 / 256, 1024)
    assert not ev.forced_only("oracle", 1 / 256, 1024)


def test_sentence_ends_are_any_of_the_three_marks_with_their_whitespace():
    """'?' and '!' end sentences too, and so does a token that joins '.' and a newline."""
    assert ev.Haystack(WordTok(), "One.\nTwo? Three! Four").ends == [2, 4, 6]


def test_a_piece_starts_at_the_text_or_a_sentence_end_and_lists_both_of_its_ends(tok):
    """Every start that fits is a candidate: 0, and each sentence end with n tokens after it (the last such one
    included); the piece's boundaries are 0, its sentence ends, and n where it ends a sentence. A haystack of
    exactly n tokens gives its one piece."""
    hay = ev.Haystack(tok, (ev.NOISE * 3).rstrip())  # it ends with a sentence
    options = []
    last = types.SimpleNamespace(choice=lambda xs: options.append(xs) or xs[-1])  # the latest start on offer
    n = len(hay.ids) - hay.ends[0]  # from the first sentence end to the end of the text (a sentence end)
    piece, ends = hay.piece(n, last)
    assert options[0] == [0, hay.ends[0]] and piece == hay.ids[hay.ends[0]:]
    assert ends == [0] + [e - hay.ends[0] for e in hay.ends[1:]] and ends[-1] == n
    piece, ends = hay.piece(len(hay.ids), random.Random(0))
    assert piece == hay.ids and ends == [0] + hay.ends


def test_keys_have_five_digits_and_multikey_distractors_are_other_keys_elsewhere(tok):
    """The key is a 5-digit number (never a shorter one); in a multikey prompt the other three names get their own
    keys (this seed: all different), at their own depths (not stacked beside the asked one)."""
    hay = ev.Haystack(tok, ev.NOISE * 200)
    for seed in range(40):
        _, key, _ = ev.retrieval_prompt(tok, hay, "single", 200, 0.5, random.Random(seed))
        assert re.fullmatch(r"[1-9]\d{4}", key), (seed, key)
    ids, key, _ = ev.retrieval_prompt(tok, hay, "multikey", 1018, 0.5, random.Random(3))
    text = tok.decode(ids)
    needles = [(m.start(), m[1], m[2]) for m in re.finditer(r"The pass key for (\w+) is (\d+)\.", text)]
    asked = re.search(r"The pass key for (\w+) is $", text)[1]
    assert len(needles) == 4 and len({name for _, name, _ in needles}) == 4
    assert {name: k for _, name, k in needles}[asked] == key and len({k for *_, k in needles}) == 4
    at = sorted(a for a, *_ in needles)
    assert max(b - a for a, b in zip(at, at[1:])) > 500, at  # not one block of needles


def test_needles_and_question_continue_the_text_without_a_stray_period(tok):
    ids, key, _ = ev.retrieval_prompt(tok, ev.Haystack(tok, ev.NOISE * 50), "single", 300, 0.5, random.Random(1))
    text = tok.decode(ids)
    assert ".." not in text and f"again. The pass key is {key}. Remember it. {key} is the pass key. The" in text


def test_a_key_whose_tokens_take_the_space_before_it_follows_a_question_without_it():
    """A tokenizer that joins the space to the digits (' 71432'): the prompt ends at 'is', the answer is ' 71432'."""
    wt = WordTok()
    ids, key, answer = ev.retrieval_prompt(wt, ev.Haystack(wt, ev.NOISE * 30), "single", 200, 0.5, random.Random(1))
    assert len(ids) == 200 and wt.decode(answer) == f" {key}"
    assert wt.decode(ids).endswith("\n\nThe pass key is") and wt.decode(ids + answer).endswith(f"is {key}")


def test_the_shortest_prompt_holds_no_haystack(tok):
    """A length that leaves 0 haystack tokens is enough (intro, needle, question); one token less is refused."""
    hay = ev.Haystack(tok, ev.NOISE * 50)
    length = next(n for n in range(40, 200) if not isinstance(_prompt_or_error(tok, hay, n), ValueError))
    ids, key, _ = ev.retrieval_prompt(tok, hay, "single", length, 0.5, random.Random(1))
    needle = f" The pass key is {key}. Remember it. {key} is the pass key."
    assert tok.decode(ids) == ev.INTRO + needle + "\n\nThe pass key is "


def _prompt_or_error(tok, hay, n):
    try:
        return ev.retrieval_prompt(tok, hay, "single", n, 0.5, random.Random(1))
    except ValueError as e:
        return e


def test_specs_cycle_every_depth_and_every_task_and_haystack_pair():
    """Every 11 samples cover the 11 depths (100% too); every 4 the four task / haystack pairs."""
    specs = ev.retrieval_specs({1024: 44}, 0)
    assert all(sorted(s[3] for s in specs[i:i + 11]) == list(ev.DEPTHS) for i in range(0, 44, 11))
    assert all({(s[1], s[2]) for s in specs[i:i + 4]} == {(t, h) for t in ev.TASKS for h in ev.HAYSTACKS}
               for i in range(0, 44, 4))


def _fake_retrieval(monkeypatch, seconds):
    """run_retrieval without a model: each batch takes `seconds[C]` of a fake clock; returns the calls' log."""
    clock, calls = [1000.0], []
    monkeypatch.setattr(ev, "time", types.SimpleNamespace(time=lambda: clock[0]))
    monkeypatch.setattr(ev, "retrieval_prompt", lambda tok, hay, task, length, depth, rng: ([1] * length, "12345",
                                                                                           [1, 2, 3, 4, 5]))
    def run_policies(model, tokens, n_prefill, steps, capacity, pols, expect, bar):
        calls.append((capacity, tokens.shape, n_prefill))
        clock[0] += seconds[capacity]
        return {("dense", None): (torch.tensor([[1, 2, 3, 4, 5, -1]] * tokens.shape[0]), None)}
    monkeypatch.setattr(ev, "run_policies", run_policies)
    return clock, calls


def test_retrieval_batches_interleave_lengths_and_skip_what_the_limit_would_cut(monkeypatch):
    """Batch i of a length's n runs (i + 1/2) / n of the way; a last short batch runs too; the prompt is C - 5
    tokens in a cache of C; a length not yet run is guessed from another's time scaled by (C / c) ** 1.2."""
    tok = types.SimpleNamespace(decode=lambda ids: "".join(map(str, ids)))
    pols = [("dense", None, None)]
    clock, calls = _fake_retrieval(monkeypatch, {1024: 10, 2048: 10})
    specs = [(C, "single", "noise", 0.5, i) for C, n in ((1024, 4), (2048, 2)) for i in range(n)]
    recs = ev.run_retrieval(None, tok, {"noise": None}, specs, pols, 1)
    assert [r["context"] for r in recs] == [1024, 2048, 1024, 1024, 2048, 1024] and all(r["correct"]["dense"]
                                                                                       for r in recs)
    assert calls[:2] == [(1024, (1, 1019), 1018), (2048, (1, 2043), 2042)]
    assert len(ev.run_retrieval(None, tok, {"noise": None}, specs[:3], pols, 2)) == 3  # batches of 2 and 1
    for minutes, ran in ((30, [1024]), (35, [1024, 2048])):  # 2048's guess: 10 s * 2 ** 1.2 = 23 s after 1024's 10
        clock, calls = _fake_retrieval(monkeypatch, {1024: 10, 2048: 10})
        specs = [(1024, "single", "noise", 0.5, 0), (2048, "single", "noise", 0.5, 1)]
        recs = ev.run_retrieval(None, tok, {"noise": None}, specs, pols, 1, deadline=clock[0] + minutes)
        assert [r["context"] for r in recs] == ran, minutes


def test_merge_counts_each_policy_plan_selector_budget_and_second_once():
    """Two perplexity runs of one pass plan it once; a selector both ran is listed once; budgets and timed tasks
    of either run are kept; where both runs hold one policy's result on a sample, the first run's counts."""
    dense = {"nll": 0.7, "ppl": 2.0, "agree": 1.0, "positions": 8}
    def run(sel, budget, ok, **kw):
        rec = {"context": 1024, "task": "single", "haystack": "noise", "depth": 0.5, "answer": "1", "seed": 7,
               "correct": {"dense": True, f"{sel} {ev.frac(budget)}": ok}}
        return {"command": sel, "selectors": [sel], "budgets": [budget], "ppl_context": 64, "retrieval": [rec],
                "perplexity": {"dense": dense}, "perplexity_planned": 8, **kw}
    merged = ev.merge([run("oracle", 1 / 8, True, seconds={"retrieval": 3}),
                       run("oracle", 1 / 8, False, seconds={"perplexity": 5}),
                       run("oracle", 1 / 16, True, seconds={})])
    assert merged["perplexity_planned"] == 8 and merged["selectors"] == ["oracle"]
    assert merged["budgets"] == [1 / 16, 1 / 8] and merged["seconds"] == {"retrieval": 3, "perplexity": 5}
    assert merged["retrieval"][0]["correct"] == {"dense": True, "oracle 1/8": True, "oracle 1/16": True}


def test_merge_leaves_out_other_projections_perplexity_rows_at_every_budget(capsys):
    """hata-trained rows of a second projection file are left out of perplexity too, also at a budget the first
    run did not run (not brought in as the first file's)."""
    def run(weights, budget):
        ppl = {"dense": {"nll": 0.7, "ppl": 2.0, "agree": 1.0, "positions": 8},
               f"hata-trained {ev.frac(budget)}": {"nll": 0.9, "ppl": 2.5, "agree": 0.9, "positions": 8}}
        return {"command": weights, "selectors": ["hata-trained"], "budgets": [budget], "seconds": {},
                "hash_weights": weights, "hash_digest": weights, "ppl_context": 64, "perplexity": ppl}
    merged = ev.merge([run("a", 1 / 8), run("b", 1 / 16)])
    assert set(merged["perplexity"]) == {"dense", "hata-trained 1/8"} and "left out" in capsys.readouterr().err


def test_report_and_plot_of_perplexity_alone():
    """No retrieval in the results: no retrieval heading; the plot's dense line is at 100% for retrieval."""
    ppl = {"dense": {"ppl": 2.0, "agree": 1.0, "nll": 0.69, "positions": 8},
           "oracle 1/8": {"ppl": 2.5, "agree": 0.875, "nll": 0.92, "positions": 8}}
    md = ev.report({"selectors": ["oracle"], "budgets": [1 / 8], "ppl_context": 1024, "perplexity": ppl})
    assert "Retrieval" not in md and md.startswith("### Perplexity")


def test_the_plots_dense_lines(monkeypatch):
    figs = []
    monkeypatch.setattr(ev, "write_png", lambda path, fig: figs.append(fig))
    recs = [{"context": 1024, "task": "single", "haystack": "noise", "depth": 0.5, "answer": "1",
             "correct": {"dense": True, "oracle 1/8": ok}} for ok in (True, False)]
    ppl = {"dense": {"ppl": 2.0, "agree": 1.0, "nll": 0.69, "positions": 8},
           "oracle 1/8": {"ppl": 2.5, "agree": 0.5, "nll": 0.92, "positions": 8}}
    assert ev.plot({"selectors": ["oracle"], "budgets": [1 / 8], "retrieval": recs, "perplexity": ppl,
                    "ppl_context": 1024}, "x")
    assert [list(ax.lines[-1].get_ydata()) for ax in figs[0].axes] == [[100, 100], [1.0, 1.0], [100.0, 100.0]]


def test_the_plots_selectors_that_score_alike_stay_visible(monkeypatch):
    """Selectors with equal scores draw one line over another: each has its own marker, smaller than the one before,
    so the first stays visible around the next (before: all "o" of one size, only the last seen)."""
    figs = []
    monkeypatch.setattr(ev, "write_png", lambda path, fig: figs.append(fig))
    names = ["oracle", "quest s0 r0", "hata-trained", "hata-random", "quest s16 r16"]  # (5: sizes 9 down to 3)
    ppl = {k: {"ppl": 2.0, "agree": 1.0, "nll": 0.69, "positions": 8} for k in ["dense", *(f"{n} 1/8" for n in names)]}
    assert ev.plot({"selectors": names, "budgets": [1 / 8], "perplexity": ppl, "ppl_context": 1024}, "x")
    lines = [line for line in figs[0].axes[0].lines if line.get_label() in names]
    assert len({line.get_marker() for line in lines}) == 5
    assert [line.get_markersize() for line in lines] == sorted((line.get_markersize() for line in lines), reverse=True)
    assert len({line.get_markersize() for line in lines}) == 5


def test_report_refuses_records_with_a_damaged_depth_or_agreement(capsys, tmp_path):
    rec = {"context": 1024, "task": "single", "haystack": "noise", "depth": "half", "answer": "1",
           "correct": {"dense": True}}
    base = {"command": "t", "selectors": ["oracle"], "budgets": [0.25], "seconds": {}, "ppl_context": 64}
    ppl = {"dense": {"nll": 0.7, "ppl": 2.0, "agree": "all", "positions": 8}}
    for name, results in (("depth", {**base, "retrieval": [rec]}), ("agree", {**base, "perplexity": ppl})):
        (tmp_path / f"{name}.json").write_text(json.dumps(results))
        assert ev.main(["--report", str(tmp_path / f"{name}.json"), "--out-dir", str(tmp_path), "--overwrite"]) == 2
        assert f"{name}.json: a retrieval or perplexity record lacks" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["--tasks", "perplexity", "--ppl-context", "256", "--ppl-tokens", "254"],  # the most --ppl-tokens allowed
    ["--contexts", "128", "--samples", "1", "--selectors", "oracle", "--quest-budgets", "0.999"],  # Quest does not run
    ["--selectors", "oracle", "trained", "--hash-weights", "none"]])  # trained left out (a note), oracle runs
def test_flags_at_their_limits_pass_the_checks(argv, capsys, tmp_path):
    assert ev.main(argv + ["--checkpoint", "/nonexistent.gguf", "--out-dir", str(tmp_path)]) == 2
    assert "nonexistent" in capsys.readouterr().err


@pytest.mark.parametrize("argv, note", [
    (["--tasks", "perplexity", "--ppl-context", "256", "--ppl-tokens", "8", "--budgets", "1/64", "249/256"],
     "budget 249/256 of a 256-token context is 249 tokens, which covers the keys of the first 2 scored steps of each "
     "window or sample: decoded densely (budgets of at most 247/256, 247 tokens, keep every scored step sparse)"),
    (["--contexts", "128", "--samples", "1000", "--budgets", "0.96"],  # ceil(122.88): 123 tokens, though 0.96 < 123/128
     "budget 24/25 of a 128-token context is 123 tokens, which covers the keys of the first scored step of each window "
     "or sample: decoded densely (budgets of at most 61/64, 122 tokens,")])
def test_a_budget_covering_some_scored_steps_is_noted(argv, note, capsys, tmp_path):
    assert ev.main(argv + ["--checkpoint", "/nonexistent.gguf", "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert note in err and "nonexistent" in err and err.count("note: budget") == 1  # 1/64 and 122/128 are not


def test_the_prose_must_hold_the_longest_context(gguf_path, tok, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(ev.Tokenizer, "from_path", lambda *a, **k: tok)
    monkeypatch.setattr(ev, "from_checkpoint", lambda *a, **k: 1 / 0)  # must not be reached
    (tmp_path / "short.txt").write_text(PROSE * 20)  # its held-out last fifth: ~500 tokens
    assert ev.main(["--text", str(tmp_path / "short.txt"), "--contexts", "128", "1024", "--samples", "1",
                    "--checkpoint", gguf_path, "--out-dir", str(tmp_path)]) == 2
    assert "fewer than --contexts 1024; give more --text" in capsys.readouterr().err


def test_a_run_records_its_budgets_plan_and_haystack_rules(gguf_path, smol, tok, monkeypatch, tmp_path):
    """The results' budgets are every one a policy ran (Quest's own too); a text of fewer windows than --ppl-docs
    plans the windows it has (the report then claims no stop); retrieval records its needle rule and the noise
    haystack's size (the model's context)."""
    monkeypatch.setattr(ev, "from_checkpoint", lambda *a, **k: smol)
    monkeypatch.setattr(ev.Tokenizer, "from_path", lambda *a, **k: tok)
    def run_retrieval(model, tok, hays, specs, pols, batch, log, deadline):  # every policy right, saved once
        log(recs := [{"context": C, "task": t, "haystack": h, "depth": d, "seed": sd, "answer": "1",
                      "correct": {"dense": True, **{ev.pkey(n, f): True for n, f, _ in pols[1:]}}}
                     for C, t, h, d, sd in specs])
        return recs
    monkeypatch.setattr(ev, "run_retrieval", run_retrieval)
    (tmp_path / "text.txt").write_text(PROSE * 10)
    assert ev.main(["--selectors", "quest", "--budgets", "1/8", "--quest-budgets", "1/4", "--contexts", "128",
                    "--samples", "1", "--ppl-context", "128", "--ppl-tokens", "2", "--ppl-docs", "3", "--text",
                    str(tmp_path / "text.txt"), "--checkpoint", gguf_path, "--out-dir", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "eval_results.json").read_text())
    assert results["budgets"] == [1 / 8, 1 / 4] and "quest s16 r16 1/4" in results["perplexity"]
    assert results["perplexity_planned"] == results["perplexity"]["dense"]["positions"] == 2  # one window
    assert "stopped" not in (tmp_path / "eval_results.md").read_text()
    assert (results["needle_rule"], results["noise_context"]) == (2, smol.args.max_seq_len)


def test_the_committed_runs_noise_prompts_stay_the_same(tok):
    """Seed 0's first noise samples at 1K: their keys are those of report/eval_results.json, and their prompts (ids,
    key, answer) are pinned by a digest, so a change to how a seed draws its piece, key, names or depths shows."""
    hay = ev.Haystack(tok, ev.NOISE * (4 * 8192 // len(tok.encode(ev.NOISE)) + 2))  # as run() sizes it for 8K
    specs = [s for s in ev.retrieval_specs({1024: 8}, 0) if s[2] == "noise"]
    prompts = [ev.retrieval_prompt(tok, hay, t, C - ev.N_DIGITS, d, random.Random(sd)) for C, t, h, d, sd in specs]
    committed = json.load(open(os.path.join(ev.HERE, "report", "eval_results.json")))["retrieval"]
    assert [(r["context"], r["haystack"]) for r in committed[:2]] == [(1024, "noise")] * 2  # samples 0 and 1
    assert [p[1] for p in prompts[:2]] == [r["answer"] for r in committed[:2]] == ["45572", "48212"]
    assert hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:16] == "5ced186c4e26225e"


# From a mutation run of eval.py's checks and merge (2026-12-06): behaviour no test held before

MERGE_REC = {"context": 1024, "task": "single", "haystack": "noise", "depth": 0.5, "answer": "1", "seed": 0,
             "correct": {"dense": True, "oracle 1/8": True}}
MERGE_RUN = {"command": "r", "selectors": ["oracle"], "budgets": [1 / 8], "seconds": {}, "retrieval": [MERGE_REC]}


def test_one_run_is_merged_once_whichever_files_hold_it(tmp_path, capsys):
    """A run's partial file beside its final one, or a merge beside one of its runs, would join the samples once but
    add the run's seconds twice: refused, by the start times a run records (a file's plain copy: by its content)."""
    run = lambda started, n: {**MERGE_RUN, "started": started, "seconds": {"retrieval": 10},
                              "retrieval": [{**MERGE_REC, "seed": i} for i in range(n)]}
    files = {"partial.json": run(["t1"], 1), "final.json": run(["t1"], 2), "other.json": run(["t2"], 2)}
    for name, results in files.items():
        (tmp_path / name).write_text(json.dumps(results))
    path = lambda *names: [str(tmp_path / n) for n in names]
    assert ev.main(["--report", *path("final.json", "partial.json"), "--out-dir", str(tmp_path)]) == 2
    assert (f"{tmp_path / 'partial.json'} holds the same run as {tmp_path / 'final.json'} (a copy, its partial file "
            "or a merge of it): give each run once") in capsys.readouterr().err
    assert ev.main(["--report", *path("final.json", "other.json"), "--name", "both", "--out-dir", str(tmp_path)]) == 0
    both = json.loads((tmp_path / "both_results.json").read_text())
    assert both["started"] == ["t1", "t2"] and both["seconds"] == {"retrieval": 20} and len(both["retrieval"]) == 2
    assert ev.main(["--report", *path("both_results.json", "partial.json"), "--name", "again", "--out-dir",
                    str(tmp_path)]) == 2 and "holds the same run as" in capsys.readouterr().err


def test_read_only_outputs_fail_before_the_run_and_a_read_only_input_is_read(tmp_path, monkeypatch, capsys):
    """A read-only results file that a run would replace fails before the work (before: after it, the partial file
    left); the partial file of a stopped run, read-only, is read by --report, which writes no partial file."""
    (results := tmp_path / "eval_results.json").write_text("kept")
    (partial := tmp_path / "eval_results.partial.json").write_text(json.dumps(MERGE_RUN))
    read_only(monkeypatch, results, partial)
    os.remove(partial)  # (a fresh run refuses to replace it)
    assert ev.main(["--checkpoint", "/nonexistent.gguf", "--out-dir", str(tmp_path), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert f"--out-dir / --name: {results} is read-only" in err and "nonexistent" not in err, err
    partial.write_text(json.dumps(MERGE_RUN))
    results.unlink()  # (else the report's own results file, read-only, is refused)
    assert ev.main(["--report", str(partial), "--out-dir", str(tmp_path)]) == 0  # before: "... is read-only"
    assert json.loads(results.read_text())["retrieval"] == MERGE_RUN["retrieval"] and partial.exists()


def test_quick_without_a_name_never_writes_the_full_runs_files(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps(MERGE_RUN))
    assert ev.main(["--quick", "--report", str(tmp_path / "r.json"), "--out-dir", str(tmp_path)]) == 0
    assert (tmp_path / "eval_quick_results.md").exists() and not (tmp_path / "eval_results.json").exists()


def test_sink_with_oracle_alone_is_not_noted_as_ignored(capsys, tmp_path):
    assert ev.main(["--sink", "4", "--selectors", "oracle", "--checkpoint", "/nonexistent.gguf",
                    "--out-dir", str(tmp_path)]) == 2
    assert "ignored" not in capsys.readouterr().err


def test_report_rebuilds_from_the_partial_file_a_stopped_run_names(tmp_path):
    (partial := tmp_path / "eval_results.partial.json").write_text(json.dumps(MERGE_RUN))  # "results so far: ..."
    assert ev.main(["--report", str(partial), "--out-dir", str(tmp_path)]) == 0
    assert (tmp_path / "eval_results.md").exists()


@pytest.mark.usefixtures("gguf_path")  # the default model
def test_the_default_model_gets_its_shipped_projections(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(ev, "checkpoint_metadata", lambda *a: 1 / 0)  # reached once the projections are chosen
    with pytest.raises(ZeroDivisionError):
        ev.main(["--selectors", "trained", "--tasks", "perplexity", "--out-dir", str(tmp_path)])
    assert "no trained projections" not in capsys.readouterr().err


def ppl_run(nll=0.7, **kw):
    return {"command": "p", "selectors": ["oracle"], "budgets": [1 / 8], "seconds": {}, "ppl_context": 64,
            "perplexity": {"dense": {"nll": nll, "ppl": 2.0, "agree": 1.0, "positions": 8}}, **kw}


def test_merge_keeps_the_plan_an_older_file_lacks(tmp_path):
    assert ev.merge([ppl_run(), ppl_run(perplexity_planned=16)])["perplexity_planned"] == 16


def test_merge_refuses_dense_passes_a_thousandth_of_a_nat_apart():
    with pytest.raises(ValueError, match="dense perplexity passes differ"):
        ev.merge([ppl_run(0.7), ppl_run(0.701)])
    assert ev.merge([ppl_run(0.7), ppl_run(0.70001)])["perplexity"]["dense"]["nll"] == 0.7


# From a mutation run of eval.py's run paths (seeding, scoring, result files, --report): behaviour no test held before


def test_merge_refuses_dense_passes_half_a_thousandth_of_a_nat_apart():
    """The dense passes of two runs over the same windows agree to 1e-4 nats: 5e-4 apart they are other windows."""
    with pytest.raises(ValueError, match="dense perplexity passes differ"):
        ev.merge([ppl_run(0.7), ppl_run(0.7005)])


def test_another_seeds_streams_are_fixed_too():
    """Seed N's sample i of length C draws from N * 2**32 + 1000 C + i: a rerun of --seed 1 draws the prompts an
    earlier one did (a merge joins their samples by it), as seed 0's are the committed runs'."""
    assert [s[4] for s in ev.retrieval_specs({1024: 2, 2048: 1}, 1)] == [2 ** 32 + 1024000, 2 ** 32 + 1024001,
                                                                          2 ** 32 + 2048000]


def test_a_length_of_one_batch_runs_halfway_through_the_others(monkeypatch):
    """One batch of 1K beside four of 2K: 2K's run at 1/8, 3/8, 5/8 and 7/8 of the way, 1K's at 1/2 (not first)."""
    tok = types.SimpleNamespace(decode=lambda ids: "".join(map(str, ids)))
    _fake_retrieval(monkeypatch, {1024: 1, 2048: 1})
    specs = [(C, "single", "noise", 0.5, i) for C, n in ((1024, 1), (2048, 4)) for i in range(n)]
    recs = ev.run_retrieval(None, tok, {"noise": None}, specs, [("dense", None, None)], 1)
    assert [r["context"] for r in recs] == [2048, 2048, 1024, 2048, 2048]


@pytest.mark.parametrize("step, seconds", [(7.4, 7), (7.6, 8)])  # rounded, not cut: 7.6 s is 8
def test_a_run_gives_retrieval_its_minutes_as_a_deadline_and_records_each_tasks_seconds(
        step, seconds, gguf_path, smol, tok, monkeypatch, tmp_path):
    """--minutes 2: run_retrieval's deadline is 120 s after the run's start (time.time()); the results record the
    task's seconds, rounded, from its start to its last save."""
    monkeypatch.setattr(ev, "from_checkpoint", lambda *a, **k: smol)
    monkeypatch.setattr(ev.Tokenizer, "from_path", lambda *a, **k: tok)
    clock = iter(range(10 ** 6))
    monkeypatch.setattr(ev, "time", types.SimpleNamespace(time=lambda: 1000.0,
                                                           perf_counter=lambda: step * next(clock)))
    deadlines = []

    def run_retrieval(model, tok, hays, specs, pols, batch, log, deadline):
        deadlines.append(deadline)
        log(recs := [{"context": C, "task": t, "haystack": h, "depth": d, "seed": sd, "answer": "1",
                      "correct": {"dense": True, "oracle 1/8": True}} for C, t, h, d, sd in specs])
        return recs
    monkeypatch.setattr(ev, "run_retrieval", run_retrieval)
    (tmp_path / "text.txt").write_text(PROSE * 10)
    assert ev.main(["--tasks", "retrieval", "--selectors", "oracle", "--budgets", "1/8", "--contexts", "128",
                    "--samples", "1", "--minutes", "2", "--text", str(tmp_path / "text.txt"), "--checkpoint",
                    gguf_path, "--out-dir", str(tmp_path)]) == 0
    assert deadlines == [1120.0]
    assert json.loads((tmp_path / "eval_results.json").read_text())["seconds"] == {"retrieval": seconds}


def test_a_runs_noise_haystack_gives_the_committed_runs_prompts(gguf_path, smol, tok, monkeypatch, tmp_path):
    """run() sizes the noise haystack by the model's context, as the committed runs did: its noise samples at 1K
    (seed 0) are the prompts test_the_committed_runs_noise_prompts_stay_the_same pins, so a rerun's join them."""
    monkeypatch.setattr(ev, "from_checkpoint", lambda *a, **k: smol)
    monkeypatch.setattr(ev.Tokenizer, "from_path", lambda *a, **k: tok)
    prompts = []

    def prompts_of(model, tok, hays, specs, *a):
        prompts.extend(ev.retrieval_prompt(tok, hays[h], t, C - ev.N_DIGITS, d, random.Random(sd))
                       for C, t, h, d, sd in specs if h == "noise")
        return []
    monkeypatch.setattr(ev, "run_retrieval", prompts_of)
    (tmp_path / "text.txt").write_text(PROSE * 200)
    assert ev.main(["--tasks", "retrieval", "--selectors", "oracle", "--budgets", "1/8", "--contexts", "1024",
                    "--samples", "8", "--text", str(tmp_path / "text.txt"), "--checkpoint", gguf_path,
                    "--out-dir", str(tmp_path)]) == 0
    assert [p[1] for p in prompts[:2]] == ["45572", "48212"]
    assert hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:16] == "5ced186c4e26225e"


# From a mutation run of eval.py's report side (load_results, merge, report, plot, digest): behaviour no test held


PPL_REC = {"nll": 0.7, "ppl": 2.0, "agree": 1.0, "positions": 8}


@pytest.mark.parametrize("damage, words", [
    ({"seconds": {"retrieval": True}}, "its budgets (fractions in (0, 1)), selectors (names) or seconds are damaged"),
    ({"seconds": {"retrieval": math.inf}}, "its budgets (fractions in (0, 1)), selectors (names) or seconds"),
    ({"perplexity_planned": "8"}, "its command or start times (text), ppl_context or planned counts"),
    ({"noise_context": -1}, "its command or start times (text), ppl_context or planned counts"),
    ({"perplexity": {"oracle 1/8": PPL_REC}}, "a retrieval or perplexity record lacks"),  # no dense row
    ({"perplexity": {"dense": {k: v for k, v in PPL_REC.items() if k != "agree"}}}, "a retrieval or perplexity"),
    ({"perplexity": {"dense": {**PPL_REC, "positions": "8"}}}, "a retrieval or perplexity"),  # (report: a TypeError)
    ({"retrieval": [{k: v for k, v in MERGE_REC.items() if k != "answer"}]}, "a retrieval or perplexity record"),
    ({"retrieval": [{**MERGE_REC, "seed": [1]}]}, "a retrieval or perplexity record"),  # (merge: a TypeError)
    ({"retrieval": [{**MERGE_REC, "task": {"name": "single"}}]}, "a retrieval or perplexity record")])
def test_a_damaged_count_time_or_record_is_refused_naming_its_file(damage, words, tmp_path):
    """A bool or an infinite number is no time; a planned count or haystack size is a whole number; a perplexity
    result needs its dense row and every field the report reads; a retrieval record needs the key a merge joins by,
    of hashable types: each one line naming the file (before: accepted, or a KeyError or TypeError later)."""
    (path := tmp_path / "r.json").write_text(json.dumps({**MERGE_RUN, "ppl_context": 64, **damage}))
    with pytest.raises(ValueError, match=re.escape(f"{path}: {words}")):
        ev.load_results(str(path))


def test_a_json_list_of_the_fields_names_is_no_results_file(tmp_path):
    (path := tmp_path / "r.json").write_text(json.dumps(["command", "selectors", "budgets", "seconds"]))
    with pytest.raises(ValueError, match=re.escape(f"{path} is not a results file of eval.py")):
        ev.load_results(str(path))


def test_merge_joins_an_older_perplexity_run_to_a_newer_retrieval_run_and_lists_both_commands():
    """The needle rule concerns retrieval runs alone: a perplexity-only file from before it joins a newer run."""
    merged = ev.merge([ppl_run(), {**copy.deepcopy(MERGE_RUN), "needle_rule": 2}])
    assert len(merged["retrieval"]) == 1 and merged["perplexity"]["dense"] == PPL_REC
    assert merged["command"] == "p ; r"


def test_merge_without_seeds_keeps_samples_of_another_context_task_or_haystack_apart(capsys):
    """Files without sample seeds join samples by context, task, haystack, depth and key: each of them tells two
    samples apart (those of one key and depth here)."""
    base = {k: v for k, v in MERGE_REC.items() if k != "seed"}
    recs = [base, {**base, "context": 2048}, {**base, "task": "multikey"}, {**base, "haystack": "prose"}]
    def run(sel):
        return {**MERGE_RUN, "command": sel, "selectors": [sel],
                "retrieval": [{**x, "correct": {"dense": True, f"{sel} 1/8": True}} for x in recs]}
    merged = ev.merge([run("oracle"), run("quest s16 r16")])
    assert sorted((x["context"], x["task"], x["haystack"]) for x in merged["retrieval"]) == [
        (1024, "multikey", "noise"), (1024, "single", "noise"), (1024, "single", "prose"), (2048, "single", "noise")]
    assert all(len(x["correct"]) == 3 for x in merged["retrieval"])


def test_report_states_the_perplexity_context_and_dense_nll_and_marks_a_fixed_window():
    """The heading gives the perplexity windows' context (not the positions again) and dense's NLL to 4 places; a
    perplexity cell whose budget the sink and recent window fill at that context is marked too."""
    ppl = {"dense": {**PPL_REC, "nll": 0.6931}, "quest s16 r16 1/16": {**PPL_REC, "ppl": 2.5},
           "quest s16 r16 1/32": {**PPL_REC, "ppl": 3.0}}
    md = ev.report({"selectors": ["quest s16 r16"], "budgets": [1 / 16, 1 / 32], "ppl_context": 1024,
                    "perplexity": ppl})
    assert ("### Perplexity and top-1 agreement: 8 teacher-forced positions, context 1024; dense perplexity 2.000 "
            "(NLL 0.6931)") in md
    assert "| quest s16 r16 | 2.500 (+25.0%) | 3.000 (+50.0%)† | 100.0% | 100.0% |" in md  # K = 64, then 32 = 16 + 16
    assert "† sink + recent positions fill" in md


def test_every_report_table_has_a_separator_cell_for_each_column():
    recs = [{**MERGE_REC, "correct": {"dense": True, "oracle 1/8": True}}]
    md = ev.report({**MERGE_RUN, "retrieval": recs, "ppl_context": 64,
                    "perplexity": {"dense": PPL_REC, "oracle 1/8": PPL_REC}})
    assert markdown_tables(md) == 4  # dense accuracy, kept share, kept share by context, perplexity


def test_dense_accuracy_cells_sit_under_their_task_and_haystack_and_contexts_go_up():
    """Columns single / noise, single / prose, multikey / noise, multikey / prose; rows by context, shortest first,
    whatever order the records come in (a merge's follow its runs)."""
    recs = [{**MERGE_REC, "context": 2048, "task": "multikey", "haystack": "noise",
             "correct": {"dense": True, "oracle 1/8": True}},
            {**MERGE_REC, "context": 1024, "task": "single", "haystack": "prose",
             "correct": {"dense": False, "oracle 1/8": False}}]
    md = ev.report({**MERGE_RUN, "retrieval": recs})
    assert "| context | samples | single / noise | single / prose | multikey / noise | multikey / prose | all |" in md
    assert "| 1024 | 1 | - | 0% | - | - | 0% |\n| 2048 | 1 | - | - | 100% | - | 100% |\n| all | 2 |" in md
    assert "| selector | budget | 1024 | 2048 |\n|---|---|---|---|\n| oracle | 1/8 | - of 0 | 100% of 1 |" in md


def test_the_plots_axes_ticks_legend_and_a_selector_that_ran_at_some_budgets(monkeypatch):
    """Perplexity over dense on a log axis labelled in plain numbers, agreement on a linear one; budgets on a log2 axis
    ticked by their labels; one legend; Quest at its extra budget beside oracle, which did not run there, still gets
    its panels; a point the tables mark † (sink + recent fill the budget) is hollow, and the legend says so."""
    figs = []
    monkeypatch.setattr(ev, "write_png", lambda path, fig: figs.append(fig))
    ppl = {k: PPL_REC for k in ("dense", "oracle 1/8", "quest s16 r16 1/4", "quest s16 r16 1/8")}
    assert ev.plot({"selectors": ["oracle", "quest s16 r16"], "budgets": [1 / 4, 1 / 8], "perplexity": ppl,
                    "ppl_context": 256}, "x")  # Quest's 16 + 16 positions fill 1/8 of 256: the tables' †
    rel, agree = figs[0].axes
    assert (rel.get_yscale(), agree.get_yscale()) == ("log", "linear")
    assert rel.xaxis.get_transform().base == 2 and agree.xaxis.get_transform().base == 2
    assert [t.get_text() for t in rel.get_xticklabels()] == ["1/4", "1/8"] and list(rel.get_xticks()) == [4, 8]
    assert [t.get_text() for t in rel.get_legend().get_texts()] == ["oracle", "quest s16 r16", "dense"]
    assert [list(line.get_xdata()) for line in rel.lines if line.get_label() in ("oracle", "quest s16 r16")] == [
        [8.0], [4.0, 8.0]]
    quest, = (line for line in rel.lines if line.get_label() == "quest s16 r16")
    hollow = [line for line in rel.lines if line.get_markerfacecolor() == "white" and len(line.get_xdata())]
    assert [(list(h.get_xdata()), h.get_color()) for h in hollow] == [([8.0], quest.get_color())]  # its † point
    assert rel.get_legend().get_title().get_text() == "hollow: sink + recent fill the budget (†)"
    figs[0].canvas.draw()  # the log axis's labels are plain numbers (they were 1.1x10^0, in mathtext)
    labels = [t.get_text() for t in rel.get_yticklabels() + rel.get_yticklabels(minor=True) if t.get_text()]
    assert labels and not any("times" in text or "^" in text for text in labels), labels


def test_digests_tell_where_one_chunk_ends_and_the_next_begins():
    """Held-out text of documents "ab" is not that of "a" and "b": a merge compares the runs' texts by digest."""
    assert ev.digest([b"ab"]) != ev.digest([b"a", b"b"]) and len(ev.digest([b"a", b"b"])) == 16


def test_agreement_counts_the_first_scored_position_too(monkeypatch):
    """Top-1 agreement is over every scored position, the first included: a selector that differs from dense at the
    first of 4 steps only agrees on 3 of 4 (an agreement over the later steps alone would read 100%)."""
    def policies(model, tokens, n_prefill, steps, capacity, pols, bar=None):
        top, first_off = torch.zeros(2, steps, dtype=torch.long), torch.zeros(2, steps, dtype=torch.long)
        first_off[:, 0] = 1
        logp = torch.full((2, steps), -1.0)
        return {("dense", None): (top, logp), ("oracle", 0.5): (first_off, logp)}
    monkeypatch.setattr(ev, "run_policies", policies)
    res = ev.run_teacher_forced(None, torch.zeros(2, 8, dtype=torch.long), 4,
                                [("dense", None, None), ("oracle", 0.5, None)], batch=2)
    assert res["dense"]["agree"] == 1.0 and res["oracle 1/2"]["positions"] == 8
    assert res["oracle 1/2"]["agree"] == 0.75


# From a mutation round of eval.py's result handling (load_results, merge, report, plot), 2026-12-07

def test_merge_reads_an_older_files_missing_n_dense_as_two():
    """Files from before n_dense was recorded ran 2 dense layers: they join a run of --n-dense 2, not one of 3."""
    assert ev.merge([copy.deepcopy(MERGE_RUN), {**copy.deepcopy(MERGE_RUN), "command": "n", "n_dense": 2}])[
        "command"] == "r ; n"
    with pytest.raises(ValueError, match="differ in model, weights, text, rbit or n_dense"):
        ev.merge([copy.deepcopy(MERGE_RUN), {**copy.deepcopy(MERGE_RUN), "n_dense": 3}])


def test_report_agreement_cells_sit_under_their_own_budget():
    """The perplexity table's agreement columns follow the budgets in the order of its ppl columns."""
    ppl = {"dense": PPL_REC, "oracle 1/8": {**PPL_REC, "ppl": 2.5, "agree": 0.75},
           "oracle 1/16": {**PPL_REC, "ppl": 3.0, "agree": 0.5}}
    md = ev.report({**MERGE_RUN, "budgets": [1 / 16, 1 / 8], "retrieval": [], "ppl_context": 64, "perplexity": ppl})
    assert "| selector | ppl 1/8 | ppl 1/16 | agree 1/8 | agree 1/16 |" in md
    assert "| oracle | 2.500 (+25.0%) | 3.000 (+50.0%) | 75.0% | 50.0% |" in md


def test_the_plots_hollow_points_are_the_tables_daggers_at_any_context(monkeypatch):
    """Quest s16 r16 at 1/32 fills its budget at 1K (K = 32) but not at 2K (K = 64): the kept-share table marks it
    (at some context), so its retrieval point is hollow too; 1/16 (K = 64, 128) is not."""
    figs = []
    monkeypatch.setattr(ev, "write_png", lambda path, fig: figs.append(fig))
    recs = [{**MERGE_REC, "context": C, "seed": C,
             "correct": {"dense": True, "quest s16 r16 1/16": True, "quest s16 r16 1/32": True}} for C in (1024, 2048)]
    results = {**MERGE_RUN, "selectors": ["quest s16 r16"], "budgets": [1 / 16, 1 / 32], "retrieval": recs}
    assert "| quest s16 r16 | 100.0% (100%) | 100.0% (100%)† |" in ev.report(results)
    assert ev.plot(results, "x")
    kept, = figs[0].axes
    hollow = [list(line.get_xdata()) for line in kept.lines
              if line.get_markerfacecolor() == "white" and len(line.get_xdata())]
    assert hollow == [[32.0]]


# From a mutation round of eval.py's running side (run's checks, batching), 2026-12-07

@pytest.mark.parametrize("argv", [
    ["--tasks", "retrieval", "--ppl-tokens", "9000"],  # perplexity's limits: checked only where it runs
    ["--tasks", "perplexity", "--minutes", "0"],  # retrieval's: noted as ignored, not refused
    ["--tasks", "perplexity", "--samples", "1001"]])
def test_a_flag_of_a_task_that_does_not_run_is_noted_not_checked(argv, capsys, tmp_path):
    """A limit of a task the run leaves out is not refused: the run goes on to the checkpoint (here missing)."""
    assert ev.main(argv + ["--selectors", "oracle", "--checkpoint", "/nonexistent.gguf", "--out-dir",
                           str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "nonexistent" in err and "note: ignored in this run: " in err, err


@pytest.mark.usefixtures("gguf_path")  # the default model: skipped when it is not installed
def test_a_window_is_checked_against_the_longest_context_that_runs(capsys, tmp_path, monkeypatch):
    """--sink 200 fits the 256-token perplexity windows though not the 128-token prompts; Quest's 100:100 has
    neither window past 128 (only each window alone is checked); oracle alone leaves no trained selector out."""
    monkeypatch.setattr(ev, "from_checkpoint", lambda *a, **k: 1 / 0)  # the checks passed: on to the weights' load
    base = ["--contexts", "128", "--samples", "1", "--ppl-tokens", "8", "--ppl-docs", "1", "--budgets", "1/8",
            "--quest-budgets", "--out-dir", str(tmp_path)]
    for argv in (["--selectors", "oracle", "--sink", "200", "--ppl-context", "256"],
                 ["--selectors", "quest", "--quest", "100:100", "--ppl-context", "128"]):
        with pytest.raises(ZeroDivisionError):
            ev.main(argv + base)
        err = capsys.readouterr().err
        assert "its sink or recent window" not in err and "no trained projections" not in err, err


def test_the_batch_flag_reaches_both_tasks(gguf_path, smol, tok, monkeypatch, tmp_path):
    """--batch 3 is the batch of the perplexity pass and of retrieval (the other --batch test checks its parsing)."""
    monkeypatch.setattr(ev, "from_checkpoint", lambda *a, **k: smol)
    monkeypatch.setattr(ev.Tokenizer, "from_path", lambda *a, **k: tok)
    batches = []
    monkeypatch.setattr(ev, "run_teacher_forced", lambda model, windows, n, pols, batch, log: batches.append(
        ("perplexity", batch)) or {})
    monkeypatch.setattr(ev, "run_retrieval", lambda model, tok, hays, specs, pols, batch, log, deadline: batches.append(
        ("retrieval", batch)) or [])
    (tmp_path / "text.txt").write_text(PROSE * 20)
    assert ev.main(["--selectors", "oracle", "--budgets", "1/8", "--contexts", "128", "--samples", "1",
                    "--ppl-context", "128", "--ppl-tokens", "4", "--ppl-docs", "1", "--batch", "3", "--text",
                    str(tmp_path / "text.txt"), "--checkpoint", gguf_path, "--out-dir", str(tmp_path)]) == 0
    assert batches == [("perplexity", 3), ("retrieval", 3)]


# From a mutation round of eval.py's task building (prompts, scoring, perplexity windows), 2026-12-07

def test_an_answer_token_of_id_0_is_kept(monkeypatch):
    """Only the steps decode did not run or cut (-1) leave a row: id 0 is a token like any other (here a digit),
    and dropping it would read the key '12345' as '1234'."""
    words = {0: "5", 1: "1234", 9: "."}
    tok = type("Tok", (), {"decode": lambda self, ids: "".join(words[i] for i in ids)})()

    def prompt(tok, hay, task, length, depth, rng):  # (ids, the key, its answer tokens)
        return [5] * length, "12345", [1, 0]
    monkeypatch.setattr(ev, "retrieval_prompt", prompt)
    monkeypatch.setattr(ev, "run_policies", lambda *a: {("dense", None): (torch.tensor([[1, 0, 9]]), None)})
    recs = ev.run_retrieval(None, tok, {"noise": None}, [(512, "single", "noise", 0.5, 1)], [("dense", None, None)], 1)
    assert recs[0]["correct"] == {"dense": True} and recs[0]["dense_output"] == "12345"


def test_the_prose_haystack_is_the_held_out_documents_a_blank_line_apart(gguf_path, smol, tok, monkeypatch, tmp_path):
    """run() joins the held-out documents with a blank line, as the committed runs did: a seed's prose prompt stays
    the same from run to run (a merge joins samples by their seed), and no document runs into the next one."""
    monkeypatch.setattr(ev, "from_checkpoint", lambda *a, **k: smol)
    monkeypatch.setattr(ev.Tokenizer, "from_path", lambda *a, **k: tok)
    seen = {}
    monkeypatch.setattr(ev, "run_retrieval", lambda model, tok, hays, *a: seen.update(hays) or [])
    paths = [str(tmp_path / f"{i}.txt") for i in range(2)]
    for path, text in zip(paths, (PROSE * 20, PROSE.upper() * 20)):
        write_text(path, text)
    assert ev.main(["--tasks", "retrieval", "--selectors", "oracle", "--budgets", "1/8", "--contexts", "128",
                    "--samples", "1", "--text", *paths, "--checkpoint", gguf_path, "--out-dir", str(tmp_path)]) == 0
    docs = ev.split_corpus(ev.load_corpus(paths))[1]  # the last fifth of each file
    assert len(docs) == 2 and seen["prose"].ids == tok.encode("\n\n".join(t for _, t in docs), bos=False)
