"""Everything between the raw files and the model: tokenizers, the LLM-Adapters tasks,
the prompt, batching, and the answer scoring the paper's tables use.

    python data.py download --data_dir data [--task math|commonsense|all]

The tokenizers need no third-party tokenizer library: LLaMA goes through sentencepiece,
GPT-J through a GPT-2 byte-level BPE written below that gives the reference ids.
"""
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

from machinery import runs


class DataError(ValueError):
    """Bad input files or names; the message is one line: expected, found, what to do."""


# -----------------------------------------------------------------------------
# Tokenizers. Each has vocab_size, bos_id, eos_id, pad_id, add_bos, encode, decode.

class SentencePieceTokenizer:
    """LLaMA's tokenizer: a sentencepiece model, BOS/EOS ids taken from the model itself."""

    def __init__(self, model_file):
        self.processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        self.vocab_size = self.processor.get_piece_size()
        self.bos_id = self.processor.bos_id()
        self.eos_id = self.processor.eos_id()
        # LLaMA has no pad piece (pad_id() is -1); LLM-Adapters pads it with id 0 (unk)
        pad_id = self.processor.pad_id()
        self.pad_id = pad_id if pad_id >= 0 else 0
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
def gpt2_pretokenizer():
    """The compiled GPT-2 pattern; built once, on first use (~0.1 s over all code points)."""
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
    return re.compile(
        rf"'s|'t|'re|'ve|'m|'ll|'d| ?[{letters}]+| ?[{numbers}]+| ?[^{space}{letters}{numbers}]+"
        rf"|[{space}]+(?![^{space}])|[{space}]+")


def bytes_to_unicode():
    """GPT-2's byte -> printable character table: BPE tokens are strings of these characters."""
    # printable Latin-1 bytes stand for themselves; the rest (controls, space, ...) are
    # shifted to 256+ so that no token contains whitespace or control characters
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + shifted)
            shifted += 1
    return table


class BPETokenizer:
    """GPT-2 / GPT-J byte-level BPE from vocab.json + merges.txt (+ added tokens)."""

    def __init__(self, folder):
        folder = Path(folder)
        if (folder / "vocab.json").exists():
            self.token_to_id = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
            lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
            merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
        else:  # transformers 5 saves only tokenizer.json, which holds the same vocabulary and merges
            bpe = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]
            self.token_to_id = bpe["vocab"]
            merges = [tuple(m.split(" ") if isinstance(m, str) else m) for m in bpe["merges"]]
        self.merge_rank = {pair: rank for rank, pair in enumerate(merges)}
        self.byte_to_char = bytes_to_unicode()
        self.char_to_byte = {c: b for b, c in self.byte_to_char.items()}
        # check once here so that encode() can never meet a symbol outside the vocabulary
        symbols = [*self.byte_to_char.values(), *("".join(pair) for pair in merges)]
        missing = [s for s in symbols if s not in self.token_to_id]
        if any(len(pair) != 2 for pair in merges) or missing:
            raise DataError(f"{folder}: expected a byte-level BPE (every byte and merge result in vocab.json, "
                            f"'a b' lines in merges.txt), found {len(missing)} missing symbols such as "
                            f"{missing[:3]}: use the vocab.json and merges.txt saved together with the model")
        self.id_to_token = {i: t for t, i in self.token_to_id.items()}
        self.added = read_added_tokens(folder)
        # <|endoftext|> is GPT-2's only special token: BOS, EOS and (as in LLM-Adapters) pad
        eot = "<|endoftext|>"
        if eot not in self.added and eot in self.token_to_id:
            self.added[eot] = dict(id=self.token_to_id[eot], lstrip=False, rstrip=False,
                                   single_word=False, normalized=False)
        if eot not in self.added:
            raise DataError(f"{folder}: expected the token {eot} in vocab.json or the added tokens, "
                            f"found none: is this a GPT-2/GPT-J tokenizer folder?")
        self.bos_id = self.eos_id = self.pad_id = self.added[eot]["id"]
        self.add_bos = False  # GPT-J's tokenizer adds no BOS
        self.id_to_added = {spec["id"]: content for content, spec in self.added.items()}
        self.vocab_size = 1 + max(*self.id_to_token, *self.id_to_added)
        # like the reference, first split on tokens matched in the raw text (normalized=False),
        # then on the rest; with leftmost-longest matching (longer alternatives first)
        self.added_patterns = []
        for raw in (True, False):
            contents = [c for c, spec in self.added.items() if (not spec["normalized"]) == raw]
            contents.sort(key=len, reverse=True)
            if contents:
                self.added_patterns.append(re.compile("|".join(map(re.escape, contents))))
        self.cache = {}  # word -> ids: text repeats words, BPE per word is the slow part

    def bpe(self, word):
        """Ids of one pre-tokenized word, merging the lowest-ranked adjacent pair first."""
        if word in self.cache:
            return self.cache[word]
        parts = [self.byte_to_char[b] for b in word.encode("utf-8")]
        # start from single bytes; a merge's rank is its line in merges.txt (lower merges first)
        while len(parts) > 1:
            pairs = list(zip(parts, parts[1:]))
            best = min(pairs, key=lambda pair: self.merge_rank.get(pair, float("inf")))
            if best not in self.merge_rank:  # no adjacent pair has a merge: done
                break
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
        # added tokens are cut out first, so "<|endoftext|>" in text is one token, never BPE'd
        pieces = [(text, None)]
        for pattern in self.added_patterns:
            pieces = [out for piece, i in pieces
                      for out in ([(piece, i)] if i is not None else self.split_added(piece, pattern))]
        ids = [self.bos_id] if bos else []
        for piece, added_id in pieces:
            if added_id is not None:
                ids.append(added_id)
                continue
            # BPE never merges across words: "Ġthe" can form, "eĠt" cannot
            for word in gpt2_pretokenizer().findall(piece):
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
                raise DataError(f"token id {i} is outside this vocabulary (0..{self.vocab_size - 1}): "
                                f"does the model match the tokenizer?")
        return data.decode("utf-8", errors="replace")


