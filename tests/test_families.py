"""Llama 3.x, Mistral and Qwen2.5 checkpoints: tiny random models made by transformers (their own
config classes), saved in the real on-disk layouts, read by our loader; transformers' logits and
greedy tokens are the reference."""
import json
import math

import pytest
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM)

import train as train_script
from machinery import adapters
from machinery.checkpoints import load_checkpoint, model_config
from model import CheckpointError, ModelConfig, Transformer, rotary_frequencies
from test_model import meta_state_dict, randomize_

VOCAB, DIM, N_LAYER, N_HEAD, N_KV, FFN = 300, 64, 2, 4, 2, 192
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
SHAPES = dict(vocab_size=VOCAB, hidden_size=DIM, intermediate_size=FFN, num_hidden_layers=N_LAYER,
              num_attention_heads=N_HEAD, num_key_value_heads=N_KV, max_position_embeddings=512,
              initializer_range=0.1, bos_token_id=1, pad_token_id=0)


def family_model(family):
    """A tiny random transformers model of the family, with its distinguishing config."""
    torch.manual_seed(0)
    if family == "llama-3.1":  # scaled rope with a small original window, instruct-style eos list
        config = LlamaConfig(**SHAPES, rope_theta=500000.0, rope_scaling=dict(LLAMA3_ROPE),
                             eos_token_id=[2, 3], tie_word_embeddings=False)
        return randomize_(LlamaForCausalLM(config))
    if family == "llama-3.2":  # tied embeddings, factor 32
        config = LlamaConfig(**SHAPES, rope_theta=500000.0,
                             rope_scaling={**LLAMA3_ROPE, "factor": 32.0},
                             eos_token_id=2, tie_word_embeddings=True)
        return randomize_(LlamaForCausalLM(config))
    if family == "mistral":
        config = MistralConfig(**SHAPES, sliding_window=4096, eos_token_id=2,
                               tie_word_embeddings=False)
        return randomize_(MistralForCausalLM(config))
    if family == "qwen2.5":  # q/k/v biases (randomized by randomize_), tied, rope_theta 1e6
        config = Qwen2Config(**SHAPES, rope_theta=1e6, tie_word_embeddings=True,
                             use_sliding_window=False,
                             eos_token_id=2)
        return randomize_(Qwen2ForCausalLM(config))
    raise ValueError(family)


def save_sharded(hf_model, folder):
    hf_model.save_pretrained(folder, max_shard_size="100KB")  # several shards and the index
    assert (folder / "model.safetensors.index.json").exists()
    assert len(list(folder.glob("model-*.safetensors"))) > 1
    return folder


def tokens(length, seed=1):
    return torch.randint(3, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))


def assert_same_as_transformers(model, hf_model, length=200):
    """Logits (fp32, 1e-5) at positions past a 64-token original window, and 20 greedy tokens."""
    idx = tokens(length)
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf_model(idx).logits, atol=1e-5, rtol=0)
        prompt = tokens(12, seed=2)[:1]
        reference = hf_model.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None,
                                      pad_token_id=0)[0, 12:].tolist()
    assert model.generate(prompt.tolist(), max_new_tokens=20)[0] == reference


FAMILIES = ["llama-3.1", "llama-3.2", "mistral", "qwen2.5"]


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_folder_matches_transformers(tmp_path, family):
    hf_model = family_model(family).eval()
    folder = save_sharded(hf_model, tmp_path / family)
    model = load_checkpoint(folder)
    assert_same_as_transformers(model, hf_model)
    # the parameter count is transformers' (tied embeddings counted once)
    count = sum(p.numel() for p in hf_model.parameters())
    assert sum(p.numel() for p in model.parameters()) == count
    tied = hf_model.config.tie_word_embeddings
    assert (model.output.weight is model.tok_embeddings.weight) == tied


def test_eos_list_is_passed_on(tmp_path):
    folder = save_sharded(family_model("llama-3.1"), tmp_path / "l31")
    config, _ = model_config(str(folder))
    assert config.eos_id == 2 and config.eos_ids == (2, 3) and config.rope_factor == 8.0


