"""Everything between the raw files and the model: tokenizers, the LLM-Adapters tasks,
the prompt, batching, and the answer scoring the paper's tables use.

    python data.py download --data_dir data [--task math|commonsense|all]

The tokenizers need no third-party tokenizer library: LLaMA goes through sentencepiece,
GPT-J through a GPT-2 byte-level BPE written below that gives the reference ids.
"""
import base64
import functools
import json
import math
import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import sentencepiece
import torch

from machinery import checks, runs
from machinery.checks import rule


class DataError(ValueError):
    """Bad input files or names; the message is one line: expected, found, what to do."""


# -----------------------------------------------------------------------------
# Tokenizers. Each has vocab_size, bos_id (None: no BOS), eos_id, pad_id, stop_ids (the ids
# that end a generation), add_bos, encode, decode.

class SentencePieceTokenizer:
    """LLaMA's tokenizer: a sentencepiece model, BOS/EOS ids taken from the model itself."""

    def __init__(self, model_file):
        try:
            self.processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        except (RuntimeError, OSError) as e:  # sentencepiece's "could not parse ModelProto"
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"{model_file}: expected a sentencepiece model (LLaMA 1/2) or Meta's "
                            f"tiktoken text (Llama 3), found neither (sentencepiece: {reason}): "
                            f"{TOKENIZER_ADVICE}") from None
        self.vocab_size = self.processor.get_piece_size()
        self.bos_id = self.processor.bos_id()
        self.eos_id = self.processor.eos_id()
        # LLaMA has no pad piece (pad_id() is -1); LLM-Adapters pads it with id 0 (unk)
        pad_id = self.processor.pad_id()
        self.pad_id = pad_id if pad_id >= 0 else 0
        self.stop_ids = [self.eos_id]
        self.add_bos = True

    def encode(self, text, bos=None, eos=False):
        bos = self.add_bos if bos is None else bos
        return [self.bos_id] * bos + self.processor.encode(text) + [self.eos_id] * eos

    def decode(self, ids):
        return self.processor.decode([int(i) for i in ids])  # plain ints, also from a tensor


class ByteTokenizer:
    """Raw UTF-8 bytes for the `tiny` preset: 0 pad, 1 bos, 2 eos, 3 + byte value."""

    def __init__(self):
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        self.stop_ids = [self.eos_id]
        self.vocab_size = 3 + 256
        self.add_bos = True

    def encode(self, text, bos=None, eos=False):
        bos = self.add_bos if bos is None else bos
        body = [3 + b for b in text.encode("utf-8")]
        return [self.bos_id] * bos + body + [self.eos_id] * eos

    def decode(self, ids):
        data = bytes(int(i) - 3 for i in ids if i >= 3)
        return data.decode("utf-8", errors="replace")


# GPT-2's pre-tokenizer splits text into words before BPE with the pattern
#   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
# Python's re has no \p{...}, and its \s also matches \x1c-\x1f, which the reference
# does not. So we spell the classes out: letters and numbers from unicodedata's categories,
# whitespace as Unicode's White_Space list (also what added tokens' lstrip/rstrip strip).
WHITESPACE = ("\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200b)))
              + "\u2028\u2029\u202f\u205f\u3000")


@functools.lru_cache(maxsize=None)
def unicode_classes():
    """Letters, numbers and whitespace as the inside of a [...] class (~0.1 s, built once)."""
    ranges = {"L": [], "N": []}  # major category -> [[first, last], ...] code point runs
    for code in range(0x110000):
        major = unicodedata.category(chr(code))[0]
        if major in ranges:
            runs = ranges[major]
            if runs and runs[-1][1] == code - 1:
                runs[-1][1] = code
            else:
                runs.append([code, code])
    letters, numbers = ("".join(f"\\U{a:08x}-\\U{b:08x}" for a, b in ranges[m]) for m in "LN")
    space = "".join(f"\\U{ord(c):08x}" for c in WHITESPACE)
    return letters, numbers, space


@functools.lru_cache(maxsize=None)
def gpt2_pretokenizer():
    """The compiled GPT-2 pattern."""
    letters, numbers, space = unicode_classes()
    return re.compile(
        rf"'s|'t|'re|'ve|'m|'ll|'d| ?[{letters}]+| ?[{numbers}]+| ?[^{space}{letters}{numbers}]+"
        rf"|[{space}]+(?![^{space}])|[{space}]+")


# Llama 3's pattern (Meta's tiktoken tokenizer and its tokenizer.json); Qwen2's is the same
# with single digits (\p{N} instead of \p{N}{1,3}). These are the only Split patterns read.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")


@functools.lru_cache(maxsize=None)
def split_pretokenizer(pattern):
    """One of the two patterns above in Python's re, its classes spelled as GPT-2's are."""
    if pattern not in (LLAMA3_PATTERN, QWEN2_PATTERN):
        raise DataError(f"expected the pre-tokenizer pattern of Llama 3 or Qwen2, found "
                        f"{pattern!r}: this tokenizer.json needs a pre-tokenizer not implemented "
                        f"here")
    L, N, S = unicode_classes()
    digits = "{1,3}" if pattern == LLAMA3_PATTERN else ""
    # (?i:...) is kept: Python's re folds case as the reference does (tested with 'S, 'ſ, 'K)
    return re.compile(
        rf"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n{L}{N}]?[{L}]+|[{N}]{digits}|"
        rf" ?[^{S}{L}{N}]+[\r\n]*|[{S}]*[\r\n]+|[{S}]+(?![^{S}])|[{S}]+")


