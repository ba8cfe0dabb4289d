"""Text <-> token ids for every checkpoint hata loads, and the chat templates that go with them.

One `Tokenizer` over three backends, picked by `Tokenizer.from_path` from what the file contains:
- sentencepiece: Llama 2 `tokenizer.model` (a protobuf; read by the sentencepiece library).
- tiktoken: Llama 3 `tokenizer.model` (lines of "base64-bytes rank"), plus Meta's 256 special tokens from 128000.
- byte-level BPE (GPT-2 style) stored in a GGUF file (`tokenizer.ggml.model == "gpt2"`, e.g. the default
  SmolLM2 model) or in a Hugging Face `tokenizer.json`, rebuilt as a `tiktoken.Encoding` with the pre-split regex
  the model was trained with. tiktoken joins by token id, not by the merges list; loading checks that the merges
  make tokens in id order (SmolLM2's 48,900 do), without which the two join in different orders.

`encode` parses no special-token text unless `parse_special` is set (engine's --parse-special): "<|im_end|>" typed by a
user stays plain text, and only added tokens that are not special, like DeepSeek-R1-Distill's <think>, are found in
text (transformers and llama.cpp parse them all); special tokens come from `encode_chat` and encode's BOS/EOS. (A
sentencepiece model's user-defined pieces, such as some models' <|im_end|>, the library itself finds in any text,
as transformers' slow tokenizers do.) The chat format is the one whose tokens the checkpoint's template writes,
else the vocabulary's: <|start_header_id|> -> Llama 3 instruct; <|im_start|> -> ChatML (with the default system
prompt written in the checkpoint's own Jinja template, if any); a sentencepiece model -> Llama 2 `[INST]` only
(none when the checkpoint's template is another one, ChatML included). A Llama 3.1+ template opens every chat with
a system turn that starts with its knowledge cutoff and a date (the template's own: fixed in 3.1 and 3.3, today's
in 3.2); hata writes that turn too. Jinja is not run per chat: hata writes each format itself, and renders the
template once at load (sandboxed) only for ChatML's default system prompt.
`eos_ids` holds every id that ends generation: EOS, <|eot_id|>, <|eom_id|>, <|im_end|>, ... if present, and the
ids the files name (a GGUF's EOT and EOM, generation_config.json's eos_token_id, and for tokenizer.json and
sentencepiece tokenizer_config.json's eos_token).
"""
import base64
import datetime
import functools
import json
import os
import re
import sys

from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment
import tiktoken

# --- byte-level BPE: vocabulary strings -> bytes, and the pre-split regexes --------------------------------

# GPT-2 stores each byte as a printable unicode character: printable Latin-1 bytes stand for themselves and
# the other 68 bytes are shifted to U+0100 onwards, in byte order.
_PRINTABLE = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
_CHAR_TO_BYTE = {chr(b): b for b in _PRINTABLE}
_CHAR_TO_BYTE.update({chr(256 + i): b for i, b in enumerate(b for b in range(256) if b not in _PRINTABLE)})

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# HF's Digits(individual_digits) + ByteLevel; matches llama.cpp's "smollm" pre-tokenizer.
SMOLLM_PATTERN = r"\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?=\p{N})|\s+(?!\S)|\s+"
GGUF_PRE = {"llama-bpe": LLAMA3_PATTERN, "llama3": LLAMA3_PATTERN, "smollm": SMOLLM_PATTERN,
            "gpt-2": GPT2_PATTERN, "gpt2": GPT2_PATTERN, "default": GPT2_PATTERN}

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>"]
# Meta reserves 256 special ids; the named ones above hold reserved tokens 0 and 1, the rest count on from 2
LLAMA3_SPECIALS += [f"<|reserved_special_token_{i}|>" for i in range(2, 256 - len(LLAMA3_SPECIALS) + 2)]
LLAMA3_VOCAB = 128000  # the ranks of Meta's tiktoken file; its special tokens come after them
CHAT_TOKENS = {"chatml": ("<|im_start|>", "<|im_end|>"),  # the special tokens each chat format writes, opener first
               "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")}
END_TOKENS = ("<|end_of_text|>", "<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|endoftext|>", "</s>")
HOW = "pass a .gguf file, a tokenizer.model / tokenizer.json file, or a checkpoint directory holding one"
# tiktoken's regex overflows its stack on a run of ~1M whitespace characters. So the tiktoken backends (sentencepiece
# needs no cut) cut a run of more than 25K whitespace characters, or of other characters with none, every 25K, as
# Meta's Llama 3 tokenizer does (it also cuts text every 400K; hata does not); a token at a cut may differ from HF's
# or llama.cpp's. (The scan is linear.)
RUN_CAP = 25_000
LONG_RUN = re.compile(rf"(?<!\s)\s{{{RUN_CAP},}}|(?<!\S)\S{{{RUN_CAP},}}")