def test_llama3_scaling_changes_the_long_wavelengths_only():
    """Independent of transformers: Meta's rule on a few frequencies by hand."""
    config = ModelConfig(dim=64, n_head=4, n_layer=1, vocab_size=10, ffn_dim=8, rope_theta=500000.0,
                         rope_factor=8.0, rope_original_max_len=64)
    plain = 1.0 / 500000.0 ** (torch.arange(0, 16, 2).float() / 16)
    scaled = rotary_frequencies(config)
    wavelen = 2 * torch.pi / plain
    assert torch.equal(scaled[wavelen < 16], plain[wavelen < 16])        # < 64 / high_freq_factor
    long = wavelen > 64  # > 64 / low_freq_factor
    torch.testing.assert_close(scaled[long], plain[long] / 8)


def write_meta_llama3(folder, hf_model, tied):
    """Meta's Llama 3 layout: params.json with use_scaled_rope, consolidated.00.pth."""
    folder.mkdir()
    c = hf_model.config
    params = {"dim": c.hidden_size, "n_layers": c.num_hidden_layers,
              "n_heads": c.num_attention_heads,
              "n_kv_heads": c.num_key_value_heads, "vocab_size": c.vocab_size, "multiple_of": 32,
              "ffn_dim_multiplier": 1.0, "norm_eps": c.rms_norm_eps, "rope_theta": 500000.0,
              "use_scaled_rope": True}
    (folder / "params.json").write_text(json.dumps(params))
    state = meta_state_dict(hf_model)
    del state["rope.freqs"]
    if tied:
        del state["output.weight"]
    torch.save(state, folder / "consolidated.00.pth")
    return folder


@pytest.mark.parametrize("tied", [False, True])
def test_meta_llama3_folder_with_scaled_rope(tmp_path, tied):
    """use_scaled_rope: true alone; a model narrower than 4096 is Llama 3.2 (factor 32,
    window 8192)."""
    torch.manual_seed(0)
    hf_model = randomize_(LlamaForCausalLM(LlamaConfig(
        **SHAPES, rope_theta=500000.0, tie_word_embeddings=tied, eos_token_id=2,
        rope_scaling={**LLAMA3_ROPE, "factor": 32.0, "original_max_position_embeddings": 8192})))
    assert FFN == 32 * -(-int(2 * 4 * DIM / 3) // 32)  # Meta's FFN rule gives transformers' width
    folder = write_meta_llama3(tmp_path / "meta", hf_model, tied)
    model = load_checkpoint(folder)
    assert model.config.rope_factor == 32.0
    assert_same_as_transformers(model, hf_model)


def write_refused(folder, **fields):
    folder.mkdir()
    config = {"model_type": "llama", "hidden_size": DIM, "num_attention_heads": N_HEAD,
              "num_hidden_layers": N_LAYER, "intermediate_size": FFN, "vocab_size": VOCAB, **fields}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("fields, words", [
    ({"model_type": "qwen3"}, ["qwen3", "q and k are RMS-normalised"]),
    ({"model_type": "gemma"}, ["gemma", "not supported"]),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, ["rope_scaling", "yarn"]),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, ["rope_scaling", "linear"]),
    ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0},
      "rope_scaling": {"rope_type": "default"}}, ["rope_parameters", "dynamic"]),
    ({"model_type": "qwen2", "use_sliding_window": True}, ["use_sliding_window"]),
])
def test_what_cannot_run_exactly_is_refused_in_one_line(tmp_path, fields, words):
    folder = write_refused(tmp_path / "f", **fields)
    with pytest.raises(CheckpointError) as error:
        model_config(str(folder))
    message = str(error.value)
    assert "\n" not in message and all(w in message for w in words), message