def bytes_to_unicode():
    """GPT-2's byte -> printable character table: BPE tokens are strings of these characters."""
    # printable Latin-1 bytes stand for themselves; the rest (controls, space, ...) are
    # shifted to 256+ so that no token contains whitespace or control characters
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + shifted)
            shifted += 1
    return table


class BPETokenizer:
    """Byte-level BPE: GPT-2 / GPT-J (vocab.json + merges.txt, or tokenizer.json), and the
    tokenizer.json of Llama 3 and Qwen2 (a Split pattern before the byte mapping)."""

    def __init__(self, folder):
        folder = Path(folder)
        self.byte_to_char = bytes_to_unicode()
        self.char_to_byte = {c: b for b, c in self.byte_to_char.items()}
        self.normalize = None  # a str -> str applied to text outside added tokens, or None
        if (folder / "vocab.json").exists():
            self.token_to_id = read_vocab(folder / "vocab.json")
            merges = read_merges(folder / "merges.txt")
            self.pretokenizer, self.ignore_merges, template_bos = gpt2_pretokenizer(), False, None
        else:
            # transformers 5 saves only tokenizer.json, which holds the same vocabulary and merges
            bpe, self.pretokenizer, self.normalize, template_bos = read_tokenizer_json(folder)
            self.token_to_id = bpe["vocab"]
            merges = [tuple(m.split(" ") if isinstance(m, str) else m) for m in bpe["merges"]]
            check_merges(folder / "tokenizer.json", "model.merges", merges)
            # Llama 3's: a word that is itself in the vocabulary is one token, merges or not
            self.ignore_merges = bool(bpe.get("ignore_merges"))
        self.merge_rank = {tuple(pair): rank for rank, pair in enumerate(merges)}
        # check once here so that encode() can never meet a symbol outside the vocabulary
        symbols = [*self.byte_to_char.values(), *("".join(pair) for pair in merges)]
        missing = [s for s in symbols if s not in self.token_to_id]
        if any(len(pair) != 2 for pair in merges) or missing:
            raise DataError(f"{folder}: expected a byte-level BPE (every byte and merge result in "
                            f"the vocabulary, 'a b' merges), found {len(missing)} missing symbols "
                            f"such as {missing[:3]}: use the tokenizer files saved with the model")
        added = read_added_tokens(folder)
        if self.pretokenizer is gpt2_pretokenizer():
            self.gpt2_specials(folder, added)
        else:
            self.set_specials(folder, added, template_bos)

    def gpt2_specials(self, folder, added):
        # <|endoftext|> is GPT-2's only special token: BOS, EOS and (as in LLM-Adapters) pad
        eot = "<|endoftext|>"
        if eot not in added and eot in self.token_to_id:
            added[eot] = dict(id=self.token_to_id[eot], lstrip=False, rstrip=False,
                              single_word=False, normalized=False)
        if eot not in added:
            raise DataError(f"{folder}: expected the token {eot} in vocab.json or the added "
                            f"tokens, found none: is this a GPT-2/GPT-J tokenizer folder?")
        self.set_added(added)
        self.bos_id = self.eos_id = self.pad_id = added[eot]["id"]
        self.stop_ids = [self.eos_id]
        self.add_bos = False  # GPT-J's tokenizer adds no BOS

    def set_specials(self, folder, added, template_bos):
        """bos/eos/pad/stop ids as transformers reads them from the folder's config files."""
        self.set_added(added)
        config = read_json(folder / "tokenizer_config.json")
        token = rule(str, dict, none_ok=True)  # a token's text, or {"content": text, ...}
        checks.check_fields(folder / "tokenizer_config.json", config,
                            {"bos_token": token, "eos_token": token, "pad_token": token,
                             "add_bos_token": rule(bool, none_ok=True)}, DataError,
                            TOKENIZER_ADVICE)
        for name in ("bos_token", "eos_token", "pad_token"):
            if isinstance(config.get(name), dict):
                checks.check_fields(folder / "tokenizer_config.json", config[name],
                                    {"content": rule(str, required=True)}, DataError,
                                    TOKENIZER_ADVICE, prefix=f"{name}.")

        def token_id(content):  # a config names a token by its text, or as {"content": ...}
            content = content.get("content") if isinstance(content, dict) else content
            return added[content]["id"] if content in added else self.token_to_id.get(content)

        # Qwen2 says bos_token: null (no BOS); Llama 3's BOS comes from its post-processor
        self.bos_id = token_id(config["bos_token"]) if "bos_token" in config else template_bos
        self.add_bos = bool(config.get("add_bos_token", template_bos is not None))
        self.add_bos = self.add_bos and self.bos_id is not None
        self.eos_id = token_id(config.get("eos_token"))
        if self.eos_id is None:
            self.eos_id = next((added[t]["id"] for t in END_TOKENS if t in added), None)
        if self.eos_id is None:
            raise DataError(f"{folder}: expected an eos_token in tokenizer_config.json or one of "
                            f"{END_TOKENS} among the added tokens, found neither: use the "
                            f"tokenizer files saved with the model")
        # Llama 3 has no pad token: pad with EOS, which the loss mask leaves out anyway
        pad_id = token_id(config.get("pad_token"))
        self.pad_id = self.eos_id if pad_id is None else pad_id
        self.stop_ids = stop_ids(folder, self.eos_id, added)

    def set_added(self, added):
        self.added = added
        self.id_to_token = {i: t for t, i in self.token_to_id.items()}
        self.id_to_added = {spec["id"]: content for content, spec in self.added.items()}
        self.vocab_size = 1 + max(*self.id_to_token, *self.id_to_added)
        # like the reference, first split on tokens matched in the raw text (normalized=False),
        # then on the rest; with leftmost-longest matching (longer alternatives first)
        self.added_patterns = []
        for raw in (True, False):
            contents = [c for c, spec in self.added.items() if (not spec["normalized"]) == raw]
            contents.sort(key=len, reverse=True)
            self.added_patterns.append(contents and re.compile("|".join(map(re.escape, contents))))
        self.cache = {}  # word -> ids: text repeats words, BPE per word is the slow part

    def rank(self, pair):
        """Which adjacent pair merges first: its line in merges.txt (None: never)."""
        return self.merge_rank.get(pair)

    def bpe(self, word):
        """Ids of one pre-tokenized word, merging the lowest-ranked adjacent pair first."""
        if word in self.cache:
            return self.cache[word]
        parts = [self.byte_to_char[b] for b in word.encode("utf-8")]
        if self.ignore_merges and "".join(parts) in self.token_to_id:
            parts = ["".join(parts)]
        # start from single bytes; merge the pair of lowest rank while one has a rank
        while len(parts) > 1:
            ranks = [(rank, pair) for pair in zip(parts, parts[1:])
                     if (rank := self.rank(pair)) is not None]
            if not ranks:  # no adjacent pair has a merge: done
                break
            best = min(ranks)[1]
            # merge every occurrence of the best pair, left to right
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        ids = [self.token_to_id[p] for p in parts]
        self.cache[word] = ids
        return ids

    def split_added(self, text, pattern):
        """Cut text on added tokens: [(piece, None), (token text, id), ...]."""
        pieces, start = [], 0  # start: where the text not yet cut begins
        for match in pattern.finditer(text):
            spec = self.added[match.group()]
            left, right = match.span()
            before, after = text[start:left], text[right:]
            # single_word tokens only count when not glued to a letter or digit
            if spec["single_word"] and (before[-1:].isalnum() or after[:1].isalnum()):
                continue
            if spec["lstrip"]:  # the token swallows the whitespace before it...
                left = start + len(before.rstrip(WHITESPACE))
            if spec["rstrip"]:  # ... and after it
                right += len(after) - len(after.lstrip(WHITESPACE))
            pieces += [(text[start:left], None), (text[left:right], spec["id"])]
            start = right
        pieces.append((text[start:], None))
        return [(piece, i) for piece, i in pieces if piece or i is not None]

    def encode(self, text, bos=None, eos=False):
        bos = self.add_bos if bos is None else bos
        # added tokens are cut out first, so "<|endoftext|>" in text is one token, never BPE'd;
        # the normalizer (Qwen2's NFC) runs between raw-text tokens and normalized ones
        raw, normalized = self.added_patterns
        pieces = self.split_added(text, raw) if raw else [(text, None)]
        if self.normalize:
            pieces = [(self.normalize(p) if i is None else p, i) for p, i in pieces]
        if normalized:
            pieces = [out for piece, i in pieces for out in
                      ([(piece, i)] if i is not None else self.split_added(piece, normalized))]
        ids = [self.bos_id] if bos and self.bos_id is not None else []
        for piece, added_id in pieces:
            if added_id is not None:
                ids.append(added_id)
                continue
            # BPE never merges across words: "Ġthe" can form, "eĠt" cannot
            for word in self.pretokenizer.findall(piece):
                ids += self.bpe(word)
        return ids + [self.eos_id] * eos

    def decode(self, ids):
        # join bytes first, decode once: one character often spans several tokens, and a
        # cut-off generation may end inside a character (it becomes U+FFFD, not an error)
        data = bytearray()
        for i in map(int, ids):  # a tensor element would not find itself as a dict key
            if i in self.id_to_added:
                data += self.id_to_added[i].encode("utf-8")
            elif i in self.id_to_token:
                data += bytes(self.char_to_byte[c] for c in self.id_to_token[i])
            else:
                raise DataError(f"token id {i} is outside this vocabulary "
                                f"(0..{self.vocab_size - 1}): does the model match the tokenizer?")
        return data.decode("utf-8", errors="replace")


