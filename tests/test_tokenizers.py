"""Our tokenizers against the references: Hugging Face / `tokenizers` for GPT-2's byte-level
BPE, sentencepiece itself for LLaMA, with the real vocabularies in ../shared/data."""
import base64
import json
import random
import shutil
import unicodedata

import pytest
import sentencepiece

from conftest import shared_path
from data import (LLAMA3_PATTERN, LLAMA3_SPECIALS, QWEN2_PATTERN, BPETokenizer, ByteTokenizer,
                  DataError, SentencePieceTokenizer, TiktokenTokenizer, bytes_to_unicode,
                  generate_prompt, gpt2_pretokenizer, load_tokenizer, split_pretokenizer)


# Texts chosen for the places where a GPT-2 tokenizer usually goes wrong.
CORPUS = [
    "Hello world", "", " ", "  ", "\n", "\n\n  \n", "a\n\nb", "trailing spaces   ", "   leading",
    "tabs\tand\t\ttabs", "x \t y", "line\r\nbreak", "mixed \n\t \n end", "one  two   three    four",
    "it's", "they're we've I'm you'll he'd don't", "IT'S THEY'RE I'M", "O'Neil's", "'s 't", "it’s curly’s",
    "1,000.50", "3.14159", "2024-01-02", "x²+y½ Ⅻ ⅷ ① ٣ ५ 〇", "version 1.2.3-beta+exp", "-42 +7 1e-9",
    "café naïve résumé", unicodedata.normalize("NFD", "café naïve résumé"), "Ångström Øre ß ẞ",
    "e\u0301 a\u0308\u0323 n\u0303", "日本語のテキスト、中文字符。한국어 문장", "全角　スペース",
    "emoji 😀🎉 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 🇫🇷🇯🇵", "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया", "สวัสดีชาวโลก",
    "Привет, мир!", "Γειά σου Κόσμε", "control\x00\x01\x1c\x1d\x1e\x1f\x7f chars", "nbsp\u00a0here",
    "zero\u200bwidth\u200djoiner\u2060", "line\u2028sep\u2029para", "ogham\u1680space", "\u3000ideographic",
    "tab\x0bvt\x0cff", "next\x85line", "___ --- *** !!! ??? ...", "<|endoftext|> is text here", "a<|endoftext|>b",
    "```python\ndef f(x):\n    return x  # comment\n```", "{\"json\": [1, 2.5, null]}", "https://example.com/a?b=c&d=e",
]
RANDOM_SEED = 1234


def random_texts(n, rng):
    """Strings spliced from pieces of the corpus and odd characters, so that they meet in new ways."""
    pieces = [p for text in CORPUS for p in text.split(" ")] + [" ", "  ", "\n", "'", "’", "\u0301", "\u200d", "\x1c"]
    return ["".join(rng.choice(pieces) + rng.choice(["", " ", "  ", "\n", "'s", "1"])
                    for _ in range(rng.randint(1, 12))) for _ in range(n)]


def llm_adapters_texts():
    """Real prompts: a few items of every shared LLM-Adapters file, in the training format."""
    texts = []
    for path in sorted(shared_path("llm-adapters", "dataset").glob("*/test.json")):
        for item in json.loads(path.read_text())[:3]:
            texts.append(generate_prompt(item["instruction"], item["input"], item["output"]))
    return texts


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")  # only the comparisons need it


@pytest.fixture(scope="module")
def gpt2_folder():
    return shared_path("gpt2-tokenizer")


@pytest.fixture(scope="module")
def gpt2_reference(gpt2_folder, transformers):
    reference = transformers.GPT2TokenizerFast.from_pretrained(str(gpt2_folder))
    # the reference itself must be the real GPT-2 vocabulary, or the comparisons prove nothing
    assert reference.encode("Hello world") == [15496, 995]
    return reference


@pytest.fixture(scope="module")
def gpt2_ours(gpt2_folder):
    return BPETokenizer(gpt2_folder)