def _cut_runs(text: str) -> list[str]:
    """text in pieces cut every RUN_CAP characters of a longer run of whitespace or non-whitespace; ordinary text
    stays one piece. No token crosses a cut."""
    cuts = [c for m in LONG_RUN.finditer(text) for c in range(m.start() + RUN_CAP, m.end(), RUN_CAP)]
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


def _vocab_bytes(token: str, where: str) -> bytes:
    try:
        return bytes(_CHAR_TO_BYTE[c] for c in token)
    except KeyError:
        raise ValueError(f"{where}: token {token!r} is not byte-level BPE; this tokenizer type is not supported")


def _check_merges(where, merges, vocab: dict, ranks: dict):
    """Refuse merges tiktoken would join in another order: HF joins the listed pair of lowest index, tiktoken the pair
    whose join has the lowest id; alike when the ids made never decrease (Llama 3 lists every split of a token, so ids
    repeat). Unchecked: tiktoken also joins unlisted pairs whose join is a token (rare in trained vocabularies)."""
    if not merges and any(len(t) > 1 for t in ranks):  # HF would never join two bytes; llama.cpp refuses the file
        raise ValueError(f"{where!r}: multi-byte tokens but no merges; the tokenizer file is incomplete, re-get it")
    last = -1
    for n, merge in enumerate(merges or []):  # "a b" strings, or [a, b] lists (newer tokenizer.json)
        pair = merge.split(" ") if isinstance(merge, str) else merge
        made = vocab.get(pair[0] + pair[1]) if len(pair) == 2 else None
        if made is None:
            raise ValueError(f"{where!r}: merge {n} {merge!r} is not two tokens whose join is in the vocabulary; "
                             "the tokenizer file is corrupt")
        if made < last:
            raise ValueError(f"{where!r}: merge {n} {' '.join(pair)!r} makes id {made} after merge {n - 1} made id "
                             f"{last}: the merges are not in id order, which hata's tiktoken-based BPE needs; this "
                             "tokenizer is not supported")
        last = made


def _default_token_types(path, tokens, named) -> list[int]:
    """Token types for a GGUF without tokenizer.ggml.token_type (optional in llama.cpp, which then takes every token
    as NORMAL and makes CONTROL the end-of-generation tokens it knows by name, END_TOKENS among them). hata also makes
    CONTROL the ids the file names (BOS, EOS, EOT, EOM) and the tokens of the chat formats it writes, which it writes
    by id (llama.cpp, parsing a rendered template, would split them as text). Other added tokens stay text."""
    known = {*END_TOKENS, *(t for ts in CHAT_TOKENS.values() for t in ts)}
    special = {i for i in named if i is not None} | {i for i, t in enumerate(tokens) if t in known}
    print(f"warning: {path!r} has no tokenizer.ggml.token_type; every token is ordinary text, as llama.cpp reads it, "
          f"but {', '.join(tokens[i] for i in sorted(special)) or 'none'} (special)", file=sys.stderr)
    return [3 if i in special else 1 for i in range(len(tokens))]


def _bpe(name, ranks: dict, specials: dict, pattern: str) -> tuple[tiktoken.Encoding, int, set]:
    """(the encoding, the vocab size, the ids below it that are no token: a GGUF's unused slots, decoded to nothing)"""
    if len(set(ranks.values())) < len(ranks) or len(set(specials.values())) < len(specials):
        raise ValueError(f"{name!r}: two tokens share one id; the tokenizer file is corrupt")
    ids = [*ranks.values(), *specials.values()]
    room = 2 * len(ids) + 1024  # a few unused ids are fine; an id of 10^9 would make this a set of 10^9
    if not ids:  # (a stub, or a cut download)
        raise ValueError(f"{name!r}: no tokens; the tokenizer file is corrupt")
    if bad := [i for i in ids if type(i) is not int or not 0 <= i < room][:1]:
        raise ValueError(f"{name!r}: token id {bad[0]!r} is not a whole number in [0, {room}) for its {len(ids)} "
                         "tokens; the tokenizer file is corrupt")
    n = max(ids) + 1
    # tiktoken needs all 256 bytes; a vocabulary may lack some (SmolLM2: 0xF1, control bytes): ids past it (see _text)
    ranks = {**{bytes([b]): n + b for b in range(256)}, **ranks}
    blank = set(range(n)) - set(ranks.values()) - set(specials.values())
    try:
        enc = tiktoken.Encoding(name=os.path.basename(name), pat_str=pattern, mergeable_ranks=ranks,
                                special_tokens=specials)
    except ValueError as e:  # a tokenizer.json's Split regex that fancy-regex cannot read
        raise ValueError(f"{name!r}: its pre-tokenizer regex does not compile ({e})") from None
    return enc, n, blank


