"""Every file the tools read is checked at the door (machinery/checks.py): a crafted bad file gives
exit code 2, exactly one `error:` line naming the file and the field, no traceback, and nothing
in the output folder. Family by family: adapter files, params.json / config.json, the base an
adapter was made for.
"""
import json
import os
import shutil

import pytest
import torch

import eval as evaluate_script
import report as report_script
import train as train_script
from conftest import shared_path
from test_faults import SHORT, stopped


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One briefly trained tiny InterLoRA adapter, shared by the adapter-file cases."""
    from conftest import write_tiny_task
    root = tmp_path_factory.mktemp("trained")
    data = write_tiny_task(root / "data")
    train_script.main([*SHORT, "--max_steps", "1", "--data_dir", str(data),
                       "--out_dir", str(root / "run")])
    return root / "run" / "adapter.pt", data


def edited(payload, change):
    payload = {**payload, "config": dict(payload["config"]), "info": dict(payload["info"]),
               "base": dict(payload["base"]), "tensors": dict(payload["tensors"])}
    change(payload)
    return payload


def first_tensor(p):
    return next(iter(p["tensors"]))


BAD_ADAPTERS = {  # how the payload is edited -> pieces of the one error line
    "no tensors": (lambda p: p.pop("tensors"), ["tensors is missing"]),
    # no base at all is a file interlora.save_adapter wrote: the tensors' shapes decide
    "base a list": (lambda p: p.update(base=[1, 2]), ["base is [1, 2] (list)"]),
    "no info": (lambda p: p.pop("info"), ["info is missing"]),
    "no config": (lambda p: p.pop("config"), ["config is missing"]),
    "config a list": (lambda p: p.update(config=[1, 2]),
                      ["config is [1, 2] (list)", "expected a JSON object"]),
    "unknown config field": (lambda p: p["config"].update(rank=4),
                             ["config.rank", "does not know"]),
    "r a string": (lambda p: p["config"].update(r="4"),
                   ["config.r is '4' (str)", "expected an integer"]),
    "r a float": (lambda p: p["config"].update(r=4.0), ["config.r is 4.0", "expected an integer"]),
    "dropout a bool": (lambda p: p["config"].update(dropout=True), ["config.dropout is True"]),
    "int64 tensor": (lambda p: p["tensors"].update({first_tensor(p): torch.ones(2).long()}),
                     ["torch.int64", "expected floating point"]),
    "complex tensor": (lambda p: p["tensors"].update(
        {first_tensor(p): torch.ones(2, dtype=torch.complex64)}),
        ["torch.complex64", "expected floating point"]),
    "not a tensor": (lambda p: p["tensors"].update({first_tensor(p): [1.0, 2.0]}),
                     ["expected a tensor"]),
    "version 99": (lambda p: p.update(version=99), ["version is 99", "1, 2"]),
    "version a string": (lambda p: p.update(version="2"), ["version is '2' (str)"]),
    "no version": (lambda p: p.pop("version"), ["version is missing"]),
    "unknown method": (lambda p: p.update(method="ia3"), ["method is 'ia3'"]),
    "unknown top field": (lambda p: p.update(extra=1),
                          ["extra is a field this version does not know"]),
    "steps negative": (lambda p: p["info"].update(steps=-3), ["info.steps is -3"]),
    "checkpoint_dir a list": (lambda p: p["info"].update(checkpoint_dir=["a"]),
                              ["info.checkpoint_dir is ['a'] (list)"]),
    "model a number": (lambda p: p["info"].update(model=7), ["info.model is 7 (int)"]),
    "no model in info": (lambda p: p["info"].pop("model"), ["names no model or task"]),
    "base class a number": (lambda p: p["base"].update({"class": 7}), ["base.class is 7 (int)"]),
    "shapes a list": (lambda p: p["base"].update(shapes=[]), ["base.shapes is [] (list)"]),
}


@pytest.mark.parametrize("damage", list(BAD_ADAPTERS))
@pytest.mark.parametrize("command", ["eval", "report"])
def test_a_bad_adapter_file_is_one_line_and_leaves_nothing(trained, tmp_path, capsys, damage,
                                                           command):
    adapter, data = trained
    change, fragments = BAD_ADAPTERS[damage]
    path = tmp_path / "adapter.pt"
    torch.save(edited(torch.load(adapter, weights_only=True), change), path)
    out = tmp_path / "out"
    main = evaluate_script.main if command == "eval" else report_script.main
    message = stopped(main, ["--adapter", path, "--data_dir", data, "--out_dir", out], capsys,
                      quiet=True)
    assert str(path) in message and all(f in message for f in fragments), message
    assert not out.exists()


def test_the_untouched_adapter_passes_the_same_checks(trained, tmp_path):
    """The cases above fail because of their edit: the same payload re-saved unedited loads."""
    from machinery import adapters
    adapter, _ = trained
    path = tmp_path / "adapter.pt"
    torch.save(edited(torch.load(adapter, weights_only=True), lambda p: None), path)
    assert adapters.read_adapter(path)["method"] == "interlora"


# ----------------------------------------------------------------------------- the base

def test_an_adapter_on_another_base_says_which_model_it_was_made_for(trained, tmp_path, capsys):
    """tiny-gptj has other modules than tiny: the message names tiny and the command to use, in
    one short line, and comes before the output folder's reuse is looked at."""
    adapter, data = trained
    out = tmp_path / "out"
    out.mkdir()
    # a reuse check would refuse this folder: the base check must come first
    (out / "run.json").write_text(json.dumps({"model": "something else"}))
    message = stopped(evaluate_script.main, ["--adapter", adapter, "--model", "tiny-gptj",
                                             "--data_dir", data, "--out_dir", out], capsys)
    assert "was made for another base model, tiny" in message, message
    assert "eval.py --model tiny" in message, message
    assert "run.json" not in message and len(message) < 400
    assert sorted(p.name for p in out.iterdir()) == ["run.json"]


