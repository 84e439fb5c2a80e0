"""Every file the tools read is checked at the door (machinery/checks.py): a crafted bad file gives
exit code 2, exactly one `error:` line naming the file and the field, no traceback, and nothing
in the output folder. Family by family: adapter files, params.json / config.json, the base an
adapter was made for.
"""
import json
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
    train_script.main([*SHORT, "--max_steps", "1", "--data_dir", str(data), "--out_dir", str(root / "run")])
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
    "no base": (lambda p: p.pop("base"), ["base is missing"]),
    "no info": (lambda p: p.pop("info"), ["info is missing"]),
    "no config": (lambda p: p.pop("config"), ["config is missing"]),
    "config a list": (lambda p: p.update(config=[1, 2]), ["config is [1, 2] (list)", "expected a JSON object"]),
    "unknown config field": (lambda p: p["config"].update(rank=4), ["config.rank", "does not know"]),
    "r a string": (lambda p: p["config"].update(r="4"), ["config.r is '4' (str)", "expected an integer"]),
    "r a float": (lambda p: p["config"].update(r=4.0), ["config.r is 4.0", "expected an integer"]),
    "dropout a bool": (lambda p: p["config"].update(dropout=True), ["config.dropout is True"]),
    "int64 tensor": (lambda p: p["tensors"].update({first_tensor(p): torch.ones(2, dtype=torch.int64)}),
                     ["torch.int64", "expected floating point"]),
    "complex tensor": (lambda p: p["tensors"].update({first_tensor(p): torch.ones(2, dtype=torch.complex64)}),
                       ["torch.complex64", "expected floating point"]),
    "not a tensor": (lambda p: p["tensors"].update({first_tensor(p): [1.0, 2.0]}), ["expected a tensor"]),
    "version 99": (lambda p: p.update(version=99), ["version is 99", "1, 2"]),
    "version a string": (lambda p: p.update(version="2"), ["version is '2' (str)"]),
    "no version": (lambda p: p.pop("version"), ["version is missing"]),
    "unknown method": (lambda p: p.update(method="ia3"), ["method is 'ia3'"]),
    "unknown top field": (lambda p: p.update(extra=1), ["extra is a field this version does not know"]),
    "steps negative": (lambda p: p["info"].update(steps=-3), ["info.steps is -3"]),
    "base class a number": (lambda p: p["base"].update({"class": 7}), ["base.class is 7 (int)"]),
    "shapes a list": (lambda p: p["base"].update(shapes=[]), ["base.shapes is [] (list)"]),
}


@pytest.mark.parametrize("damage", list(BAD_ADAPTERS))
@pytest.mark.parametrize("command", ["eval", "report"])
def test_a_bad_adapter_file_is_one_line_and_leaves_nothing(trained, tmp_path, capsys, damage, command):
    adapter, data = trained
    change, fragments = BAD_ADAPTERS[damage]
    path = tmp_path / "adapter.pt"
    torch.save(edited(torch.load(adapter, weights_only=True), change), path)
    out = tmp_path / "out"
    main = evaluate_script.main if command == "eval" else report_script.main
    message = stopped(main, ["--adapter", path, "--data_dir", data, "--out_dir", out], capsys, quiet=True)
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
    """tiny-gptj has other modules than tiny: the message names tiny and the command to use, in one
    short line, and comes before the output folder's reuse is looked at."""
    adapter, data = trained
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"model": "something else"}))  # a reuse check would refuse this
    message = stopped(evaluate_script.main, ["--adapter", adapter, "--model", "tiny-gptj", "--data_dir", data,
                                             "--out_dir", out], capsys)
    assert "was made for another base model, tiny" in message and "eval.py --model tiny" in message, message
    assert "run.json" not in message and len(message) < 400
    assert sorted(p.name for p in out.iterdir()) == ["run.json"]


# ----------------------------------------------------------------------------- params.json / config.json

def llama_folder(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    folder = tmp_path / "llama-tiny"
    LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2,
                                 tie_word_embeddings=False)).save_pretrained(folder)
    shutil.copy(shared_path("spm-tokenizer", "tokenizer.model"), folder)
    return folder


META = {"dim": 64, "n_layers": 2, "n_heads": 4, "multiple_of": 32, "norm_eps": 1e-5, "vocab_size": 32000}

BAD_CONFIGS = {  # (file, fields changed) -> pieces of the one error line
    "rms_norm_eps a string": ("config.json", {"rms_norm_eps": "1e-6"}, ["rms_norm_eps is '1e-6' (str)"]),
    "rms_norm_eps zero": ("config.json", {"rms_norm_eps": 0}, ["rms_norm_eps is 0"]),
    "a million layers": ("config.json", {"num_hidden_layers": 1e6}, ["num_hidden_layers is 1000000.0 (float)"]),
    "layers too many": ("config.json", {"num_hidden_layers": 10 ** 6}, ["num_hidden_layers is 1000000",
                                                                       "from 1 to 1024"]),
    "hidden_size negative": ("config.json", {"hidden_size": -64}, ["hidden_size is -64"]),
    "heads do not divide": ("config.json", {"num_attention_heads": 5},
                            ["hidden_size 64 is not a multiple of num_attention_heads 5"]),
    "kv heads do not divide": ("config.json", {"num_key_value_heads": 3},
                               ["num_attention_heads 4 is not a multiple of num_key_value_heads 3"]),
    "vocab a string": ("config.json", {"vocab_size": "32000"}, ["vocab_size is '32000' (str)"]),
    "context zero": ("config.json", {"max_position_embeddings": 0}, ["max_position_embeddings is 0"]),
    "rope_theta nan": ("config.json", {"rope_theta": float("nan")}, ["rope_theta is nan"]),
    "multiple_of zero": ("params.json", {"multiple_of": 0}, ["multiple_of is 0", "from 1 to"]),
    "norm_eps a string": ("params.json", {"norm_eps": "1e-5"}, ["norm_eps is '1e-5' (str)"]),
    "dim zero": ("params.json", {"dim": 0}, ["dim is 0"]),
    "n_heads do not divide": ("params.json", {"n_heads": 6}, ["dim 64 is not a multiple of n_heads 6"]),
    "ffn multiplier a list": ("params.json", {"ffn_dim_multiplier": [1.3]}, ["ffn_dim_multiplier is [1.3]"]),
    "n_layers a bool": ("params.json", {"n_layers": True}, ["n_layers is True (bool)"]),
}


@pytest.mark.parametrize("damage", list(BAD_CONFIGS))
def test_a_bad_model_config_is_one_line_before_anything_is_made(tmp_path, capsys, damage):
    name, change, fragments = BAD_CONFIGS[damage]
    folder = llama_folder(tmp_path)
    if name == "params.json":
        (folder / "config.json").unlink()
        torch.save({"tok_embeddings.weight": torch.zeros(32000, 64)}, folder / "consolidated.00.pth")
        values = dict(META)
    else:
        values = json.loads((folder / "config.json").read_text())
    values.update(change)
    (folder / name).write_text(json.dumps(values))
    out = tmp_path / "out"
    message = stopped(train_script.main, ["--model", folder, "--task", "math", "--max_steps", "1", "--data_dir",
                                          shared_path("llm-adapters"), "--out_dir", out], capsys)
    assert str(folder / name) in message and all(f in message for f in fragments), message
    assert not out.exists()