def file_head(path, names=(), missing: Exception | None = None):
    """(file, its first 64 bytes): file `path`, or in directory `path` the first of `names` there, else its one .gguf
    (else `missing` is raised). Refused by name, never parsed: a Git LFS pointer, a *.gguf without the GGUF magic."""
    if os.path.isdir(path):
        found = [n for n in names if os.path.isfile(os.path.join(path, n))]
        found = found[:1] or sorted(n for n in os.listdir(path) if n.endswith(".gguf"))
        if len(found) > 1:
            raise ValueError(f"{path!r} holds several .gguf files ({', '.join(found)}); pass the one to use")
        if not found:
            raise missing or FileNotFoundError(f"no .gguf file in directory {path!r}")
        path = os.path.join(path, found[0])
    if os.path.exists(path) and not os.path.isfile(path):  # a pipe would hang the read below until written to
        raise ValueError(f"{path!r} is not a regular file (a pipe or a device?): pass the file itself")
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"version https://git-lfs.github.com/spec/v1"):  # a clone made without git-lfs
        raise ValueError(f"{path!r} is a Git LFS pointer, not the file itself: fetch it with `git lfs pull` "
                         "(or download the file)")
    if path.endswith(".gguf") and head[:4] != b"GGUF":  # by its name a GGUF: never try it as another format
        raise ValueError(f"{path!r} is not a GGUF file (it does not start with 'GGUF'): truncated or corrupt; "
                         "re-download it")
    return path, head


