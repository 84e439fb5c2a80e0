"""baselines.py (the paper's Adapter and Prefix baselines) and adapters.py, checked against things they do
not compute themselves.

- Trainable parameters: the paper's counts (SPEC §4) on the real model shapes, built on the meta device,
  and every row of the README's method table.
- Adapter: a transcription of LLM-Adapters' series adapter (its peft fork, tuners/bottleneck.py), written
  out in this file and put by hand where LLM-Adapters puts it, gives the same logits; its init is N(0, 0.02).
- Prefix: PEFT's prefix tuning on transformers' LlamaForCausalLM, its table copied into ours on the same
  weights loaded by checkpoints.py, gives the same logits (with and without padding) and trains the same.
- Generation with the KV cache: a left-padded batch equals each prompt alone and a full recomputation.
- The commands: train.py trains both, resumes bit for bit, eval.py evaluates through the adapter file;
  files of another base model, merging and the gate report are one clear error each.
"""
import copy
import json

import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from machinery.adapters import default_targets
from machinery import adapters, decode
import baselines
import eval as evaluate_script
import interlora
import report
import train as train_script
from machinery.adapters import AdapterError
from baselines import AdapterConfig, PrefixConfig, SeriesAdapter, add_adapter, add_prefix
from conftest import ROOT, read_jsonl
from machinery.checkpoints import load_checkpoint
from model import PRESETS, ModelConfig, Transformer

TOL = dict(rtol=1e-5, atol=1e-5)  # fp32: two computations of the same thing


def tiny_model(name="tiny", seed=0, **overrides):
    """A random model.py Transformer of a tiny preset, in eval mode (same seed, same weights)."""
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**PRESETS[name], **overrides})).eval()


def random_tokens(generator, *shape, vocab=259):
    return torch.randint(3, vocab, shape, generator=generator)


def with_baseline(method, name="tiny", seed=0, **overrides):
    """A tiny model with the baseline `method` added (seeded), in eval mode."""
    model = tiny_model(name, seed, **overrides)
    torch.manual_seed(seed + 1)
    adapters.add_adapters(model, adapters.make_config(method))
    return model.eval()


# ----------------------------------------------------------------------------- 1. parameter counts

PAPER_COUNTS = [  # SPEC §4: the paper's 201.33M / 314.57M / 117.44M and its prefix counts
    ("llama-7b", "adapter", 201_326_592), ("llama-13b", "adapter", 314_572_800), ("gptj-6b", "adapter", 117_440_512),
    ("llama-7b", "prefix", 7_864_320), ("llama-13b", "prefix", 12_288_000), ("gptj-6b", "prefix", 6_881_280),
]


def meta_count(model_name, method):
    """Trainable parameters of `method` on the real shapes, built on the meta device (no memory, no time)."""
    with torch.device("meta"):
        model = Transformer(ModelConfig.from_name(model_name))
    try:
        adapters.add_adapters(model, adapters.make_config(method))
    except AdapterError as e:  # an ablation that does not fit GPT-J
        return e
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if adapters.is_adapter_parameter(n)}
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("model_name, method, paper_count", PAPER_COUNTS)
def test_trainable_parameters_equal_the_papers_counts(model_name, method, paper_count):
    assert meta_count(model_name, method) == paper_count


def test_readme_lists_the_counts_the_code_gives_for_every_method():
    """Each row of the README's table (| `method` | what | llama-7b | llama-13b | gptj-6b |) is what the code
    counts, and the table has a row for every --method of train.py."""
    rows = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0].startswith("`") and cells[0].strip("`") in adapters.METHODS:
            rows[cells[0].strip("`")] = cells[2:]
    assert set(rows) == set(adapters.METHODS), "the README's method table lists other methods than train.py"
    for method, cells in rows.items():
        for model_name, cell in zip(["llama-7b", "llama-13b", "gptj-6b"], cells):
            count = meta_count(model_name, method)
            assert cell == (f"{count:,}" if isinstance(count, int) else "n/a"), (method, model_name, cell)


# ----------------------------------------------------------------------------- 2. the adapter = LLM-Adapters'