def read_added_tokens(folder):
    """{content: {id, lstrip, rstrip, single_word, normalized}} from the files transformers writes."""
    added = {}
    # the reference's defaults for a token that gives no flags (added_tokens.json gives none)
    defaults = dict(lstrip=False, rstrip=False, single_word=False, normalized=True)

    def add(content, token_id, spec):
        added[content] = {**defaults, **{k: spec[k] for k in defaults if k in spec}, "id": int(token_id)}

    # later files describe the same tokens more fully, so they win
    path = folder / "added_tokens.json"  # {content: id}, GPT-J's hub layout
    if path.exists():
        for content, token_id in json.loads(path.read_text(encoding="utf-8")).items():
            add(content, token_id, {})
    path = folder / "tokenizer_config.json"  # "added_tokens_decoder": {id: {content, flags}}
    if path.exists():
        for token_id, spec in json.loads(path.read_text(encoding="utf-8")).get("added_tokens_decoder", {}).items():
            add(spec["content"], token_id, spec)
    path = folder / "tokenizer.json"  # "added_tokens": [{id, content, flags}]
    if path.exists():
        for spec in json.loads(path.read_text(encoding="utf-8")).get("added_tokens", []):
            add(spec["content"], spec["id"], spec)
    return added


def is_bpe_tokenizer_json(folder):
    path = folder / "tokenizer.json"
    return path.exists() and json.loads(path.read_text(encoding="utf-8")).get("model", {}).get("type") == "BPE"


def load_tokenizer(folder):
    """The tokenizer of a checkpoint folder: sentencepiece for LLaMA, byte-level BPE for GPT-J."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"tokenizer folder {folder} not found: pass the folder of the checkpoint")
    # the folder's own files first; Meta's LLaMA download keeps tokenizer.model one level up
    if (folder / "tokenizer.model").exists():
        return SentencePieceTokenizer(folder / "tokenizer.model")
    if (folder / "vocab.json").exists() and (folder / "merges.txt").exists() or is_bpe_tokenizer_json(folder):
        return BPETokenizer(folder)
    if (folder.parent / "tokenizer.model").exists():
        return SentencePieceTokenizer(folder.parent / "tokenizer.model")
    raise DataError(f"{folder}: expected tokenizer.model (here or in its parent) or vocab.json + merges.txt, "
                    f"found neither: point to the checkpoint folder that holds the tokenizer files")


def tokenizer_for(checkpoint_dir):
    """The tokenizer of a checkpoint folder; bytes for the random tiny presets, which have none (None)."""
    return ByteTokenizer() if checkpoint_dir is None else load_tokenizer(checkpoint_dir)



# -----------------------------------------------------------------------------
# Tasks: LLM-Adapters' JSON lists of {instruction, input, output, answer}

MATH_DATASETS = ["SVAMP", "AQuA", "AddSub", "MultiArith", "SingleEq", "gsm8k"]  # paper's table order
COMMONSENSE_DATASETS = ["ARC-Challenge", "ARC-Easy", "boolq", "winogrande", "piqa", "social_i_qa", "openbookqa"]
TASKS = {  # name -> (training file, test sets, max new tokens at generation: room for a worked answer, or a keyword)
    "math": ("ft-training_set/math_data.json", MATH_DATASETS, 256),
    "commonsense": ("ft-training_set/commonsense_15k.json", COMMONSENSE_DATASETS, 32),
}


def dataset_file(dataset):
    """A test file's path, both under data_dir and in the LLM-Adapters repository."""
    return f"dataset/{dataset}/test.json"