def open_gguf(path, keep=True):
    """gguf.GGUFReader(path), kept for the next reader of the same unchanged file (unless not `keep`: the last
    reader lets the file's mapping go with it): the tokenizer and the model read one GGUF, and parsing its metadata
    takes a second (the default model's 49K token strings)."""
    st = os.stat(path)
    reader = _open_gguf(os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if not keep:
        _open_gguf.cache_clear()
    return reader


@functools.lru_cache(maxsize=1)
def _open_gguf(path, dev, inode, size, mtime_ns):  # a file replaced or rewritten is read again
    try:
        import gguf
    except ImportError as e:  # the environment's fault, not the file's: its readers let this through
        raise ImportError(f"a GGUF file needs the gguf package ({e}): pip install -r requirements.txt") from None
    import numpy as np

    class Reader(gguf.GGUFReader):
        """The reader over a plain-array view of its np.memmap (the mapping lives on under the view): parsing slices
        the file about a million times, and each slice of a memmap runs Python code (3.5 s instead of 1 s here)."""
        data = property(lambda self: self._data, lambda self, mm: setattr(self, "_data", mm.view(np.ndarray)))
    return Reader(path)


EMPTY_PROBE = ("Ab c1 23!? \u00e9e\u0301\u4e00 \n\t\r\n x "  # where _check_split_regex looks; printable ASCII too
               + " ".join(map(chr, range(33, 127))) + "".join(map(chr, range(32, 127))))


def _check_split_regex(pattern, wrapped, path):
    """tiktoken panics (a Rust panic, past any `except Exception`) on a regex that matches the empty string: a Split
    regex that does so in EMPTY_PROBE (no probe finds all) is refused, read by `regex` (V1 reads nested classes as
    Oniguruma, HF's engine, does) or, if only fancy-regex reads it, by tiktoken itself (`wrapped`), its panic caught."""
    import regex
    try:
        found = regex.compile(pattern, regex.V1)
        empty = found.fullmatch("") or any(m.start() == m.end() for m in found.finditer(EMPTY_PROBE))
    except regex.error:
        try:
            tiktoken.Encoding("probe", pat_str=wrapped, mergeable_ranks={bytes([b]): b for b in range(256)},
                              special_tokens={}).encode_ordinary(EMPTY_PROBE)
            empty = False
        except ValueError:  # fancy-regex cannot read it either: _bpe names it
            return
        except BaseException as e:  # pyo3's PanicException: an empty match
            if type(e).__name__ != "PanicException":
                raise
            empty = True
    if empty:
        raise ValueError(f"{path!r}: its Split regex {pattern!r} matches the empty string, which hata's tiktoken-based "
                         "BPE cannot split by; this tokenizer is not supported")


def _pre_split(pre, normalizer, path):
    """The one regex (tiktoken splits by one) that is a tokenizer.json's pre-tokenizer: ByteLevel's GPT-2 regex,
    Digits(individual) + ByteLevel (SmolLM2), or one isolating Split + ByteLevel without its own regex (Llama 3).
    Another chain (several Splits, as DeepSeek's), a normalizer or a prefix space would split or drop text otherwise."""
    steps = pre.get("pretokenizers") or [pre]  # (an empty Sequence: refused below by its own name)
    kinds, last = [s.get("type") for s in steps], steps[-1]
    byte_level = normalizer is None and kinds[-1] == "ByteLevel" and not last.get("add_prefix_space", False)
    split = steps[0] if kinds == ["Split", "ByteLevel"] else {}
    regex = (split.get("pattern") or {}).get("Regex")
    if byte_level and kinds == ["ByteLevel"] and last.get("use_regex", True):
        return GPT2_PATTERN
    if byte_level and kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") \
            and last.get("use_regex", True):
        return SMOLLM_PATTERN
    if byte_level and isinstance(regex, str) and split.get("behavior") == "Isolated" and not split.get("invert") \
            and not last.get("use_regex", True):
        # the text between its matches is a piece too (tiktoken would drop it), cut every RUN_CAP characters (one
        # longer piece overflows fancy-regex's stack)
        wrapped = f"(?:{regex})|(?:(?!(?:{regex}))[\\s\\S]){{1,{RUN_CAP}}}"
        _check_split_regex(regex, wrapped, path)
        return wrapped
    raise ValueError(f"{path!r}: its pre-tokenizer ({' + '.join(map(str, kinds))}" + (", a normalizer" if normalizer
                     else "") + ") is not one hata reproduces (ByteLevel; Digits + ByteLevel; one Split + ByteLevel)")


def read_json(path, optional=False) -> dict:
    """The JSON object in the file at `path` (tokenizer and checkpoint settings); optional: {} where there is no file
    (or a folder of that name)."""
    if optional and not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except ValueError as e:  # (JSONDecodeError, UnicodeDecodeError)
        raise ValueError(f"{path!r} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path!r} holds a JSON {type(obj).__name__}, not an object of settings")
    return obj


def _alternatives(names):  # a regex that finds any of `names` (the longest first), capturing it; None for none
    longest = sorted(set(filter(None, names)), key=len, reverse=True)
    return re.compile("(" + "|".join(map(re.escape, longest)) + ")") if longest else None


def _hf_config(directory):
    """tokenizer_config.json in `directory` ({} if none); the chat template: the chat_template.jinja beside it
    (where transformers 5 saves it; it wins, as in transformers), else the config's, else None; and the ids
    generation ends at by generation_config.json (eos_token_id: an id or a list)."""
    cfg_path, gen_path = (os.path.join(directory, f) for f in ("tokenizer_config.json", "generation_config.json"))
    cfg, stops = read_json(cfg_path, optional=True), read_json(gen_path, optional=True).get("eos_token_id")
    stops = [] if stops is None else stops if isinstance(stops, list) else [stops]
    if not all(type(i) is int and i >= 0 for i in stops):
        raise ValueError(f"{gen_path!r}: eos_token_id must be a token id or a list of them, got {stops!r}")
    for key in ("bos_token", "eos_token"):  # a name, or {"content": name, ...} (AddedToken), or none: the name
        value = cfg.get(key)
        cfg[key] = value.get("content") if isinstance(value, dict) else value
        if value is not None and not isinstance(cfg[key], str):
            raise ValueError(f"{cfg_path!r}: {key} must be a token's name, got {value!r}")
    template = cfg.get("chat_template")
    if isinstance(template, list):  # named templates (transformers' list form): the one named "default"
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    template = template if isinstance(template, str) else None
    jinja = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(jinja):  # the file's template wins over the config's, as in transformers
        try:
            with open(jinja, encoding="utf-8") as f:
                template = f.read()
        except UnicodeDecodeError as e:
            raise ValueError(f"{jinja!r} is not UTF-8 text ({e})") from None
    return cfg, template, stops


def _template_first(post) -> str | None:
    """The special token a tokenizer.json post-processor's template puts first (how HF adds BOS), if any (BERT's and
    RoBERTa's post-processors, which no Llama tokenizer uses, give none)."""
    for step in post.get("processors", [post]) if isinstance(post, dict) else []:
        first = (step.get("single") or [None])[0] if isinstance(step, dict) else None
        if isinstance(first, dict) and isinstance(first.get("SpecialToken"), dict):
            return first["SpecialToken"].get("id")
    return None


class _Sandbox(ImmutableSandboxedEnvironment):
    """jinja2's sandbox as transformers renders chat templates (loop controls too), where a repeat or a power whose
    result would pass 10^6 items or bits is refused: a template read at load must not fill the memory with one
    operation (a loop that does not end is stopped by Ctrl-C)."""
    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context, operator, left, right):
        if operator == "*":  # 'ab' * 3, [x] * 3: items
            size = max((len(a) * b for a, b in ((left, right), (right, left))
                        if isinstance(a, (str, list, tuple)) and isinstance(b, int)), default=0)
        else:  # 3 ** 4: bits
            size = left.bit_length() * right if isinstance(left, int) and isinstance(right, int) else 0
        if size > 10 ** 6:
            raise SecurityError(f"a {operator} of more than 10^6 items or bits")
        return super().call_binop(context, operator, left, right)


