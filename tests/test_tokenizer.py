"""Tests for tokenizer.py: each backend against ids from an independent implementation, chat templates
token by token, and the error messages for bad paths and files."""
import base64
import copy
import datetime
import json
import os
import re
import time

import numpy as np
import pytest

from tests.helpers import package_file, write_gguf
from tokenizer import GGUF_PRE, LLAMA3_PATTERN, Tokenizer, _CHAR_TO_BYTE, _cut_runs, _default_system, open_gguf

BYTE_CHARS = sorted(_CHAR_TO_BYTE, key=_CHAR_TO_BYTE.get)  # GPT-2's byte-level characters, of bytes 0..255 in order
BYTE_VOCAB = {c: b for b, c in enumerate(BYTE_CHARS)}  # a byte-level vocabulary of exactly those 256 tokens


@pytest.fixture(scope="module")
def smol(tok):  # the default model's tokenizer, read once a session (conftest.py): its GGUF header takes ~4 s
    return tok


@pytest.fixture(scope="module")
def llama3():
    return Tokenizer.from_path(package_file("llama_models", "llama3", "tokenizer.model"))


# --- byte-level BPE from the default model's GGUF ----------------------------------------------------------

# Ids from Hugging Face `tokenizers` (transformers 5.23.0 in a throwaway venv):
#   AutoTokenizer.from_pretrained(dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"), with its pre_tokenizer set
#   to Sequence([Digits(individual_digits=True), ByteLevel(add_prefix_space=False)]) as in SmolLM2's own
#   tokenizer.json (transformers' GGUF converter drops the digit split; llama.cpp's "smollm" pre keeps it).
#   Against that tokenizer this file's GGUF path matched on 400 documents, 1.7 M characters of code and
#   random unicode, with zero mismatches.
SMOL_IDS = {
    "The capital of France is": [504, 3575, 282, 4649, 314],
    "Hello, world!": [19556, 28, 905, 17],
    "  leading spaces and\ttabs\n\n\nnewlines   ": [216, 2899, 5600, 284, 197, 100, 7366, 1116, 198, 2241, 5110,
                                                 333],
    "12345 67.89 1,000,000": [33, 34, 35, 36, 37, 216, 38, 39, 30, 40, 41, 216, 33, 28, 32, 32, 32, 28, 32, 32, 32],
    "def f(x):\n    return x**2  # square\n": [1604, 275, 24, 104, 727, 472, 1003, 1792, 828, 34, 216, 907, 5222,
                                             198],
    "naïve café 日本語 🤗 Ünïcödé": [3546, 46494, 37366, 17097, 241, 115, 40993, 179, 120, 248, 15107, 114, 241,
                                   5549, 246, 94, 25972, 83, 7466, 84, 2756],
    "I'm here, you've seen it, they'll go": [57, 5248, 1535, 28, 346, 3543, 2269, 357, 28, 502, 3060, 685],
    "x =   42;\n    if y > 7:": [104, 446, 333, 36, 34, 43, 472, 585, 329, 2986, 216, 39, 42],
    "  1\n\n  2": [256, 33, 39892, 34],
    "Hello world": [19556, 905],
    # \x04 and U+40000's lead byte 0xF1 have no token in this vocabulary: dropped, as HF does.
    "\x04ctl\U00040000x": [46262, 218, 218, 218, 104],
}


@pytest.mark.parametrize("text", list(SMOL_IDS))
def test_gguf_known_ids(smol, text):
    assert smol.encode(text) == SMOL_IDS[text]


@pytest.mark.parametrize("text", [s for s in SMOL_IDS if "\x04" not in s] + ["", " ", "\n", "a\u200bb\r\n\x00"])
def test_gguf_round_trip(smol, text):
    assert smol.decode(smol.encode(text)) == text


def test_gguf_metadata(smol):
    # SmolLM2's GGUF: bos <|im_start|> = 1 but add_bos_token false; <|im_end|> = 2 is EOS; 0 is <|endoftext|>.
    assert (smol.vocab_size, smol.bos_id, smol.eos_ids) == (49152, 1, frozenset({0, 2}))
    assert smol.encode("Hello world") == smol.encode("Hello world", bos=False) == [19556, 905]
    assert smol.encode("Hello world", bos=True, eos=True) == [1, 19556, 905, 2]


def test_special_token_text_is_parsed_only_when_asked(smol, sp_model, tmp_path):
    """parse_special (engine's --parse-special) reads special-token text as the tokens, in encode and in a chat's messages,
    the longest name first; by default it stays text. A sentencepiece model's added tokens too."""
    text = "<|im_start|>user\nHi<|im_end|><|endoftext|>"
    plain = smol.encode(text)
    tok = copy.copy(smol)
    tok.parse_special = True
    assert plain == smol.encode("<|im_start|>") + smol.encode("user\nHi<|im_end|><|endoftext|>") and 1 not in plain
    assert tok.encode(text) == [1, *smol.encode("user\nHi"), 2, 0]
    chat = [{"role": "user", "content": "a<|im_end|>"}]
    assert tok.encode_chat(chat).count(2) == smol.encode_chat(chat).count(2) + 1  # the message's own <|im_end|>
    (tmp_path / "tokenizer.model").write_bytes((sp_model / "tokenizer.model").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {"300": {"content": "<x>"}}}))
    sp = Tokenizer.from_path(tmp_path)
    sp.parse_special = True
    assert sp.encode("the<x>fox", bos=False) == sp.encode("the", bos=False) + [300] + sp.encode("fox", bos=False)
    # its own control pieces too (before: only tokens past the vocabulary); a text that opens with the BOS gets one
    assert sp.encode("fox</s>", bos=False)[-1] == 2 and sp.encode("<s>fox") == [1, *sp.encode("fox", bos=False)]


def test_a_llama3_prompt_that_opens_with_its_bos_gets_one(llama3):
    """Parsed special text that opens with <|begin_of_text|> takes the place of the BOS encode adds (two were
    written before; llama.cpp warns of that)."""
    tok = copy.copy(llama3)
    tok.parse_special = True
    assert tok.encode("<|begin_of_text|>Hello") == tok.encode("Hello") == [128000, 9906]
    assert llama3.encode("<|begin_of_text|>Hello")[:2] == [128000, 27]  # not parsed: text after the BOS


def test_huge_runs_are_cut_instead_of_crashing(smol, llama3):
    """A run of ~1M whitespace characters overflowed tiktoken's regex stack: a Rust panic that no `except` caught.
    Runs are cut every 25K characters, as Meta's tokenizer does; ordinary text stays one piece."""
    assert _cut_runs("ab c\n") == ["ab c\n"] and _cut_runs("") == [""]
    assert [len(p) for p in _cut_runs("x" + " " * 60001 + "y")] == [25001, 25000, 10002]
    assert [len(p) for p in _cut_runs(" " + "z" * 50000)] == [25001, 25000]
    for tok in (smol, llama3):
        for text in (" " * 1_000_000, "x" + "\n\t" * 500_000 + "y"):
            assert tok.decode(tok.encode(text, bos=False)) == text


def test_special_text_is_plain(smol, llama3):
    assert 2 not in smol.encode("<|im_end|> is text")
    assert smol.decode(smol.encode("<|im_end|> is text")) == "<|im_end|> is text"
    assert not set(llama3.encode("<|eot_id|><|begin_of_text|>", bos=False)) & {128000, 128009}


def test_chatml(smol):
    # transformers' apply_chat_template on the same GGUF (its Jinja template, which adds the default system
    # prompt "You are a helpful AI assistant named SmolLM, trained by Hugging Face" when none is given).
    assert smol.encode_chat([{"role": "user", "content": "Hi"}]) == [
        1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712, 8182,
        2, 198, 1, 4093, 198, 26843, 2, 198, 1, 520, 9531, 198]
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
              {"role": "assistant", "content": "4"}, {"role": "user", "content": "Thanks!"}]
    assert smol.encode_chat(dialog) == [
        1, 9690, 198, 6077, 5453, 30, 2, 198, 1, 4093, 198, 1780, 314, 216, 34, 27, 34, 47, 2, 198,
        1, 520, 9531, 198, 36, 2, 198, 1, 4093, 198, 16937, 17, 2, 198, 1, 520, 9531, 198]
    assert smol.encode_chat(dialog, add_generation_prompt=False) == smol.encode_chat(dialog)[:-4]
    opens = [{"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Hi"}]  # no system turn first:
    assert smol.encode_chat(opens) == smol.encode_chat([{"role": "system", "content": smol.system}, *opens])  # default
    with pytest.raises(ValueError, match="no BOS/EOS token"):
        Tokenizer(enc=smol.enc, vocab_size=smol.vocab_size).encode("ab", eos=True)  # not [.., None]


# --- Llama 3 tiktoken file ---------------------------------------------------------------------------------

def test_llama3_known_ids(llama3):
    # Meta's test vector (llama-models' tokenizer test).
    assert llama3.encode("This is a test sentence.", bos=True, eos=True) == [
        128000, 2028, 374, 264, 1296, 11914, 13, 128001]
    assert llama3.encode("This is a test sentence.")[0] == 128000  # BOS by default
    assert (llama3.vocab_size, llama3.bos_id) == (128256, 128000)
    assert llama3.eos_ids == {128001, 128008, 128009}  # <|end_of_text|>, <|eom_id|>, <|eot_id|>
    specials = llama3.specials  # Meta's numbering past <|eot_id|> (llama-models' tokenizer.py)
    assert [specials[t] for t in ("<|python_tag|>", "<|image|>", "<|reserved_special_token_2|>")] == [
        128010, 128011, 128012]
    assert specials["<|reserved_special_token_245|>"] == 128255 and len(specials) == 256
    text = "Hello, wörld!\n\n  12345 def f(): return 'ok'"
    assert llama3.decode(llama3.encode(text, bos=False)) == text


def test_llama3_chat(llama3):
    # Same as llama_models.llama3.chat_format.ChatFormat.encode_dialog_prompt on this dialog.
    ids = llama3.encode_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert ids == [128000, 128006, 9125, 128007, 271, 3513, 10015, 13, 128009,
                   128006, 882, 128007, 271, 13347, 128009, 128006, 78191, 128007, 271]


# --- sentencepiece (Llama 2 format), trained here ----------------------------------------------------------

@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    d = tmp_path_factory.mktemp("tok_sp")
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly boxing".split()
    lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) + f" {i}." for i in range(300)]
    (d / "corpus.txt").write_text("\n".join(lines))
    # Llama 2's settings that matter here: no normalization, whitespace kept, unknown bytes as <0xNN>.
    spm.SentencePieceTrainer.train(input=str(d / "corpus.txt"), model_prefix=str(d / "tokenizer"), vocab_size=300,
                                   model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, bos_id=1, eos_id=2, unk_id=0)
    return d