def write_byte_bpe(folder):
    """A GPT-2 style tokenizer with no merges: every byte one token (ids 3..258), <|endoftext|> 2,
    so that train.py reads text for these folders (their real tokenizers are not this helper's)."""
    from data import bytes_to_unicode
    vocab = {char: 3 + byte for byte, char in bytes_to_unicode().items()}
    (folder / "vocab.json").write_text(json.dumps({**vocab, "<|endoftext|>": 2}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return folder


def test_mistral_window_shorter_than_the_run_is_refused(tmp_path, capsys):
    torch.manual_seed(0)
    config = MistralConfig(**{**SHAPES, "vocab_size": 259}, sliding_window=32,
                           tie_word_embeddings=False)
    folder = tmp_path / "mistral-w32"
    MistralForCausalLM(config).save_pretrained(folder)
    write_byte_bpe(folder)
    capsys.readouterr()  # transformers' progress bars while saving are not the run's output
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        train_script.main(["--model", str(folder), "--task", "math", "--max_steps", "1",
                           "--cutoff_len", "64", "--out_dir", str(out)])
    assert stop.value.code in (1, 2)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "sliding_window is 32" in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("family", ["llama-3.2", "qwen2.5"])
def test_tied_output_is_never_an_adapter_target_and_merge_keeps_it_shared(tmp_path, family):
    """LoRA on every target of a tied (and for Qwen2 biased) model: the shared matrix stays one
    frozen parameter, and merging W += lambda B A gives the unmerged logits."""
    model = load_checkpoint(save_sharded(family_model(family), tmp_path / family))
    cfg = adapters.make_config("ffn-all", r=4, alpha=8, dropout=0.0, gate_pool="mean")
    cfg.method, cfg.attention_gate, cfg.ffn_gate = "lora", False, "none"  # mergeable: plain LoRA
    replaced = adapters.add_adapters(model, cfg)
    assert not any("output" in n or "tok_embeddings" in n for n in replaced)
    assert model.output.weight is model.tok_embeddings.weight
    assert not model.output.weight.requires_grad
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    # LoRA's count: r (d_in + d_out) for q, v (the paper's attention targets), gate, up, down
    per_layer = 4 * ((DIM + DIM) + (DIM + N_KV * DIM // N_HEAD) + 3 * (DIM + FFN))
    assert sum(p.numel() for p in trainable.values()) == N_LAYER * per_layer
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in trainable.items():  # B starts at 0: make the update real
            param.normal_(0, 0.05)
        idx = tokens(40)
        unmerged = model(idx)
        adapters.merge(model)
        torch.testing.assert_close(model(idx), unmerged, atol=1e-5, rtol=0)
    assert model.output.weight is model.tok_embeddings.weight


@pytest.mark.parametrize("family", FAMILIES)
def test_train_two_steps_and_evaluate_on_a_family_folder(tmp_path, data_dir, family):
    """train.py's main in-process on the tiny sharded folder: two InterLoRA steps that move B,
    the adapter file without the (shared) embedding, loadable onto the folder's model; then
    eval.py on that adapter, the base found from its record."""
    hf_model = family_model(family)
    folder = write_byte_bpe(save_sharded(hf_model, tmp_path / family))
    out = tmp_path / "run"
    train_script.main(["--model", str(folder), "--task", "math", "--max_steps", "2",
                       "--micro_batch_size", "2", "--grad_accum", "1", "--cutoff_len", "64",
                       "--data_dir", str(data_dir), "--out_dir", str(out), "--device", "cpu"])
    losses = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(map(math.isfinite, losses))
    tensors = torch.load(out / "adapter.pt", weights_only=True)["tensors"]
    assert tensors and not any("embed" in n or "output" in n for n in tensors), list(tensors)
    assert any(n.endswith("lora_B.weight") and t.abs().sum() > 0 for n, t in tensors.items())
    model = load_checkpoint(folder)  # the adapter file fits the folder's model again
    adapters.load_adapter(model, out / "adapter.pt")
    tied = model.output.weight is model.tok_embeddings.weight
    assert tied == hf_model.config.tie_word_embeddings
    import eval as eval_script
    # the random model may pick any of its VOCAB ids: name the ones past the bytes, as a real
    # tokenizer names every row of its model's embedding
    vocab = json.loads((folder / "vocab.json").read_text())
    vocab |= {f"<|extra_{i}|>": i for i in range(max(vocab.values()) + 1, VOCAB)}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    accuracy = eval_script.main(["--adapter", str(out / "adapter.pt"), "--data_dir", str(data_dir),
                                 "--datasets", "AddSub", "--limit", "2", "--max_new_tokens", "4",
                                 "--out_dir", str(tmp_path / "eval"), "--device", "cpu"])
    assert set(accuracy) == {"AddSub"}
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["items"] == {"AddSub": 2} and results["model"] == str(folder)


@pytest.mark.parametrize("dim, factor", [(2048, 32.0), (3072, 32.0), (4096, 8.0), (8192, 8.0)])
def test_meta_params_json_scaling_factor_follows_the_width(tmp_path, dim, factor):
    """Meta's params.json says only use_scaled_rope: Llama 3.2 (1B 2048, 3B 3072 wide) is 32,
    3.1/3.3 (8B 4096, 70B 8192, 405B 16384) 8, as their published config.json files say."""
    folder = tmp_path / "meta"
    folder.mkdir()
    params = {"dim": dim, "n_layers": 2, "n_heads": dim // 128, "n_kv_heads": 8,
              "vocab_size": 128256,
              "multiple_of": 256, "ffn_dim_multiplier": 1.5, "norm_eps": 1e-5,
              "rope_theta": 500000.0, "use_scaled_rope": True}
    (folder / "params.json").write_text(json.dumps(params))
    config, _ = model_config(str(folder))
    assert (config.rope_factor, config.rope_original_max_len) == (factor, 8192)
    assert (config.rope_low_freq_factor, config.rope_high_freq_factor) == (1.0, 4.0)
    params["use_scaled_rope"] = False
    (folder / "params.json").write_text(json.dumps(params))
    assert model_config(str(folder))[0].rope_factor == 0.0


def test_mistral_window_equal_to_the_sequence_is_exact(tmp_path):
    """transformers' window lets a token see the W - 1 before it: a sequence of exactly W tokens
    is the longest that full causal attention computes exactly, so check_window accepts it."""
    from machinery.checkpoints import check_window
    torch.manual_seed(0)
    config = MistralConfig(**SHAPES, sliding_window=32, eos_token_id=2, tie_word_embeddings=False)
    hf_model = randomize_(MistralForCausalLM(config))
    folder = tmp_path / "mistral-w32"
    hf_model.save_pretrained(folder)
    model = load_checkpoint(folder)
    check_window(model.config, 32, "a test")
    with pytest.raises(CheckpointError):
        check_window(model.config, 33, "a test")
    idx = tokens(32)
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf_model(idx).logits, atol=1e-5, rtol=0)
        # one token more and transformers' window cuts the first token off: the refusal is needed
        longer = tokens(33)
        assert not torch.allclose(model(longer)[:, -1], hf_model(longer).logits[:, -1], atol=1e-5)


def test_eval_refuses_prompts_plus_answers_past_the_window(tmp_path, data_dir, capsys):
    import eval as eval_script
    config = MistralConfig(**SHAPES, sliding_window=32, tie_word_embeddings=False)
    folder = tmp_path / "mistral-w32"
    MistralForCausalLM(config).save_pretrained(folder)
    write_byte_bpe(folder)
    capsys.readouterr()
    out = tmp_path / "eval"
    with pytest.raises(SystemExit) as stop:
        eval_script.main(["--model", str(folder), "--base", "--task", "math", "--data_dir",
                          str(data_dir), "--max_new_tokens", "8", "--out_dir", str(out)])
    assert stop.value.code in (1, 2)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    assert "--max_new_tokens 8" in err[0] and "sliding_window is 32" in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_memory_plan_counts_tied_and_biased_weights_once(tmp_path, family, quantize):
    """machinery/memory.py's weight bytes are the loaded model's (a shared matrix counted once)."""
    from machinery.memory import weight_bytes
    from machinery.quantize import quantize_model
    model = load_checkpoint(save_sharded(family_model(family), tmp_path / family))
    if quantize:
        quantize_model(model, quantize)
    stored = {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()
    total = sum(t.numel() * t.element_size() for t in stored)
    assert sum(weight_bytes(model.config, "fp32", quantize).values()) == total