def read_items(path):
    """One LLM-Adapters file as a list of dicts with string instruction/input/output/answer."""
    path = Path(path)
    if not path.exists():
        # files live at <data_dir>/dataset/NAME/test.json or <data_dir>/ft-training_set/X.json
        data_dir = next((p.parent for p in path.parents if p.name in ("dataset", "ft-training_set")), path.parent)
        raise DataError(f'{path} not found: run "python data.py download --data_dir {data_dir}" first')
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except PermissionError:
        raise DataError(f"cannot read {path}: permission denied") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON at line {e.lineno} column {e.colno} ({e.msg}): "
                        f"delete it and download it again") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}): delete it and download it again") from None
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a JSON list of items, found {type(items).__name__}: "
                        f"is this an LLM-Adapters file?")
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise DataError(f"{path}: item {index}: expected a dict, found {type(item).__name__}: "
                            f"fix or re-download the file")
        item = {"input": "", **item}  # an empty input may be left out (LLM-Adapters' files never do)
        bad = [f"{k} missing" if k not in item else f"{k} is {type(item[k]).__name__}"
               for k in ("instruction", "input", "output", "answer") if not isinstance(item.get(k), str)]
        if bad:
            raise DataError(f"{path}: item {index}: expected string instruction, input, output and answer, "
                            f"found {', '.join(bad)}: fix or re-download the file")
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
        raise DataError(f"unknown {name} dataset(s) {', '.join(unknown)}: expected some of {', '.join(all_datasets)}")
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
        seen = {tuple(sorted(item.items())) for item in train}  # dicts are unhashable, sorted tuples are not
        test = {d: [item for item in items if tuple(sorted(item.items())) not in seen] for d, items in test.items()}
    return Task(name, train if with_train else None, test, max_new_tokens)


# -----------------------------------------------------------------------------
# The prompt (the same string in training and evaluation) and batching

PROMPT_HEADER = ("Below is an instruction that describes a task, paired with an input that provides "
                 "further context. Write a response that appropriately completes the request.")


def generate_prompt(instruction, input="", output=""):
    """Training text when given the output; without it, the prompt the model continues."""
    input_section = f"### Input:\n{input}\n\n" if input else ""
    return f"{PROMPT_HEADER}\n\n### Instruction:\n{instruction}\n\n{input_section}### Response:\n{output}"


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
        prompt_len = len(tokenizer.encode(generate_prompt(item["instruction"], item.get("input", ""))))
        labels[:prompt_len] = [-100] * min(prompt_len, len(labels))
    return input_ids, labels


def collate(examples, pad_id):
    """Right-pad [(input_ids, labels), ...] for training: (input_ids, labels, attention_mask), each (B, T)."""
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
    """The prediction in a generated response: float (math), letter (AQuA), keyword; None if none."""
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
    raise DataError(f"unknown dataset {dataset!r}: expected one of {', '.join(MATH_DATASETS + COMMONSENSE_DATASETS)}")


def is_correct(dataset, response, answer):
    """LLM-Adapters' verdict: numbers within 0.001, letters and keywords equal; no answer is wrong."""
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
    from machinery.download import BASE_URL, download  # the download code (it imports this module)

    parser = runs.OneLineParser(description="Fetch the LLM-Adapters data files the tasks use.")
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("download", help="download the training and test files")
    fetch.add_argument("--data_dir", default="data", help="where to put dataset/ and ft-training_set/ (default: data)")
    fetch.add_argument("--task", default="all", choices=["math", "commonsense", "all"],
                       help="which task's training and test files (default: all)")
    fetch.add_argument("--base_url", default=BASE_URL, help="a copy of the repository at commit 8166572")
    fetch.add_argument("--timeout", type=runs.float_flag, default=60,
                       help="seconds to wait for the server (default: 60)")

    def command(argv):
        args = parser.parse_args(argv)
        download(args.data_dir, args.task, args.base_url, args.timeout)
    runs.run_command(command, argv, errors=(DataError,))


if __name__ == "__main__":
    main()