# LLM-Adapters' TRANSFORMERS_MODELS_TO_ADAPTER_TYPE_MAPPING, under model.py's module names:
# llama: gate_proj (w1), up_proj (w3) -> "mh_adapter", down_proj (w2) -> "output_adapter"; gptj: fc_in (w1), fc_out (w2)
LLM_ADAPTERS_TYPES = {"llama": {"w1": "mh_adapter", "w3": "mh_adapter", "w2": "output_adapter"},
                      "gptj": {"w1": "mh_adapter", "w2": "output_adapter"}}


class LLMAdaptersLinear(nn.Module):
    """LLM-Adapters' bottleneck `Linear.forward` (series adapter, no dropout, scaling 1.0, tanh), transcribed:

        mh_adapter:     residual = x; output = adapter_up(tanh(adapter_down(x))) * scaling + residual
                        result = F.linear(output, weight, bias)
        output_adapter: x = F.linear(x, weight, bias); residual = x
                        result = adapter_up(tanh(adapter_down(x))) * scaling + residual
    """

    def __init__(self, linear, adapter_type, down, up):
        super().__init__()
        self.weight, self.bias, self.adapter_type = linear.weight, linear.bias, adapter_type
        self.down, self.up, self.scaling = down, up, 1.0  # (bottleneck, d), (d, bottleneck)

    def forward(self, x):
        if self.adapter_type == "mh_adapter":
            residual = x
            output = torch.tanh(x @ self.down.T) @ self.up.T * self.scaling
            return F.linear(output + residual, self.weight, self.bias)
        x = F.linear(x, self.weight, self.bias)
        return torch.tanh(x @ self.down.T) @ self.up.T * self.scaling + x


@pytest.mark.parametrize("name", ["tiny", "tiny-gptj"])
def test_adapter_equals_llm_adapters_series_adapter(name):
    model = tiny_model(name)
    reference = copy.deepcopy(model)
    add_adapter(model, AdapterConfig())
    family = model.config.family
    for i, block in enumerate(reference.layers):
        for child, adapter_type in LLM_ADAPTERS_TYPES[family].items():
            ours = model.layers[i].feed_forward.get_submodule(child)
            assert isinstance(ours, SeriesAdapter)  # every LLM-Adapters target is adapted...
            setattr(block.feed_forward, child, LLMAdaptersLinear(
                getattr(block.feed_forward, child), adapter_type, ours.adapter_down.weight.detach(),
                ours.adapter_up.weight.detach()))
    adapted = {n for n, m in model.named_modules() if isinstance(m, SeriesAdapter)}
    assert adapted == {f"layers.{i}.feed_forward.{c}" for i in range(4) for c in LLM_ADAPTERS_TYPES[family]}  # ...only

    idx = random_tokens(torch.Generator().manual_seed(0), 2, 13)
    expected = reference(idx)
    torch.testing.assert_close(model(idx), expected, **TOL)
    assert not torch.allclose(expected, tiny_model(name)(idx), atol=1e-2)  # N(0, 0.02): not the base at step 0
    # and after training moved D and U (the comparison above holds for any D, U, not only small ones)
    with torch.no_grad():
        for layer in adapted:
            for matrix in ("adapter_down", "adapter_up"):
                getattr(model.get_submodule(layer), matrix).weight.mul_(10)
    torch.testing.assert_close(model(idx), reference(idx), **TOL)


def test_adapter_init_is_normal_with_std_002_and_its_arithmetic_fp32():
    model = with_baseline("adapter")
    for matrix in ("adapter_down", "adapter_up"):
        values = torch.cat([p.detach().flatten() for n, p in model.named_parameters() if matrix in n])  # 393,216 each
        assert abs(values.mean()) < 2e-4 and abs(values.std() - 0.02) < 4e-4, (values.mean(), values.std())
        within = (values.abs() < 0.02).float().mean()  # a normal has 68.3% within one std (a uniform 57.7%)
        assert abs(within - 0.6827) < 0.005, within
    # a bf16 base without autocast: the adapter reads an fp32 copy, and the stream stays bf16
    model = tiny_model().to(torch.bfloat16)
    add_adapter(model, AdapterConfig())
    seen = []
    for n, m in model.named_modules():
        if n.endswith(("adapter_down", "adapter_up")):
            m.register_forward_pre_hook(lambda mod, args: seen.append((args[0].dtype, mod.weight.dtype)))
    logits = model(random_tokens(torch.Generator().manual_seed(1), 1, 5))
    assert logits.dtype == torch.bfloat16 and set(seen) == {(torch.float32, torch.float32)}