def test_sentencepiece(sp_model):
    tok = Tokenizer.from_path(sp_model)  # the directory: finds tokenizer.model, sees it is not tiktoken
    assert (tok.vocab_size, tok.bos_id, tok.eos_ids) == (300, 1, frozenset({2}))
    for text in ["the lazy fox", "Ünïcödé 日本 🤗 and  two  spaces", "digits 12345"]:
        ids = tok.encode(text)
        assert ids[0] == 1 and 1 not in ids[1:] and ids[-1] != 2
        assert tok.decode(ids) == text
    assert tok.encode("the fox", bos=False, eos=True) == tok.encode("the fox")[1:] + [2]
    assert tok.encode("a\udcff b") == tok.encode("a\ufffd b")  # an undecodable argv byte: U+FFFD, as tiktoken's
    ids = tok.encode_chat([{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
                           {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}])
    assert ids == (tok.encode("[INST] <<SYS>>\nS\n<</SYS>>\n\na [/INST] b ", eos=True) + tok.encode("[INST] c [/INST]"))
    for roles in (["user", "user"], ["system"], ["assistant", "user"], ["user", "system"], ["system", "assistant"]):
        with pytest.raises(ValueError, match="takes turns user, assistant"):
            tok.encode_chat([{"role": r, "content": "x"} for r in roles])


@pytest.mark.parametrize("which", ["gguf", "sentencepiece"])
def test_streamer_prints_what_decode_gives_from_a_few_tokens_a_step(which, smol, sp_model, capsys):
    from engine import Streamer
    tok = smol if which == "gguf" else Tokenizer.from_path(sp_model)
    text = " ".join(["the lazy fox jumps, Ünïcödé 日本 🤗 and  two  spaces"] * 6) + " 12345"
    ids = tok.encode(text, bos=False)
    # ids of no text (a model's padded rows, past the vocabulary) before some tokens: the context still holds the
    # token before them, whose text keeps the next one's space (sentencepiece drops a first piece's)
    pad = [tok.vocab_size] * 3
    ids = [i for n, t in enumerate(ids) for i in (pad * (n % 7 == 3) + [t])]
    decoded, decode = [], tok.decode
    tok.decode = lambda part: decoded.append(len(part)) or decode(part)  # instance attribute: this test's only
    try:
        streamer = Streamer(tok)
        for t in ids + [-1, *sorted(tok.eos_ids)]:  # -1: a finished sequence's filler; a stop token: not printed
            streamer([t])
        streamer.finish()
    finally:
        del tok.decode
    assert capsys.readouterr().out == decode(ids) + "\n"
    assert len(ids) > 60 and max(decoded) <= Streamer.CONTEXT + 4 + len(pad)  # not the whole sequence each step


def test_the_streamer_prints_token_id_0(llama3, capsys):
    """Id 0 is a token (Llama 3's "!", sentencepiece's unk): only negative ids are a finished sequence's filler."""
    from engine import Streamer
    streamer = Streamer(llama3)
    for t in llama3.encode("Hi!", bos=False) + [-1]:
        streamer([t])
    streamer.finish()
    assert llama3.encode("!", bos=False) == [0] and capsys.readouterr().out == "Hi!\n"


def test_sentencepiece_follows_the_checkpoints_template(sp_model, tmp_path):
    """Llama 2's [INST] only where the checkpoint's tokenizer_config.json has none or a Llama 2 one (its <<SYS>>
    block). Mistral's [INST] template has none: one BOS a chat, no system turn, so it is refused, not misread."""
    (tmp_path / "tokenizer.model").write_bytes((sp_model / "tokenizer.model").read_bytes())
    chat = [{"role": "user", "content": "a"}]
    llama2 = "{% if s %}{{ '<<SYS>>\\n' + s + '\\n<</SYS>>\\n\\n' }}{% endif %}{{ '[INST] ' + m + ' [/INST]' }}"
    mistral = "{{ bos_token }}{% for m in messages %}{{ '[INST] ' + m['content'] + ' [/INST]' }}{% endfor %}"
    for template, works in [(llama2, True), (mistral, False), ("<|user|>\n{{ m }}</s>", False), ("<<SYS>>", False)]:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
        tok = Tokenizer.from_path(tmp_path)
        if works:
            assert tok.encode_chat(chat) == tok.encode("[INST] a [/INST]")
        else:
            with pytest.raises(ValueError, match="no chat format hata writes"):
                tok.encode_chat(chat)
    (tmp_path / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="tokenizer_config.json' holds a JSON list, not an object"):
        Tokenizer.from_path(tmp_path)
    added = {"2": {"content": "</s>"}, "300": {"content": "<|im_end|>"}, "301": {"content": "<|im_start|>"}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": added}))
    tok = Tokenizer.from_path(tmp_path)  # a ChatML fine-tune of Llama 2: its added <|im_end|> ends generation too
    assert tok.eos_ids == frozenset({2, 300}) and tok.decode([300, 301]) == ""
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 301]}))
    assert Tokenizer.from_path(tmp_path).eos_ids == {2, 300, 301}  # generation_config.json's ids too


def test_a_sentencepiece_models_own_end_pieces_and_its_configs_eos_stop_generation(sp_model, tmp_path):
    """An end token among the model's own pieces (Yi's <|im_end|> at 7, here a control symbol at 3), and the piece or
    added token tokenizer_config.json names as eos_token (transformers' EOS), end generation too."""
    spm = pytest.importorskip("sentencepiece")
    spm.SentencePieceTrainer.train(input=str(sp_model / "corpus.txt"), model_prefix=str(tmp_path / "tokenizer"),
                                   vocab_size=300, model_type="bpe", byte_fallback=True, bos_id=1, eos_id=2, unk_id=0,
                                   control_symbols=["<|im_end|>"])
    assert Tokenizer.from_path(tmp_path).eos_ids == {2, 3}
    piece = Tokenizer.from_path(tmp_path).sp.id_to_piece(100)
    for eos, added, stop in ((piece, {}, 100), ({"content": "<|end|>"}, {"300": {"content": "<|end|>"}}, 300)):
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": eos, "added_tokens_decoder": added}))
        assert Tokenizer.from_path(tmp_path).eos_ids == {2, 3, stop}, eos


# --- Hugging Face tokenizer.json (byte-level BPE) ----------------------------------------------------------

@pytest.mark.filterwarnings("ignore:invalid escape sequence")  # the template's \q, which Jinja keeps as written
def test_hf_tokenizer_json(tmp_path):
    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    vocab.update({BYTE_CHARS[b]: 3 + b for b in range(256)})
    merges = ["h e", "l l", "he ll", "hell o", "Ġ w"]
    vocab.update({m.replace(" ", ""): 259 + i for i, m in enumerate(merges)})
    added = [{"id": i, "content": t, "special": True} for t, i in list(vocab.items())[:3]]
    pre = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                 {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}]}
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab, "merges": merges},
                                                         "added_tokens": added, "pre_tokenizer": pre}))
    template = ("{{ '<|im_start|>system\\nBe nice,\\n\\tnot a\\\\b \\q<|im_end|>\\n' }}"  # (\\q: no escape, kept)
                "{% for m in messages %}...{% endfor %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": template}))
    tok = Tokenizer.from_path(tmp_path)
    assert (tok.vocab_size, tok.bos_id, tok.eos_ids) == (264, 1, frozenset({0, 2}))
    assert tok.encode("hello 12 w") == [262, 3 + 32, 3 + ord("1"), 3 + ord("2"), 263]
    assert tok.decode(tok.encode("hello wörld")) == "hello wörld"
    assert tok.decode([262, 264, 264 + 62, 50000, -1]) == "hello"  # a model's padded rows decode to nothing
    (tmp_path / "renamed").write_bytes((tmp_path / "tokenizer.json").read_bytes())  # known by its content
    assert Tokenizer.from_path(tmp_path / "renamed").encode("hello 12 w") == tok.encode("hello 12 w")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|im_start|>"}}))
    assert Tokenizer.from_path(tmp_path).eos_ids == {0, 1, 2}  # the config's EOS, a name no built-in list holds
    for ids, want in (([5, 2], {0, 1, 2, 5}), (7, {0, 1, 2, 7}), (None, {0, 1, 2})):  # generation_config's ids too
        (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": ids, "max_length": 8}))
        assert Tokenizer.from_path(tmp_path).eos_ids == want, ids
    for text, words in (('{"eos_token_id": "2"}', "eos_token_id must be a token id or a list"),
                        ('{"eos_token_id": [2, -1]}', "eos_token_id must be"), ("{", "is not valid JSON")):
        (tmp_path / "generation_config.json").write_text(text)
        with pytest.raises(ValueError, match=words):
            Tokenizer.from_path(tmp_path)
    (tmp_path / "generation_config.json").unlink()
    (tmp_path / "tokenizer_config.json").write_text("{}")
    broken = [{"content": "<|x|>"}, {"id": "1", "content": "<|im_start|>"}, None]  # no id; id a string; null
    far = [[{"id": i, "content": "<|x|>"}] for i in (-1, 10 ** 9, 1.5, True)]  # 10^9: not a set of 10^9 ids
    for entries in (broken[:1], broken[1:2], None, [{"id": 1, "content": "a"}, {"id": 1, "content": "b"}], *far):
        (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab, "merges": merges},
                                                             "added_tokens": entries, "pre_tokenizer": pre}))
        with pytest.raises(ValueError, match="malformed tokenizer|two tokens share one id|is not a whole number in "
                                             r"\[0, 15\d\d\) for its 26\d tokens") as e:
            Tokenizer.from_path(tmp_path)
        assert "\n" not in str(e.value)
    nl, sys_ids = 3 + 10, [3 + ord(c) for c in "system\nBe nice,\n\tnot a\\b \\q"]  # the escapes as Jinja renders
    assert tok.encode_chat([{"role": "user", "content": "he"}], add_generation_prompt=False) == [
        1, *sys_ids, 2, nl, 1, *[3 + ord(c) for c in "user\n"], 259, 2, nl]