def read_added_tokens(folder):
    """{content: {id, lstrip, rstrip, single_word, normalized}} from the files transformers
    writes."""
    added = {}
    # the reference's defaults for a token that gives no flags (added_tokens.json gives none)
    defaults = dict(lstrip=False, rstrip=False, single_word=False, normalized=True)

    def add(content, token_id, spec):
        flags = {k: spec[k] for k in defaults if k in spec}
        added[content] = {**defaults, **flags, "id": int(token_id)}

    # later files describe the same tokens more fully, so they win
    path = folder / "added_tokens.json"  # {content: id}, GPT-J's hub layout
    if path.exists():
        tokens = read_json(path)
        checks.check_mapping(path, "the file", tokens, rule(str), _TOKEN_ID, DataError,
                             TOKENIZER_ADVICE)
        for content, token_id in tokens.items():
            add(content, token_id, {})
    path = folder / "tokenizer_config.json"  # "added_tokens_decoder": {id: {content, flags}}
    if path.exists():
        decoder = read_json(path).get("added_tokens_decoder", {})
        checks.check_mapping(path, "added_tokens_decoder", decoder, rule(str), rule(dict),
                             DataError, TOKENIZER_ADVICE)
        for token_id, spec in decoder.items():
            if not token_id.isdigit():
                raise DataError(f"{path}: added_tokens_decoder key {token_id!r}, expected a "
                                f"token id: {TOKENIZER_ADVICE}")
            check_added_token(path, f"added_tokens_decoder[{token_id!r}]", spec, with_id=False)
            add(spec["content"], token_id, spec)
    path = folder / "tokenizer.json"  # "added_tokens": [{id, content, flags}]
    if path.exists():
        specs = read_json(path).get("added_tokens", [])
        checks.check_list(path, "added_tokens", specs, rule(dict), DataError, TOKENIZER_ADVICE)
        for index, spec in enumerate(specs):
            check_added_token(path, f"added_tokens[{index}]", spec)
            add(spec["content"], spec["id"], spec)
    return added