# ----------------------------------------------------------------------------- model configs

def llama_folder(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    folder = tmp_path / "llama-tiny"
    LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=192,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 tie_word_embeddings=False)).save_pretrained(folder)
    shutil.copy(shared_path("spm-tokenizer", "tokenizer.model"), folder)
    return folder


META = {"dim": 64, "n_layers": 2, "n_heads": 4, "multiple_of": 32, "norm_eps": 1e-5,
        "vocab_size": 32000}

def nested(levels):
    value = []
    for _ in range(levels - 1):
        value = [value]
    return value


BAD_CONFIGS = {  # (file, fields changed) -> pieces of the one error line
    "rms_norm_eps a string": ("config.json", {"rms_norm_eps": "1e-6"},
                              ["rms_norm_eps is '1e-6' (str)"]),
    "rms_norm_eps zero": ("config.json", {"rms_norm_eps": 0}, ["rms_norm_eps is 0"]),
    "a million layers": ("config.json", {"num_hidden_layers": 1e6},
                         ["num_hidden_layers is 1000000.0 (float)"]),
    "layers too many": ("config.json", {"num_hidden_layers": 10 ** 6},
                        ["num_hidden_layers is 1000000", "from 1 to 1024"]),
    "hidden_size negative": ("config.json", {"hidden_size": -64}, ["hidden_size is -64"]),
    "heads do not divide": ("config.json", {"num_attention_heads": 5},
                            ["hidden_size 64 is not a multiple of num_attention_heads 5"]),
    "kv heads do not divide": ("config.json", {"num_key_value_heads": 3},
                               ["num_attention_heads 4 is not a multiple of "
                                "num_key_value_heads 3"]),
    "vocab a string": ("config.json", {"vocab_size": "32000"}, ["vocab_size is '32000' (str)"]),
    "context zero": ("config.json", {"max_position_embeddings": 0},
                     ["max_position_embeddings is 0"]),
    "rope_theta nan": ("config.json", {"rope_theta": float("nan")}, ["rope_theta is nan"]),
    "multiple_of zero": ("params.json", {"multiple_of": 0}, ["multiple_of is 0", "from 1 to"]),
    "norm_eps a string": ("params.json", {"norm_eps": "1e-5"}, ["norm_eps is '1e-5' (str)"]),
    "dim zero": ("params.json", {"dim": 0}, ["dim is 0"]),
    "n_heads do not divide": ("params.json", {"n_heads": 6},
                              ["dim 64 is not a multiple of n_heads 6"]),
    "ffn multiplier a list": ("params.json", {"ffn_dim_multiplier": [1.3]},
                              ["ffn_dim_multiplier is [1.3]"]),
    "n_layers a bool": ("params.json", {"n_layers": True}, ["n_layers is True (bool)"]),
    "nested 100 deep": ("config.json", {"rope_scaling": nested(100)},
                        ["nested deeper than 64 levels"]),
    "params nested 100 deep": ("params.json", {"dim": nested(100)},
                               ["nested deeper than 64 levels"]),
}


@pytest.mark.parametrize("damage", list(BAD_CONFIGS))
def test_a_bad_model_config_is_one_line_before_anything_is_made(tmp_path, capsys, damage):
    name, change, fragments = BAD_CONFIGS[damage]
    folder = llama_folder(tmp_path)
    if name == "params.json":
        (folder / "config.json").unlink()
        torch.save({"tok_embeddings.weight": torch.zeros(32000, 64)},
                   folder / "consolidated.00.pth")
        values = dict(META)
    else:
        values = json.loads((folder / "config.json").read_text())
    values.update(change)
    (folder / name).write_text(json.dumps(values))
    out = tmp_path / "out"
    message = stopped(train_script.main, ["--model", folder, "--task", "math", "--max_steps", "1",
                                          "--data_dir", shared_path("llm-adapters"),
                                          "--out_dir", out], capsys)
    assert str(folder / name) in message and all(f in message for f in fragments), message
    assert not out.exists()