def test_hf_llama3_json_matches_tiktoken_file(tmp_path, llama3):
    # A Llama 3 HF directory: the same vocabulary as tokenizer.json with Meta's regex in a Split step, and BOS
    # added by the post-processor. It must tokenize exactly like Meta's tiktoken file.
    path = package_file("llama_models", "llama3", "tokenizer.model")
    ranks = {}
    with open(path, "rb") as f:
        for line in f:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    name = {rank: "".join(BYTE_CHARS[b] for b in tok) for tok, rank in ranks.items()}
    vocab = {t: i for i, t in name.items()}
    # Merges as transformers' TikTokenConverter writes Llama 3's (280,147): every split of a token into two tokens,
    # in the order of the token's id; so ids repeat, and a part's id may be above its join's.
    splits = sorted((rank, ranks[tok[:i]], ranks[tok[i:]]) for tok, rank in ranks.items() for i in range(1, len(tok))
                    if tok[:i] in ranks and tok[i:] in ranks)
    merges = [f"{name[a]} {name[b]}" for _, a, b in splits]
    assert len(merges) == 280147
    added = [{"id": 128000 + i, "content": t, "special": True} for i, t in
             enumerate(["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                        "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                        "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>"])]
    pre = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated"},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]}
    post = {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<|begin_of_text|>"}}]}
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab, "merges": merges},
                                                         "added_tokens": added, "pre_tokenizer": pre,
                                                         "post_processor": post}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}))
    tok = Tokenizer.from_path(tmp_path)
    assert (tok.bos_id, tok.eos_ids) == (128000, frozenset({128001, 128008, 128009}))
    for text in ["This is a test sentence.", "  x = 12345;\n\n\tdef f(): 'ok' 日本語 🤗"]:
        assert tok.encode(text) == llama3.encode(text)
    msgs = [{"role": "user", "content": "Hi"}]
    assert tok.encode_chat(msgs) == llama3.encode_chat(msgs)


# --- errors a person can act on ----------------------------------------------------------------------------

def test_errors(tmp_path, gguf_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer at .*pass a .gguf file"):
        Tokenizer.from_path(tmp_path / "nope.gguf")
    with pytest.raises(FileNotFoundError, match="no tokenizer.model, tokenizer.json or .gguf in directory"):
        Tokenizer.from_path(tmp_path)
    (tmp_path / "tokenizer.json").mkdir()  # a directory of that name is not a tokenizer
    with pytest.raises(FileNotFoundError, match="no tokenizer.model, tokenizer.json or .gguf in directory"):
        Tokenizer.from_path(tmp_path)
    cut = tmp_path / "cut.gguf"
    with open(gguf_path, "rb") as f:
        cut.write_bytes(f.read(300_000))
    with pytest.raises(ValueError, match="not a readable GGUF file, truncated or corrupt.*re-download"):
        Tokenizer.from_path(cut)
    (tmp_path / "tokenizer.model").write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(ValueError, match="neither a sentencepiece nor a tiktoken tokenizer.model"):
        Tokenizer.from_path(tmp_path)
    weights = {"w.pth": b"PK\x03\x04archive/data.pkl", "w.bin": b"\x80\x02}q\x00", "w.safetensors":
               (12).to_bytes(8, "little") + b'{"a":{}}    '}  # refused by their first bytes, not read whole
    for name, head in weights.items():
        (tmp_path / name).write_bytes(head + bytes(100))
        with pytest.raises(ValueError, match=r"holds model weights \(PyTorch's zip, a pickle or safetensors\), not a"):
            Tokenizer.from_path(tmp_path / name)
    (tmp_path / "bad.json").write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}}}))
    with pytest.raises(ValueError, match="only byte-level BPE tokenizer.json is supported"):
        Tokenizer.from_path(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text(json.dumps({"model": "BPE", "pre_tokenizer": []}))
    with pytest.raises(ValueError, match="is not a Hugging Face tokenizer.json.*must be objects.*re-download it"):
        Tokenizer.from_path(tmp_path / "bad.json")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))  # the checkpoint's other JSON file
    with pytest.raises(ValueError, match=r"not a Hugging Face tokenizer.json \('model'\); pass tokenizer.json or the"):
        Tokenizer.from_path(tmp_path / "config.json")
    empty = {"type": "Sequence", "pretokenizers": [], "from": "ByteLevel"}  # no step: refused, not an IndexError
    (tmp_path / "bad.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": {}}, "pre_tokenizer": empty}))
    with pytest.raises(ValueError, match=r"its pre-tokenizer \(Sequence\) is not one hata reproduces"):
        Tokenizer.from_path(tmp_path / "bad.json")


def test_gguf_named_file_without_magic_is_called_corrupt(tmp_path, gguf_path):
    """A *.gguf that does not start with 'GGUF' (empty, header overwritten, text) is a broken download, never
    parsed as a sentencepiece model; alone in a directory it is picked and refused the same way."""
    with open(gguf_path, "rb") as f:
        header = f.read(4096)
    for name, data in (("empty.gguf", b""), ("zeroed.gguf", b"\0" * 4 + header[4:]), ("text.gguf", b"hello\n" * 9)):
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ValueError) as e:
            Tokenizer.from_path(path)
        assert str(e.value) == f"{str(path)!r} is not a GGUF file (it does not start with 'GGUF'): truncated or " \
                               "corrupt; re-download it"
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "model.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match=r"model.gguf' is not a GGUF file \(it does not start with 'GGUF'\)"):
        Tokenizer.from_path(alone)


def test_directory_with_several_ggufs_asks_which(tmp_path, llama3):
    """As load_checkpoint: several .gguf files in a directory are refused by name (not the first by sorted name
    taken), unless a tokenizer.model or tokenizer.json is there, which is preferred."""
    for name in ("b.gguf", "a.gguf", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(ValueError) as e:
        Tokenizer.from_path(tmp_path)
    assert str(e.value) == f"{str(tmp_path)!r} holds several .gguf files (a.gguf, b.gguf); pass the one to use"
    lines = package_file("llama_models", "llama3", "tokenizer.model")
    (tmp_path / "tokenizer.model").write_bytes(open(lines, "rb").read())
    assert Tokenizer.from_path(tmp_path).encode("hi there") == llama3.encode("hi there")


def test_git_lfs_pointers_are_named(tmp_path):
    """A clone made without git-lfs holds pointer files in place of tokenizer.json, tokenizer.model (sentencepiece or
    tiktoken) and *.gguf: each is named as one, with how to fetch it, not refused as bad JSON, protobuf or GGUF."""
    pointer = b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"c4" * 32 + b"\nsize 9085657\n"
    for name in ("tokenizer.json", "tokenizer.model", "model.gguf"):
        folder = tmp_path / name.replace(".", "_")
        folder.mkdir()
        (folder / name).write_bytes(pointer)
        (folder / "tokenizer_config.json").write_text("{}")
        for path in (folder, folder / name):  # found in its directory, or named
            with pytest.raises(ValueError) as e:
                Tokenizer.from_path(path)
            assert str(e.value) == f"{str(folder / name)!r} is a Git LFS pointer, not the file itself: fetch it with " \
                                   "`git lfs pull` (or download the file)"


def test_gguf_bos_default_follows_llama_cpp(tmp_path):
    """Without tokenizer.ggml.add_bos_token a byte-level GGUF adds BOS only for Llama 3's pre-tokenizers, as
    llama.cpp does (a ChatML model's BOS <|im_start|> must not open every prompt); the key, when present, rules."""
    tokens = BYTE_CHARS + ["<s>"]
    for pre, flag, want in (("smollm", None, False), ("llama-bpe", None, True), ("smollm", True, True),
                            ("llama-bpe", False, False)):
        path = _write_gguf(tmp_path / f"{pre}-{flag}.gguf", tokens, [1] * 256 + [3], pre=pre, bos=256, add_bos=flag)
        assert Tokenizer.from_path(path).encode("hi") == [256] * want + [ord("h"), ord("i")], (pre, flag)
    heads = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]  # Llama 3's chat format
    for flag in (None, True):  # BOS asked for (llama-bpe's default, or the key) but no BOS id: encoded without one
        path = _write_gguf(tmp_path / f"nobos-{flag}.gguf", tokens + heads, [1] * 256 + [3] * 4, pre="llama-bpe",
                           add_bos=flag)
        tok = Tokenizer.from_path(path)
        assert tok.encode("hi") == [ord("h"), ord("i")]
        assert tok.encode_chat([{"role": "user", "content": "x"}])[:2] == [257, *b"u"]  # before: None, 257


def test_gguf_end_of_turn_ids_stop_generation(tmp_path):
    """A GGUF's tokenizer.ggml.eot_token_id and eom_token_id end generation, whatever the tokens' names (the file
    names them; llama.cpp stops at them too)."""
    tokens, types = BYTE_CHARS + ["<end_of_turn>", "<eom>", "</s>"], [1] * 256 + [3] * 3
    path = _write_gguf(tmp_path / "plain.gguf", tokens, types, pre="smollm")
    assert Tokenizer.from_path(path).eos_ids == {258}  # by name only
    path = _write_gguf(tmp_path / "eot.gguf", tokens, types, pre="smollm", eot=256, eom=257)
    assert Tokenizer.from_path(path).eos_ids == {256, 257, 258}


def test_a_gguf_without_token_types_reads_as_llama_cpp_does(tmp_path, capsys):
    """tokenizer.ggml.token_type is optional in llama.cpp: every token is NORMAL but the end-of-generation ones it
    knows by name (CONTROL). hata reads such a file as one whose types say so, with CONTROL also for the ids the file
    names and the chat tokens it writes, and says so in a warning; before, it refused the file as corrupt."""
    tokens = BYTE_CHARS + ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<s>", "<think>", "ab"]
    kw = dict(merges=["a b"], pre="smollm", bos=259, add_bos=True)
    bare = Tokenizer.from_path(_write_gguf(tmp_path / "bare.gguf", tokens, None, **kw))
    assert "bare.gguf' has no tokenizer.ggml.token_type" in capsys.readouterr().err
    typed = Tokenizer.from_path(_write_gguf(tmp_path / "typed.gguf", tokens, [1] * 256 + [3, 3, 3, 3, 1, 1], **kw))
    assert bare.specials == typed.specials == {"<|im_start|>": 256, "<|im_end|>": 257, "<|endoftext|>": 258,
                                               "<s>": 259}
    assert bare.eos_ids == typed.eos_ids == {257, 258} and bare.chat == typed.chat == "chatml"
    chat = [{"role": "user", "content": "ab <think>"}]
    assert bare.encode_chat(chat) == typed.encode_chat(chat) == [259, 256, *b"user\n", 261, *b" <think>", 257, 10,
                                                                 256, *b"assistant\n"]
    assert bare.decode([260, 257, 97]) == typed.decode([260, 257, 97]) == "<think><|im_end|>a"