# ----------------------------------------------------------------------------- tokenizer files
# Each file is checked field by field (machinery/checks.py) before a tokenizer is built from it.

TOKENIZER_ADVICE = "use the tokenizer files saved with the model, or download them again"
_TOKEN_ID = rule(int, low=0, high=(1 << 22) - 1)  # as config.json's vocab_size: 4M at most
_FLAG = rule(bool)
_ADDED_TOKEN = {"id": rule(int, low=0, high=(1 << 22) - 1, required=True),
                "content": rule(str, required=True), "lstrip": _FLAG, "rstrip": _FLAG,
                "single_word": _FLAG, "normalized": _FLAG, "special": _FLAG}


def check_added_token(path, name, spec, with_id=True):
    """One added token's description: its text, its id (when the entry holds it), its flags."""
    rules = _ADDED_TOKEN if with_id else {k: r for k, r in _ADDED_TOKEN.items() if k != "id"}
    checks.check_fields(path, spec, rules, DataError, TOKENIZER_ADVICE, prefix=f"{name}.")
    if not spec["content"]:
        raise DataError(f"{path}: {name}.content is empty, expected the token's text: "
                        f"{TOKENIZER_ADVICE}")


def read_vocab(path):
    """vocab.json: {token: id}, every id a whole number and none given twice."""
    vocab = read_json(path)
    checks.check_mapping(path, "vocab", vocab, rule(str), _TOKEN_ID, DataError, TOKENIZER_ADVICE)
    check_unique_ids(path, vocab)
    return vocab


def check_unique_ids(path, vocab):
    if len(set(vocab.values())) != len(vocab):
        seen = {}
        for token, token_id in vocab.items():
            if token_id in seen:
                raise DataError(f"{path}: tokens {seen[token_id]!r} and {token!r} both have id "
                                f"{token_id}, expected one id per token: {TOKENIZER_ADVICE}")
            seen[token_id] = token


def read_merges(path):
    """merges.txt: a '#version' line, then one merge a line, two symbols split by one space."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path} not found (vocab.json needs it): {TOKENIZER_ADVICE}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}): "
                        f"{TOKENIZER_ADVICE}") from None
    merges = []
    for number, line in enumerate(lines, 1):
        if not line or (number == 1 and line.startswith("#version")):
            continue
        pair = tuple(line.split(" "))
        if len(pair) != 2 or not all(pair):
            raise DataError(f"{path}: line {number}: expected two symbols split by one space, "
                            f"found {line[:40]!r}: {TOKENIZER_ADVICE}")
        checks.check_text(path, f"line {number}", line, DataError, TOKENIZER_ADVICE)
        merges.append(pair)
    return merges


def check_merges(path, name, merges):
    """tokenizer.json's merges: "a b" strings or [a, b] pairs of symbols."""
    for index, pair in enumerate(merges):
        if len(pair) != 2 or not all(isinstance(p, str) and p for p in pair):
            raise DataError(f"{path}: {name}[{index}] is {checks.found(list(pair))}, expected "
                            f"two symbols ('a b' or [a, b]): {TOKENIZER_ADVICE}")


_TOKENIZER_JSON = {"model": rule(dict, required=True), "pre_tokenizer": rule(dict, none_ok=True),
                   "normalizer": rule(dict, none_ok=True),
                   "post_processor": rule(dict, none_ok=True), "added_tokens": rule(list)}
_BPE_MODEL = {"type": rule(str, required=True), "vocab": rule(dict, required=True),
              "merges": rule(list, required=True), "ignore_merges": rule(bool, none_ok=True),
              "continuing_subword_prefix": rule(str, none_ok=True),
              "end_of_word_suffix": rule(str, none_ok=True), "byte_fallback": rule(bool),
              "dropout": rule(float, low=0, high=1, none_ok=True)}
_PRE_TOKENIZER = {"type": rule(str, required=True), "pretokenizers": rule(list),
                  "add_prefix_space": rule(bool), "use_regex": rule(bool),
                  "pattern": rule(dict), "behavior": rule(str), "invert": rule(bool)}


