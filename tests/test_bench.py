"""Smoke tests of the benchmarks on CPU with tiny models: every row runs and reports sane numbers.

Never timing asserts: these check that the scripts run end to end (the reference stack and
the evaluation workload included), that their tables and JSON hold the expected rows, and
that the FLOP count they divide by is the right one.
"""
import json
import math
import sys

import pytest
import torch
import torch.nn as nn

from bench import full_size, generate_speed, train_speed
from conftest import shared_path
from memory import weight_bytes
from model import SHAPE_FIELDS, ModelConfig, Transformer, load_model, model_config


@pytest.fixture(autouse=True)
def one_thread():
    # tiny shapes gain nothing from threads, and on a busy machine extra threads make each step stall
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def positive(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


# ----------------------------------------------------------------------------- train_speed

def test_matmul_params_count_the_linear_layers():
    for name in ("tiny", "tiny-gptj"):
        model = Transformer(ModelConfig.from_name(name))
        linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
        assert train_speed.matmul_params(model.config) == linear
    # LLaMA-7B has 6,738,415,616 parameters: the linear layers plus the embedding and 65 RMSNorm weights
    config = ModelConfig.from_name("llama-7b")
    embedding, norms = config.vocab_size * config.dim, (2 * config.n_layer + 1) * config.dim
    assert train_speed.matmul_params(config) + embedding + norms == 6_738_415_616


def test_train_speed_runs_ours_and_the_reference(tmp_path, capsys):
    out = tmp_path / "train.json"
    result = train_speed.main(["--model", "tiny,tiny-gptj", "--batch_sizes", "2", "--seq_len", "32",
                               "--steps", "2", "--warmup", "1", "--device", "cpu", "--json", str(out)])
    rows = result["rows"]
    expected = {(model, implementation, method) for model in ("tiny", "tiny-gptj")
                for implementation in ("ours", "hf+peft") for method in ("interlora", "lora")}
    assert {(r["model"], r["implementation"], r["method"]) for r in rows} == expected
    for r in rows:
        assert r["status"] == "ok", r
        assert r["batch"] == 2 and r["mode"] == "eager"
        for key in ("tokens_per_s", "step_ms", "flops_per_step", "mfu_measured", "vs_hf_peft"):
            assert positive(r[key]), (key, r)
        assert r["mfu_datasheet"] is None and r["peak_memory_gb"] is None  # no such numbers on CPU
        assert r["tokens_per_s"] == pytest.approx(2 * 32 / (r["step_ms"] / 1e3))
        if r["implementation"] == "hf+peft":
            assert r["vs_hf_peft"] == 1.0
    # InterLoRA r=4 on q, v, down + gates has more adapter weights than LoRA r=4 on the same modules
    adapters = {(r["model"], r["implementation"], r["method"]): r["adapter_params"] for r in rows}
    assert adapters[("tiny", "ours", "interlora")] > adapters[("tiny", "hf+peft", "interlora")]
    assert adapters[("tiny", "ours", "lora")] == adapters[("tiny", "hf+peft", "lora")]  # same LoRA, same size
    attention = {(r["model"], r["implementation"]): r["attention"] for r in rows}
    assert attention[("tiny-gptj", "hf+peft")] == "eager"  # transformers has no sdpa for GPT-J
    table = capsys.readouterr().out
    assert table.count("| tiny ") == 4 and table.count("| tiny-gptj ") == 4
    saved = json.loads(out.read_text())
    assert saved["settings"]["seq_len"] == 32 and len(saved["rows"]) == 8
    assert positive(saved["environment"]["matmul_tflops_measured"])


def test_train_speed_reports_a_failed_compile_in_its_row(monkeypatch):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("no compiler here")
    monkeypatch.setattr(torch, "compile", no_compiler)
    # also the other options: gradient checkpointing in both stacks, no attention mask
    rows = train_speed.main(["--model", "tiny", "--batch_sizes", "2", "--seq_len", "16", "--steps", "1",
                             "--warmup", "1", "--device", "cpu", "--compile", "--grad_checkpointing",
                             "--attention_mask", "none"])["rows"]
    assert [(r["implementation"], r["mode"]) for r in rows] == [("ours", "eager"), ("ours", "compiled"),
                                                               ("hf+peft", "eager")] * 2
    for r in rows:
        if r["mode"] == "eager":
            assert r["status"] == "ok" and positive(r["tokens_per_s"]) and positive(r["vs_hf_peft"])
        else:
            assert r["status"].startswith("failed") and "no compiler here" in r["status"]


# ----------------------------------------------------------------------------- generate_speed

def test_generate_speed_runs_ours_and_the_reference(tmp_path, capsys):
    out = tmp_path / "generate.json"
    result = generate_speed.main(["--model", "tiny", "--batch_sizes", "1,2", "--prompt_len", "8",
                                  "--new_tokens", "16", "--repeats", "3", "--device", "cpu", "--json", str(out)])
    rows = result["speed"]
    assert [(r["implementation"], r["batch"]) for r in rows] == [("ours", 1), ("ours", 2), ("hf+peft", 1),
                                                                ("hf+peft", 2)]
    for r in rows:
        assert r["status"] == "ok", r
        for key in ("prefill_ms", "decode_tokens_per_s", "ms_per_step", "floor_ms_per_step", "of_roofline",
                    "vs_hf_peft"):
            assert positive(r[key]), (key, r)
        assert r["decode_tokens_per_s"] == pytest.approx(r["batch"] * 16 / r["decode_s"])
    # the floor grows with the batch: each row has its own KV cache to read
    floors = {(r["implementation"], r["batch"]): r["floor_ms_per_step"] for r in rows}
    assert floors[("ours", 1)] < floors[("ours", 2)]
    assert result["eval_workload"] == []
    assert capsys.readouterr().out.count("| tiny ") == 4
    saved = json.loads(out.read_text())
    assert len(saved["speed"]) == 4 and positive(saved["environment"]["copy_bandwidth_bytes_per_s"])


def test_generate_speed_reports_a_failed_compile_in_its_row(monkeypatch):
    def no_compiler(self, *args, **kwargs):
        raise RuntimeError("no compiler here")
    monkeypatch.setattr(torch.nn.Module, "compile", no_compiler)
    monkeypatch.setattr(torch._logging, "set_logs", lambda **kwargs: None)  # leave the process's logging alone
    rows = generate_speed.main(["--model", "tiny", "--batch_sizes", "1", "--prompt_len", "4", "--new_tokens", "4",
                                "--repeats", "1", "--device", "cpu", "--compile", "--skip_reference"])["speed"]
    assert [r["mode"] for r in rows] == ["eager", "compiled"]
    assert rows[0]["status"] == "ok"
    assert rows[1]["status"].startswith("failed") and "no compiler here" in rows[1]["status"]


def test_eval_workload_prompts_are_the_math_test_split():
    data_dir = shared_path("llm-adapters")
    settings = generate_speed.parse_settings(["--model", "tiny", "--data_dir", str(data_dir), "--device", "cpu"])
    prompts, _ = generate_speed.workload_prompts(settings, "tiny")
    assert len(prompts) == 806  # the paper's math test split: 20% of each of the six sets
    # llama-7b through the sentencepiece tokenizer (LLaMA's vocabulary layout), as the GPU run uses it
    settings.tokenizer = str(shared_path("spm-tokenizer"))
    settings.new_tokens = 256
    prompts, tokenizer = generate_speed.workload_prompts(settings, "llama-7b")
    assert len(prompts) == 806 and all(p[0] == tokenizer.bos_id for p in prompts)
    assert max(map(len, prompts)) + 256 <= ModelConfig.from_name("llama-7b").max_seq_len


def test_eval_workload_without_a_tokenizer_stops_before_building():
    settings = generate_speed.parse_settings(["--model", "llama-7b", "--device", "cpu"])
    with pytest.raises(SystemExit, match="needs --tokenizer"):
        generate_speed.workload_prompts(settings, "llama-7b")


def test_eval_workload_runs_through_generate_batches(tmp_path):
    data_dir = shared_path("llm-adapters")
    result = generate_speed.main(["--model", "tiny", "--skip_speed", "--eval_workload", "--data_dir", str(data_dir),
                                  "--limit", "2", "--new_tokens", "4", "--eval_batch_size", "5", "--device", "cpu"])
    assert result["speed"] == []
    (row,) = result["eval_workload"]
    assert row["prompts"] == 12  # two of each of the six math test sets
    assert 0 < row["new_tokens"] <= 12 * 4 and row["stopped_at_eos"] <= 12
    assert positive(row["wall_s"]) and positive(row["new_tokens_per_s"])
    assert "| tiny | ours eager | 12 | 5 | 4 |" in result["tables"]["eval"]


# ----------------------------------------------------------------------------- full_size

SMALL_LLAMA = ModelConfig(vocab_size=300, dim=64, n_layer=2, n_head=4, ffn_dim=192)  # Meta's rule with multiple_of 32


def test_full_size_writes_meta_layout_that_loads(tmp_path):
    tokenizer = shared_path("spm-tokenizer", "tokenizer.model")
    folder = tmp_path / "llama" / "7B"
    full_size.write_meta_llama(folder, SMALL_LLAMA, tokenizer, multiple_of=32)
    # LLaMA-1's params.json, and the tokenizer beside the size folders as in Meta's download
    assert json.loads((folder / "params.json").read_text()) == {
        "dim": 64, "n_heads": 4, "n_layers": 2, "norm_eps": 1e-06, "multiple_of": 32, "vocab_size": -1}
    assert (tmp_path / "llama" / "tokenizer.model").read_bytes() == tokenizer.read_bytes()
    config, _ = model_config(str(folder))
    assert all(getattr(config, f) == getattr(SMALL_LLAMA, f) for f in SHAPE_FIELDS)
    state = torch.load(folder / "consolidated.00.pth", weights_only=True)
    assert {t.dtype for t in state.values()} == {torch.float16}
    assert abs(state["layers.0.feed_forward.w1.weight"].float().std().item() - 0.02) < 0.001
    model = load_model(str(folder), dtype=torch.bfloat16)
    with torch.no_grad():
        assert model(torch.randint(0, 300, (1, 8))).isfinite().all()


def test_full_size_refuses_a_config_params_json_cannot_describe(tmp_path):
    with pytest.raises(ValueError, match="ffn_dim 192"):
        full_size.write_meta_llama(tmp_path, ModelConfig(vocab_size=300, dim=64, n_layer=2, n_head=4, ffn_dim=200),
                                   tmp_path / "tokenizer.model", multiple_of=32)


def test_full_size_load_child_reports_or_refuses(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "llama" / "7B"
    full_size.write_meta_llama(folder, SMALL_LLAMA, shared_path("spm-tokenizer", "tokenizer.model"), multiple_of=32)
    full_size.main(["--folder", str(folder), "--load_child", "bf16", "int8"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["model_bytes"] == sum(weight_bytes(SMALL_LLAMA, "bf16", "int8").values())
    assert report["load_s"] > 0 and report["rss_after_load"] > report["model_bytes"]
    monkeypatch.setattr("memory.memory_available", lambda device: 2 ** 20)  # 1 MiB: nothing fits
    full_size.main(["--folder", str(folder), "--load_child", "fp32", "none"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["refused"].startswith("evaluation in fp32 needs")


def test_full_size_measures_each_child_on_its_own(tmp_path):
    """os.wait4 gives each child's own peak (never below this process's RSS: Linux starts a child's count there)."""
    big = full_size.run([sys.executable, "-c", "x = bytearray(1_500_000_000); print('held')"], tmp_path / "big.log")
    small = full_size.run([sys.executable, "-c", "print('small')"], tmp_path / "small.log")
    assert big["returncode"] == 0 and big["last_line"] == "held" and big["peak_rss"] > 1_500_000_000
    assert small["peak_rss"] < big["peak_rss"] - 500_000_000
    failed = full_size.run([sys.executable, "-c", "raise SystemExit('error: no')"], tmp_path / "failed.log")
    assert failed["returncode"] == 1 and full_size.describe("eval", failed) == "exit 1: error: no"