@pytest.mark.parametrize("weight_map, fragment", [
    ({"lm_head.weight": "../elsewhere.safetensors"}, "expected a file name in the folder"),
    ({"lm_head.weight": 3}, "weight_map['lm_head.weight'] is 3 (int)"),
    ([], "has no weight_map"),
])
def test_a_bad_shard_index_is_one_line(small_llama, trained, tmp_path, capsys, weight_map,
                                       fragment):
    folder = tmp_path / "model"
    shutil.copytree(small_llama, folder)
    shutil.copy(shared_path("spm-tokenizer", "tokenizer.model"), folder)
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    out = tmp_path / "out"
    message = stopped(train_script.main, ["--model", folder, "--task", "math", "--max_steps", "1",
                                          "--data_dir", trained[1], "--out_dir", out], capsys)
    assert str(index) in message and fragment in message, message
    assert not out.exists()


# ----------------------------------------------------------------------------- tokenizer files

@pytest.fixture(scope="module")
def small_llama(tmp_path_factory):
    """config.json + model.safetensors of a tiny LLaMA (vocab 300), copied for each case."""
    from transformers import LlamaConfig, LlamaForCausalLM
    folder = tmp_path_factory.mktemp("small-llama")
    LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=1, num_attention_heads=2,
                                 tie_word_embeddings=False)).save_pretrained(folder)
    return folder


def byte_bpe():
    """A byte-level BPE as GPT-2 writes it: the 256 byte symbols, three merges, <|endoftext|>."""
    from data import bytes_to_unicode
    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    merges = ["Ġ t", "h e", "Ġt he"]
    for merge in merges:
        vocab["".join(merge.split(" "))] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, merges


def write_vocab_merges(folder, vocab=None, merges=None):
    good_vocab, good_merges = byte_bpe()
    vocab = good_vocab if vocab is None else vocab
    (folder / "vocab.json").write_text(vocab if isinstance(vocab, str) else json.dumps(vocab))
    lines = "\n".join(["#version: 0.2", *(good_merges if merges is None else merges)]) + "\n"
    (folder / "merges.txt").write_text(lines, encoding="utf-8", errors="surrogatepass")


def tokenizer_json(**changes):
    """GPT-2's tokenizer.json layout over byte_bpe(), with `changes` to its parts."""
    vocab, merges = byte_bpe()
    spec = {"version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": vocab["<|endoftext|>"], "content": "<|endoftext|>",
                              "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": True, "special": True}],
            "normalizer": None,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False,
                              "trim_offsets": True, "use_regex": True},
            "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                        "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None,
                      "continuing_subword_prefix": "", "end_of_word_suffix": "",
                      "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": vocab, "merges": [m.split(" ") for m in merges]}}
    for path, value in changes.items():  # "model.vocab" -> spec["model"]["vocab"]
        *parents, last = path.split(".")
        target = spec
        for key in parents:
            target = target[key]
        target[last] = value
    return spec


def write_tokenizer_json(folder, spec):
    (folder / "tokenizer.json").write_text(spec if isinstance(spec, str) else json.dumps(spec))


def tiktoken_lines(extra=()):
    """Meta's tiktoken text: each of the 256 bytes and two merges, 'base64 rank' per line."""
    import base64
    tokens = [bytes([b]) for b in range(256)] + [b" t", b"he"]
    return [f"{base64.b64encode(t).decode()} {i}" for i, t in enumerate(tokens)] + list(extra)


def write_model_file(folder, data):
    (folder / "tokenizer.model").write_bytes(data if isinstance(data, bytes)
                                             else ("\n".join(data) + "\n").encode())