def test_a_gguf_token_id_that_is_no_token_is_named(tmp_path):
    """BOS, EOS, EOT and EOM ids are checked against the token list: before, a string id failed later in a
    comparison (a bare TypeError), and one past the list blamed the tokenizer for not belonging to its own file."""
    tokens, types = BYTE_CHARS + ["<s>"], [1] * 256 + [3]
    for key, kw, got in (("bos", dict(bos=257), "257"), ("eot", dict(eot=4000000000), "4000000000"),
                         ("eos", dict(strings=[("tokenizer.ggml.eos_token_id", "2")]), "'2'")):
        path = _write_gguf(tmp_path / f"{key}.gguf", tokens, types, pre="smollm", **kw)
        with pytest.raises(ValueError, match=f"tokenizer.ggml.{key}_token_id must be a token id below 257, got {got}"):
            Tokenizer.from_path(path)
    assert Tokenizer.from_path(_write_gguf(tmp_path / "ok.gguf", tokens, types, pre="smollm", bos=256)).bos_id == 256


def test_a_chat_format_needs_every_token_it_writes(tmp_path):
    """A vocabulary with ChatML's opener but no <|im_end|>, or Llama 3's header tokens but no <|eot_id|>, has no
    chat format hata writes: before, it wrote None into the prompt (a bare TypeError later)."""
    for name, extra in (("chatml", ["<|im_start|>", "<|im_end|>"]),
                        ("llama3", ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])):
        for whole, gap in [(True, None)] + [(False, i) for i in range(1, len(extra))]:  # each token but the opener
            specials = extra if whole else extra[:gap] + ["<|other|>"] + extra[gap + 1:]
            path = _write_gguf(tmp_path / f"{name}{gap}.gguf", BYTE_CHARS + specials,
                               [1] * 256 + [3] * len(extra), pre="smollm")
            tok = Tokenizer.from_path(path)
            assert tok.chat == (name if whole else None), (name, gap)
            if not whole:
                with pytest.raises(ValueError, match="no chat format hata writes"):
                    tok.encode_chat([{"role": "user", "content": "x"}])


def test_config_and_gguf_errors(tmp_path, llama3):
    """A corrupt tokenizer_config.json is named; a GGUF without a token list says so; a tiktoken file may end in a
    blank line."""
    vocab = dict(BYTE_VOCAB)
    pre = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab, "merges": []},
                                                         "pre_tokenizer": pre}))
    (tmp_path / "tokenizer_config.json").write_text("{bos_token: <s>}")
    with pytest.raises(ValueError, match="tokenizer_config.json' is not valid JSON"):
        Tokenizer.from_path(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": ["x"]}')  # not tokenizer.json's fault
    with pytest.raises(ValueError, match="tokenizer_config.json': eos_token must be a token's name, got \\['x'\\]"):
        Tokenizer.from_path(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{}")
    (tmp_path / "chat_template.jinja").write_bytes(b"{{ \xff }}")  # named, not a bare codec error
    with pytest.raises(ValueError, match="chat_template.jinja' is not UTF-8 text"):
        Tokenizer.from_path(tmp_path)
    (tmp_path / "chat_template.jinja").unlink()
    for kind, words in (("gpt2", "no tokenizer.ggml.tokens list"),
                        ("llama", "GGUF tokenizer type 'llama' is not supported")):  # the same path rewritten
        path = write_gguf(tmp_path / "t.gguf", lambda writer: writer.add_tokenizer_model(kind))
        with pytest.raises(ValueError, match=words):  # the second file is parsed again, not served from the cache
            Tokenizer.from_path(path)
        first = open_gguf(path)
        assert open_gguf(path) is first  # the model's loader gets the tokenizer's parse
        assert open_gguf(path, keep=False) is first and open_gguf(path) is not first  # the last reader lets it go
    short = _write_gguf(tmp_path / "short.gguf", BYTE_CHARS, [1] * 100)  # zip dropped the rest
    with pytest.raises(ValueError, match="its token_type list differs from it in length; the file is corrupt"):
        Tokenizer.from_path(short)
    flipped = _write_gguf(tmp_path / "flip.gguf", BYTE_CHARS[:255] + [b"\xff\xfe"], [1] * 256)
    with pytest.raises(ValueError, match="flip.gguf': malformed tokenizer \\(UnicodeDecodeError: "):  # not bare
        Tokenizer.from_path(flipped)
    lines = package_file("llama_models", "llama3", "tokenizer.model")
    (tmp_path / "tik.model").write_bytes(open(lines, "rb").read() + b"\n")
    assert Tokenizer.from_path(tmp_path / "tik.model").encode("hi there") == llama3.encode("hi there")
    # Cut at a line, or a line lost: Meta's special tokens would land on other ids (BOS on an ordinary token)
    whole = open(lines, "rb").read().splitlines(keepends=True)
    for name, kept in (("cut", whole[:100000]), ("gap", whole[:5000] + whole[5001:])):
        (tmp_path / f"{name}.model").write_bytes(b"".join(kept))
        with pytest.raises(ValueError, match=r"not Meta's Llama 3 tokens 0..127999 each once: a cut or corrupt file"):
            Tokenizer.from_path(tmp_path / f"{name}.model")


def test_the_default_system_prompt_and_the_template_file(tmp_path):
    """ChatML's default system prompt is what the template renders for a chat without one: a string holding the other
    quote or its own escaped (before: an apostrophe dropped the system turn), one kept in a variable, written as the
    template's text, or with a \\u escape (before: none of these three read, or the escape left as written); a
    template that does not render (a syntax error, its own raise_exception, a repeat or power past 10^6 items or
    bits), or writes only the chat's own system message, has none; loop controls render, as in transformers.
    chat_template.jinja wins over the config's template, as in transformers (before: the config's)."""
    user = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    for template, want in (("{{ \"<|im_start|>system\\nYou're nice.<|im_end|>\\n\" }}", "You're nice."),
                           ("{{ '<|im_start|>system\\nYou\\'re \"nice\".<|im_end|>\\n' }}", 'You\'re "nice".'),
                           ("{{ '<|im_start|>system\\nYou're<|im_end|>' }}", None),  # not a Jinja string
                           ("{% set d = 'Be nice.' %}{{ '<|im_start|>system\\n' + d + '<|im_end|>\\n' }}" + user,
                            "Be nice."),
                           ("<|im_start|>system\nYou're nice.<|im_end|>\n" + user, "You're nice."),
                           ("{{ '<|im_start|>system\\ncaf\\u00e9<|im_end|>' }}", "caf\u00e9"),
                           ("{{ raise_exception('no') }}<|im_start|>system\nX<|im_end|>", None),
                           ("{{ '<|im_start|>system\\n' + 'ab' * 2 + '<|im_end|>' }}", "abab"),
                           ("{{ 'a' * 10 ** 9 }}<|im_start|>system\nX<|im_end|>", None),  # refused, not a GB made
                           ("{{ (2 ** 2000000) % 7 }}<|im_start|>system\nX<|im_end|>", None),
                           ("{% for m in messages %}{% break %}{% endfor %}<|im_start|>system\nGo.<|im_end|>", "Go."),
                           ("{% for m in messages %}{% if m.role == 'system' %}<|im_start|>system\n{{ m.content }}"
                            "<|im_end|>{% endif %}{% endfor %}", None)):
        assert _default_system(template) == want, template
    _write_byte_json(tmp_path, ["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    chatml = "{% for m in messages %}<|im_start|>...{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": chatml}))
    # folders named like the template and a config are skipped
    (tmp_path / "chat_template.jinja").mkdir()
    (tmp_path / "generation_config.json").mkdir()
    assert Tokenizer.from_path(tmp_path).chat == "chatml"
    (tmp_path / "chat_template.jinja").rmdir()
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}<|start_header_id|>...{% endfor %}")
    assert Tokenizer.from_path(tmp_path).chat == "llama3"


def test_gguf_reader_over_plain_arrays_reads_what_the_library_reads(gguf_path):
    """open_gguf's reader slices a plain-array view of the file (the library's np.memmap slices run Python code on
    each of the parse's ~10^6 slices); it must find the same fields and tensor bytes, read-only."""
    gguf = pytest.importorskip("gguf")
    ours, theirs = open_gguf(gguf_path), gguf.GGUFReader(gguf_path)
    assert type(ours.data) is np.ndarray and type(ours.tensors[0].data) is np.ndarray and not ours.data.flags.writeable
    assert list(ours.fields) == list(theirs.fields)
    assert all(ours.fields[k].contents() == theirs.fields[k].contents() for k in theirs.fields)
    assert [(t.name, t.tensor_type, list(t.shape)) for t in ours.tensors] == [
        (t.name, t.tensor_type, list(t.shape)) for t in theirs.tensors]
    assert all(np.array_equal(a.data, b.data) for a, b in zip(ours.tensors, theirs.tensors))


def test_decode_at_the_edges_of_the_vocabulary(tmp_path, llama3):
    """Id 0 is a token; a byte the vocabulary lacks gets the id past it and is dropped (here byte 0, at id 255 =
    vocab_size); a cut UTF-8 character decodes to U+FFFD; special and added tokens decode to their text (a model's
    <think> is shown); a folder with both tokenizer.model and tokenizer.json (a Llama 2 repository) reads the .model."""
    assert llama3.encode("!", bos=False) == [0] and llama3.decode([0]) == "!"
    assert llama3.encode("🤗", bos=False) == [9468, 97, 245] and llama3.decode([9468]) == "\ufffd"
    vocab = {BYTE_CHARS[b]: b - 1 for b in range(1, 256)}
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab, "merges": []},
                                                         "pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}))
    tok = Tokenizer.from_path(tmp_path)
    assert tok.vocab_size == 255 and tok.encode("\x00a") == [ord("a") - 1]
    (tmp_path / "tokenizer.model").write_bytes(open(package_file("llama_models", "llama3", "tokenizer.model"),
                                                    "rb").read())
    tok = Tokenizer.from_path(tmp_path)
    assert tok.vocab_size == 128256 and tok.encode("hi there") == llama3.encode("hi there")
    names = ["<|begin_of_text|>", "<|eot_id|>", "<think>"]
    path = _write_gguf(tmp_path / "t.gguf", BYTE_CHARS + names, [1] * 256 + [3, 3, 4],
                       pre="llama-bpe", bos=256)
    tok = Tokenizer.from_path(path)
    assert tok.decode([258, ord("a")]) == "<think>a" and tok.decode([257]) == "<|eot_id|>"


def test_unused_ids_decode_to_nothing_and_the_template_picks_the_format(tmp_path):
    """A GGUF's UNUSED slots (convert_hf_to_gguf's [PAD] fillers) decode to nothing instead of failing; a template
    in ChatML makes a vocabulary that also holds Llama 3's header tokens chat in ChatML (Hermes-2-Pro-Llama-3);
    USER_DEFINED tokens are found in plain text, CONTROL tokens are not (llama.cpp without parse_special)."""
    names = ["<|begin_of_text|>", "[PAD257]", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
             "<|im_start|>", "<|im_end|>", "<think>"]
    for template, chat in ((None, "llama3"), ("{{bos_token}}{% for m in messages %}<|im_start|>...", "chatml")):
        path = _write_gguf(tmp_path / f"{chat}.gguf", BYTE_CHARS + names,
                           [1] * 256 + [3, 5, 3, 3, 3, 3, 3, 4], pre="llama-bpe", bos=256, template=template)
        tok = Tokenizer.from_path(path)
        assert tok.decode([ord("h"), 257, ord("i")]) == "hi" and tok.chat == chat
        ids = tok.encode_chat([{"role": "user", "content": "x"}], add_generation_prompt=False)
        assert ids[:2] == ([256, 258] if chat == "llama3" else [256, 261])
        assert tok.encode("a<think><|eot_id|>", bos=False) == [ord("a"), 263, *b"<|eot_id|>"]



# Llama 3.2-Instruct's chat template without its tool branches; Llama 3.1's sets the date to "26 Jul 2024" instead.
LLAMA32_TEMPLATE = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""


@pytest.mark.parametrize("version", ["3.1", "3.2"])
def test_llama31_templates_open_with_the_cutoff_and_the_date(tmp_path, version):
    """A Llama 3.1+ template writes a system turn into every chat: the knowledge cutoff, the date (3.1: fixed;
    3.2: today's), then the system message if any. Ids against the template rendered by Jinja as transformers does
    (a sandbox with trim_blocks and lstrip_blocks, strftime_now defined), on a vocabulary of single bytes."""
    jinja2 = pytest.importorskip("jinja2.sandbox")
    template = LLAMA32_TEMPLATE
    if version == "3.1":
        template = re.sub(r"(?s){%- if strftime_now.*?{%- endif %}\n", '{%- set date_string = "23 Jul 2024" %}\n',
                          template, count=1)  # 3.1's own is 26 Jul 2024, the fallback: another date shows it read
    names = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    path = _write_gguf(tmp_path / "llama.gguf", BYTE_CHARS + names, [1] * 256 + [3] * 4,
                       pre="llama-bpe", bos=256, template=template)
    tok = Tokenizer.from_path(path)
    env = jinja2.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    specials = {t: 256 + i for i, t in enumerate(names)}
    for messages in ([{"role": "user", "content": "Hi "}],
                     [{"role": "system", "content": " Be brief.\n"}, {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": "4"}, {"role": "user", "content": "Thanks"}],
                     [{"role": "system", "content": ""}, {"role": "user", "content": "x"}]):
        for prompt in (True, False):
            text = env.from_string(template).render(messages=messages, add_generation_prompt=prompt,
                                                    bos_token=names[0])
            want = [i for part in re.split("(" + "|".join(map(re.escape, names)) + ")", text)
                    for i in ([specials[part]] if part in specials else part.encode())]
            assert tok.encode_chat(messages, add_generation_prompt=prompt) == want, text
    date = "23 Jul 2024" if version == "3.1" else datetime.datetime.now().strftime("%d %b %Y")
    assert tok.opening == f"Cutting Knowledge Date: December 2023\nToday Date: {date}\n\n"
    bare = '{{ "Cutting Knowledge Date: December 2023\\n" }}{{ "Today Date: " + date_string + "\\n\\n" }}'
    path = _write_gguf(tmp_path / "bare.gguf", BYTE_CHARS + names, [1] * 256 + [3] * 4,
                       pre="llama-bpe", bos=256, template=bare)  # a date set nowhere: Meta's default
    assert Tokenizer.from_path(path).opening == "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"

def test_a_meta_tokenizer_model_takes_its_folders_chat_template(tmp_path):
    """Meta's tiktoken tokenizer.model beside a tokenizer_config.json takes its chat template (and beside a
    generation_config.json its stop ids), as a tokenizer.json or a sentencepiece model does: Llama 3.2's opens
    every chat with the cutoff and the date; another template (a Llama 3 vocabulary with its own format, as
    DeepSeek-R1-Distill-Llama's) is no Llama 3 chat. Alone: Llama 3's."""
    (tmp_path / "tokenizer.model").write_bytes(open(package_file("llama_models", "llama3", "tokenizer.model"),
                                                    "rb").read())
    tok = Tokenizer.from_path(tmp_path)
    assert (tok.chat, tok.opening) == ("llama3", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": LLAMA32_TEMPLATE}))
    tok = Tokenizer.from_path(tmp_path)
    date = datetime.datetime.now().strftime("%d %b %Y")
    assert (tok.chat, tok.opening) == ("llama3", f"Cutting Knowledge Date: December 2023\nToday Date: {date}\n\n")
    other = "{% for m in messages %}<｜User｜>{{ m['content'] }}<｜Assistant｜>{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": other}))
    assert Tokenizer.from_path(tmp_path).chat is None
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [128001, 128011]}))
    assert Tokenizer.from_path(tmp_path).eos_ids == {128001, 128008, 128009, 128011}  # the folder's stop ids too


