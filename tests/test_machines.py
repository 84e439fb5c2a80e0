"""train.py and eval.py on the machines users have (issue: real checkpoints): every --dtype and
--quantize through the real commands, the memory check before any weight is read, and a
checkpoint folder given as --model, compared with transformers.
"""
import json
import shutil

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import eval as evaluate_script
from machinery import memory
import train as train_script
from conftest import read_jsonl, shared_path
from machinery.adapters import read_adapter
from machinery.checkpoints import load_model

SHORT = ["--model", "tiny", "--task", "math", "--micro_batch_size", "2", "--grad_accum", "2", "--lr", "1e-2",
         "--warmup_steps", "1", "--cutoff_len", "320", "--max_steps", "3"]


def exit_line(main, argv, capsys):
    with pytest.raises(SystemExit) as stop:
        main([str(a) for a in argv])
    err = capsys.readouterr().err  # a progress bar may come first
    lines = [line for line in err.splitlines() if line.startswith("error: ") or "Traceback" in line]
    assert stop.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    return lines[0]


@pytest.mark.parametrize("dtype, quantize", [("fp32", ""), ("bf16", ""), ("fp16", ""), ("fp32", "int8"),
                                             ("bf16", "nf4")])
def test_every_precision_trains_and_evaluates_through_the_commands(data_dir, tmp_path, capsys, dtype, quantize):
    out = tmp_path / "run"
    flags = ["--dtype", dtype] + (["--quantize", quantize] if quantize else [])
    train_script.main([*SHORT, *flags, "--data_dir", str(data_dir), "--out_dir", str(out)])
    settings = json.loads((out / "settings.json").read_text())["settings"]
    assert (settings["dtype"], settings["quantize"]) == (dtype, quantize)
    losses = [r["loss"] for r in read_jsonl(out / "log.jsonl")]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    adapter = read_adapter(out / "adapter.pt")["tensors"]
    assert all(t.dtype == torch.float32 for t in adapter.values())  # adapters stay fp32 over any base

    evaluate_script.main(["--adapter", str(out / "adapter.pt"), *flags, "--data_dir", str(data_dir),
                          "--datasets", "AddSub", "--limit", "2", "--max_new_tokens", "3"])
    run = json.loads((out / "eval-math" / "run.json").read_text())
    assert (run["dtype"], run["quantize"]) == (dtype, quantize or None)
    # predictions of another precision are another evaluation's
    other = ["--dtype", "fp32" if dtype != "fp32" else "bf16"] + flags[2:]
    message = exit_line(evaluate_script.main, ["--adapter", out / "adapter.pt", *other, "--data_dir", data_dir,
                                               "--datasets", "AddSub", "--limit", "2", "--max_new_tokens", "3"], capsys)
    assert "another evaluation (different dtype)" in message


def test_int8_training_lowers_the_loss_through_train_py(data_dir, tmp_path):
    out = tmp_path / "run"
    train_script.main([*SHORT, "--quantize", "int8", "--max_steps", "12", "--dropout", "0", "--data_dir",
                       str(data_dir), "--out_dir", str(out)])
    losses = [r["loss"] for r in read_jsonl(out / "log.jsonl")]
    assert losses[-1] < 0.9 * losses[0], losses