BAD_TOKENIZERS = {  # how the tokenizer files are written -> pieces of the one error line
    "tokenizer.model of random bytes": (lambda f: write_model_file(f, bytes(range(256)) * 8),
                                        "tokenizer.model", ["expected a sentencepiece model"]),
    "tokenizer.model empty": (lambda f: write_model_file(f, b""), "tokenizer.model",
                              ["found neither", "unk is not defined"]),
    "tiktoken line not base64": (lambda f: write_model_file(f, tiktoken_lines(["@@@@ 258"])),
                                 "tokenizer.model:259", ["expected 'base64-token rank' lines"]),
    "tiktoken line without a rank": (lambda f: write_model_file(f, tiktoken_lines(["aGk="])),
                                     "tokenizer.model:259", ["found b'aGk='"]),
    "tiktoken rank skipped": (lambda f: write_model_file(f, tiktoken_lines(["aGk= 300"])),
                              "tokenizer.model", ["expected ranks 0 to 258", "none of rank 258",
                                                  "line 259 has rank 300"]),
    "tiktoken rank twice": (lambda f: write_model_file(f, tiktoken_lines(["aGk= 5"])),
                            "tokenizer.model:259", ["rank 5 again (line 6)"]),
    "tiktoken token twice": (lambda f: write_model_file(f, tiktoken_lines(["aGU= 258"])),
                             "tokenizer.model:259", ["a token given twice"]),
    "tiktoken bytes missing": (lambda f: write_model_file(f, tiktoken_lines()[:200]),
                               "tokenizer.model", ["a rank for each of the 256 bytes"]),
    "merges line of three symbols": (lambda f: write_vocab_merges(f, merges=["Ġ t", "h e x"]),
                                     "merges.txt", ["line 3: expected two symbols",
                                                    "'h e x'"]),
    "merges line of one symbol": (lambda f: write_vocab_merges(f, merges=["Ġt"]),
                                  "merges.txt", ["line 2: expected two symbols"]),
    "merges line with a lone surrogate": (lambda f: write_vocab_merges(f, merges=["\udc80 t"]),
                                          "merges.txt", ["not UTF-8"]),
    "vocab.json a list": (lambda f: write_vocab_merges(f, vocab=["a", "b"]), "vocab.json",
                          ["is ['a', 'b'] (list)", "expected a JSON object"]),
    "vocab.json id a string": (lambda f: write_vocab_merges(f, vocab={**byte_bpe()[0], "x": "7"}),
                               "vocab.json", ["vocab['x'] is '7' (str)", "expected an integer"]),
    "vocab.json id negative": (lambda f: write_vocab_merges(f, vocab={**byte_bpe()[0], "x": -1}),
                               "vocab.json", ["vocab['x'] is -1"]),
    "vocab.json id a float": (lambda f: write_vocab_merges(f, vocab={**byte_bpe()[0], "x": 9.5}),
                              "vocab.json", ["vocab['x'] is 9.5"]),
    "vocab.json id given twice": (lambda f: write_vocab_merges(f, vocab={**byte_bpe()[0], "x": 0}),
                                  "vocab.json", ["both have id 0"]),
    "vocab.json no JSON": (lambda f: write_vocab_merges(f, vocab='{"a": 1'), "vocab.json",
                           ["is not valid JSON"]),
    "vocab.json nested deep": (lambda f: write_vocab_merges(f, vocab="[" * 100000 + "]" * 100000),
                               "vocab.json", ["nested deeper"]),
    "tokenizer.json a list": (lambda f: write_tokenizer_json(f, [1]), "tokenizer.json",
                              ["the file is [1] (list)"]),
    "tokenizer.json model a string": (lambda f: write_tokenizer_json(
        f, tokenizer_json(model="BPE")), "tokenizer.json", ["model is 'BPE' (str)"]),
    "tokenizer.json no vocab": (lambda f: write_tokenizer_json(f, {**tokenizer_json(), "model": {
        k: v for k, v in tokenizer_json()["model"].items() if k != "vocab"}}),
        "tokenizer.json", ["model.vocab is missing"]),
    "tokenizer.json vocab a list": (lambda f: write_tokenizer_json(
        f, tokenizer_json(**{"model.vocab": ["a"]})), "tokenizer.json", ["model.vocab is ['a']"]),
    "tokenizer.json id a string": (lambda f: write_tokenizer_json(
        f, tokenizer_json(**{"model.vocab": {**byte_bpe()[0], "x": "1"}})), "tokenizer.json",
        ["model.vocab['x'] is '1' (str)"]),
    "tokenizer.json merges a dict": (lambda f: write_tokenizer_json(
        f, tokenizer_json(**{"model.merges": {"a": "b"}})), "tokenizer.json",
        ["model.merges is {'a': 'b'} (dict)", "expected a list"]),
    "tokenizer.json merge of three": (lambda f: write_tokenizer_json(
        f, tokenizer_json(**{"model.merges": [["Ġ", "t", "x"]]})), "tokenizer.json",
        ["model.merges[0] is ['Ġ', 't', 'x']", "two symbols"]),
    "tokenizer.json merge a number": (lambda f: write_tokenizer_json(
        f, tokenizer_json(**{"model.merges": [7]})), "tokenizer.json", ["model.merges[0] is 7"]),
    "tokenizer.json added token without id": (lambda f: write_tokenizer_json(
        f, tokenizer_json(added_tokens=[{"content": "<|endoftext|>"}])), "tokenizer.json",
        ["added_tokens[0].id is missing"]),
    "tokenizer.json pre_tokenizer a list": (lambda f: write_tokenizer_json(
        f, tokenizer_json(pre_tokenizer=["ByteLevel"])), "tokenizer.json",
        ["pre_tokenizer is ['ByteLevel'] (list)"]),
    "tokenizer.json use_regex a string": (lambda f: write_tokenizer_json(
        f, tokenizer_json(**{"pre_tokenizer.use_regex": "yes"})), "tokenizer.json",
        ["pre_tokenizer.use_regex is 'yes' (str)"]),
}


