"""Smoke tests of bench/speed.py on the CPU with tiny shapes: every row runs and reports sane numbers.

Never timing asserts: these check that the harness runs end to end (the reference stack, the
compiled rows and eval.py's path included), that its tables and JSON hold the expected rows,
and that the FLOPs and bytes it divides by are the right ones. torch.compile is given its
"eager" backend here: the compiled code paths run, without minutes of code generation.
"""
import json
import math

import pytest
import torch
import torch.nn as nn

from bench import speed
from conftest import shared_path
from model import ModelConfig, Transformer

TINY = ["--dim", "64", "--n_layer", "2", "--n_head", "4", "--ffn_dim", "128", "--vocab_size", "300",
        "--micro_batch", "2", "--seq_len", "40", "--batch_sizes", "1,2", "--prompt_len", "4", "--new_tokens", "6",
        "--rounds", "2", "--device", "cpu"]


@pytest.fixture(autouse=True)
def one_thread_quick_compile(monkeypatch):
    # tiny shapes gain nothing from threads, and on a busy machine extra threads make each step stall
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **options: compile(
        fn, backend="eager", fullgraph=options.get("fullgraph", False), dynamic=options.get("dynamic")))
    yield
    torch.compiler.reset()
    torch.set_num_threads(threads)


def positive(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_matmul_weights_are_the_linear_layers():
    for name in ("tiny", "tiny-gptj"):
        model = Transformer(ModelConfig.from_name(name))
        assert speed.matmul_weights(model.config) == sum(
            m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    # LLaMA-7B has 6,738,415,616 parameters: the linear layers plus the embedding and 65 RMSNorm weights
    config = ModelConfig.from_name("llama-7b")
    embedding, norms = config.vocab_size * config.dim, (2 * config.n_layer + 1) * config.dim
    assert speed.matmul_weights(config) + embedding + norms == 6_738_415_616


def test_every_row_runs_and_reports_sane_numbers(tmp_path, capsys):
    out = tmp_path / "speed.json"
    result = speed.main(TINY + ["--json", str(out)])
    train = [r for r in result["rows"] if r["work"] == "train"]
    generate = [r for r in result["rows"] if r["work"] == "generate"]
    stacks = [("ours", "eager"), ("ours", "compiled"), ("hf+peft", "eager")]
    assert [(r["method"], r["stack"], r["mode"]) for r in train] == [(m, *s) for m in ("interlora", "lora") for s in stacks]
    assert [(r["batch"], r["stack"], r["mode"]) for r in generate] == [(b, *s) for b in (1, 2) for s in stacks]
    for r in train:
        assert len(r["times"]) == 2
        for key in ("tokens_per_s", "step_ms", "flops", "of_matmul", "vs_hf_peft"):
            assert positive(r[key]), (key, r)
        assert r["tokens_per_s"] == pytest.approx(2 * 40 / (r["step_ms"] / 1e3))
    for r in generate:
        for key in ("tokens_per_s", "ms_per_step", "floor_ms_per_step", "of_floor", "prefill_ms", "vs_hf_peft"):
            assert positive(r[key]), (key, r)
        assert r["tokens_per_s"] == pytest.approx(r["batch"] * 1e3 / r["ms_per_step"])
    assert all(r["vs_hf_peft"] == 1.0 for r in result["rows"] if r["stack"] == "hf+peft")
    # InterLoRA's gates add weights to LoRA r=4 on the same modules; LoRA r=10 is PEFT's size exactly
    adapters = {(r["method"], r["stack"]): r["adapter_params"] for r in train}
    assert adapters["interlora", "ours"] > adapters["interlora", "hf+peft"]
    assert adapters["lora", "ours"] == adapters["lora", "hf+peft"]
    # each batch has its own KV cache to read: the floor grows with it
    floors = {r["batch"]: r["floor_ms_per_step"] for r in generate}
    assert floors[1] < floors[2]
    printed = capsys.readouterr().out
    assert printed.count("| ours compiled |") == 4 and printed.count("| hf+peft eager |") == 4
    saved = json.loads(out.read_text())
    assert len(saved["rows"]) == 12 and positive(saved["matmul_flops_per_s"]) and positive(saved["memory_bytes_per_s"])


def test_decode_floor_counts_the_weights_and_the_cache():
    s = speed.settings_from_command_line(speed.Settings, "", ["--prompt_len", "10", "--new_tokens", "5"])
    config = ModelConfig.from_name("tiny")
    model = speed.build_ours(config, "interlora", "cpu", torch.float32)
    weights = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("tok_embeddings"))
    cache = 2 * config.n_layer * 3 * config.n_kv_heads * config.head_dim * (10 + 3)  # batch 3, mean context 13
    assert speed.decode_floor_bytes(model, config, 3, s) == 4 * (weights + cache)


def test_eval_work_runs_through_generate_batches():
    data_dir = shared_path("llm-adapters")
    result = speed.main(TINY + ["--work", "eval", "--data_dir", str(data_dir), "--limit", "2", "--eval_new_tokens",
                                "4", "--eval_batch_size", "5"])
    (row,) = result["rows"]
    assert row["prompts"] == 12 and row["mode"] == "compiled"  # two of each of the six math test sets
    assert 0 < row["new_tokens"] <= 12 * 4 and positive(row["wall_s"])


def test_bad_work_is_a_clear_error():
    with pytest.raises(speed.RunError, match="--work"):
        speed.main(["--work", "fly"])