def check_tokenizer_json(path, spec):
    """tokenizer.json's parts this code reads, before any of them is used."""
    advice = TOKENIZER_ADVICE
    checks.check_fields(path, spec, _TOKENIZER_JSON, DataError, advice)
    model = spec["model"]
    checks.check_fields(path, model, _BPE_MODEL if model.get("type") == "BPE" else
                        {"type": rule(str, required=True)}, DataError, advice, prefix="model.")
    if model["type"] == "BPE":
        checks.check_mapping(path, "model.vocab", model["vocab"], rule(str), _TOKEN_ID,
                             DataError, advice)
        check_unique_ids(path, model["vocab"])
        checks.check_list(path, "model.merges", model["merges"], rule(str, list), DataError,
                          advice)
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre] if pre else []
    for index, part in enumerate(parts):
        name = f"pre_tokenizer.pretokenizers[{index}]" if part is not pre else "pre_tokenizer"
        checks.check_fields(path, part, _PRE_TOKENIZER, DataError, advice, prefix=f"{name}.")
        if part["type"] == "Split":
            checks.check_fields(path, part.get("pattern"),
                                {"Regex": rule(str), "String": rule(str)}, DataError, advice,
                                prefix=f"{name}.pattern.")
    post = spec.get("post_processor") or {}
    for index, processor in enumerate(post.get("processors", []) if post.get("type") == "Sequence"
                                      else [post] if post else []):
        name = "post_processor" + (f".processors[{index}]" if processor is not post else "")
        checks.check_fields(path, processor, {"type": rule(str, required=True)}, DataError, advice,
                            prefix=f"{name}.")
        if processor["type"] != "TemplateProcessing":
            continue
        checks.check_list(path, f"{name}.single", processor.get("single", []), rule(dict),
                          DataError, advice)
        first = (processor.get("single") or [{}])[0]
        if "SpecialToken" in first:
            token = first["SpecialToken"]
            checks.check_fields(path, token, {"id": rule(str, required=True)}, DataError, advice,
                                prefix=f"{name}.single[0].SpecialToken.")
            specials = processor.get("special_tokens")
            checks.check_fields(path, specials, {token["id"]: rule(dict, required=True)},
                                DataError, advice, prefix=f"{name}.special_tokens.")
            ids = specials[token["id"]].get("ids")
            checks.check_list(path, f"{name}.special_tokens[{token['id']!r}].ids", ids,
                              _TOKEN_ID, DataError, advice)
            if not ids:
                raise DataError(f"{path}: {name}.special_tokens[{token['id']!r}].ids is empty, "
                                f"expected the token's id: {advice}")


def read_json(path):
    """A tokenizer or config file's dict, checked as JSON; {} when the folder does not have it."""
    return checks.load_json(path, DataError, TOKENIZER_ADVICE) if path.exists() else {}


def read_tokenizer_json(folder):
    """(BPE model, pre-tokenizer regex, normalize or None, the post-processor's BOS id or None)
    of a byte-level tokenizer.json; one line naming what was found for anything else."""
    path = folder / "tokenizer.json"
    spec = read_json(path)
    check_tokenizer_json(path, spec)
    bpe, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    norm = spec.get("normalizer")

    def refuse(what, found):
        raise DataError(f"{path}: expected {what}, found {found}: this tokenizer is not "
                        f"implemented here (GPT-2, GPT-J, Llama 3 and Qwen2 are)")

    unread = [k for k in ("dropout", "continuing_subword_prefix", "end_of_word_suffix",
                          "byte_fallback") if bpe.get(k)]
    if bpe.get("type") != "BPE" or unread:
        refuse("a BPE model without dropout, affixes or byte fallback",
               f"model type {bpe.get('type')} with {unread}")
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    level = parts[-1] if kinds[-1:] == ["ByteLevel"] else {}
    if level.get("add_prefix_space"):
        refuse("ByteLevel without add_prefix_space", "add_prefix_space true")
    if kinds == ["ByteLevel"] and level.get("use_regex", True):
        pretokenizer = gpt2_pretokenizer()
    elif kinds == ["Split", "ByteLevel"] and not level.get("use_regex", True):
        split = parts[0]
        if (split.get("behavior") != "Isolated" or split.get("invert")
                or "Regex" not in split["pattern"]):
            refuse("Split(Regex, Isolated)", f"Split {split.get('behavior')} of {split['pattern']}")
        pretokenizer = split_pretokenizer(split["pattern"]["Regex"])
    else:
        refuse("pre_tokenizer ByteLevel, or Sequence [Split, ByteLevel(use_regex false)]",
               f"{pre.get('type')} {kinds}")
    if norm is not None and norm.get("type") != "NFC":
        refuse("normalizer null or NFC", f"normalizer {norm.get('type')}")
    normalize = norm and functools.partial(unicodedata.normalize, "NFC")
    # Llama 3's TemplateProcessing puts <|begin_of_text|> first in every single sequence
    post = spec.get("post_processor") or {}
    posts = post.get("processors", []) if post.get("type") == "Sequence" else [post]
    template_bos = None
    for processor in posts:
        if processor.get("type") != "TemplateProcessing":
            continue
        first = (processor.get("single") or [{}])[0]
        if "SpecialToken" in first:
            name = first["SpecialToken"]["id"]
            template_bos = processor["special_tokens"][name]["ids"][0]
    return bpe, pretokenizer, normalize, template_bos


# tokens that end a training item, in the order tried when a folder names no eos_token
END_TOKENS = ["<|end_of_text|>", "<|endoftext|>"]
# an instruct model's end of turn (Llama 3's <|eot_id|>, <|eom_id|>; Qwen2's <|im_end|>)
TURN_END_TOKENS = ["<|eot_id|>", "<|eom_id|>", "<|im_end|>"]


def stop_ids(folder, eos_id, added):
    """Ids that end a generation: eos, an instruct end of turn, and the configs' eos_token_id."""
    stops = [eos_id] + [added[t]["id"] for t in TURN_END_TOKENS if t in added]
    for name in ("generation_config.json", "config.json"):
        listed = read_json(folder / name).get("eos_token_id")
        checks.check_value(folder / name, "eos_token_id", listed,
                           rule(int, list, low=0, high=(1 << 22) - 1, none_ok=True), DataError,
                           TOKENIZER_ADVICE)
        if isinstance(listed, list):
            checks.check_list(folder / name, "eos_token_id", listed, _TOKEN_ID, DataError,
                              TOKENIZER_ADVICE)
        stops += listed if isinstance(listed, list) else [] if listed is None else [listed]
    return list(dict.fromkeys(stops))  # in order, once each