def test_hf_bos_beyond_ascii_a_named_template_and_plain_added_tokens(tmp_path):
    """BOS found in the post-processor although json.dumps would escape its name (DeepSeek-R1-Distill-Llama's);
    transformers' list form of chat_template gives its "default" entry; an added token that is not special (its
    <think>) is found in plain text, as HF does."""
    bos, vocab = "<｜begin▁of▁sentence｜>", dict(BYTE_VOCAB)
    added = [{"id": 256, "content": bos, "special": True}, {"id": 257, "content": "<|im_start|>", "special": True},
             {"id": 258, "content": "<|im_end|>", "special": True}, {"id": 259, "content": "<think>", "special": False},
             {"id": 260, "content": "", "special": False}]  # an empty one matches nothing
    post = {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": bos, "type_id": 0}},
                                                     {"Sequence": {"id": "A", "type_id": 0}}]}
    (tmp_path / "tokenizer.json").write_text(json.dumps({
        "model": {"type": "BPE", "vocab": vocab, "merges": []}, "added_tokens": added, "post_processor": post,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}}))
    named = [{"name": "tool_use", "template": "..."},
             {"name": "default", "template": "<|im_start|>system\nHi<|im_end|>"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": bos, "chat_template": named}))
    tok = Tokenizer.from_path(tmp_path)
    assert tok.encode("hi") == [256, ord("h"), ord("i")] and tok.system == "Hi" and tok.chat == "chatml"
    assert tok.encode("<think>\n<|im_end|>", bos=False) == [259, ord("\n"), *b"<|im_end|>"]  # not special: found
    # Without tokenizer_config.json, BOS is what the post-processor's template puts first (as HF's tokenizers adds
    # it); Llama 3's post-processor is a Sequence of ByteLevel and that template
    (tmp_path / "tokenizer_config.json").unlink()
    tj = json.loads((tmp_path / "tokenizer.json").read_text())
    tj["post_processor"] = {"type": "Sequence", "processors": [{"type": "ByteLevel", "trim_offsets": False}, post]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    tok = Tokenizer.from_path(tmp_path)
    assert (tok.bos_id, tok.add_bos, tok.encode("hi")) == (256, True, [256, ord("h"), ord("i")])


# --- merges and the GGUF pre-tokenizer -------------------------------------------------------------------------

def _hf_bpe_ref(word: str, merges: list[str]) -> list[str]:
    """HF's BPE on one pre-split word: join the adjacent pair of lowest merge index (leftmost on a tie) until no
    adjacent pair is listed."""
    rank = {tuple(m.split(" ")): n for n, m in enumerate(merges)}
    parts = list(word)
    while len(parts) > 1:
        i = min(range(len(parts) - 1), key=lambda i: rank.get((parts[i], parts[i + 1]), len(rank)))
        if (parts[i], parts[i + 1]) not in rank:
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def _write_byte_json(folder, specials=(), **fields):
    """A byte-level BPE tokenizer.json in `folder`: the 256 byte tokens, no merges, the special tokens `specials`
    from id 256 on, and any other top-level `fields` (a post_processor)."""
    (folder / "tokenizer.json").write_text(json.dumps({
        "model": {"type": "BPE", "vocab": dict(BYTE_VOCAB), "merges": []},
        "added_tokens": [{"id": 256 + i, "content": t, "special": True} for i, t in enumerate(specials)],
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}, **fields}))


def _write_gguf(path, tokens, types, merges=(), pre=None, bos=None, add_bos=None, template=None, eot=None,
                eom=None, strings=()) -> str:
    """A GGUF file holding only a byte-level BPE tokenizer; the keys left None (types too) are not written;
    `strings`: (key, text) pairs written as they are."""
    def fill(writer):
        for key, text in strings:
            writer.add_string(key, text)
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list(tokens)
        if types is not None:
            writer.add_token_types(types)
        if merges:
            writer.add_token_merges(merges)
        if pre is not None:
            writer.add_tokenizer_pre(pre)
        if bos is not None:
            writer.add_bos_token_id(bos)
        if add_bos is not None:
            writer.add_add_bos_token(add_bos)
        if template is not None:
            writer.add_chat_template(template)
        if eot is not None:
            writer.add_eot_token_id(eot)
        if eom is not None:
            writer.add_eom_token_id(eom)
    return write_gguf(path, fill)


# Listed first, "b c" outranks "a b" in HF's BPE: "abc" -> a|bc. tiktoken joins by id, so it agrees only if "bc"
# also has the lower id; with "ab" and "bc" swapped, the old loader gave 7 of these words other ids than HF's BPE.
# (tiktoken also joins two tokens the list never joins, when their join is a token: not checked, and rare with
# trained vocabularies, see SMOL_IDS; none of these words meets such a pair.)
MERGES = ["b c", "a b", "c a", "ab ab", "bc a"]
WORDS = ["abc", "abcabc", "cabbc", "ababc", "aabcab", "bcab", "c", "abbc", "cabc", "abca", "ababab", "bcabca"]


@pytest.mark.parametrize("form", ["file", "lists", "gguf"])
def test_merges_out_of_id_order_are_refused(tmp_path, form):
    """A vocabulary whose ids follow the merge order tokenizes as HF's BPE does; one whose ids do not (here "ab"
    and "bc" swapped, so tiktoken would split "abc" ab|c) is refused, naming the first merge out of order."""
    in_order = {m.replace(" ", ""): 256 + n for n, m in enumerate(MERGES)}
    swapped = {**in_order, "bc": 257, "ab": 256}
    for made, ok in ((in_order, True), (swapped, False)):
        vocab = {**BYTE_VOCAB, **made}
        if form == "gguf":
            tokens = sorted(vocab, key=vocab.get)  # a GGUF's ids are list positions
            path = _write_gguf(tmp_path / f"{ok}.gguf", tokens, [1] * len(vocab), MERGES, pre="gpt-2")
        else:
            merges = [m.split(" ") for m in MERGES] if form == "lists" else MERGES
            path = tmp_path / f"{ok}.json"
            path.write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab, "merges": merges},
                                        "pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}))
        if ok:
            tok = Tokenizer.from_path(path)
            for word in WORDS:
                assert tok.encode(word) == [vocab[t] for t in _hf_bpe_ref(word, MERGES)], word
            assert tok.encode("abc") == [ord("a"), 256]  # a|bc
        else:
            with pytest.raises(ValueError, match="merge 1 'a b' makes id 256 after merge 0 made id 257: the merges "
                                                 "are not in id order.*not supported") as e:
                Tokenizer.from_path(path)
            assert "\n" not in str(e.value)


def test_merges_must_make_tokens_and_exist(tmp_path):
    """A merge whose join is no token, or a vocabulary with multi-byte tokens but no merges (HF would never make
    them; llama.cpp refuses such a GGUF), is refused; a vocabulary of single bytes needs no merges."""
    vocab = {**BYTE_VOCAB, "ab": 256}
    for merges, words in ((["a b", "a c"], "merge 1 'a c' is not two tokens whose join is in the vocabulary"),
                          (["a b c"], "merge 0 'a b c' is not two tokens"), ([], "multi-byte tokens but no merges"),
                          (None, "multi-byte tokens but no merges")):
        model = {"type": "BPE", "vocab": vocab, **({"merges": merges} if merges is not None else {})}
        (tmp_path / "tokenizer.json").write_text(json.dumps({"model": model, "pre_tokenizer": {"type": "ByteLevel"}}))
        with pytest.raises(ValueError, match=words):
            Tokenizer.from_path(tmp_path)
    path = _write_gguf(tmp_path / "t.gguf", list(vocab), [1] * 257)
    with pytest.raises(ValueError, match="t.gguf': multi-byte tokens but no merges"):
        Tokenizer.from_path(path)


def test_gguf_without_pre_tokenizer(tmp_path, capsys):
    """A GGUF naming no pre-tokenizer (converted before llama.cpp wrote one) is split with Llama 3's regex when its
    vocabulary is Llama 3's (it holds <|start_header_id|>), and gets BOS as Llama 3 does; any other, or one naming
    "default" (llama.cpp's four regexes in turn), is split GPT-2's way with a warning. Llama 3's regex keeps " 1" as
    " " and "1"; GPT-2's keeps it whole."""
    tokens = BYTE_CHARS + ["Ġ1", "<|begin_of_text|>", "<|start_header_id|>"]
    types = [1] * 257 + [3, 3]
    cases = [(None, 259, [257, 32, 49], ""), (None, 258, [256], "names no pre-tokenizer"),
             ("default", 259, [257, 32, 49], ""), ("default", 258, [256], "not as llama.cpp or the model does"),
             ("gpt-2", 259, [256], "")]
    for n, (pre, size, ids, warning) in enumerate(cases):
        path = _write_gguf(tmp_path / f"{n}.gguf", tokens[:size], types[:size], ["Ġ 1"], pre=pre, bos=257)
        capsys.readouterr()
        assert Tokenizer.from_path(path).encode(" 1") == ids, (pre, size)
        err = capsys.readouterr().err
        assert (warning in err) if warning else err == "", (pre, size, err)


def test_split_regex_keeps_the_text_between_its_matches(tmp_path):
    """An isolating Split keeps the text its regex does not match as pieces of their own (tiktoken would drop
    it: "ab 12!" with a letters-only regex encoded as "ab"); each gap is one piece, so a merge inside it applies."""
    vocab = BYTE_VOCAB | {"Ġ1": 256}
    pre = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "\\p{L}+"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(
        {"model": {"type": "BPE", "vocab": vocab, "merges": ["Ġ 1"]}, "pre_tokenizer": pre}))
    tok = Tokenizer.from_path(tmp_path)
    assert tok.encode("ab 12!\ncd") == [97, 98, 256, 50, 33, 10, 99, 100]
    assert tok.decode(tok.encode(" 1 x\n\n")) == " 1 x\n\n"
    gap = "1 " * 500_000  # one gap of 1M characters: cut into pieces, not a Rust panic (stack overflow)
    assert tok.decode(tok.encode(gap)) == gap
    vocab_gap = vocab | {"!a": 257}  # a merge across a gap and the match after it: never made
    (tmp_path / "tokenizer.json").write_text(json.dumps(
        {"model": {"type": "BPE", "vocab": vocab_gap, "merges": ["Ġ 1", "! a"]}, "pre_tokenizer": pre}))
    assert Tokenizer.from_path(tmp_path).encode("1!a") == [49, 33, 97]
    for regex, words in [("", "Split regex '' matches the empty string"), ("(?=x)", "matches the empty string"),
                         ("(?m:^$)", "matches the empty string"),  # only between two line ends
                         ("(?U)a*", "matches the empty string"),  # a flag only fancy-regex reads: probed by tiktoken
                         ("\\p{L}*", "matches the empty string"),  # not a Rust panic
                         ("\\p{L}+|(?=\\.)", "matches the empty string"),  # only before a '.': it lost the '.'
                         ("(?=q)|\\p{L}+", "matches the empty string"),  # only before a 'q': a Rust panic
                         ("\\p{L}+|(?<=\\p{L})(?=\\p{N})", "matches the empty string"),  # between a letter, a digit
                         ("((", "its pre-tokenizer regex does not compile"),  # tiktoken's message, with the file
                         (" ?[^(\\s|[.,!?…。，、।۔،])]+", None), ("\\x{4E00}+|\\S+|\\s+", None)]:  # BLOOM's; loaded
        pre["pretokenizers"][0]["pattern"]["Regex"] = regex
        (tmp_path / "tokenizer.json").write_text(json.dumps(
            {"model": {"type": "BPE", "vocab": vocab, "merges": ["Ġ 1"]}, "pre_tokenizer": pre}))
        if words is None:
            assert Tokenizer.from_path(tmp_path).decode(Tokenizer.from_path(tmp_path).encode("a, b 一")) == "a, b 一"
        else:
            with pytest.raises(ValueError, match=re.escape(words)):
                Tokenizer.from_path(tmp_path)