def assert_same_ids(ours, reference, texts, round_trip=True):
    for text in texts:
        ids = ours.encode(text)
        assert ids == reference.encode(text, add_special_tokens=False), repr(text)
        assert ours.decode(ids) == text or not round_trip, repr(text)
        assert ours.decode(ids) == reference.decode(ids, clean_up_tokenization_spaces=False), repr(text)


# -----------------------------------------------------------------------------
# GPT-2 byte-level BPE

def test_gpt2_bpe_matches_reference(gpt2_ours, gpt2_reference):
    assert gpt2_ours.encode("Hello world") == [15496, 995]
    assert (gpt2_ours.vocab_size, gpt2_ours.eos_id, gpt2_ours.bos_id, gpt2_ours.pad_id) == (50257, 50256, 50256, 50256)
    assert gpt2_ours.add_bos is False and gpt2_ours.encode("hi", eos=True)[-1] == 50256
    texts = CORPUS + llm_adapters_texts() + random_texts(300, random.Random(RANDOM_SEED))
    assert_same_ids(gpt2_ours, gpt2_reference, texts)


def test_gpt2_pretokenizer_classifies_every_character_like_reference(gpt2_reference):
    # Each character sits between a letter and a digit, so where the words split tells
    # whether the character is a letter, a number, whitespace or other. We take every
    # character whose category differs from a neighbour's (the edges of each Unicode
    # run) plus every 11th one, leaving out unassigned, private-use and surrogate points.
    categories = [unicodedata.category(chr(code)) for code in range(0x110000)] + ["Cn"]
    codes = [code for code in range(0x110000) if categories[code] not in ("Cn", "Co", "Cs") and
             (code % 11 == 0 or not categories[code - 1] == categories[code] == categories[code + 1])]
    text = "".join("a" + chr(code) + "1." for code in codes)
    byte_to_char = bytes_to_unicode()
    ours = ["".join(byte_to_char[b] for b in word.encode("utf-8")) for word in gpt2_pretokenizer().findall(text)]
    reference = [word for word, _ in gpt2_reference.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)]
    assert ours == reference


def test_gpt2_tricky_characters_one_by_one(gpt2_ours, gpt2_reference):
    # \x1c-\x1f are whitespace to Python's \s but not to Unicode; ² ½ Ⅻ are numbers not \d
    tricky = "²½Ⅻ٣\u0301\u0903\x1c\x1d\x1e\x1f\xa0\u3000\u2003\u200b\u200d\u2060\ufeff_"
    texts = [f"{left}{c}{right}" for c in tricky for left, right in [("a", "b"), (" ", " "), ("1", "2"), ("", "  x")]]
    assert_same_ids(gpt2_ours, gpt2_reference, texts)


def write_gptj_folder(folder, gpt2_folder):
    """GPT-J's hub layout: GPT-2's files, 143 added <|extratoken_i|> (ids 50257..50399)."""
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(gpt2_folder / name, folder / name)
    extra = {f"<|extratoken_{i}|>": 50256 + i for i in range(1, 144)}
    (folder / "added_tokens.json").write_text(json.dumps(extra))
    config = dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                  add_prefix_space=False, model_max_length=2048, tokenizer_class="GPT2Tokenizer")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


ADDED_TOKEN_TEXTS = [
    "<|extratoken_1|>", "a<|extratoken_1|>b", "a <|extratoken_12|> b", "x  <|extratoken_2|>\n\ny",
    "<|endoftext|><|extratoken_143|><|extratoken_14|>", "<|extratoken_1|><|extratoken_10|><|extratoken_100|>",
    "<|extratoken_144|> is not one", "half <|extratoken_ 1|> and <|endoftext|", "é<|extratoken_5|>日本",
]


def test_gptj_added_tokens_match_reference(tmp_path, gpt2_folder, transformers):
    write_gptj_folder(tmp_path, gpt2_folder)
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    ours = load_tokenizer(tmp_path)
    assert isinstance(ours, BPETokenizer)
    assert ours.vocab_size == len(reference) == 50400
    assert ours.encode("<|extratoken_143|>") == [50399]
    assert_same_ids(ours, reference, ADDED_TOKEN_TEXTS + CORPUS[:20])