def test_the_default_dtype_on_the_cpu_says_why(data_dir, tmp_path, monkeypatch, capsys):
    train_script.main([*SHORT, "--max_steps", "1", "--data_dir", str(data_dir), "--out_dir", str(tmp_path / "a")])
    printed = capsys.readouterr().out
    assert "frozen base in fp32 on the CPU: it fits" in printed
    assert json.loads((tmp_path / "a" / "settings.json").read_text())["settings"]["dtype"] == "fp32"

    # with too little memory for fp32 but enough for bf16, the default is bf16 and says so
    fp32 = sum(memory.memory_needed(load_model("tiny").config, "fp32", training=True, batch_size=2, seq_len=320,
                                    trainable_params=18692).values())
    monkeypatch.setattr(memory, "memory_available", lambda device: fp32 - 1)
    train_script.main([*SHORT, "--max_steps", "1", "--data_dir", str(data_dir), "--out_dir", str(tmp_path / "b")])
    assert "frozen base in bf16: fp32 would need" in capsys.readouterr().out
    assert json.loads((tmp_path / "b" / "settings.json").read_text())["settings"]["dtype"] == "bf16"

    # a resumed run keeps its dtype, whatever the memory says now
    monkeypatch.setattr(memory, "memory_available", lambda device: 2 ** 40)
    train_script.main([*SHORT, "--max_steps", "1", "--data_dir", str(data_dir), "--out_dir", str(tmp_path / "b"),
                       "--resume"])
    assert "nothing to do" in capsys.readouterr().out


def test_the_memory_check_refuses_before_reading_any_weight(tmp_path, monkeypatch, capsys):
    # llama-7b in fp32 on a 24 GB machine: refused with the figures and the flags that fit, before any
    # weight is read (the folder holds no weights at all)
    folder = tmp_path / "llama" / "7B"
    folder.mkdir(parents=True)
    shutil.copy(shared_path("spm-tokenizer", "tokenizer.model"), folder.parent)
    (folder / "params.json").write_text(json.dumps({"dim": 4096, "n_layers": 32, "n_heads": 32, "multiple_of": 256,
                                                    "norm_eps": 1e-6, "vocab_size": 32000}))
    monkeypatch.setattr(memory, "memory_available", lambda device: 20 * 2 ** 30)
    out = tmp_path / "out"
    message = exit_line(train_script.main, ["--model", "llama-7b", "--checkpoint_dir", folder, "--dtype", "fp32",
                                            "--data_dir", shared_path("llm-adapters"), "--out_dir", out], capsys)
    assert "training in fp32 needs" in message and "20.0 GiB are available" in message
    assert "--dtype bf16" in message and "--quantize int8" in message
    assert not out.exists()
    message = exit_line(evaluate_script.main, ["--base", "--model", "llama-7b", "--task", "math", "--checkpoint_dir",
                                               folder, "--dtype", "fp32", "--data_dir", shared_path("llm-adapters"),
                                               "--out_dir", out], capsys)
    assert "evaluation in fp32 needs" in message and "--dtype bf16" in message and not out.exists()


def test_a_checkpoint_folder_as_the_model(tmp_path, capsys):
    """A Llama-2-style folder with grouped-query attention and another rope_theta, given as --model:
    trained and evaluated through the commands; the base's logits are transformers'."""
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, rope_theta=50000.0,
                                      rms_norm_eps=1e-5, max_position_embeddings=512, tie_word_embeddings=False))
    folder = tmp_path / "Llama-2-tiny"
    hf.save_pretrained(folder)
    shutil.copy(shared_path("spm-tokenizer", "tokenizer.model"), folder)
    idx = torch.randint(3, 32000, (2, 30), generator=torch.Generator().manual_seed(1))
    ours = load_model(str(folder))(idx)
    assert torch.allclose(ours, hf.eval()(idx).logits, atol=1e-5)

    data = shared_path("llm-adapters")
    out = tmp_path / "out"
    train_script.main(["--model", str(folder), "--task", "math", "--max_steps", "1", "--micro_batch_size", "1",
                       "--grad_accum", "1", "--cutoff_len", "64", "--data_dir", str(data), "--out_dir", str(out)])
    info = read_adapter(out / "adapter.pt")["info"]
    assert info["model"] == str(folder) and info["checkpoint_dir"] == str(folder)
    evaluate_script.main(["--adapter", str(out / "adapter.pt"), "--data_dir", str(data), "--datasets", "SVAMP",
                          "--limit", "2", "--max_new_tokens", "2"])
    assert "| Llama-2-tiny | interlora |" in (out / "eval-math" / "results.md").read_text()