def test_pre_tokenizers_and_templates_hata_does_not_reproduce_are_refused(tmp_path):
    """tiktoken splits by one regex: a chain of Splits (DeepSeek's), a normalizer or a prefix space would split or
    drop text otherwise (a chain's second Split used to be ignored, and text its first regex missed lost), so such a
    tokenizer.json is refused by name. A template that writes neither ChatML nor Llama 3 (DeepSeek-R1-Distill-Llama,
    on Llama 3's vocabulary) leaves the chat format unknown (an error at --chat), not Llama 3's."""
    vocab = dict(BYTE_VOCAB)
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}
    split = {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated", "invert": False}
    for pre, normalizer, words in (
            ({"type": "Sequence", "pretokenizers": [split, split, {"type": "Digits"}, byte_level]}, None,
             "Split + Split + Digits + ByteLevel"),
            ({"type": "Sequence", "pretokenizers": [split, byte_level]}, {"type": "NFC"}, "a normalizer"),
            ({"type": "ByteLevel", "add_prefix_space": True, "use_regex": True}, None, "(ByteLevel)"),
            ({"type": "Sequence", "pretokenizers": [{**split, "invert": True}, byte_level]}, None,
             "(Split + ByteLevel)"),
            ({"type": "Sequence", "pretokenizers": [split, {**byte_level, "use_regex": True}]}, None,  # 2 regexes
             "(Split + ByteLevel)"),
            ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": False},
                                                    {**byte_level, "use_regex": True}]}, None, "(Digits + ByteLevel)"),
            (byte_level, None, "(ByteLevel)")):  # no regex at all: not GPT-2's
        path = tmp_path / "tokenizer.json"
        path.write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab, "merges": []}, "pre_tokenizer": pre,
                                    "normalizer": normalizer}))
        with pytest.raises(ValueError, match=f"its pre-tokenizer .*{re.escape(words)}.* is not one hata reproduces"):
            Tokenizer.from_path(path)
    names = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    r1 = "{{ bos_token }}{% for m in messages %}<｜User｜>{{ m['content'] }}<｜Assistant｜>{% endfor %}"
    for template, chat in ((r1, None), (None, "llama3")):
        path = _write_gguf(tmp_path / f"{chat}.gguf", BYTE_CHARS + names, [1] * 256 + [3] * 4,
                           pre="llama-bpe", bos=256, template=template)
        assert Tokenizer.from_path(path).chat == chat
    path = _write_gguf(tmp_path / "qwen2.gguf", BYTE_CHARS, [1] * 256, pre="qwen2")
    with pytest.raises(ValueError, match="unknown GGUF pre-tokenizer 'qwen2'; add its regex to GGUF_PRE"):
        Tokenizer.from_path(path)  # not split some other way


def test_llama2_chat_strips_each_turn(sp_model):
    """Meta's Llama 2 format strips the user's text inside [INST] ... [/INST]."""
    tok = Tokenizer.from_path(sp_model)
    assert tok.encode_chat([{"role": "user", "content": "  a \n"}]) == tok.encode("[INST] a [/INST]")


def test_the_longest_added_token_wins(smol):
    """Added tokens that share a start: "<x>y" is one token, not "<x>" and then "y"."""
    tok = Tokenizer(enc=smol.enc, vocab_size=smol.vocab_size, specials={"<x>": 5, "<x>y": 6}, in_text=["<x>", "<x>y"])
    assert tok.encode("a<x>y", bos=False) == [smol.encode("a")[0], 6]


def test_byte_level_map_is_gpt2s():
    """The byte <-> character map is GPT-2's bytes_to_unicode (openai/gpt-2 encoder.py), every byte once; the other
    tests build their vocabularies through _CHAR_TO_BYTE itself, so only this pins it (0xFF is 'ÿ', 0xAD is 'Ń')."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    assert _CHAR_TO_BYTE == {chr(c): b for b, c in zip(bs, cs)}
    assert [_CHAR_TO_BYTE[c] for c in "ĀĉĊĠÿŃ!~"] == [0, 9, 10, 32, 255, 173, 33, 126]


def test_llama3_matches_metas_own_tokenizer(llama3):
    """Ids against Meta's reference tokenizer (llama_models), on text where Llama 3's regex matters: digits in
    groups of three, contractions matched case-insensitively ("'LL" of "'LLAMA" is a piece), line ends; and its
    special tokens' names and ids (its <|image|> at 128011 was missing, which renumbered every reserved one)."""
    meta_tok = pytest.importorskip("llama_models.llama3.tokenizer")
    import pathlib
    meta = meta_tok.Tokenizer(pathlib.Path(package_file("llama_models", "llama3", "tokenizer.model")))
    for text in ["12345 1234567 3.14159", "HE'LLO 'LLAMA DON'TS I'M WE'VE they'RE", "a\r\n\n  b\t\tc  \n",
                 "naïve café 日本語 🤗 !!?? ...", "x=  42;\n    if y > 7:"]:
        assert llama3.encode(text, bos=False) == meta.encode(text, bos=False, eos=False), text
    assert llama3.specials == meta.special_tokens


