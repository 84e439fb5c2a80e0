"""Smoke tests of bench/speed.py on the CPU with tiny shapes: every row runs and reports sane numbers.

Never timing asserts: these check that the harness runs end to end (the reference stack, the
compiled rows and eval.py's path included), that its tables and JSON hold the expected rows,
and that the FLOPs and bytes it divides by are the right ones. torch.compile is given its
"eager" backend here: the compiled code paths run, without minutes of code generation.
"""
import json
import math
import sys

import pytest
import torch
import torch.nn as nn

from bench import full_size, speed
from conftest import shared_path
from machinery.memory import weight_bytes
from machinery.checkpoints import load_model, model_config
from model import SHAPE_FIELDS, ModelConfig, Transformer

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
    assert [(r["batch"], r["stack"], r["mode"]) for r in generate] == [(b, *s) for b in (1, 2)
                                                                       for s in stacks + [("matmuls", "alone")]]
    for r in train:
        assert len(r["times"]) == 2
        for key in ("tokens_per_s", "step_ms", "flops", "of_matmul", "vs_hf_peft"):
            assert positive(r[key]), (key, r)
        assert r["tokens_per_s"] == pytest.approx(2 * 40 / (r["step_ms"] / 1e3))
    for r in generate:
        for key in ("tokens_per_s", "ms_per_step", "floor_ms_per_step", "of_floor", "of_matmuls", "vs_hf_peft"):
            assert positive(r[key]), (key, r)
        assert positive(r["prefill_ms"]) or r["stack"] == "matmuls"  # the bare matmuls have no prefill
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
    assert len(saved["rows"]) == 14 and positive(saved["matmul_flops_per_s"]) and positive(saved["memory_bytes_per_s"])


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
    monkeypatch.setattr("machinery.memory.memory_available", lambda device: 2 ** 20)  # 1 MiB: nothing fits
    full_size.main(["--folder", str(folder), "--load_child", "fp32", "none"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["refused"].startswith("evaluation in fp32 needs")


def test_full_size_measures_each_child_on_its_own(tmp_path):
    """os.wait4 gives each child's own peak (never below this process's RSS: Linux starts a child's count there)."""
    # a child's count starts at this process's size (pytest's, after the tests before): allocate well above it
    size = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    size += 1_500_000_000
    big = full_size.run([sys.executable, "-c", f"x = bytearray({size}); print('held')"], tmp_path / "big.log")
    small = full_size.run([sys.executable, "-c", "print('small')"], tmp_path / "small.log")
    assert big["returncode"] == 0 and big["last_line"] == "held" and big["peak_rss"] > size
    assert small["peak_rss"] < big["peak_rss"] - 500_000_000
    failed = full_size.run([sys.executable, "-c", "raise SystemExit('error: no')"], tmp_path / "failed.log")
    assert failed["returncode"] == 1 and full_size.describe("eval", failed) == "exit 1: error: no"


def test_profile_names_the_operators_and_the_layouts():
    result = speed.main(TINY + ["--work", "profile"])
    (text,) = result["tables"]
    assert "training step" in text and "generation, batch 1" in text and "aten::mm" in text
    assert "stored (out, in)" in text and "stored (in, out)" in text and "a plain read" in text