def _default_system(template: str | None) -> str | None:
    """The system prompt a ChatML Jinja template writes when the chat has none (SmolLM2's), from the template rendered
    as transformers does (sandboxed) for one user message; None where it writes none or does not render here."""
    if "<|im_start|>system" not in (template or ""):
        return None
    try:
        text = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]).from_string(
            template).render(messages=[{"role": "user", "content": "\0"}], add_generation_prompt=False,
                             bos_token="", eos_token="")
    except Exception:  # (jinja2's errors, and a template's own: raise_exception and strftime_now are undefined here)
        return None
    m = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", text.partition("\0")[0], flags=re.S)
    return m[1] if m else None


def _dated_opening(template: str | None) -> str | None:
    """The text a Llama 3.1+ Jinja template starts every chat's system turn with (the system message follows it):
    the knowledge cutoff and the date, the template's fixed one or, where it calls strftime_now, today's (at
    loading) as transformers renders it. None for other templates."""
    cutoff = re.search(r"Cutting Knowledge Date: ([^\\\"'{}\n]+)", template or "")
    if cutoff is None or "Today Date: " not in template:
        return None
    today = re.search(r"strftime_now\(\s*[\"']([^\"']+)[\"']", template)  # transformers defines it: today's date
    fixed = re.search(r"date_string\s*=\s*[\"']([^\"']+)[\"']", template)
    date = datetime.datetime.now().strftime(today[1]) if today else fixed[1] if fixed else "26 Jul 2024"
    return f"Cutting Knowledge Date: {cutoff[1]}\nToday Date: {date}\n\n"


# --- Tokenizer ---------------------------------------------------------------------------------------------