# The 256 special tokens Meta's Llama 3.1+ tokenizer appends after the base ranks (128000 on);
# Llama 3.0 names 128004, 128005, 128008 and 128010 reserved, with the same ids for the rest.
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
                   "<|python_tag|>"]
LLAMA3_SPECIALS += [f"<|reserved_special_token_{i}|>" for i in range(2, 2 + 256 - 11)]


def is_tiktoken_file(path):
    """Meta's Llama 3 tokenizer.model: 'base64-token rank' lines, not a sentencepiece proto."""
    with open(path, "rb") as file:
        first = file.readline(1000)
    return re.fullmatch(rb"[A-Za-z0-9+/]+=* \d+\r?\n?", first) is not None


class TiktokenTokenizer(BPETokenizer):
    """Meta's Llama 3 tokenizer.model: BPE by ranks (merge the adjacent pair whose
    concatenation has the lowest rank), Llama 3's pattern, Meta's 256 specials."""

    def __init__(self, path):
        path = Path(path)
        self.byte_to_char = bytes_to_unicode()
        self.char_to_byte = {c: b for b, c in self.byte_to_char.items()}
        self.normalize, self.ignore_merges = None, True  # tiktoken looks a word up whole first
        self.pretokenizer = split_pretokenizer(LLAMA3_PATTERN)
        self.token_to_id = {}  # tokens as byte_to_char strings, so decode() is the BPE one
        lines = {}  # rank -> the line that gave it
        for number, line in enumerate(path.read_bytes().splitlines(), 1):
            try:  # validate: b64decode would otherwise drop characters outside base64's alphabet
                token, rank = line.split()
                chars = "".join(self.byte_to_char[b]
                                for b in base64.b64decode(token, validate=True))
                rank = int(rank)
            except ValueError:  # also binascii.Error: bad padding, a character not base64
                raise DataError(f"{path}:{number}: expected 'base64-token rank' lines (Meta's "
                                f"Llama 3 tokenizer.model), found {line[:40]!r}: is the file "
                                f"complete?") from None
            if not chars or chars in self.token_to_id or rank in lines:
                what = ("an empty token" if not chars else "a token given twice"
                        if chars in self.token_to_id else f"rank {rank} again (line {lines[rank]})")
                raise DataError(f"{path}:{number}: expected a new token and a new rank, found "
                                f"{what}: {TOKENIZER_ADVICE}")
            lines[rank] = number
            self.token_to_id[chars] = rank
        if lines and max(lines) != len(lines) - 1:
            # Meta's specials take the ids right after the last rank (Meta's Tokenizer does the
            # same), so the ranks must be 0 to n - 1: a gap would give a special a token's id
            gap = min(set(range(len(lines))) - lines.keys())
            raise DataError(f"{path}: expected ranks 0 to {len(lines) - 1}, one per token, found "
                            f"none of rank {gap} (line {lines[max(lines)]} has rank "
                            f"{max(lines)}): {TOKENIZER_ADVICE}")
        missing = [c for c in self.byte_to_char.values() if c not in self.token_to_id]
        if missing:
            raise DataError(f"{path}: expected a rank for each of the 256 bytes, found "
                            f"{len(missing)} missing: is this a byte-level tiktoken file?")
        base = len(self.token_to_id)  # Meta: specials start right after the base ranks
        flags = dict(lstrip=False, rstrip=False, single_word=False, normalized=False)
        self.set_added({t: dict(flags, id=base + i) for i, t in enumerate(LLAMA3_SPECIALS)})
        self.bos_id, self.eos_id = base, base + 1  # <|begin_of_text|>, <|end_of_text|>
        self.pad_id, self.add_bos = self.eos_id, True  # no pad token: EOS, as tokenizer.json's
        self.stop_ids = stop_ids(path.parent, self.eos_id, self.added)

    def rank(self, pair):
        return self.token_to_id.get(pair[0] + pair[1])


def is_bpe_tokenizer_json(folder):
    path = folder / "tokenizer.json"
    if not path.exists():
        return False
    model = read_json(path).get("model")  # not an object: BPETokenizer's checks say so
    return not isinstance(model, dict) or model.get("type") == "BPE"


def load_tokenizer(folder):
    """The tokenizer of a checkpoint folder: sentencepiece for LLaMA, byte-level BPE for GPT-J."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"tokenizer folder {folder} not found: pass the folder of the checkpoint")
    # the folder's own files first; Meta's LLaMA download keeps tokenizer.model one level up
    if (folder / "tokenizer.model").exists():
        return model_file_tokenizer(folder / "tokenizer.model")
    has_vocab_and_merges = (folder / "vocab.json").exists() and (folder / "merges.txt").exists()
    if has_vocab_and_merges or is_bpe_tokenizer_json(folder):
        return BPETokenizer(folder)
    if (folder.parent / "tokenizer.model").exists():
        return model_file_tokenizer(folder.parent / "tokenizer.model")
    raise DataError(f"{folder}: expected tokenizer.model (here or in its parent), tokenizer.json "
                    f"or vocab.json + merges.txt, found none: point to the checkpoint folder that "
                    f"holds the tokenizer files")


def model_file_tokenizer(path):
    """Meta's Llama 3 tokenizer.model is tiktoken's text format; LLaMA 1/2's is a proto."""
    return TiktokenTokenizer(path) if is_tiktoken_file(path) else SentencePieceTokenizer(path)