def test_added_token_flags_as_transformers_saves_them(tmp_path, gpt2_folder, transformers):
    # transformers 5 saves tokenizer.json + tokenizer_config.json; vocab.json and merges.txt come from GPT-2
    AddedToken = transformers.AddedToken
    source = transformers.GPT2TokenizerFast.from_pretrained(str(gpt2_folder))
    source.add_tokens([AddedToken("<L>", lstrip=True), AddedToken("<R>", rstrip=True),
                       AddedToken("<LR>", lstrip=True, rstrip=True), AddedToken("[W]", single_word=True),
                       AddedToken("abc", normalized=False), AddedToken("xt|>"), AddedToken("<|extra|>"),
                       AddedToken("<x>"), AddedToken("<x><y>")])
    special = AddedToken("<sp>", lstrip=True, rstrip=True, normalized=False)
    source.add_special_tokens({"additional_special_tokens": [special]})
    source.save_pretrained(str(tmp_path))
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(gpt2_folder / name, tmp_path / name)
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    ours = BPETokenizer(tmp_path)
    texts = ["x <L> y", "x  <R>  y", " \t<LR>\n z", "a[W]b", "a [W] b", "[W]", "xabcx ab", "q <sp>  r",
             "te<|endoftext|>xt|>", "\u3000<L>\u00a0<R>\u2003", "<L><L>  <R>   <R>", "<|extra|><|endoftext|>",
             "<x><y><x> <x><y>"]  # the longest added token wins
    # tokens that strip whitespace lose it: decode can only agree with the reference
    assert_same_ids(ours, reference, texts, round_trip=False)


def test_folder_with_only_tokenizer_json(tmp_path, gpt2_folder, transformers):
    # what transformers 5 saves for GPT-2 / GPT-J: no vocab.json or merges.txt, all in tokenizer.json
    source = transformers.GPT2TokenizerFast.from_pretrained(str(gpt2_folder))
    source.add_tokens(["<|extratoken_1|>"])
    source.save_pretrained(str(tmp_path))
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).unlink(missing_ok=True)
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    ours = load_tokenizer(tmp_path)
    assert isinstance(ours, BPETokenizer) and ours.vocab_size == len(reference)
    assert_same_ids(ours, reference, CORPUS + ["a<|extratoken_1|>b"])


def test_added_tokens_from_tokenizer_config(tmp_path, gpt2_folder, transformers):
    # the transformers 4 layout: flags in tokenizer_config.json's added_tokens_decoder
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(gpt2_folder / name, tmp_path / name)
    flags = dict(single_word=False, special=False)
    decoder = {"50256": dict(content="<|endoftext|>", lstrip=False, rstrip=False, normalized=False, **flags),
               "50257": dict(content="<|x|>", lstrip=True, rstrip=True, normalized=False, **flags)}
    config = dict(tokenizer_class="GPT2Tokenizer", added_tokens_decoder=decoder)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    texts = ["a <|x|> b", "a<|x|>b", " <|x|><|endoftext|> "]
    assert_same_ids(BPETokenizer(tmp_path), reference, texts, round_trip=False)