@pytest.mark.parametrize("pre", sorted(GGUF_PRE))
def test_gguf_pre_names_pick_their_regex(tmp_path, pre):
    """Each tokenizer.ggml.pre name splits " 1234" its own way: GPT-2 keeps " 1234" whole, Llama 3 keeps the space
    apart and digits in threes, SmolLM2 every digit apart. Merges "Ġ 1", "1 2", "3 4" show the pieces."""
    tokens = BYTE_CHARS + ["Ġ1", "12", "34"]
    path = _write_gguf(tmp_path / "t.gguf", tokens, [1] * 259, ["Ġ 1", "1 2", "3 4"], pre=pre)
    want = {"llama-bpe": [32, 257, 51, 52], "llama3": [32, 257, 51, 52], "smollm": [32, 49, 50, 51, 52],
            "gpt-2": [256, 50, 258], "gpt2": [256, 50, 258], "default": [256, 50, 258]}
    assert Tokenizer.from_path(path).encode(" 1234", bos=False) == want[pre]


def test_digits_individual_split_every_digit(tmp_path):
    """Digits(individual_digits) + ByteLevel (SmolLM2's tokenizer.json) splits digits one by one even where the
    vocabulary has a token for a run of them."""
    vocab = BYTE_VOCAB | {"12": 256}
    pre = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                 {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(
        {"model": {"type": "BPE", "vocab": vocab, "merges": ["1 2"]}, "pre_tokenizer": pre}))
    assert Tokenizer.from_path(tmp_path).encode("x12") == [ord("x"), ord("1"), ord("2")]


def test_cutting_runs_scans_text_once():
    """_cut_runs looks for long runs only where a run starts: without its lookbehinds a run just under RUN_CAP is
    scanned again from each of its characters (here 8 runs of 24,999: about 10 s instead of milliseconds)."""
    text = ("x" * 24_999 + " ") * 8
    start = time.process_time()  # the CPU time this process spent: not the time other work kept it waiting
    assert _cut_runs(text) == [text]
    assert time.process_time() - start < 1.0


def test_malformed_merges_and_vocabularies_are_refused(tmp_path):
    """A merge of three parts (even if its first and last join to a token), one with a doubled space, two vocabulary
    tokens on one id, and an id at the bound (2 x tokens + 1024) are refused as a corrupt file."""
    byte_vocab = dict(BYTE_VOCAB)
    pre = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    cases = [({**byte_vocab, "ab": 256}, ["a c b"], [], "merge 0 'a c b' is not two tokens"),
             ({**byte_vocab, "ab": 256}, ["a  b"], [], "merge 0 'a  b' is not two tokens"),
             ({**byte_vocab, "ab": 255}, ["a b"], [], "two tokens share one id"),
             (byte_vocab, [], [{"id": 2 * 257 + 1024, "content": "<x>", "special": True}],
              r"token id 1538 is not a whole number in \[0, 1538\)")]
    for vocab, merges, added, words in cases:
        (tmp_path / "tokenizer.json").write_text(json.dumps(
            {"model": {"type": "BPE", "vocab": vocab, "merges": merges}, "added_tokens": added, "pre_tokenizer": pre}))
        with pytest.raises(ValueError, match=words):
            Tokenizer.from_path(tmp_path)


def test_a_vocabulary_of_no_tokens_is_called_corrupt(tmp_path):
    """A tokenizer.json whose vocabulary holds no token (a stub, or a cut download) is refused naming the file (before:
    "max() arg is an empty sequence", naming nothing)."""
    (tmp_path / "tokenizer.json").write_text(json.dumps(
        {"model": {"type": "BPE", "vocab": {}, "merges": []}, "pre_tokenizer": {"type": "ByteLevel"}}))
    with pytest.raises(ValueError, match=r"tokenizer\.json': no tokens; the tokenizer file is corrupt"):
        Tokenizer.from_path(tmp_path)


def test_split_behaviours_other_than_isolated_are_refused(tmp_path):
    """HF's Split drops its matches ("Removed") or glues them to a neighbour ("MergedWithPrevious", ...): only
    "Isolated" is what hata's one regex does."""
    for behavior in ("Removed", "MergedWithPrevious", "MergedWithNext", "Contiguous"):
        pre = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": behavior, "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]}
        (tmp_path / "tokenizer.json").write_text(json.dumps(
            {"model": {"type": "BPE", "vocab": dict(BYTE_VOCAB), "merges": []},
             "pre_tokenizer": pre}))
        with pytest.raises(ValueError, match=r"\(Split \+ ByteLevel\) is not one hata reproduces"):
            Tokenizer.from_path(tmp_path)


def test_a_directory_is_searched_for_dot_gguf_files_only(tmp_path):
    """A file whose name merely ends in "gguf" (no dot) is no GGUF file to pick."""
    (tmp_path / "model-gguf").write_bytes(b"GGUF")
    with pytest.raises(FileNotFoundError, match="no tokenizer.model, tokenizer.json or .gguf in directory"):
        Tokenizer.from_path(tmp_path)


def test_a_device_is_refused_not_read():
    """A path that exists but is no regular file (a pipe would block the read until written to) is refused by name."""
    with pytest.raises(ValueError, match="is not a regular file"):
        Tokenizer.from_path("/dev/null")


def test_added_tokens_are_found_as_literal_text(smol):
    """An added token's text is matched literally: "<|t|>" holds regex metacharacters, so "a<b" stays plain text."""
    tok = Tokenizer(enc=smol.enc, vocab_size=smol.vocab_size, specials={"<|t|>": 7, "a.c": 8}, in_text=["<|t|>", "a.c"])
    assert tok.encode("a<b|abc", bos=False) == smol.encode("a<b|abc", bos=False)
    assert tok.encode("x<|t|>a.c", bos=False) == [smol.encode("x")[0], 7, 8]


def test_named_templates_take_the_one_named_default(tmp_path):
    """transformers' list form of chat_template: the entry named "default", wherever it stands, not another."""
    _write_byte_json(tmp_path, ["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    named = [{"name": "rag", "template": "<|im_start|>..."}, {"name": "default", "template": "<|start_header_id|>..."}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    assert Tokenizer.from_path(tmp_path).chat == "llama3"


def test_default_system_undoes_a_carriage_return_escape():
    assert _default_system("{{ '<|im_start|>system\\nA\\rB\\tC<|im_end|>\\n' }}") == "A\rB\tC"


def test_a_cutoff_without_a_date_line_is_no_dated_opening():
    """Only a template that writes both the knowledge cutoff and "Today Date: " opens chats with them."""
    from tokenizer import _dated_opening
    assert _dated_opening('{{ "Cutting Knowledge Date: December 2023\\n" }}') is None
    assert _dated_opening('{{ "Cutting Knowledge Date: December 2023\\n" }}{{ "Today Date: " + date_string }}') == \
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"


def test_the_configs_bos_token_rules_over_the_post_processor(tmp_path):
    """BOS is tokenizer_config.json's bos_token when it names one; the post-processor's first token only without it.
    Here the post-processor does not add the config's BOS, so encode adds none."""
    post = {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
                                                     {"Sequence": {"id": "A", "type_id": 0}}]}
    _write_byte_json(tmp_path, ["<s>", "<|im_start|>"], post_processor=post)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    tok = Tokenizer.from_path(tmp_path)
    assert (tok.bos_id, tok.add_bos, tok.encode("hi")) == (256, False, [ord("h"), ord("i")])


def test_a_bpe_tokenizer_json_without_byte_level_is_named_as_such(tmp_path):
    """A sentencepiece-style BPE tokenizer.json (Metaspace: Llama 2's, Mistral's) is refused with the hint to use
    tokenizer.model, not as an unknown pre-tokenizer."""
    (tmp_path / "tokenizer.json").write_text(json.dumps({
        "model": {"type": "BPE", "vocab": {"▁a": 0}, "merges": []},
        "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first"}}))
    with pytest.raises(ValueError, match="only byte-level BPE tokenizer.json is supported; for Llama 2"):
        Tokenizer.from_path(tmp_path)


def test_bos_asked_of_a_tokenizer_without_one_is_refused(smol):
    with pytest.raises(ValueError, match="no BOS/EOS token"):
        Tokenizer(enc=smol.enc, vocab_size=smol.vocab_size).encode("ab", bos=True)  # not [None, ..]


def test_chatml_writes_an_empty_default_system_prompt(smol):
    """A template whose default system turn is empty ("<|im_start|>system\\n<|im_end|>") still writes that turn."""
    assert _default_system("{{ '<|im_start|>system\\n<|im_end|>\\n' }}") == ""
    tok = Tokenizer(enc=smol.enc, vocab_size=smol.vocab_size, specials=smol.specials, chat="chatml", system="")
    assert tok.encode_chat([{"role": "user", "content": "Hi"}], add_generation_prompt=False) == [
        1, *smol.encode("system\n"), 2, *smol.encode("\n"), 1, *smol.encode("user\nHi"), 2, *smol.encode("\n")]


def test_chatml_splits_role_and_content_as_one_text(tmp_path):
    """ChatML's "role\\ncontent" is one text, as the template renders it: with Llama 3's regex (Hermes-2-Pro-Llama-3)
    a content that opens with a line end makes one "\\n\\n" piece with the role's line end."""
    names = ["ĊĊ", "<|begin_of_text|>", "<|im_start|>", "<|im_end|>"]
    path = _write_gguf(tmp_path / "t.gguf", BYTE_CHARS + names, [1] * 257 + [3] * 3,
                       ["Ċ Ċ"], pre="llama-bpe", bos=257, template="{% for m in messages %}<|im_start|>...")
    tok = Tokenizer.from_path(path)
    assert tok.encode_chat([{"role": "user", "content": "\nx"}], add_generation_prompt=False) == [
        257, 258, *b"user", 256, ord("x"), 259, ord("\n")]