# ----------------------------------------------------------------------------- 3. the prefix = PEFT's

def tiny_hf_llama():
    """A random transformers LlamaForCausalLM, fp32, eval mode, with grouped-query attention (4 heads, 2 kv heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         initializer_range=0.1)
    return LlamaForCausalLM(config).float().eval()


def peft_prefix(hf_model):
    from peft import PrefixTuningConfig, get_peft_model
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=30)  # prefix_projection=False
    return get_peft_model(copy.deepcopy(hf_model), config)


def peft_table_to_ours(table, n_layer, n_kv_heads, head_dim):
    """PEFT's table (30, layers * 2 * kv width) in the layout of model.py's keys.

    transformers stores LLaMA's q and k rows of each head in rotate-half order (the even dims of Meta's
    interleaved pairs, then the odd ones); model.py keeps Meta's order. A key prefix is compared with the
    queries as stored, so each head's key dims are put back into Meta's order; values keep theirs.
    """
    t = table.detach().reshape(-1, n_layer, 2, n_kv_heads, head_dim).clone()  # (P, layers, k|v, heads, hd)
    keys = t[:, :, 0].unflatten(-1, (2, head_dim // 2))                       # (..., evens|odds, hd/2)
    t[:, :, 0] = keys.transpose(-1, -2).flatten(-2)                           # (..., hd): e0, o0, e1, o1, ...
    return t.flatten(1)


@pytest.fixture(scope="module")
def prefix_pair(tmp_path_factory):
    """(PEFT's prefix model, ours on the same weights with PEFT's table copied in), both fp32."""
    hf_model = tiny_hf_llama()
    folder = tmp_path_factory.mktemp("hf-llama")
    hf_model.save_pretrained(folder)
    peft_model = peft_prefix(hf_model)
    ours = load_checkpoint(folder).float()
    prefix = add_prefix(ours, PrefixConfig())
    table = peft_model.prompt_encoder["default"].embedding.weight
    assert table.shape == prefix.table.shape == (30, 2 * 2 * 2 * 16)
    with torch.no_grad():
        prefix.table.copy_(peft_table_to_ours(table, 2, 2, 16))
    return hf_model, peft_model.eval(), ours.eval()


def test_prefix_gives_peft_logits_without_padding(prefix_pair):
    hf_model, peft_model, ours = prefix_pair
    idx = random_tokens(torch.Generator().manual_seed(0), 3, 11, vocab=96)
    expected = peft_model(input_ids=idx).logits
    assert not torch.allclose(expected, hf_model(input_ids=idx).logits, atol=1e-2)  # the prefix matters
    torch.testing.assert_close(ours(idx), expected, **TOL)


def test_prefix_gives_peft_logits_with_padding(prefix_pair):
    """transformers gives the tokens after a 30-token past the positions 30, 31, ... whatever the mask, so a
    left-padded row is shifted by its padding there; model.py counts real tokens only. Right padding (as
    train.py's batches) compares as is; left padding (as generation's) with the positions ours uses passed
    explicitly (PEFT adds the 30)."""
    _, peft_model, ours = prefix_pair
    idx = random_tokens(torch.Generator().manual_seed(1), 3, 11, vocab=96)
    right = torch.ones_like(idx)
    right[1, 7:], right[2, 3:] = 0, 0
    expected = peft_model(input_ids=idx, attention_mask=right).logits
    real = right.bool()
    torch.testing.assert_close(ours(idx, attention_mask=right)[real], expected[real], **TOL)
    torch.testing.assert_close(ours(idx, attention_mask=right, right_padded=True)[real], expected[real], **TOL)

    left = right.flip(1)
    positions = (left.cumsum(1) - 1).clamp(min=0)
    expected = peft_model(input_ids=idx, attention_mask=left, position_ids=positions).logits
    real = left.bool()
    torch.testing.assert_close(ours(idx, attention_mask=left)[real], expected[real], **TOL)


def test_prefix_trains_as_peft_trains(prefix_pair):
    """The same AdamW steps on the same right-padded batches: the same losses, the same table after."""
    _, peft_model, ours = prefix_pair
    peft_model, ours = copy.deepcopy(peft_model).train(), copy.deepcopy(ours).train()
    generator = torch.Generator().manual_seed(2)
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=3e-2)
                  for m in (peft_model, ours)]
    assert [len(o.param_groups[0]["params"]) for o in optimizers] == [1, 1]  # the table only
    losses = {"peft": [], "ours": []}
    for _ in range(4):
        idx = random_tokens(generator, 3, 12, vocab=96)
        mask = torch.ones_like(idx)
        mask[0, 9:], mask[2, 5:] = 0, 0
        labels = idx.masked_fill(mask == 0, -100)
        for key, loss in (("peft", lambda: peft_model(input_ids=idx, attention_mask=mask, labels=labels).loss),
                          ("ours", lambda: ours(idx, attention_mask=mask, labels=labels, right_padded=True))):
            optimizer = optimizers[key == "ours"]
            value = loss()
            value.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses[key].append(value.item())
    assert losses["ours"] == pytest.approx(losses["peft"], rel=1e-5)
    assert losses["ours"][-1] < losses["ours"][0]  # the steps did something
    table = peft_table_to_ours(peft_model.prompt_encoder["default"].embedding.weight, 2, 2, 16)
    torch.testing.assert_close(ours.prefix_tuning.table.detach(), table, **TOL)


# ----------------------------------------------------------------------------- 4. generation with the KV cache

def left_padded(prompts, pad_id=0):
    length = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        idx[row, length - len(prompt):] = torch.tensor(prompt)
        mask[row, length - len(prompt):] = 1
    return idx, mask


@pytest.mark.parametrize("name", ["tiny", "tiny-gptj"])
@pytest.mark.parametrize("method", ["adapter", "prefix"])
def test_cached_generation_equals_one_prompt_at_a_time_and_full_recomputation(method, name):
    model = with_baseline(method, name)
    generator = torch.Generator().manual_seed(3)
    prompts = [random_tokens(generator, n).tolist() for n in (5, 11, 2)]
    batched = model.generate(prompts, max_new_tokens=6)
    assert batched == [model.generate([p], max_new_tokens=6)[0] for p in prompts]
    for prompt, tokens in zip(prompts, batched):  # greedy, each token from the whole sequence run again
        sequence = list(prompt)
        for _ in range(6):
            sequence.append(int(model(torch.tensor([sequence]))[0, -1].argmax()))
        assert sequence[len(prompt):] == tokens

    # the logits themselves: a left-padded batch through the cache, one token at a time, against each row alone
    idx, mask = left_padded([random_tokens(generator, 12).tolist(), random_tokens(generator, 7).tolist()])
    prompt_len = 5
    model.setup_cache(2, idx.shape[1])
    try:
        steps = [model(idx[:, :prompt_len], attention_mask=mask[:, :prompt_len])]
        for position in range(prompt_len, idx.shape[1]):
            steps.append(model(idx[:, position:position + 1], attention_mask=mask,  # the whole cache's mask
                               start_pos=torch.tensor(position))[:, -1:])
    finally:
        model.clear_cache()
    cached = torch.cat(steps, dim=1)
    for row in range(2):
        real = mask[row].bool()
        torch.testing.assert_close(cached[row, real], model(idx[row:row + 1, real])[0], **TOL)


def test_prefix_decode_step_compiles_once_and_gives_the_eager_tokens():
    from torch._dynamo.utils import counters
    torch.compiler.reset()
    model = with_baseline("prefix", dim=64, n_layer=1, ffn_dim=160)
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12], [40] * 9]
    eager = model.generate(prompts, max_new_tokens=8)
    graphs = counters["stats"]["unique_graphs"]
    assert model.generate(prompts, max_new_tokens=8, decode_step=decode.compiled_decode_step(model)) == eager  # fullgraph: a break would raise
    assert counters["stats"]["unique_graphs"] - graphs == 1
    torch.compiler.reset()


# ----------------------------------------------------------------------------- 5. files, merging

@pytest.mark.parametrize("method", ["adapter", "prefix"])
def test_save_then_load_round_trips_exactly(tmp_path, method):
    model = with_baseline(method)
    path = tmp_path / "adapter.pt"
    adapters.save_adapter(path, model, adapters.make_config(method), info={"model": "tiny", "steps": 3})
    payload = adapters.read_adapter(path)
    assert (payload["format"], payload["version"], payload["method"]) == ("interlora-adapter", 2, method)
    assert set(payload["tensors"]) == {n for n, _ in model.named_parameters() if baselines.is_baseline_parameter(n)}
    fresh = tiny_model()
    cfg, info = adapters.load_adapter(fresh, path)
    assert cfg == adapters.make_config(method) and info == {"model": "tiny", "steps": 3}
    idx = random_tokens(torch.Generator().manual_seed(4), 2, 9)
    assert torch.equal(fresh.eval()(idx), model(idx))
    with pytest.raises(AdapterError, match=re.escape(f"no InterLoRA or LoRA adapter (method '{method}')")):
        interlora.load_adapter(tiny_model(), path, default_targets(tiny_model()))


def test_interlora_files_of_every_version_load_through_adapters(tmp_path):
    model = tiny_model()
    cfg = interlora.InterLoRAConfig(**interlora.VARIANTS["lora"])
    interlora.add_interlora(model, cfg, default_targets(model))
    path = tmp_path / "lora.pt"
    interlora.save_adapter(path, model, cfg, info={"model": "tiny"})
    assert adapters.read_adapter(path)["method"] == "lora"
    old = torch.load(path, weights_only=True)
    del old["method"]
    old["version"] = 1  # as written before the baselines: the method is in the config only
    torch.save(old, path)
    loaded, _ = adapters.load_adapter(tiny_model(), path)
    assert loaded == cfg


MISMATCHED = {  # a model the prefix of `tiny` (4 layers, 4 kv heads x 32) does not fit
    "shallower": dict(n_layer=3),
    "wider": dict(dim=192, n_head=4),
    "other-heads": dict(n_head=8),  # the same width (128), other heads: 8 x 16
}


@pytest.mark.parametrize("base", MISMATCHED)
@pytest.mark.parametrize("method", ["prefix", "adapter"])
def test_loading_onto_another_depth_or_width_is_a_clear_error(tmp_path, method, base):
    model = with_baseline(method)
    path = tmp_path / "adapter.pt"
    adapters.save_adapter(path, model, adapters.make_config(method), info={"model": "tiny"})
    other = tiny_model(**MISMATCHED[base])
    idx = random_tokens(torch.Generator().manual_seed(5), 1, 7)
    before = other(idx)
    if method == "adapter" and base == "other-heads":  # the FFN has the same shapes: it does fit
        adapters.load_adapter(other, path)
        assert not torch.equal(other(idx), before)
        return
    with pytest.raises(AdapterError) as error:
        adapters.load_adapter(other, path)
    message = str(error.value)
    assert str(path) in message and "another base model" in message and "tiny" in message and "\n" not in message
    if method == "prefix":
        assert "4 layers of 4 heads x 32" in message, message
    assert not any(adapters.is_adapter_parameter(n) for n, _ in other.named_parameters())  # left as it was
    assert not other._forward_pre_hooks and torch.equal(other(idx), before)


@pytest.mark.parametrize("method, reason", [("adapter", "nonlinear"), ("prefix", "no weight")])
def test_merging_a_baseline_is_refused_with_the_reason(method, reason):
    model = with_baseline(method)
    idx = random_tokens(torch.Generator().manual_seed(6), 1, 6)
    before = model(idx)
    with pytest.raises(AdapterError) as error:
        adapters.merge(model)
    assert reason in str(error.value) and "unmerged" in str(error.value) and "\n" not in str(error.value)
    assert interlora.merge(model) is model  # interlora.merge finds nothing of its own to fold
    assert torch.equal(model(idx), before)


# ----------------------------------------------------------------------------- 6. the commands

SHORT = ["--model", "tiny", "--task", "math", "--micro_batch_size", "2", "--grad_accum", "2", "--warmup_steps", "2",
         "--cutoff_len", "320", "--max_steps", "6", "--save_every", "2"]
TINY_COUNTS = {"adapter": 4 * 3 * 2 * 128 * 256, "prefix": 30 * 4 * 2 * 128}  # SPEC §4's formulas on `tiny`


@pytest.mark.parametrize("method", ["adapter", "prefix"])
def test_baseline_trains_resumes_and_evaluates_through_the_commands(method, data_dir, tmp_path, monkeypatch, capsys):
    args = [*SHORT, "--method", method, "--data_dir", str(data_dir)]
    train_script.main(args + ["--out_dir", str(tmp_path / "straight")])
    printed = capsys.readouterr().out
    assert f"trainable parameters: {TINY_COUNTS[method]:,} of" in printed
    settings = json.loads((tmp_path / "straight" / "settings.json").read_text())
    assert settings["settings"]["lr"] == {"adapter": 3e-4, "prefix": 3e-2}[method]  # the paper's, by default
    assert settings["adapter"]["method"] == method and settings["trainable_parameters"] == TINY_COUNTS[method]
    losses = [r["loss"] for r in read_jsonl(tmp_path / "straight" / "log.jsonl")]
    assert losses[-1] < 0.95 * losses[0], losses

    # interrupted during step 3 (after the save at step 2), then resumed: the same adapter, bit for bit
    get_lr = train_script.get_lr

    def interrupt_at_step_3(step, *rest):
        if step == 3:
            raise KeyboardInterrupt
        return get_lr(step, *rest)
    monkeypatch.setattr(train_script, "get_lr", interrupt_at_step_3)
    with pytest.raises(SystemExit):
        train_script.main(args + ["--out_dir", str(tmp_path / "resumed")])
    monkeypatch.setattr(train_script, "get_lr", get_lr)
    train_script.main(args + ["--out_dir", str(tmp_path / "resumed"), "--resume"])
    straight, resumed = (adapters.read_adapter(tmp_path / d / "adapter.pt") for d in ("straight", "resumed"))
    assert straight["tensors"].keys() == resumed["tensors"].keys() and straight["method"] == method
    for name in straight["tensors"]:
        assert torch.equal(straight["tensors"][name], resumed["tensors"][name]), name
    logged = [[(r["step"], r["loss"], r["lr"]) for r in read_jsonl(tmp_path / d / "log.jsonl")]
              for d in ("straight", "resumed")]
    assert logged[0] == logged[1]

    # eval.py needs nothing but the adapter file
    capsys.readouterr()
    accuracy = evaluate_script.main(["--adapter", str(tmp_path / "straight" / "adapter.pt"), "--data_dir",
                                     str(data_dir), "--datasets", "AddSub", "--limit", "3", "--max_new_tokens", "4"])
    results = json.loads((tmp_path / "straight" / "eval-math" / "results.json").read_text())
    assert results["method"] == method and results["trainable_parameters"] == TINY_COUNTS[method]
    assert set(accuracy) == {"AddSub"} and f"| tiny | {method} |" in capsys.readouterr().out

    # the gate report and another base model: one clear line each
    for main, argv, fragment in [
            (report.main, ["--adapter", str(tmp_path / "straight" / "adapter.pt"), "--data_dir", str(data_dir)],
             f"has no gates (method {method})"),
            (evaluate_script.main, ["--adapter", str(tmp_path / "straight" / "adapter.pt"), "--model", "tiny-gptj",
                                    "--data_dir", str(data_dir), "--datasets", "AddSub", "--out_dir",
                                    str(tmp_path / "other")], "made for another base model")]:
        with pytest.raises(SystemExit) as stop:
            main(argv)
        lines = capsys.readouterr().err.strip().splitlines()
        assert stop.value.code == 2 and lines[-1].startswith("error: ") and fragment in lines[-1], lines
    assert not (tmp_path / "other").exists()