def test_bpe_trained_by_tokenizers_library(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers
    reference = tokenizers.Tokenizer(models.BPE())
    reference.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    reference.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    rng = random.Random(RANDOM_SEED)
    reference.train_from_iterator(CORPUS[::2] * 5 + random_texts(400, rng), trainer)
    reference.model.save(str(tmp_path))  # vocab.json + merges.txt
    ours = BPETokenizer(tmp_path)
    assert len(ours.merge_rank) > 100  # it really learned merges
    for text in CORPUS[1::2] + random_texts(200, rng) + ["x<|endoftext|>y"]:  # held out
        ids = ours.encode(text)
        assert ids == reference.encode(text).ids, repr(text)
        assert ours.decode(ids) == text


# -----------------------------------------------------------------------------
# Llama 3 and Qwen2: tokenizer.json with a Split pattern, and Meta's tiktoken tokenizer.model

# where the Llama 3 / Qwen2 pattern differs from GPT-2's: case-insensitive contractions (and
# the characters that fold to s and k), digit runs, a letter glued to one symbol, \r\n runs
HARD_TEXTS = [
    "DON'T I'LL WE'VE SHE'D THEY'RE IT'S I'M", "It'S wE'Ve", "'ſ 'K 'ſt", "12345678901 1234 12",
    "٣٤٥٦٧ ١٢ x²½³ ⅷⅸ", "$100,000.00 + 3.14159e-10", "(a)[b]{c} .x ,y !z", "a\r\n\r\nb\r\n",
    "\r\r\n\n \r\n  x", "tab\t\tx\t \ty", "spaces     five\n    four", "   \n", "\n   ",
    "中文字符，标点。日本語のテキスト", "مرحبا بالعالم ١٢٣", "नमस्ते दुनिया", "e\u0301\u0301 a\u0308\u0323",
    unicodedata.normalize("NFD", "Ångström café"), "emoji 😀🎉 👍🏽 👨‍👩‍👧‍👦 🇫🇷", "!!!\n\n???\r\n",
    "<|begin_of_text|>Hi<|eot_id|>", "<|start_header_id|>user<|end_header_id|>\n\nHi?<|eot_id|>",
    "x<|end_of_text|>y <|reserved_special_token_250|> <|eot_id|",  # 250: not a special
    "<|im_start|>user\nhi<|im_end|>\n",
    "a<|endoftext|>b",
]
QWEN2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def test_split_patterns_classify_like_tokenizers():
    tokenizers = pytest.importorskip("tokenizers")
    text = "".join(HARD_TEXTS + CORPUS) + "".join("a" + chr(c) + "1" for c in range(0, 0x3000, 7))
    for pattern in (LLAMA3_PATTERN, QWEN2_PATTERN):
        split = tokenizers.pre_tokenizers.Split(tokenizers.Regex(pattern), behavior="isolated")
        reference = [word for word, _ in split.pre_tokenize_str(text)]
        assert split_pretokenizer(pattern).findall(text) == reference


def train_split_bpe(pattern, specials, normalizer=None):
    """A real tokenizer.json as Llama 3 / Qwen2 ship it, trained by `tokenizers` itself."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    reference = Tokenizer(models.BPE(ignore_merges=pattern == LLAMA3_PATTERN))
    reference.normalizer = normalizer and normalizers.NFC()
    reference.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    reference.decoder = decoders.ByteLevel()
    # no specials in training: the base ids are 0..n-1, as tiktoken ranks are; specials after
    trainer = trainers.BpeTrainer(vocab_size=900, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    rng = random.Random(RANDOM_SEED)
    reference.train_from_iterator(CORPUS[::2] * 5 + HARD_TEXTS[::2] * 5 + random_texts(400, rng),
                                  trainer)
    reference.add_special_tokens(specials)
    return reference


@pytest.fixture(scope="module")
def llama3_folder(tmp_path_factory):
    pytest.importorskip("tokenizers")
    from tokenizers import processors
    folder = tmp_path_factory.mktemp("llama3")
    reference = train_split_bpe(LLAMA3_PATTERN, LLAMA3_SPECIALS)
    bos = reference.token_to_id("<|begin_of_text|>")
    reference.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
        special_tokens=[("<|begin_of_text|>", bos)])
    reference.save(str(folder / "tokenizer.json"))
    # Llama 3.1 Instruct's files: eos is the end of turn, generation stops on three ids
    config = dict(tokenizer_class="PreTrainedTokenizerFast", bos_token="<|begin_of_text|>",
                  eos_token="<|eot_id|>")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    generation = dict(eos_token_id=[bos + 1, bos + 8, bos + 9])
    (folder / "generation_config.json").write_text(json.dumps(generation))
    return folder


def held_out_texts():
    return HARD_TEXTS + CORPUS + random_texts(150, random.Random(RANDOM_SEED + 1))


def test_llama3_tokenizer_json_matches_tokenizers(llama3_folder):
    tokenizers = pytest.importorskip("tokenizers")
    reference = tokenizers.Tokenizer.from_file(str(llama3_folder / "tokenizer.json"))
    ours = load_tokenizer(llama3_folder)
    assert isinstance(ours, BPETokenizer) and ours.ignore_merges and len(ours.merge_rank) > 300
    base = reference.token_to_id("<|begin_of_text|>")
    assert ours.vocab_size == reference.get_vocab_size() == base + 256
    for text in held_out_texts():
        ids = ours.encode(text)
        assert ids == reference.encode(text).ids and ids[0] == base, repr(text)  # template's BOS
        body = reference.encode(text, add_special_tokens=False).ids
        assert ours.encode(text, bos=False, eos=True) == body + [ours.eos_id]
        assert ours.decode(body) == text == reference.decode(body, skip_special_tokens=False)


def test_llama3_special_ids_as_transformers_reads_them(llama3_folder, transformers):
    reference = transformers.AutoTokenizer.from_pretrained(str(llama3_folder))
    ours = load_tokenizer(llama3_folder)
    base = ours.vocab_size - 256
    assert (ours.bos_id, ours.eos_id) == (reference.bos_token_id, reference.eos_token_id)
    assert (ours.bos_id, ours.eos_id) == (base, base + 9)
    assert reference.pad_token_id is None and ours.pad_id == ours.eos_id  # no pad token: EOS pads
    assert ours.add_bos and ours.stop_ids == [base + 9, base + 8, base + 1]
    text = "<|start_header_id|>user<|end_header_id|>\n\nHow many? 12345<|eot_id|>"
    assert ours.encode(text) == reference.encode(text)


def test_qwen2_tokenizer_json_matches_tokenizers(tmp_path, transformers):
    tokenizers = pytest.importorskip("tokenizers")
    reference = train_split_bpe(QWEN2_PATTERN, QWEN2_SPECIALS, normalizer="NFC")
    reference.save(str(tmp_path / "tokenizer.json"))
    config = dict(tokenizer_class="PreTrainedTokenizerFast", bos_token=None,
                  eos_token="<|endoftext|>", pad_token="<|endoftext|>", add_bos_token=False)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    eot, im_end = reference.token_to_id("<|endoftext|>"), reference.token_to_id("<|im_end|>")
    (tmp_path / "config.json").write_text(json.dumps(dict(eos_token_id=eot)))
    ours = load_tokenizer(tmp_path)
    assert ours.normalize is not None and not ours.ignore_merges
    for text in held_out_texts() + ["123456", "café"]:
        ids = ours.encode(text)
        assert ids == reference.encode(text).ids, repr(text)
        # NFC: decoding gives the composed text, as the reference's does
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=False), repr(text)
    assert ours.encode("2024") == [reference.token_to_id(d) for d in "2024"]  # single digits
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert (ours.bos_id, hf.bos_token_id, ours.add_bos) == (None, None, False)
    assert (ours.eos_id, ours.pad_id) == (hf.eos_token_id, hf.pad_token_id) == (eot, eot)
    assert ours.stop_ids == [eot, im_end] and ours.encode("x", eos=True)[-1] == eot


# a word no merges reach: tiktoken looks a word up whole before it merges bytes
UNREACHABLE = b"zqxjzqxj"


def write_tiktoken_file(path, reference):
    """The tokenizer.json's base vocabulary as Meta writes tokenizer.model: base64 bytes, rank,
    plus one token that only the whole-word lookup finds."""
    char_to_byte = {c: b for b, c in bytes_to_unicode().items()}
    vocab = {t: i for t, i in reference.get_vocab(with_added_tokens=False).items()}
    ranks = {bytes(char_to_byte[c] for c in token): i for token, i in vocab.items()}
    assert UNREACHABLE not in ranks and b"zq" not in ranks
    ranks[UNREACHABLE] = len(ranks)
    assert sorted(ranks.values()) == list(range(len(ranks)))  # dense, as tiktoken's are
    lines = [f"{base64.b64encode(token).decode()} {rank}" for token, rank in
             sorted(ranks.items(), key=lambda item: item[1])]
    path.write_text("\n".join(lines) + "\n")
    return ranks


def test_tiktoken_tokenizer_model_matches_tiktoken(tmp_path, llama3_folder):
    tiktoken = pytest.importorskip("tiktoken")
    tokenizers = pytest.importorskip("tokenizers")
    reference_json = tokenizers.Tokenizer.from_file(str(llama3_folder / "tokenizer.json"))
    ranks = write_tiktoken_file(tmp_path / "tokenizer.model", reference_json)
    specials = {t: len(ranks) + i for i, t in enumerate(LLAMA3_SPECIALS)}
    reference = tiktoken.Encoding("llama3-tiny", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                  special_tokens=specials)
    (tmp_path / "original").mkdir()  # Meta's layout names no configs: the defaults must hold
    ours = load_tokenizer(tmp_path / "original")
    assert isinstance(ours, TiktokenTokenizer)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (len(ranks), len(ranks) + 1, len(ranks) + 1)
    assert ours.stop_ids == [len(ranks) + 1, len(ranks) + 9, len(ranks) + 8]
    assert ours.vocab_size == reference.n_vocab == len(ranks) + 256
    # Meta's ids (128000 + i): 128001 end of text, 128006/7 headers, 128008 eom, 128009 eot
    named = {t: i - len(ranks) for t, i in specials.items() if "reserved" not in t}
    assert [named[t] for t in ("<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                               "<|eom_id|>", "<|eot_id|>", "<|python_tag|>")] == [1, 6, 7, 8, 9, 10]
    assert ours.encode(UNREACHABLE.decode(), bos=False) == [len(ranks) - 1]
    for text in held_out_texts() + ["a zqxjzqxj zqxjzqxjs"]:
        ids = ours.encode(text, bos=False)
        assert ids == reference.encode(text, allowed_special="all"), repr(text)
        assert ours.decode(ids) == text == reference.decode(ids), repr(text)
        assert ours.encode(text)[0] == len(ranks)
    # Meta's real ranks are the ones the tokenizer.json was converted from, so the two agree
    # wherever the trained merges are what the ranks imply (most words); at least here:
    for text in ["Hello world", "it's 2024", "日本語"]:  # (no "zqxj" here)
        json_ids = reference_json.encode(text, add_special_tokens=False).ids
        assert ours.encode(text, bos=False) == json_ids


def test_tokenizer_json_refusals(tmp_path, llama3_folder):
    spec = json.loads((llama3_folder / "tokenizer.json").read_text())
    changes = {
        "pattern": lambda s: s["pre_tokenizer"]["pretokenizers"][0]["pattern"].update(
            Regex=r"\w+|\s+"),
        "Metaspace": lambda s: s.update(pre_tokenizer=dict(type="Metaspace", replacement="▁")),
        "NFKC": lambda s: s.update(normalizer=dict(type="NFKC")),
        "WordPiece": lambda s: s["model"].update(type="WordPiece"),
        "Removed": lambda s: s["pre_tokenizer"]["pretokenizers"][0].update(behavior="Removed"),
    }
    for found, change in changes.items():
        broken = json.loads(json.dumps(spec))
        change(broken)
        (tmp_path / "tokenizer.json").write_text(json.dumps(broken))
        with pytest.raises(DataError) as error:
            BPETokenizer(tmp_path)
        message = str(error.value)
        assert found in message and "expected" in message and "\n" not in message, message
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "tokenizer.model").write_text("aGk= 0\nbroken\n")
    with pytest.raises(DataError) as error:
        load_tokenizer(tmp_path)
    assert "tokenizer.model:2" in str(error.value) and "base64" in str(error.value)


def test_every_tokenizer_has_stop_ids(spm_file, gpt2_ours):
    assert ByteTokenizer().stop_ids == [2]
    assert SentencePieceTokenizer(spm_file).stop_ids == [2]
    assert gpt2_ours.stop_ids == [50256]


# -----------------------------------------------------------------------------
# sentencepiece (LLaMA)

@pytest.fixture(scope="module")
def spm_file():
    return shared_path("spm-tokenizer", "tokenizer.model")


def test_sentencepiece_matches_sentencepiece(spm_file):
    reference = sentencepiece.SentencePieceProcessor(model_file=str(spm_file))
    ours = SentencePieceTokenizer(spm_file)
    assert (ours.bos_id, ours.eos_id) == (reference.bos_id(), reference.eos_id()) == (1, 2)
    assert ours.vocab_size == reference.get_piece_size() == 32000
    assert ours.pad_id == 0 and reference.pad_id() == -1  # no pad piece: LLM-Adapters pads with 0
    texts = CORPUS + llm_adapters_texts() + random_texts(100, random.Random(RANDOM_SEED))
    for text in texts:
        ids = ours.encode(text)
        assert ids == [reference.bos_id()] + reference.encode(text), repr(text)
        assert ours.encode(text, bos=False, eos=True) == reference.encode(text) + [reference.eos_id()]
        assert ours.decode(ids) == reference.decode(reference.encode(text))
    for text in llm_adapters_texts() + ["café 日本語 😀 Привет", "a\n\nb"]:
        assert ours.decode(ours.encode(text, eos=True)) == text


def test_sentencepiece_matches_transformers_llama_where_it_agrees(tmp_path, spm_file, transformers):
    # transformers 5 converts tokenizer.model into a merges-based BPE; it splits runs of
    # spaces differently ("x  y") and parses "</s>" in text as EOS, while Meta's LLaMA code
    # (and ours) uses sentencepiece itself. On plain single-spaced text the two must agree.
    shutil.copy(spm_file, tmp_path / "tokenizer.model")
    reference = transformers.LlamaTokenizerFast.from_pretrained(str(tmp_path))
    ours = load_tokenizer(tmp_path)
    texts = ["Hello world", "The answer is 42.", "Übergröße café naïve", "Question: how many apples? Answer: 7",
             "a\n\nb"] + [t for t in llm_adapters_texts() if "  " not in t]
    for text in texts:
        assert ours.encode(text, bos=False) == reference.encode(text, add_special_tokens=False), repr(text)


# -----------------------------------------------------------------------------
# bytes, and picking the tokenizer of a folder

def test_byte_tokenizer_round_trip():
    tokenizer = ByteTokenizer()
    text = "naïve 日本語 😀\n\x00"
    ids = tokenizer.encode(text, eos=True)
    assert ids == [1] + [3 + b for b in text.encode("utf-8")] + [2]
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode([0, 0] + ids) == text  # pads, bos and eos are not text
    assert tokenizer.vocab_size == 259 and max(ids) < tokenizer.vocab_size


def test_load_tokenizer_picks_by_files(tmp_path, spm_file, gpt2_folder):
    assert isinstance(load_tokenizer(gpt2_folder), BPETokenizer)
    shutil.copy(spm_file, tmp_path / "tokenizer.model")
    assert isinstance(load_tokenizer(tmp_path), SentencePieceTokenizer)
    (tmp_path / "7B").mkdir()  # Meta's layout: llama/tokenizer.model beside llama/7B/
    assert isinstance(load_tokenizer(tmp_path / "7B"), SentencePieceTokenizer)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(DataError) as missing:
        load_tokenizer(tmp_path / "nowhere")
    assert "nowhere" in str(missing.value) and "not found" in str(missing.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as empty:
        load_tokenizer(tmp_path / "empty")
    message = str(empty.value)
    assert "empty" in message and "tokenizer.model" in message and "vocab.json" in message
    for error in (missing.value, empty.value):
        assert "\n" not in str(error)