def test_llama2_chat_strips_answers_but_not_the_system_prompt(sp_model):
    """Meta's Llama 2 format (llama-models' chat_completion): the answer is stripped, the system prompt inside
    <<SYS>> is written as given (only the whole first turn is stripped at its ends)."""
    tok = Tokenizer.from_path(sp_model)
    chat = [{"role": "system", "content": " S "}, {"role": "user", "content": "a"},
            {"role": "assistant", "content": "  b \n"}, {"role": "user", "content": "c"}]
    first = tok.encode("[INST] <<SYS>>\n S \n<</SYS>>\n\na [/INST] b ", eos=True)
    assert tok.encode_chat(chat) == first + tok.encode("[INST] c [/INST]")
    assert tok.encode_chat(chat[:3]) == first  # a chat that ends with the answer: the whole exchange, </s> too


def test_a_post_processor_that_appends_the_bos_token_adds_no_bos(tmp_path):
    """bos_token = eos_token = <|endoftext|> and a template that appends it ("$A <|endoftext|>"): it is not put
    first, so encode adds no BOS (HF's ids are the text's, then that token, which encode(eos=True) appends)."""
    post = {"type": "TemplateProcessing", "single": [{"Sequence": {"id": "A", "type_id": 0}},
                                                     {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}]}
    _write_byte_json(tmp_path, ["<|endoftext|>"], post_processor=post)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|endoftext|>",
                                                               "eos_token": "<|endoftext|>"}))
    tok = Tokenizer.from_path(tmp_path)
    assert (tok.bos_id, tok.add_bos, tok.encode("hi"), tok.encode("hi", eos=True)) == (256, False, [104, 105],
                                                                                      [104, 105, 256])


# From a mutation run of tokenizer.py (2026-12-06)

def test_generation_config_eos_id_zero_is_an_id_and_true_is_not(tmp_path):
    """generation_config.json's eos_token_id 0 is a token id (GPT-2-style <|endoftext|>); a JSON true is no id."""
    _write_byte_json(tmp_path, ["<|im_end|>"])
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 256]}))
    assert Tokenizer.from_path(tmp_path).eos_ids == {0, 256}
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": True}))
    with pytest.raises(ValueError, match="eos_token_id must be a token id or a list of them, got \\[True\\]"):
        Tokenizer.from_path(tmp_path)


def test_a_system_turn_written_after_the_messages_is_no_default_system_prompt():
    """Only a system turn the template writes before the chat's first message is its default system prompt."""
    late = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}" \
           "<|im_start|>system\nLate<|im_end|>\n"
    assert _default_system(late) is None


def test_a_tiktoken_file_with_crlf_line_ends_loads(tmp_path, llama3):
    """Meta's tiktoken file saved with Windows line ends ("base64 rank\\r\\n") is still read as tiktoken."""
    lines = package_file("llama_models", "llama3", "tokenizer.model")
    (tmp_path / "crlf.model").write_bytes(open(lines, "rb").read().replace(b"\n", b"\r\n"))
    assert Tokenizer.from_path(tmp_path / "crlf.model").encode("hi there") == llama3.encode("hi there")


def test_a_tiktoken_file_with_a_repeated_rank_or_a_bad_base64_line_is_refused(tmp_path):
    """A tiktoken line whose rank repeats another's (the count still 128,000), or whose token is not clean base64
    (a stray character that a lenient decoder would skip), is a corrupt file."""
    whole = open(package_file("llama_models", "llama3", "tokenizer.model"), "rb").read().splitlines(keepends=True)
    tok, _ = whole[-1].split()
    for name, kept, words in (("dup", whole[:-1] + [tok + b" 5\n"], "not Meta's Llama 3 tokens 0..127999 each once"),
                              ("b64", whole[:1] + [b"I*g== 1\n"] + whole[2:], "line 2 is not 'base64 rank'")):
        (tmp_path / f"{name}.model").write_bytes(b"".join(kept))
        with pytest.raises(ValueError, match=re.escape(words)):
            Tokenizer.from_path(tmp_path / f"{name}.model")


def test_a_sentencepiece_bos_at_id_0_is_added(sp_model, tmp_path):
    """A sentencepiece model whose BOS (or EOS) is id 0 (unk elsewhere) has one: id 0 is a token; only -1 means none."""
    spm = pytest.importorskip("sentencepiece")
    spm.SentencePieceTrainer.train(input=str(sp_model / "corpus.txt"), model_prefix=str(tmp_path / "tokenizer"),
                                   vocab_size=300, model_type="bpe", byte_fallback=True, bos_id=0, eos_id=2, unk_id=1)
    tok = Tokenizer.from_path(tmp_path)
    assert (tok.bos_id, tok.add_bos) == (0, True) and tok.encode("the fox")[0] == 0
    spm.SentencePieceTrainer.train(input=str(sp_model / "corpus.txt"), model_prefix=str(tmp_path / "tokenizer"),
                                   vocab_size=300, model_type="bpe", byte_fallback=True, bos_id=1, eos_id=0, unk_id=2)
    tok = Tokenizer.from_path(tmp_path)  # an EOS at id 0 too
    assert tok.eos_id == 0 and 0 in tok.eos_ids and tok.encode("the fox", eos=True)[-1] == 0


def test_an_empty_chatml_chat_is_only_the_generation_prompt(smol):
    """ChatML with no messages writes no default system turn (SmolLM2's template writes it with the first message)."""
    assert smol.encode_chat([]) == [1, *smol.encode("assistant\n")]


def test_added_tokens_decoder_keys_that_are_no_ids_are_skipped(sp_model, tmp_path):
    """tokenizer_config.json's added_tokens_decoder entries whose key is not a number, or whose value is not an
    object, are skipped, not a crash."""
    (tmp_path / "tokenizer.model").write_bytes((sp_model / "tokenizer.model").read_bytes())
    # (\u00b2, superscript 2, is a digit to isdigit() but not to int(): before, a bare ValueError naming no file)
    added = {"x": {"content": "<y>"}, "\u00b2": {"content": "<y>"}, "300": {"content": "<|im_end|>"}, "301": "<y>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": added}))
    tok = Tokenizer.from_path(tmp_path)
    assert "<y>" not in tok.specials and tok.specials["<|im_end|>"] == 300 and 300 in tok.eos_ids


# From a mutation run of tokenizer.py's chat side (2026-12-07)

def test_the_sandbox_sizes_a_repeat_either_way_round_and_a_power_by_its_bits():
    """A repeat is refused past 10^6 items whichever side the count stands on, a tuple's too, and 10^6 itself
    renders; a power is sized by its bits (base bits times exponent: 10 ** 600000 has 2.4 * 10^6), not their sum."""
    for expr, renders in (("10 ** 7 * 'a'", False), ("((1,) * 2000000)|length", False),
                          ("('a' * 1000000)|length", True), ("(10 ** 600000) % 7", False)):
        want = "X" if renders else None
        assert _default_system("{{ " + expr + " }}<|im_start|>system\nX<|im_end|>") == want, expr


def test_the_default_system_prompt_renders_with_trimmed_blocks():
    """The template renders as transformers renders it: trim_blocks drops the line end after a block tag,
    lstrip_blocks the indent before one, so neither lands in the default system prompt."""
    assert _default_system("<|im_start|>system\n  {% if true %}\nA<|im_end|>\n  {% endif %}") == "A"


def test_the_default_system_prompt_ends_at_its_own_im_end():
    """A template that writes a turn of its own after the default system turn (a greeting) keeps it out of the
    system prompt: the prompt ends at the first <|im_end|>."""
    user = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    greeting = "<|im_start|>system\nA<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n" + user
    assert _default_system(greeting) == "A"


# From a mutation run of tokenizer.py's loaders (2026-12-07)

def test_open_gguf_reads_a_rewritten_file_again_by_its_size_or_its_time(tmp_path):
    """open_gguf keeps a file's parse only while the file is unchanged: rewritten in place at the same size (only its
    mtime differs), or at another size with its mtime put back, it is parsed again (its keys too), not served stale."""
    path = tmp_path / "t.gguf"

    def keys():  # (a key's name, not its value: a stale parse shows the new value bytes through its memory map)
        return set(open_gguf(path).fields)
    write_gguf(path, lambda writer: writer.add_string("hata.test.aaaa", "x"))
    later = path.stat().st_mtime_ns + 10**9
    assert "hata.test.aaaa" in keys()
    write_gguf(path, lambda writer: writer.add_string("hata.test.bbbb", "x"))  # same size and inode
    os.utime(path, ns=(later, later))
    assert "hata.test.bbbb" in keys()
    write_gguf(path, lambda writer: writer.add_string("hata.test.cccc", "x" * 100))  # another size, the same mtime
    os.utime(path, ns=(later, later))
    assert "hata.test.cccc" in keys()


def test_a_vocabulary_token_that_is_not_byte_level_is_refused_by_name(tmp_path):
    """A BPE vocabulary whose strings are not GPT-2's byte characters (sentencepiece's "\u2581", in a tokenizer.json or
    a GGUF that calls itself "gpt2") is refused by name, not read as other bytes."""
    vocab = {**BYTE_VOCAB, "\u2581": 256}
    (tmp_path / "tokenizer.json").write_text(json.dumps({
        "model": {"type": "BPE", "vocab": vocab, "merges": []},
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}}))
    gguf = _write_gguf(tmp_path / "t.gguf", list(vocab), [1] * 257, pre="smollm")
    for path in (tmp_path / "tokenizer.json", gguf):
        with pytest.raises(ValueError, match="token '\u2581' is not byte-level BPE; this tokenizer type is not"):
            Tokenizer.from_path(path)


def test_a_gguf_without_token_types_keeps_its_special_tokens_out_of_text(tmp_path):
    """The tokens a GGUF without tokenizer.ggml.token_type gets as special are CONTROL, as llama.cpp's: their text
    typed by a user stays text (a USER_DEFINED token would be found in it)."""
    tokens = BYTE_CHARS + ["<|im_start|>", "<|im_end|>", "<s>"]
    tok = Tokenizer.from_path(_write_gguf(tmp_path / "bare.gguf", tokens, None, pre="smollm", bos=258))
    assert tok.specials == {"<|im_start|>": 256, "<|im_end|>": 257, "<s>": 258}
    assert tok.encode("a<|im_end|><s>") == [*b"a<|im_end|><s>"]


def test_added_tokens_also_in_the_models_vocab_stay_out_of_its_ranks(tmp_path):
    """A tokenizer.json may list its added tokens in model.vocab too (SmolLM2's does): they are special tokens only,
    never byte-level ranks (which would need merges to make them, and would join typed text into them)."""
    (tmp_path / "tokenizer.json").write_text(json.dumps({
        "model": {"type": "BPE", "vocab": {**BYTE_VOCAB, "<x>": 256}, "merges": []},
        "added_tokens": [{"id": 256, "content": "<x>", "special": True}],
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}}))
    tok = Tokenizer.from_path(tmp_path)
    assert tok.specials == {"<x>": 256} and tok.encode("a<x>") == [*b"a<x>"] and tok.decode([256]) == "<x>"