@pytest.mark.parametrize("damage", list(BAD_TOKENIZERS))
def test_a_bad_tokenizer_file_is_one_line_and_leaves_nothing(small_llama, trained, tmp_path, capsys,
                                                              damage):
    make, name, fragments = BAD_TOKENIZERS[damage]
    folder = tmp_path / "model"
    shutil.copytree(small_llama, folder)
    make(folder)
    out = tmp_path / "out"
    message = stopped(train_script.main, ["--model", folder, "--task", "math", "--max_steps", "1",
                                          "--data_dir", trained[1], "--out_dir", out], capsys)
    assert str(folder / name) in message and all(f in message for f in fragments), message
    assert not out.exists()


def test_the_untouched_tokenizer_files_load_and_match_the_reference(tmp_path):
    """The files the cases above damage are good as written: the same ids as `tokenizers` and
    tiktoken give (so each case fails by its damage)."""
    import tiktoken
    from tokenizers import Tokenizer
    import data
    text = "the tea\nhe hit the t"
    write_vocab_merges(tmp_path)
    (tmp_path / "j").mkdir()
    write_tokenizer_json(tmp_path / "j", tokenizer_json())
    reference = Tokenizer.from_file(str(tmp_path / "j" / "tokenizer.json")).encode(text).ids
    assert data.load_tokenizer(tmp_path).encode(text) == reference
    assert data.load_tokenizer(tmp_path / "j").encode(text) == reference
    (tmp_path / "t").mkdir()
    write_model_file(tmp_path / "t", tiktoken_lines())
    ranks = {bytes([b]): b for b in range(256)} | {b" t": 256, b"he": 257}
    enc = tiktoken.Encoding("t", pat_str=data.LLAMA3_PATTERN, mergeable_ranks=ranks,
                            special_tokens={})
    assert data.load_tokenizer(tmp_path / "t").encode(text, bos=False) == enc.encode(text)
    write_model_file(tmp_path / "t", tiktoken_lines()[::-1])  # tiktoken takes any line order
    assert data.load_tokenizer(tmp_path / "t").encode(text, bos=False) == enc.encode(text)


# ----------------------------------------------------------------------------- data items

ITEM = {"instruction": "What is 2 + 2?", "input": "", "output": "4", "answer": "4"}
BAD_ITEMS = {  # the damaged item (placed second in the file) -> pieces of the one error line
    "instruction a list": ({**ITEM, "instruction": ["a"]}, ["instruction is ['a'] (list)",
                                                            "expected a string"]),
    "output a number": ({**ITEM, "output": 4}, ["output is 4 (int)"]),
    "answer null": ({**ITEM, "answer": None}, ["answer is None (NoneType)"]),
    "answer missing": ({k: v for k, v in ITEM.items() if k != "answer"}, ["answer is missing"]),
    "another field a list": ({**ITEM, "source": [1, 2]}, ["source is [1, 2] (list)"]),
    "another field a dict": ({**ITEM, "meta": {"a": 1}}, ["meta is {'a': 1} (dict)"]),
    "a lone surrogate": ({**ITEM, "instruction": "x\ud800y"}, ["instruction holds a lone "
                                                               "surrogate U+D800 at character 1"]),
    "a lone low surrogate in input": ({**ITEM, "input": "\udc00"},
                                      ["input holds a lone surrogate"]),
    "the item a list": (["What is 2 + 2?", "4"], ["item 1: expected a dict, found list"]),
}


@pytest.mark.parametrize("damage", list(BAD_ITEMS))
@pytest.mark.parametrize("command", ["train", "eval"])
def test_a_bad_data_item_names_its_file_and_index(trained, tmp_path, capsys, damage, command):
    bad, fragments = BAD_ITEMS[damage]
    data = tmp_path / "data"
    shutil.copytree(trained[1], data)
    name = "ft-training_set/math_data.json" if command == "train" else "dataset/SVAMP/test.json"
    items = json.loads((data / name).read_text())
    items[1] = bad
    (data / name).write_text(json.dumps(items))  # ensure_ascii: a surrogate is written \ud800
    out = tmp_path / "out"
    argv = ([*SHORT, "--data_dir", data, "--out_dir", out] if command == "train" else
            ["--base", "--model", "tiny", "--task", "math", "--data_dir", data, "--out_dir", out])
    message = stopped(train_script.main if command == "train" else evaluate_script.main, argv,
                      capsys)
    assert f"{data / name}: item 1" in message and all(f in message for f in fragments), message
    assert not out.exists()


# ----------------------------------------------------------------------------- .safetensors headers

def rewrite_safetensors(path, change=None, raw=None, data_change=None):
    """model.safetensors with its header edited by change(header) (or replaced by the bytes
    `raw`) and its data by data_change(data); the header length is written anew."""
    blob = path.read_bytes()
    size = int.from_bytes(blob[:8], "little")
    header, data = json.loads(blob[8:8 + size]), blob[8 + size:]
    if change:
        change(header)
    text = raw if raw is not None else json.dumps(header).encode()
    data = data_change(data, header) if data_change else data
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)