class Tokenizer:
    """Build with `Tokenizer.from_path`; the constructor takes what a loader read."""

    def __init__(self, *, enc=None, vocab_size=None, blank=(), sp=None, specials=None, in_text=(), bos_id=None,
                 eos_id=None, stops=(), add_bos=False, chat=None, system=None, opening=None):
        self.enc, self.sp = enc, sp                 # exactly one backend: a tiktoken.Encoding or sentencepiece
        self.blank = frozenset(blank)               # ids below vocab_size that are no token (see _bpe)
        self.specials = dict(specials or {})        # special-token text -> id
        # added tokens found in text too (as in HF); with parse_special (engine's --parse-special) every special token
        self.in_text, self.any_special = (_alternatives(names) for names in (in_text, [*in_text, *self.specials]))
        self.parse_special = False
        self.bos_id, self.eos_id = bos_id, eos_id   # eos_id: what encode(eos=True) appends
        self.add_bos = add_bos and bos_id is not None  # encode()'s default (a GGUF may ask for a BOS it lacks)
        self.eos_ids = frozenset({i for t, i in self.specials.items() if t in END_TOKENS} | {eos_id, *stops} - {None})
        self.chat, self.system = chat, system       # "llama3" | "chatml" | "llama2" | None; ChatML's default system
        self.opening = opening                      # Llama 3.1+: what every chat's system turn starts with
        self.vocab_size = sp.get_piece_size() if sp is not None else vocab_size

    @classmethod
    def from_path(cls, path) -> "Tokenizer":
        if not os.path.exists(path := os.fspath(path)):
            raise FileNotFoundError(f"no tokenizer at {path!r}: {HOW}")
        path, head = file_head(path, ("tokenizer.model", "tokenizer.json"), FileNotFoundError(
            f"no tokenizer.model, tokenizer.json or .gguf in directory {path!r}: {HOW}"))
        try:  # the format by what the file holds (a .json also by its name)
            if head[:4] == b"GGUF":
                return cls._from_gguf(path)
            if path.endswith(".json") or re.match(rb'\s*\{\s*"', head):  # a renamed tokenizer.json too
                return cls._from_hf_json(path)
            if re.match(rb"[A-Za-z0-9+/=]+ \d+\r?\n", head):
                return cls._from_tiktoken(path)
            if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80" or head[8:10] == b'{"':  # (sentencepiece reads it all)
                raise ValueError(f"{path!r} holds model weights (PyTorch's zip, a pickle or safetensors), not a "
                                 f"tokenizer; {HOW}")
            return cls._from_sentencepiece(path)
        except (KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:  # a field missing or malformed
            raise ValueError(f"{path!r}: malformed tokenizer ({type(e).__name__}: {e}); {HOW}") from None

    @classmethod
    def _from_gguf(cls, path):
        try:
            fields = open_gguf(path).fields
        except ImportError:  # no gguf package (pip install -r requirements.txt): not a fault of the file
            raise
        except Exception as e:  # the reader fails with assorted errors on a cut or corrupt file
            raise ValueError(f"{path!r} is not a readable GGUF file, truncated or corrupt ({e}); re-download it")
        get = lambda k, default=None: fields[k].contents() if k in fields else default
        kind = get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(f"{path!r}: GGUF tokenizer type {kind!r} is not supported (only byte-level BPE "
                             "'gpt2'); point --tokenizer at the model's tokenizer.model instead")
        pre = get("tokenizer.ggml.pre", "default")
        if pre not in GGUF_PRE:
            raise ValueError(f"{path!r}: unknown GGUF pre-tokenizer {pre!r}; add its regex to GGUF_PRE in tokenizer.py")
        tokens, types = get("tokenizer.ggml.tokens"), get("tokenizer.ggml.token_type")
        if tokens is None or (types is not None and len(tokens) != len(types)):
            raise ValueError(f"{path!r}: the GGUF file has no tokenizer.ggml.tokens list, or its token_type list "
                             "differs from it in length; the file is corrupt")
        ids = {k: get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "eot", "eom")}
        for k, i in ids.items():  # a damaged field would fail far from here, or name the wrong file
            if i is not None and not (type(i) is int and 0 <= i < len(tokens)):
                raise ValueError(f"{path!r}: tokenizer.ggml.{k}_token_id must be a token id below {len(tokens)}, got "
                                 f"{i!r}; the file is corrupt")
        if types is None:
            types = _default_token_types(path, tokens, ids.values())
        # Types 1 NORMAL: byte-level strings; 3 CONTROL, 4 USER_DEFINED (found in plain text too): raw text.
        ranks = {_vocab_bytes(tok, path): i for i, (tok, typ) in enumerate(zip(tokens, types)) if typ == 1}
        specials = {tok: i for i, (tok, typ) in enumerate(zip(tokens, types)) if typ in (3, 4)}
        _check_merges(path, get("tokenizer.ggml.merges"), dict(zip(tokens, range(len(tokens)))), ranks)
        # Converters before llama.cpp had tokenizer.ggml.pre (April 2024) wrote none; llama.cpp splits such files (and
        # "default") by four regexes in turn, which one tiktoken regex cannot be, warning that generation degrades.
        # Early Llama 3 files hold <|start_header_id|>: they get Llama 3's regex (and BOS), as Meta's and HF's
        # tokenizers give them; the others GPT-2's regex, with a warning (ids differ around punctuation and digits).
        llama3 = pre == "default" and "<|start_header_id|>" in specials
        pattern = LLAMA3_PATTERN if llama3 else GGUF_PRE[pre]
        if pre == "default" and not llama3:
            print(f"warning: {path!r} names no pre-tokenizer (tokenizer.ggml.pre: {pre!r}); splitting text GPT-2's "
                  "way, not as llama.cpp or the model does; re-convert the file with a current llama.cpp",
                  file=sys.stderr)
        template = get("tokenizer.chat_template")
        enc, n, blank = _bpe(path, ranks, specials, pattern)
        return cls(enc=enc, vocab_size=n, blank=blank, specials=specials, bos_id=ids["bos"], eos_id=ids["eos"],
                   stops=[ids["eot"], ids["eom"]],
                   in_text=[t for t, typ in zip(tokens, types) if typ == 4],
                   add_bos=bool(get("tokenizer.ggml.add_bos_token", pattern is LLAMA3_PATTERN)),  # llama.cpp's
                   chat=cls._chat_of(specials, template), system=_default_system(template),
                   opening=_dated_opening(template))

    @classmethod
    def _from_hf_json(cls, path):
        try:
            with open(path, encoding="utf-8") as f:
                tj = json.load(f)
            model, pre = tj["model"], tj.get("pre_tokenizer") or {}
            if not (isinstance(model, dict) and isinstance(pre, dict)):
                raise TypeError("'model' and 'pre_tokenizer' must be objects")
        except (ValueError, KeyError, TypeError) as e:  # no 'model' (config.json?): another file, not a bad download
            raise ValueError(f"{path!r} is not a Hugging Face tokenizer.json ({e}); " + ("pass tokenizer.json or the "
                             "checkpoint directory" if isinstance(e, KeyError) else "re-download it"))
        if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(pre):
            raise ValueError(f"{path!r}: only byte-level BPE tokenizer.json is supported; for Llama 2 "
                             "use the directory's tokenizer.model")
        pattern = _pre_split(pre, tj.get("normalizer"), path)
        specials = {t["content"]: t["id"] for t in tj.get("added_tokens", [])}
        ranks = {_vocab_bytes(t, path): i for t, i in model["vocab"].items() if t not in specials}
        _check_merges(path, model.get("merges"), model["vocab"], ranks)
        cfg, template, stops = _hf_config(os.path.dirname(path))  # bos/eos names, the chat template, stop ids
        # HF adds BOS as the special token the post-processor's template puts first (Llama 3 does, SmolLM2 does not:
        # a template that only appends it adds no BOS); without a config, BOS is that first token
        first = _template_first(tj.get("post_processor"))
        bos_name = cfg.get("bos_token") or first
        bos, eos = specials.get(bos_name), specials.get(cfg.get("eos_token"))
        add_bos = bos is not None and first == bos_name
        enc, n, blank = _bpe(path, ranks, specials, pattern)
        return cls(enc=enc, vocab_size=n, blank=blank, specials=specials, bos_id=bos, eos_id=eos, stops=stops,
                   add_bos=add_bos, chat=cls._chat_of(specials, template), system=_default_system(template),
                   in_text=[t["content"] for t in tj.get("added_tokens", []) if t.get("special") is False],
                   opening=_dated_opening(template))

    @classmethod
    def _from_tiktoken(cls, path):
        ranks = {}
        with open(path, "rb") as f:
            for n, line in enumerate(f):
                if not line.strip():  # a blank line, e.g. a trailing one
                    continue
                try:
                    tok, rank = line.split()
                    ranks[base64.b64decode(tok, validate=True)] = int(rank)
                except ValueError:
                    raise ValueError(f"{path!r} line {n + 1} is not 'base64 rank'; the tiktoken file is corrupt")
        if sorted(ranks.values()) != list(range(LLAMA3_VOCAB)):  # Meta's specials follow its 128,000 ranks
            raise ValueError(f"{path!r} holds {len(ranks)} token ranks, not Meta's Llama 3 tokens 0..{LLAMA3_VOCAB - 1}"
                             " each once: a cut or corrupt file (re-download it), or not Llama 3's tokenizer")
        specials = {t: LLAMA3_VOCAB + i for i, t in enumerate(LLAMA3_SPECIALS)}
        _, template, stops = _hf_config(os.path.dirname(path))  # a Hugging Face folder's, as the other formats
        enc, n, blank = _bpe(path, ranks, specials, LLAMA3_PATTERN)
        return cls(enc=enc, vocab_size=n, blank=blank, specials=specials, bos_id=specials["<|begin_of_text|>"],
                   eos_id=specials["<|end_of_text|>"], stops=stops, add_bos=True,
                   chat=cls._chat_of(specials, template), opening=_dated_opening(template))

    @classmethod
    def _from_sentencepiece(cls, path):
        import sentencepiece
        try:
            sp = sentencepiece.SentencePieceProcessor(model_file=path)
        except Exception as e:
            raise ValueError(f"{path!r} is neither a sentencepiece nor a tiktoken tokenizer.model ({e}); {HOW}")
        bos, eos = sp.bos_id(), sp.eos_id()
        cfg, template, stops = _hf_config(os.path.dirname(path))  # Llama 2's [INST], unless the folder says otherwise
        # Its special tokens: its own control pieces (<s>, </s>), and those tokenizer_config.json lists, a fine-tune's
        # past the vocabulary too (ChatML's <|im_end|> at 32000, which decodes to nothing, as every id past the
        # vocabulary). Those that end a turn stop generation, and --parse-special finds them all in text.
        specials = {sp.id_to_piece(i): i for i in range(sp.get_piece_size()) if sp.is_control(i)}
        specials |= {t.get("content"): int(i) for i, t in (cfg.get("added_tokens_decoder") or {}).items()
                     if isinstance(t, dict) and str(i).isdecimal()}
        # end pieces that are no control piece (Yi's <|im_end|> at 7), and the config's EOS (transformers' eos_token)
        ends = [t for t in (*END_TOKENS, cfg.get("eos_token")) if t is not None]
        stops += [i for i in map(sp.piece_to_id, ends) if i != sp.unk_id()]
        stops += [specials[t] for t in ends if t in specials]
        llama2 = template is None or ("[INST]" in template and "<<SYS>>" in template)  # not Mistral's [INST]
        return cls(sp=sp, specials=specials, bos_id=bos if bos >= 0 else None, eos_id=eos if eos >= 0 else None,
                   stops=stops, add_bos=bos >= 0, chat="llama2" if llama2 else None)

    @staticmethod
    def _chat_of(specials, template):  # the template's format (None: another), else the vocabulary's
        formats = [(c, ts[0]) for c, ts in CHAT_TOKENS.items() if all(t in specials for t in ts)]  # all it writes
        if template is not None:  # e.g. DeepSeek-R1-Distill-Llama: Llama 3's vocabulary, its own chat format
            return next((chat for chat, t in formats if t in template), None)
        return formats[-1][0] if formats else None  # both in the vocabulary: Llama 3's (CHAT_TOKENS lists it last)

    # --- encode / decode ---

    def _text(self, text: str) -> list[int]:
        found = self.any_special if self.parse_special else self.in_text
        parts = found.split(text) if found else [text]  # odd parts: the tokens found
        ids = [i for n, part in enumerate(parts) for i in ([self.specials[part]] if n % 2 else self._ordinary(part))]
        # bytes the vocabulary lacks (ids past it, _bpe) are dropped after merging: '=\x04=' is '=', '=' (HF's: '==')
        past = self.sp is None and self.enc.n_vocab > self.vocab_size
        return [i for i in ids if i < self.vocab_size] if past else ids

    def _ordinary(self, text: str) -> list[int]:  # tiktoken, a piece at a time (see RUN_CAP); or sentencepiece
        if self.sp is not None:  # a lone surrogate (an undecodable byte of argv) becomes U+FFFD, as tiktoken makes it
            return self.sp.encode(text.encode("utf-16", "surrogatepass").decode("utf-16", "replace"))
        return [i for piece in _cut_runs(text) for i in self.enc.encode_ordinary(piece)]

    def encode(self, text: str, bos: bool | None = None, eos: bool = False) -> list[int]:
        bos = self.add_bos if bos is None else bos
        if (bos and self.bos_id is None) or (eos and self.eos_id is None):
            raise ValueError("this tokenizer has no BOS/EOS token; call encode() with bos=False, eos=False")
        ids = self._text(text)
        bos = bos and ids[:1] != [self.bos_id]  # text that opens with it (parse_special) gets no second one
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids) -> str:
        """Ids past the vocabulary (a model's padded rows, or another tokenizer's) or of no token decode to nothing."""
        ids = [i for i in map(int, ids) if 0 <= i < self.vocab_size and i not in self.blank]
        return self.sp.decode(ids) if self.sp is not None else self.enc.decode(ids, errors="replace")

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        sp = self.specials.get
        ids = [self.bos_id] if self.add_bos and self.chat != "llama2" else []
        if self.chat == "llama3":
            turns = [(m["role"], m["content"].strip()) for m in messages]  # trimmed, as the templates do
            if self.opening is not None:  # Llama 3.1+: a system turn always, the system message after the date
                system = turns.pop(0)[1] if turns and turns[0][0] == "system" else ""
                turns.insert(0, ("system", self.opening + system))
            for role, text in turns:
                ids += [sp("<|start_header_id|>"), *self._text(role), sp("<|end_header_id|>"),
                        *self._text("\n\n"), *self._text(text), sp("<|eot_id|>")]
            if add_generation_prompt:
                ids += [sp("<|start_header_id|>"), *self._text("assistant"), sp("<|end_header_id|>"),
                        *self._text("\n\n")]
        elif self.chat == "chatml":
            if self.system is not None and messages and messages[0]["role"] != "system":
                messages = [{"role": "system", "content": self.system}, *messages]
            for m in messages:
                ids += [sp("<|im_start|>"), *self._text(m["role"] + "\n" + m["content"]), sp("<|im_end|>"),
                        *self._text("\n")]
            if add_generation_prompt:
                ids += [sp("<|im_start|>"), *self._text("assistant\n")]
        elif self.chat == "llama2":
            # Meta's format: the system prompt folds into the first user turn; each exchange is <s>...</s>; the last
            # user turn's "[INST] ... [/INST]" is the prompt, so add_generation_prompt has nothing to add.
            turns = [m["role"] for m in (messages[1:] if messages and messages[0]["role"] == "system" else messages)]
            if not turns or turns != [("user", "assistant")[i % 2] for i in range(len(turns))]:
                raise ValueError("Llama 2's chat format takes turns user, assistant, user, ... (a system message "
                                 "only first, before a user turn)")
            if messages[0]["role"] == "system":
                first = f"<<SYS>>\n{messages[0]['content']}\n<</SYS>>\n\n{messages[1]['content']}"
                messages = [{"role": "user", "content": first}, *messages[2:]]
            for i in range(0, len(messages), 2):
                turn = f"[INST] {messages[i]['content'].strip()} [/INST]"
                if i + 1 < len(messages):
                    ids += self.encode(f"{turn} {messages[i + 1]['content'].strip()} ", bos=True, eos=True)
                else:
                    ids += self.encode(turn, bos=True)
        else:
            raise ValueError("this tokenizer has no chat format hata writes (Llama 3's or ChatML's tokens in a byte-"
                             "level BPE vocabulary, or Llama 2's [INST] with <<SYS>> for sentencepiece, not "
                             "Mistral's); use a plain prompt instead")
        return ids