def tokenizer_for(checkpoint_dir):
    """The tokenizer of a checkpoint folder; bytes for the random tiny presets, which have none
    (None)."""
    return ByteTokenizer() if checkpoint_dir is None else load_tokenizer(checkpoint_dir)



# -----------------------------------------------------------------------------
# Tasks: LLM-Adapters' JSON lists of {instruction, input, output, answer}

MATH_DATASETS = ["SVAMP", "AQuA", "AddSub", "MultiArith", "SingleEq", "gsm8k"]  # the paper's order
COMMONSENSE_DATASETS = ["ARC-Challenge", "ARC-Easy", "boolq", "winogrande", "piqa", "social_i_qa",
                        "openbookqa"]
TASKS = {  # name -> (training file, test sets, max new tokens at generation)
    "math": ("ft-training_set/math_data.json", MATH_DATASETS, 256),  # room for a worked answer
    "commonsense": ("ft-training_set/commonsense_15k.json", COMMONSENSE_DATASETS, 32),  # a keyword
}


def dataset_file(dataset):
    """A test file's path, both under data_dir and in the LLM-Adapters repository."""
    return f"dataset/{dataset}/test.json"


_TEXT = rule(str)
_ITEM_FIELDS = {key: rule(str, required=True)
                for key in ("instruction", "input", "output", "answer")}


def read_items(path):
    """One LLM-Adapters file as a list of dicts with string instruction/input/output/answer."""
    path = Path(path)
    if not path.exists():
        # files live at <data_dir>/dataset/NAME/test.json or <data_dir>/ft-training_set/X.json
        data_folders = ("dataset", "ft-training_set")
        data_dir = next((p.parent for p in path.parents if p.name in data_folders), path.parent)
        raise DataError(f'{path} not found: '
                        f'run "python data.py download --data_dir {data_dir}" first')
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except PermissionError:
        raise DataError(f"cannot read {path}: permission denied") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON at line {e.lineno} column {e.colno} ({e.msg}): "
                        f"delete it and download it again") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}): "
                        "delete it and download it again") from None
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a JSON list of items, found {type(items).__name__}: "
                        f"is this an LLM-Adapters file?")
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise DataError(f"{path}: item {index}: expected a dict, found {type(item).__name__}: "
                            f"fix or re-download the file")
        # an empty input may be left out (LLM-Adapters' files never do)
        item = {"input": "", **item}
        # every field a string of Unicode text (other fields too: the math split compares whole
        # records), the four known ones there
        rules = {key: _TEXT for key in item} | _ITEM_FIELDS
        checks.check_fields(f"{path}: item {index}", item, rules, DataError,
                            "fix or re-download the file")
        items[index] = item
    return items


@dataclass
class Task:
    """One of the paper's two benchmarks, read from LLM-Adapters' files."""
    name: str
    train: list | None  # training items; None when loaded with with_train=False
    test: dict  # dataset name -> test items, in the paper's table order
    max_new_tokens: int


def load_task(name, data_dir, datasets=None, with_train=True):
    """A task's training items and test sets; eval passes with_train=False."""
    if name not in TASKS:
        raise DataError(f"unknown task {name!r}: expected one of math, commonsense")
    train_file, all_datasets, max_new_tokens = TASKS[name]
    datasets = all_datasets if datasets is None else list(datasets)
    unknown = [d for d in datasets if d not in all_datasets]
    if unknown:
        raise DataError(f"unknown {name} dataset(s) {', '.join(unknown)}: "
                        f"expected some of {', '.join(all_datasets)}")
    datasets = [d for d in all_datasets if d in datasets]  # tables always in the paper's order
    data_dir = Path(data_dir)
    test = {d: read_items(data_dir / dataset_file(d)) for d in datasets}
    # a math answer that no number can equal is a broken file: say so now, not after generating
    for dataset, items in test.items():
        if dataset in MATH_DATASETS and dataset != "AQuA":
            for index, item in enumerate(items):
                where = f"{data_dir / dataset_file(dataset)}: item {index}"
                math_answer(dataset, item["answer"], where)
    # evaluation needs no commonsense training file; math needs its own to split off the tests
    train = read_items(data_dir / train_file) if with_train or name == "math" else None
    if name == "math":
        # math_data.json holds 80% of every full test set: the test split is what remains
        # (records equal as a whole; MultiArith has 10 duplicates, hence 110 not 120)
        def record(item):  # dicts are unhashable, sorted tuples are not
            return tuple(sorted(item.items()))
        seen = set(map(record, train))
        test = {d: [item for item in items if record(item) not in seen]
                for d, items in test.items()}
    return Task(name, train if with_train else None, test, max_new_tokens)


# -----------------------------------------------------------------------------
# The prompt (the same string in training and evaluation) and batching

PROMPT_HEADER = ("Below is an instruction that describes a task, paired with an input that "
                 "provides further context. Write a response that appropriately completes the "
                 "request.")


def generate_prompt(instruction, input="", output=""):
    """Training text when given the output; without it, the prompt the model continues."""
    input_section = f"### Input:\n{input}\n\n" if input else ""
    return (f"{PROMPT_HEADER}\n\n### Instruction:\n{instruction}\n\n"
            f"{input_section}### Response:\n{output}")