def last_tensor(header):
    return max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])


def shift_last(header, by):
    entry = header[last_tensor(header)]
    entry["data_offsets"] = [n + by for n in entry["data_offsets"]]


def same_size_as_another(header):
    """The first tensor's offsets given to another of the same size: both point at one place."""
    names = [k for k in header if k != "__metadata__"]
    a = names[0]
    b = next(n for n in names[1:] if header[n]["shape"] == header[a]["shape"]
             and header[n]["dtype"] == header[a]["dtype"])
    header[b]["data_offsets"] = list(header[a]["data_offsets"])


def entry(header):
    return header[next(k for k in header if k != "__metadata__")]


BAD_HEADERS = {  # how model.safetensors is damaged -> (pieces of the one line, safetensors refuses)
    "shorter than 8 bytes": (lambda p: p.write_bytes(b"\x01\x02"), ["expected an 8-byte header"],
                             True),
    "header length past the end": (lambda p: p.write_bytes((10 ** 7).to_bytes(8, "little") + b"{}"),
                                   ["a header of 10,000,000 bytes, past the end"], True),
    "header length over 100 MB": (lambda p: (p.write_bytes((200_000_000).to_bytes(8, "little")),
                                             os.truncate(p, 300_000_000)),
                                  ["more than 100,000,000"], True),
    "header not UTF-8": (lambda p: rewrite_safetensors(p, raw=b'{"\xff": 1}'), ["not UTF-8"],
                         True),
    "header no JSON": (lambda p: rewrite_safetensors(p, raw=b'{"a": '), ["is not valid JSON"],
                       True),
    "header a list": (lambda p: rewrite_safetensors(p, raw=b"[1, 2]"),
                      ["the header: the file is [1, 2] (list)"], True),
    "nesting past Python's limit": (lambda p: rewrite_safetensors(
        p, raw=b'{"__metadata__": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        ["nested deeper than Python can parse"], True),
    "nesting of 100 levels": (lambda p: rewrite_safetensors(
        p, raw=b'{"__metadata__": {"a": ' + b"[" * 100 + b"]" * 100 + b"}}"),
        ["nested deeper than 64 levels"], True),
    "metadata value a number": (lambda p: rewrite_safetensors(
        p, lambda h: h.update(__metadata__={"format": 1})), ["__metadata__['format'] is 1 (int)"],
        True),
    "entry a number": (lambda p: rewrite_safetensors(p, lambda h: h.update(x=3)),
                       ["tensor x: its header entry is 3 (int)"], True),
    "entry without dtype": (lambda p: rewrite_safetensors(p, lambda h: entry(h).pop("dtype")),
                            ["the field dtype is missing"], True),
    "dtype unknown": (lambda p: rewrite_safetensors(p, lambda h: entry(h).update(dtype="F33")),
                      ["dtype 'F33' is no safetensors type"], True),
    "dtype fp8": (lambda p: rewrite_safetensors(p, lambda h: entry(h).update(dtype="F8_E4M3")),
                  ["dtype 'F8_E4M3' is a safetensors type this loader does not read"], False),
    "shape of floats": (lambda p: rewrite_safetensors(
        p, lambda h: entry(h).update(shape=[float(n) for n in entry(h)["shape"]])),
        ["shape[0] is", "(float), expected an integer"], True),
    "shape negative": (lambda p: rewrite_safetensors(p, lambda h: entry(h).update(shape=[-1, 2])),
                       ["shape[0] is -1"], True),
    "shape a string": (lambda p: rewrite_safetensors(p, lambda h: entry(h).update(shape="32x32")),
                       ["shape is '32x32' (str)"], True),
    "offsets of three": (lambda p: rewrite_safetensors(
        p, lambda h: entry(h)["data_offsets"].append(0)), ["expected [begin, end]"], True),
    "offsets reversed": (lambda p: rewrite_safetensors(
        p, lambda h: entry(h).update(data_offsets=entry(h)["data_offsets"][::-1])),
        ["expected [begin, end] with begin <= end"], True),
    "two tensors on the same bytes": (lambda p: rewrite_safetensors(p, same_size_as_another),
                                      ["invalid offset for tensor", "overlaps"], True),
    "the last tensor overlaps": (lambda p: rewrite_safetensors(
        p, lambda h: shift_last(h, -4), data_change=lambda d, h: d[:-4]),
        ["invalid offset for tensor", "overlaps the bytes before"], True),
    "a gap before the last tensor": (lambda p: rewrite_safetensors(
        p, lambda h: shift_last(h, 4), data_change=lambda d, h: d + bytes(4)),
        ["invalid offset for tensor", "to no tensor"], True),
    "bytes after the last tensor": (lambda p: rewrite_safetensors(
        p, data_change=lambda d, h: d + bytes(8)), ["8 bytes after the last tensor"], True),
}


@pytest.mark.parametrize("damage", list(BAD_HEADERS))
def test_a_bad_safetensors_header_is_one_line_as_the_library_would_refuse(
        small_llama, trained, tmp_path, capsys, damage):
    from safetensors.torch import load_file
    make, fragments, library_refuses = BAD_HEADERS[damage]
    folder = tmp_path / "model"
    shutil.copytree(small_llama, folder)
    shutil.copy(shared_path("spm-tokenizer", "tokenizer.model"), folder)
    make(folder / "model.safetensors")
    out = tmp_path / "out"
    message = stopped(train_script.main, ["--model", folder, "--task", "math", "--max_steps", "1",
                                          "--data_dir", trained[1], "--out_dir", out], capsys)
    assert str(folder / "model.safetensors") in message, message
    assert all(f in message for f in fragments), message
    assert not out.exists()
    if library_refuses:  # the reference reader refuses the same file
        with pytest.raises(Exception):
            load_file(folder / "model.safetensors")


def test_the_rewritten_safetensors_file_is_good_unless_damaged(small_llama, tmp_path):
    """rewrite_safetensors without a change gives a file both readers take, with equal tensors."""
    from safetensors.torch import load_file
    from machinery.checkpoints import index_safetensors
    path = tmp_path / "model.safetensors"
    shutil.copy(small_llama / "model.safetensors", path)
    rewrite_safetensors(path, lambda h: None)
    ours = {name: t.read() for name, t in index_safetensors(path).items()}
    theirs = load_file(path)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)


# ----------------------------------------------------------------------------- flag ranges

BAD_TRAINING_FLAGS = {  # flags -> a piece of the one error line
    "rank past the layer width": (["--r", "200"], "--r 200: expected a rank at most 128"),
    "rank past the table": (["--r", "100000"], "--r 100000: expected a value from 0 to 4,096"),
    "lora rank past the width": (["--method", "lora", "--r", "129"], "at most 128"),
    "cutoff past the context": (["--cutoff_len", "2000"],
                                "--cutoff_len 2000: expected at most 1024, the model's context"),
    "cutoff past the table": (["--cutoff_len", "3000000"], "from 2 to 2,097,152"),
    "micro-batch huge": (["--micro_batch_size", "100000"], "--micro_batch_size 100000"),
    "grad_accum huge": (["--grad_accum", "1000000"], "--grad_accum 1000000"),
    "epochs huge": (["--epochs", "5000"], "--epochs 5000: expected a value from 1 to 1,000"),
    "max_steps huge": (["--max_steps", "100000000"], "--max_steps 100000000"),
    "save_every huge": (["--save_every", "100000000"], "--save_every 100000000"),
    "warmup huge": (["--warmup_steps", "100000000"], "--warmup_steps 100000000"),
    "gate log huge": (["--gate_log_every", "100000000"], "--gate_log_every 100000000"),
    "alpha huge": (["--alpha", "1e7"], "--alpha 10000000.0"),
    "seed negative": (["--seed", "-1"], "--seed -1: expected a value from 0"),
    "seed past 64 bits": (["--seed", str(2 ** 64)], f"--seed {2 ** 64}"),
}
BAD_EVALUATION_FLAGS = {
    "generation past the context": (["--max_new_tokens", "100000"],
                                    "+ --max_new_tokens 100000 make"),
    "generation past the table": (["--max_new_tokens", "3000000"], "from 0 to 2,097,152"),
    "batch huge": (["--batch_size", "100000"], "--batch_size 100000"),
    "limit huge": (["--limit", "100000000"], "--limit 100000000"),
}


@pytest.mark.parametrize("case", list(BAD_TRAINING_FLAGS))
def test_a_training_flag_out_of_range_is_one_line_before_anything_is_written(
        trained, tmp_path, capsys, case):
    flags, fragment = BAD_TRAINING_FLAGS[case]
    out = tmp_path / "out"
    message = stopped(train_script.main, [*SHORT, "--data_dir", trained[1], "--out_dir", out,
                                          *flags], capsys, quiet=True)
    assert fragment in message, message
    assert not out.exists()


@pytest.mark.parametrize("case", list(BAD_EVALUATION_FLAGS))
def test_an_evaluation_flag_out_of_range_is_one_line_before_anything_is_written(
        trained, tmp_path, capsys, case):
    flags, fragment = BAD_EVALUATION_FLAGS[case]
    adapter, data = trained
    out = tmp_path / "out"
    message = stopped(evaluate_script.main, ["--adapter", adapter, "--data_dir", data,
                                             "--out_dir", out, *flags], capsys)
    assert fragment in message, message
    assert not out.exists()


def test_the_largest_rank_and_generation_in_range_are_taken(trained, tmp_path):
    """The bounds are the model's: --r 128 (tiny's width) builds, and a generation that ends
    exactly at the context of 1024 tokens is planned."""
    from machinery import checks
    from machinery.checkpoints import model_config
    import train as t
    config, _ = model_config("tiny")
    s = t.parse_settings([*SHORT, "--r", "128"])
    cfg = adapters_config(s)
    checks.check_flags(s, config, ValueError, cfg, prompt_len=1000, max_new_tokens=24)
    with pytest.raises(ValueError, match="make 1025 tokens"):
        checks.check_flags(s, config, ValueError, cfg, prompt_len=1000, max_new_tokens=25)
    assert t.trainable_parameters(config, cfg) > 0


def adapters_config(s):
    from machinery import adapters
    return adapters.make_config(s.method, r=s.r, alpha=s.alpha, dropout=s.dropout,
                                gate_pool=s.gate_pool)


def test_the_flag_table_agrees_with_what_help_shows():
    """checks.FLAG_BOUNDS decides; the settings' metadata (shown by --help) says the same lows."""
    from dataclasses import fields
    from machinery import checks
    classes = [train_script.TrainSettings, evaluate_script.EvalSettings,
               report_script.ReportSettings]
    numeric = [f for cls in classes for f in fields(cls) if f.type in (int, float)]
    assert {f.name for f in numeric} <= checks.FLAG_BOUNDS.keys()
    for f in numeric:
        low, high = checks.FLAG_BOUNDS[f.name]
        for key in ("min", "above"):
            if key in f.metadata:
                assert f.metadata[key] == low, f.name
        if "below" in f.metadata:
            assert f.metadata["below"] == high, f.name


# ----------------------------------------------------------------------------- run files

def with_settings(change):
    def apply(path):
        saved = json.loads(path.read_text())
        change(saved)
        path.write_text(json.dumps(saved))
    return apply


BAD_SETTINGS = {  # how a run's settings.json is edited -> a piece of the one line
    "dtype a list": (with_settings(lambda s: s["settings"].update(dtype=[])),
                     "settings.dtype is [] (list), expected a string"),
    "lr a string": (with_settings(lambda s: s["settings"].update(lr="1e-3")),
                    "settings.lr is '1e-3' (str), expected a number"),
    "r a fraction": (with_settings(lambda s: s["settings"].update(r=4.5)),
                     "settings.r is 4.5 (float), expected an integer"),
    "resume a string": (with_settings(lambda s: s["settings"].update(resume="yes")),
                        "settings.resume is 'yes' (str), expected true or false"),
    "data a list": (with_settings(lambda s: s.update(data=[1])), "data is [1] (list)"),
    "data items a string": (with_settings(lambda s: s["data"].update(items="8")),
                            "data.items is '8' (str)"),
    "adapter a list": (with_settings(lambda s: s.update(adapter=[])), "adapter is [] (list)"),
    "total_steps negative": (with_settings(lambda s: s.update(total_steps=-6)),
                             "total_steps is -6"),
}


@pytest.mark.parametrize("damage", list(BAD_SETTINGS))
def test_an_edited_settings_json_is_one_line_and_changes_nothing(trained, tmp_path, capsys,
                                                                 damage):
    """The finished run's settings.json, read by --resume (an unfinished run's is read the same
    way, by the same function)."""
    adapter, data = trained
    out = tmp_path / "run"
    shutil.copytree(adapter.parent, out)
    edit, fragment = BAD_SETTINGS[damage]
    edit(out / "settings.json")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    message = stopped(train_script.main, [*SHORT, "--data_dir", data, "--out_dir", out,
                                          "--resume"], capsys)
    assert str(out / "settings.json") in message and fragment in message, message
    assert "delete it" in message
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_the_untouched_settings_json_passes_the_same_checks(trained, tmp_path, capsys):
    adapter, data = trained
    out = tmp_path / "run"
    shutil.copytree(adapter.parent, out)
    with_settings(lambda s: None)(out / "settings.json")
    train_script.main([str(a) for a in [*SHORT, "--max_steps", "1", "--data_dir", data,
                                        "--out_dir", out, "--resume"]])
    assert "nothing to do" in capsys.readouterr().out


@pytest.mark.parametrize("text, fragment", [
    ("[1]", "the file is [1] (list), expected a JSON object"),
    ("3", "the file is 3 (int)"),
    ('{"model": "tiny", ', "is corrupt"),
])
def test_an_edited_run_json_is_one_line_and_changes_nothing(trained, tmp_path, capsys, text,
                                                            fragment):
    adapter, data = trained
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text(text)
    message = stopped(evaluate_script.main, ["--adapter", adapter, "--data_dir", data,
                                             "--out_dir", out], capsys)
    assert str(out / "run.json") in message and fragment in message, message
    assert [p.name for p in out.iterdir()] == ["run.json"]
    assert (out / "run.json").read_text() == text
