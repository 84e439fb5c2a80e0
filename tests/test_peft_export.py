"""LoRA adapters exported to PEFT's format: PEFT loads the files onto transformers' model of the
same base and gives our logits (fp32, 1e-5); the file's names are the ones PEFT itself writes;
InterLoRA and the baselines are refused in one line."""
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import train as train_script
from machinery import adapters, peft_export
from machinery.checkpoints import load_checkpoint, load_model
from test_families import (LLAMA3_ROPE, SHAPES, family_model, save_sharded, write_byte_bpe,
                           write_meta_llama3)
from test_model import randomize_, tiny_hf_model


def reference_and_folder(kind, tmp_path):
    """(transformers' model, the folder our loader reads) of one tiny random base."""
    if kind == "meta-llama-3.2":  # Meta's layout: q/k rows stored interleaved, GQA, scaled rope
        torch.manual_seed(0)
        hf_model = randomize_(LlamaForCausalLM(LlamaConfig(
            **SHAPES, rope_theta=500000.0, tie_word_embeddings=False, eos_token_id=2,
            rope_scaling={**LLAMA3_ROPE, "factor": 32.0,
                          "original_max_position_embeddings": 8192})))
        return hf_model, write_meta_llama3(tmp_path / "meta", hf_model, tied=False)
    hf_model = tiny_hf_model("gptj") if kind == "gptj" else family_model(kind)
    return hf_model.eval(), save_sharded(hf_model, tmp_path / kind)


def lora_adapter(folder, path, targets):
    """Our model of `folder` with plain LoRA (lambda 3, random B) on `targets`, saved to `path`."""
    model = load_checkpoint(folder)
    attention = tuple(t for t in targets if t in "qkv")
    cfg = adapters.make_config("lora", r=4, alpha=12, dropout=0.05, attention_targets=attention,
                               ffn_targets=tuple(t for t in targets if t not in attention))
    adapters.add_adapters(model, cfg)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # zero at the start: set, as training would
                param.normal_(0, 0.05)
    adapters.save_adapter(path, model, cfg, {"model": str(folder)})
    return model.eval()


@pytest.mark.parametrize("kind, targets", [
    ("llama-3.1", ("q", "k", "v", "down")),        # HF folder: q/k rows un-permuted on loading
    ("meta-llama-3.2", ("q", "k", "v", "down")),  # Meta's folder: stored as model.py keeps them
    ("qwen2.5", ("q", "k", "v", "up")),           # q/k biases, tied embeddings
    ("gptj", ("q", "k", "v", "up", "down")),      # transformers' GPT-J rotates interleaved pairs
])
def test_peft_gives_our_logits(tmp_path, kind, targets):
    hf_model, folder = reference_and_folder(kind, tmp_path)
    ours = lora_adapter(folder, tmp_path / "adapter.pt", targets)
    out = tmp_path / "peft"
    for _ in range(2):  # a second export replaces the first
        assert peft_export.main([str(tmp_path / "adapter.pt"), str(out)]) is None
    assert sorted(p.name for p in out.iterdir()) == sorted(peft_export.PEFT_FILES)
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 12, 0.05)

    # the names PEFT itself gives the same LoRA on transformers' model
    names = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "down": "down_proj", "up": "up_proj"}
    if kind == "gptj":
        names |= {"up": "fc_in", "down": "fc_out"}
    own = get_peft_model(type(hf_model)(hf_model.config),
                         LoraConfig(r=4, target_modules=[names[t] for t in targets]))
    assert load_file(out / "adapter_model.safetensors").keys() == \
        get_peft_model_state_dict(own).keys()
    assert config["target_modules"] == sorted(names[t] for t in targets)

    idx = torch.randint(3, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base_logits = hf_model(idx).logits
        peft_model = PeftModel.from_pretrained(hf_model, out).eval()
        logits = ours(idx)
        torch.testing.assert_close(peft_model(idx).logits, logits, atol=1e-5, rtol=0)
        assert (logits - base_logits).abs().max() > 0.05  # the adapters change the logits


@pytest.mark.parametrize("method, words", [
    ("interlora", "gates depend on the input"),
    ("adapter", "bottleneck adapter"),
    ("prefix", "prefix"),
])
def test_other_methods_are_refused_in_one_line(tmp_path, capsys, method, words):
    model = load_model("tiny")
    cfg = adapters.make_config(method)
    adapters.add_adapters(model, cfg)
    adapters.save_adapter(tmp_path / "adapter.pt", model, cfg, {"model": "tiny"})
    with pytest.raises(SystemExit) as stop:
        peft_export.main([str(tmp_path / "adapter.pt"), str(tmp_path / "peft")])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and words in err[0], err
    assert "only --method lora" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.pt"]  # nothing half-written


def export_error(capsys, *argv):
    """The one error line (and exit code 2) of the command."""
    with pytest.raises(SystemExit) as stop:
        peft_export.main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and err[0].startswith("error:"), err
    return err[0]


def test_a_moved_or_wrong_base_and_a_busy_out_dir_are_refused(tmp_path, capsys):
    hf_model, folder = reference_and_folder("llama-3.2", tmp_path)
    adapter, out = tmp_path / "adapter.pt", tmp_path / "peft"
    lora_adapter(folder, adapter, ("q", "v"))
    moved = folder.rename(tmp_path / "moved")
    capsys.readouterr()  # transformers' progress bars while saving are not the command's output
    assert "pass --model" in export_error(capsys, adapter, out)  # the folder it names is gone
    # a base of other shapes would give wrong head counts
    assert "[64, 64]" in export_error(capsys, adapter, out, "--model", "tiny")
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert "other files" in export_error(capsys, adapter, out, "--model", moved)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.pt", "moved", "peft"]
    assert peft_export.main([str(adapter), str(tmp_path / "new"), "--model", str(moved)]) is None


def test_an_adapter_train_py_wrote_exports(tmp_path, data_dir):
    """The real file: train.py --method lora on a Llama 3.1 folder, exported by its own record
    of the base, gives PEFT the logits of our model with the adapter loaded."""
    hf_model = family_model("llama-3.1")
    folder = write_byte_bpe(save_sharded(hf_model, tmp_path / "llama-3.1"))
    out = tmp_path / "run"
    train_script.main(["--model", str(folder), "--task", "math", "--method", "lora",
                       "--max_steps", "2", "--lr", "0.05", "--micro_batch_size", "2",
                       "--grad_accum", "1", "--cutoff_len", "64", "--data_dir", str(data_dir),
                       "--out_dir", str(out), "--device", "cpu"])
    assert peft_export.main([str(out / "adapter.pt"), str(tmp_path / "peft")]) is None
    ours = load_checkpoint(folder)
    adapters.load_adapter(ours, out / "adapter.pt")
    idx = torch.randint(3, 259, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base_logits = hf_model(idx).logits
        peft_model = PeftModel.from_pretrained(hf_model, tmp_path / "peft").eval()
        logits = ours.eval()(idx)
        torch.testing.assert_close(peft_model(idx).logits, logits, atol=1e-5, rtol=0)
        assert (logits - base_logits).abs().max() > 1e-3  # two steps moved B