def tokenize_item(tokenizer, item, cutoff_len=256, train_on_inputs=True):
    """(input_ids, labels) of one training item; labels are -100 where no loss is taken."""
    text = generate_prompt(item["instruction"], item.get("input", ""), item["output"])
    input_ids = tokenizer.encode(text)[:cutoff_len]
    # EOS teaches the model to stop; a truncated text has no end, so it gets none
    if len(input_ids) < cutoff_len:
        input_ids.append(tokenizer.eos_id)
    labels = list(input_ids)
    if not train_on_inputs:
        # as LLM-Adapters: mask as many tokens as the prompt alone encodes to (BPE may merge
        # differently across the prompt/response boundary, so this count is approximate there)
        prompt = generate_prompt(item["instruction"], item.get("input", ""))
        prompt_len = len(tokenizer.encode(prompt))
        labels[:prompt_len] = [-100] * min(prompt_len, len(labels))
    return input_ids, labels


def truncation_note(examples, cutoff_len, eos_id):
    """One line saying how many training items cutoff_len cuts (None if none): a cut item has
    no EOS, so a run where most are cut never shows the model where an answer ends."""
    # tokenize_item appends EOS whenever it fits: a full-length item without it was cut
    cut = sum(len(ids) == cutoff_len and ids[-1] != eos_id for ids, _ in examples)
    if not cut:
        return None
    return (f"note: {cut:,} of {len(examples):,} training items ({cut / len(examples):.0%}) are "
            f"longer than --cutoff_len {cutoff_len} tokens and are cut there, without EOS: "
            "a larger --cutoff_len keeps more of them whole")


def collate(examples, pad_id):
    """Right-pad [(input_ids, labels), ...] for training: (input_ids, labels, attention_mask),
    each (B, T)."""
    lengths = torch.tensor([len(ids) for ids, _ in examples])  # (B,)
    T = int(lengths.max())
    input_ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), -100, dtype=torch.long)  # no loss on padding
    for row, (ids, item_labels) in enumerate(examples):
        input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[row, :len(item_labels)] = torch.tensor(item_labels, dtype=torch.long)
    attention_mask = torch.arange(T)[None, :] < lengths[:, None]  # (B, T), True on real tokens
    return input_ids, labels, attention_mask


# -----------------------------------------------------------------------------
# Scoring: LLM-Adapters' answer extraction, kept exactly so accuracies compare with the paper

KEYWORDS = {  # commonsense dataset -> the first match of this pattern is the prediction
    "boolq": r"true|false",
    "piqa": r"solution1|solution2",
    "winogrande": r"option1|option2",
    **dict.fromkeys(["ARC-Challenge", "ARC-Easy", "openbookqa", "social_i_qa"],
                    r"answer1|answer2|answer3|answer4|answer5"),
}


def extract_answer(dataset, response):
    """The prediction in a generated response: float (math), letter (AQuA), keyword; None if
    none."""
    if dataset in MATH_DATASETS and dataset != "AQuA":
        # the last number, commas removed ("1,000" -> 1000); "-?\d+\.?\d*" as LLM-Adapters
        numbers = re.findall(r"-?\d+\.?\d*", response.replace(",", ""))
        return float(numbers[-1]) if numbers else None
    if dataset == "AQuA":
        # the first capital A-E anywhere, so "A: ..." before the real answer reads as A
        letters = re.findall(r"A|B|C|D|E", response.strip())
        return letters[0] if letters else None
    if dataset in KEYWORDS:
        # case-sensitive, as LLM-Adapters: "True" is no boolq answer
        keywords = re.findall(KEYWORDS[dataset], response.strip())
        return keywords[0] if keywords else None
    known = ", ".join(MATH_DATASETS + COMMONSENSE_DATASETS)
    raise DataError(f"unknown dataset {dataset!r}: expected one of {known}")


def is_correct(dataset, response, answer):
    """LLM-Adapters' verdict: numbers within 0.001, letters and keywords equal; no answer is
    wrong."""
    prediction = extract_answer(dataset, response)
    if prediction is None:
        return False
    if isinstance(prediction, float):
        return abs(prediction - math_answer(dataset, answer)) <= 0.001
    return prediction == answer


def math_answer(dataset, answer, where=None):
    """A math test item's answer as a float; "nan", "inf" or "1e999" is a DataError: no
    prediction is ever within 0.001 of them, so the item could never be scored right."""
    try:
        value = float(answer)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value):
        raise DataError(f"{where or dataset}: answer {answer!r} is not a finite number: "
                        "fix or re-download the test file")
    return value


def main(argv=None):
    # the download code imports this module as `data`: run as a script, this file is `__main__`,
    # and its DataError is another class than the one the download code raises
    from machinery.download import BASE_URL, DataError as DownloadError, download

    parser = runs.OneLineParser(description="Fetch the LLM-Adapters data files the tasks use.")
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("download", help="download the training and test files")
    fetch.add_argument("--data_dir", default="data",
                       help="where to put dataset/ and ft-training_set/ (default: data)")

    fetch.add_argument("--task", default="all", choices=["math", "commonsense", "all"],
                       help="which task's training and test files (default: all)")
    fetch.add_argument("--base_url", default=BASE_URL,
                       help="the repository at commit 8166572: a URL, or a local copy (a "
                       "folder, or a file:// URL) laid out as the repository is")
    fetch.add_argument("--timeout", type=runs.float_flag, default=60,
                       help="seconds to wait for the server (default: 60)")

    def command(argv):
        args = parser.parse_args(argv)
        download(args.data_dir, args.task, args.base_url, args.timeout)
    runs.run_command(command, argv, errors=(DataError, DownloadError))


if __name__ == "__main__":
    main()
