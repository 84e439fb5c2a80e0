"""interlora.py checked against things it does not compute itself.

- Trainable parameter counts: the paper's own numbers (SPEC §1, Tables 1/2/5) on the real
  model shapes (built on the meta device), and for every named ablation a closed-form count
  written here from the SPEC's reading of Eq. 4-8.
- method="lora": PEFT's LoRA on transformers' LlamaForCausalLM (same A and B, same logits),
  directly and through checkpoints.py's loader of the same Hugging Face weights.
- The gates: a plain-tensor transcription of Eq. 4-8 written in this file, fed with each
  layer's own weights and inputs (both poolings, with padding).
- Padding and generation: the same sequence alone (no padding at all), a full recomputation
  without a KV cache, and one-prompt-at-a-time generation.
- Merging, saving and loading: the unmerged model and the model the file was saved from.

Models are tiny and random (model.py's `tiny` / `tiny-gptj`, a small transformers LLaMA).
"""
import copy
import functools
import os

import pytest
import torch
import torch.nn.functional as F

from machinery.adapters import default_targets
from machinery import adapters, fused
from interlora import (VARIANTS, AdapterError, InterLoRAConfig, InterLoRALinear, add_interlora,
                       adapter_state_dict, is_adapter_parameter, load_adapter, merge,
                       remove_interlora, save_adapter)
from conftest import ROOT
from machinery.checkpoints import load_checkpoint
from model import PRESETS, ModelConfig, Transformer

TOL = dict(rtol=1e-5, atol=1e-5)  # fp32 comparisons between two computations of the same thing


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; several spin and stall when other jobs share the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- helpers

def tiny_model(name="tiny", seed=0, **overrides):
    """A random model.py Transformer of a tiny preset, in eval mode (same seed, same weights)."""
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**PRESETS[name], **overrides})).eval()


def randomise_adapters(model, seed=1, std=0.2):
    """Non-zero values for every adapter tensor (B starts at zero), α in [1.5, 2.5): adapters that matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not is_adapter_parameter(name):
                continue
            if param.dim() == 0:  # α of Eq. 7
                param.fill_(1.5 + torch.rand((), generator=generator).item())
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return model


def adapted(name="tiny", seed=0, **cfg_fields):
    """A tiny model with InterLoRA (cfg_fields) added and randomised, in eval mode, and its config."""
    model = tiny_model(name, seed)
    cfg = InterLoRAConfig(**cfg_fields)
    add_interlora(model, cfg, default_targets(model))
    return randomise_adapters(model).eval(), cfg


def adapter_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, InterLoRALinear)}


def record_inputs(model):
    """{layer name: [(input, output) of each call]} for every InterLoRALinear, through forward hooks."""
    inputs = {}
    for name, layer in adapter_layers(model).items():
        inputs[name] = []
        layer.register_forward_hook(lambda mod, args, out, calls=inputs[name]: calls.append(
            (args[0].detach().clone(), out.detach().clone())))
    return inputs


def record_head_gates(model):
    """{layer name: [the head gate used in each call]} by wrapping each attention layer's Eq. 5.

    Reads InterLoRALinear's internals (`gate == "head"`, `head_gate`): rename them here too.
    """
    gates = {}
    for name, layer in adapter_layers(model).items():
        if layer.gate != "head":
            continue
        calls = gates[name] = []

        def wrapped(x, original=layer.head_gate, calls=calls):
            g = original(x)
            calls.append(g.detach().clone())
            return g
        layer.head_gate = wrapped
    return gates


def left_padded(prompts, pad_id=0):
    """(tokens, mask) of prompts of different lengths, left-padded as generation batches them."""
    length = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        idx[row, length - len(prompt):] = torch.tensor(prompt)
        mask[row, length - len(prompt):] = 1
    return idx, mask


def random_tokens(generator, *shape, vocab=259):
    return torch.randint(3, vocab, shape, generator=generator)


# ----------------------------------------------------------------------------- Eq. 4-8 written out

def eq4_lora(layer, x, lam):
    """Eq. 4 without dropout (eval): λ · B A x, with the layer's A and B."""
    return lam * (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T)


def base_linear(layer, x):
    bias = layer.base.bias
    return x @ layer.base.weight.T + (0 if bias is None else bias)


def eq5_head_gate(layer, x, mask, pool):
    """Eq. 5: s_t = sigmoid(x_t W_att W_h) (B, T, h); the mean over real tokens (all of them: (B, 1, h)),
    or over the real tokens <= t ("causal": (B, T, h); NaN where no real token came yet)."""
    W_att = layer.gate_in.weight.T   # (d_in, 1)
    W_h = layer.gate_out.weight.T    # (1, h)
    s = torch.sigmoid(x @ W_att @ W_h)
    real = torch.ones(s.shape[:2], dtype=torch.bool) if mask is None else mask.bool()
    B, T, h = s.shape
    if pool == "mean":
        return torch.stack([s[b][real[b]].mean(0) for b in range(B)])[:, None]
    g = torch.full((B, T, h), float("nan"), dtype=s.dtype)
    for b in range(B):
        for t in range(T):
            if real[b, : t + 1].any():
                g[b, t] = s[b, : t + 1][real[b, : t + 1]].mean(0)
    return g


def eq6_attention(layer, x, g, lam):
    """Eq. 6: W x + the LoRA output split into h heads, head i times g_i."""
    lora = eq4_lora(layer, x, lam)
    h = g.shape[-1]
    return base_linear(layer, x) + (lora.unflatten(-1, (h, -1)) * g[..., None]).flatten(-2)


def eq8_ffn(layer, u, lam, gate):
    """Eq. 7-8: W u + LoRA(u) ⊙ α relu(u W_ffn W_o); "InterLoRA*": sigmoid and no α."""
    pre = u @ layer.gate_in.weight.T @ layer.gate_out.weight.T  # (B, T, d_out)
    g_ffn = layer.gate_scale * F.relu(pre) if gate == "relu" else torch.sigmoid(pre)
    return base_linear(layer, u) + eq4_lora(layer, u, lam) * g_ffn


# ----------------------------------------------------------------------------- 1. parameter counts

# The paper's models as SPEC §1 describes them: (layers, d_model, d_ff, heads).
SPEC_SHAPES = {"llama-7b": (32, 4096, 11008, 32), "llama-13b": (40, 5120, 13824, 40),
               "gptj-6b": (28, 4096, 16384, 16)}

# The paper's variants as SPEC §1 reads them (independent of interlora.VARIANTS).
SPEC_VARIANTS = {
    "interlora": dict(r=4, attention=("q", "v"), attention_gate=True, ffn=("down",), ffn_gate="relu"),
    "lora": dict(r=10, attention=("q", "v"), attention_gate=False, ffn=(), ffn_gate="none"),
    "interlora-star": dict(r=4, attention=("q", "v"), attention_gate=True, ffn=("down",), ffn_gate="sigmoid"),
    "no-attention-gate": dict(r=4, attention=("q", "v"), attention_gate=False, ffn=("down",), ffn_gate="relu"),
    "no-ffn-gate": dict(r=4, attention=("q", "v"), attention_gate=True, ffn=("down",), ffn_gate="none"),
    "ffn-up": dict(r=4, attention=("q", "v"), attention_gate=True, ffn=("up",), ffn_gate="relu"),
    "ffn-gate": dict(r=4, attention=("q", "v"), attention_gate=True, ffn=("gate",), ffn_gate="relu"),
    "ffn-all": dict(r=4, attention=("q", "v"), attention_gate=True, ffn=("gate", "up", "down"), ffn_gate="relu"),
}


def closed_form_count(model_name, r, attention, attention_gate, ffn, ffn_gate):
    """Per adapted module: A d_in·r + B r·d_out; a head gate d_in + heads; an FFN gate d_in + d_out (+1 α for relu)."""
    layers, d, d_ff, heads = SPEC_SHAPES[model_name]
    per_layer = 0
    for _ in attention:  # q, k, v: d -> d (no grouped-query attention in the paper's models)
        per_layer += r * (d + d) + (d + heads if attention_gate else 0)
    for role in ffn:
        d_in, d_out = (d_ff, d) if role == "down" else (d, d_ff)
        per_layer += r * (d_in + d_out) + {"relu": d_in + d_out + 1, "sigmoid": d_in + d_out, "none": 0}[ffn_gate]
    return layers * per_layer


@functools.lru_cache(maxsize=None)
def trainable_count(model_name, **cfg_fields):
    """Trainable parameters after add_interlora on the real shapes (meta device: no memory), or the error."""
    with torch.device("meta"):
        model = Transformer(ModelConfig.from_name(model_name))
    try:
        add_interlora(model, InterLoRAConfig(**cfg_fields), default_targets(model))
    except AdapterError as e:
        return e
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def variant_count(model_name, variant):
    return trainable_count(model_name, **VARIANTS[variant])


PAPER_COUNTS = [  # SPEC §1 / paper Tables 1, 2 and 5
    ("llama-7b", dict(VARIANTS["lora"]), 5_242_880),
    ("llama-13b", dict(VARIANTS["lora"]), 8_192_000),
    ("gptj-6b", dict(VARIANTS["lora"]), 4_587_520),
    ("llama-7b", dict(), 4_778_016),
    ("llama-13b", dict(), 7_478_440),
    ("gptj-6b", dict(), 4_932_508),
    ("llama-7b", dict(r=2), 2_762_784),
    ("llama-13b", dict(r=2), 4_324_520),
    ("gptj-6b", dict(r=2), 2_868_124),
    ("llama-7b", dict(VARIANTS["lora"], r=5), 2_621_440),
]


@pytest.mark.parametrize("model_name, cfg_fields, paper_count", PAPER_COUNTS,
                         ids=[f"{m}-{c or 'interlora'}" for m, c, _ in PAPER_COUNTS])
def test_trainable_parameters_equal_the_papers_counts(model_name, cfg_fields, paper_count):
    assert trainable_count(model_name, **cfg_fields) == paper_count


def test_variants_are_the_ones_the_spec_describes():
    assert set(VARIANTS) == set(SPEC_VARIANTS), "every named variant needs its SPEC reading in this test"


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("model_name", ["llama-7b", "gptj-6b"])
def test_variant_parameter_count_matches_closed_form(model_name, variant):
    count = variant_count(model_name, variant)
    spec = SPEC_VARIANTS[variant]
    if model_name.startswith("gptj") and "gate" in spec["ffn"]:
        # GPT-J's MLP is fc_in -> gelu -> fc_out: there is no gate projection to adapt
        assert isinstance(count, AdapterError), f"{variant} on GPT-J should be refused, got {count}"
        message = str(count)
        assert "'gate'" in message and "\n" not in message, message
        return
    assert count == closed_form_count(model_name, **spec)


def test_print_variant_parameter_counts():
    """The table the README lists: run `pytest -s -k print_variant` to read it."""
    models = ["llama-7b", "llama-13b", "gptj-6b"]
    lines = [f"{'variant':<20}" + "".join(f"{m:>14}" for m in models)]
    for variant in VARIANTS:
        cells = []
        for model_name in models:
            count = variant_count(model_name, variant)
            assert isinstance(count, (int, AdapterError))
            cells.append(f"{count:>14,}" if isinstance(count, int) else f"{'n/a':>14}")
        lines.append(f"{variant:<20}" + "".join(cells))
    print("\ntrainable parameters per variant (n/a: GPT-J has no gate projection)\n" + "\n".join(lines))
    assert variant_count("llama-13b", "interlora") == 7_478_440  # the table is the paper's where they overlap


def test_readme_lists_the_counts_the_code_gives():
    """Each README row (| `variant` | ... | llama-7b | llama-13b | gptj-6b |) is what the code counts."""
    readme = (ROOT / "README.md").read_text()
    rows = {}
    for line in readme.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0].strip("`") in VARIANTS and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells[2:]
    assert rows.keys() == VARIANTS.keys(), "the README's variant table lists other variants than VARIANTS"
    for variant, cells in rows.items():
        for model_name, cell in zip(["llama-7b", "llama-13b", "gptj-6b"], cells):
            count = variant_count(model_name, variant)
            assert cell == (f"{count:,}" if isinstance(count, int) else "n/a"), (variant, model_name, cell)


# ----------------------------------------------------------------------------- 2. freshly added, freezing

@pytest.mark.parametrize("name", ["tiny", "tiny-gptj"])
def test_fresh_adapters_leave_logits_unchanged_exactly(name):
    model = tiny_model(name)
    idx = random_tokens(torch.Generator().manual_seed(0), 2, 11)
    mask = torch.ones_like(idx)
    mask[1, :4] = 0
    before = model(idx, attention_mask=mask)
    add_interlora(model, InterLoRAConfig(ffn_targets=("up", "down")), default_targets(model))
    assert torch.equal(model.eval()(idx, attention_mask=mask), before)
    assert torch.equal(model.train()(idx, attention_mask=mask), before)  # dropout acts on a zero update too


def test_only_adapters_train_and_base_stays_bit_identical():
    model = tiny_model("tiny").train()
    base_names = {name for name, _ in model.named_parameters()}
    base_before = {name: p.detach().clone() for name, p in model.named_parameters()}
    assert not any(is_adapter_parameter(name) for name in base_names)

    cfg = InterLoRAConfig(ffn_targets=("gate", "down"))
    add_interlora(model, cfg, default_targets(model))
    params = dict(model.named_parameters())
    adapters = {n: p for n, p in params.items() if is_adapter_parameter(n)}
    # wrapping renames W to *.base.weight and adds nothing else but adapter tensors
    assert {n.replace(".base.", ".") for n in params if n not in adapters} == base_names
    assert set(adapter_state_dict(model)) == set(adapters)
    assert all(p.requires_grad for p in adapters.values())
    assert not any(p.requires_grad for n, p in params.items() if n not in adapters)

    generator = torch.Generator().manual_seed(0)
    idx = random_tokens(generator, 4, 16)
    # AdamW over *all* parameters, with weight decay: a base weight would move if it had a gradient
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(4):
        loss = F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
        loss.backward()
        assert all(params[n].grad is None for n in params if n not in adapters)
        assert all(p.grad is not None for p in adapters.values())
        if step == 0:  # B = 0: only B learns at first; A and the gates get zero gradients
            assert all(p.grad.abs().sum() > 0 for n, p in adapters.items() if "lora_B" in n)
            assert all(p.grad.abs().sum() == 0 for n, p in adapters.items() if "lora_B" not in n)
        else:
            stuck = [n for n, p in adapters.items() if p.grad.abs().sum() == 0]
            assert not stuck, f"adapter tensors without gradient after B moved: {stuck[:3]}"
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    now = {name.replace(".base.", "."): p for name, p in params.items() if name not in adapters}
    assert all(torch.equal(now[name], before) for name, before in base_before.items())


# ----------------------------------------------------------------------------- 3. LoRA = PEFT; gates = Eq. 5-8

def tiny_hf_llama(seed=0, initializer_range=0.02):
    """A random transformers LlamaForCausalLM, fp32, eval mode; grouped-query attention (4 heads, 2 kv heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         initializer_range=initializer_range)
    return LlamaForCausalLM(config).float().eval()


def peft_lora(hf_model, r, alpha, seed=2):
    """PEFT's LoRA on q and v of a copy of hf_model, with random non-zero B."""
    from peft import LoraConfig, get_peft_model
    peft_model = get_peft_model(copy.deepcopy(hf_model), LoraConfig(
        r=r, lora_alpha=alpha, target_modules=["q_proj", "v_proj"], lora_dropout=0.05))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return peft_model.eval()


def peft_tensors(peft_model):
    """{(layer index, 'q'|'v', 'A'|'B'): weight} of PEFT's LoRA."""
    out = {}
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            parts = name.split(".")
            layer = int(parts[parts.index("layers") + 1])
            role = "q" if "q_proj" in name else "v"
            out[layer, role, "A" if "lora_A" in name else "B"] = param.detach()
    return out


def hf_rows_to_meta(weight, n_heads):
    """Inverse of the LLaMA conversion script's q/k row permutation (Meta's interleaved rotary layout).

    The script maps Meta's rows to HF's by w.view(h, hd/2, 2, d).transpose(1, 2); this undoes it.
    """
    out_dim = weight.shape[0]
    return weight.reshape(n_heads, 2, out_dim // n_heads // 2, -1).transpose(1, 2).reshape(weight.shape)


@pytest.mark.parametrize("r, alpha", [(10, 20), (6, 9)])
def test_lora_method_equals_peft_on_transformers_llama(r, alpha):
    hf_model = tiny_hf_llama()
    peft_model = peft_lora(hf_model, r, alpha)
    ours = copy.deepcopy(hf_model)
    add_interlora(ours, InterLoRAConfig(**dict(VARIANTS["lora"], r=r, alpha=alpha)), default_targets(ours))
    ours.eval()
    with torch.no_grad():
        for (layer, role, matrix), weight in peft_tensors(peft_model).items():
            module = ours.model.layers[layer].self_attn.get_submodule(f"{role}_proj")
            getattr(module, f"lora_{matrix}").weight.copy_(weight)
    idx = random_tokens(torch.Generator().manual_seed(0), 2, 9, vocab=96)
    expected = peft_model(input_ids=idx).logits
    assert not torch.allclose(expected, hf_model(input_ids=idx).logits, atol=1e-3)  # LoRA matters here
    torch.testing.assert_close(ours(input_ids=idx).logits, expected, **TOL)


def test_lora_method_on_our_transformer_equals_peft(tmp_path):
    """The same HF weights through checkpoints.load_checkpoint: our Transformer + InterLoRA-LoRA = PEFT."""
    r, alpha = 8, 16
    hf_model = tiny_hf_llama()
    hf_model.save_pretrained(tmp_path)
    peft_model = peft_lora(hf_model, r, alpha)
    ours = load_checkpoint(tmp_path).float().eval()
    add_interlora(ours, InterLoRAConfig(**dict(VARIANTS["lora"], r=r, alpha=alpha)), default_targets(ours))
    n_head, n_kv = hf_model.config.num_attention_heads, hf_model.config.num_key_value_heads
    with torch.no_grad():
        for (layer, role, matrix), weight in peft_tensors(peft_model).items():
            module = ours.layers[layer].attention.wq if role == "q" else ours.layers[layer].attention.wv
            if role == "q" and matrix == "B":  # B's rows are W_q's output rows, which the loader reorders
                weight = hf_rows_to_meta(weight, n_head)
            getattr(module, f"lora_{matrix}").weight.copy_(weight)
    assert n_kv != n_head  # v is not permuted, and grouped-query heads are exercised
    idx = random_tokens(torch.Generator().manual_seed(0), 2, 9, vocab=96)
    torch.testing.assert_close(ours.eval()(idx), peft_model(input_ids=idx).logits, **TOL)


def test_lora_on_transformers_llama_trains_exactly_what_peft_trains():
    """Only adapter tensors are trainable on someone else's model: PEFT's count, and no base weight.

    transformers names LLaMA's W_gate `mlp.gate_proj`, which must not pass for an adapter tensor.
    """
    hf_model = tiny_hf_llama()
    base_names = [name for name, _ in hf_model.named_parameters()]
    peft_trainable, _ = peft_lora(hf_model, 10, 20).get_nb_trainable_parameters()
    add_interlora(hf_model, InterLoRAConfig(**VARIANTS["lora"]), default_targets(hf_model))
    trainable = [name for name, p in hf_model.named_parameters() if p.requires_grad]
    wrongly_adapter = [name for name in base_names if is_adapter_parameter(name)]
    assert not wrongly_adapter, (f"is_adapter_parameter() accepts base weights of transformers' LLaMA, e.g. "
                                 f"{wrongly_adapter[0]}: add_interlora trains them and save_adapter saves them")
    assert sum(p.numel() for p in hf_model.parameters() if p.requires_grad) == peft_trainable
    assert all("lora_" in name for name in trainable)


GATED_CASES = [(name, pool, ffn_gate) for name in ("tiny", "tiny-gptj") for pool in ("mean", "causal")
               for ffn_gate in ("relu", "sigmoid")]


@pytest.mark.parametrize("name, pool, ffn_gate", GATED_CASES)
def test_gated_layers_equal_equations_5_to_8(name, pool, ffn_gate):
    """Every adapted layer's output, inside a padded batch, against Eq. 5-8 written out above."""
    ffn_targets = ("gate", "up", "down") if name == "tiny" else ("up", "down")
    r, alpha = 3, 7.5  # λ = 2.5, not the default 2
    model, cfg = adapted(name, r=r, alpha=alpha, ffn_targets=ffn_targets, ffn_gate=ffn_gate, gate_pool=pool)
    calls = record_inputs(model)
    generator = torch.Generator().manual_seed(3)
    idx = random_tokens(generator, 3, 10)
    mask = torch.ones_like(idx)
    mask[0, :4] = 0   # left padding
    mask[1, 7:] = 0   # right padding
    mask[2, 2] = 0    # a hole: only the mask decides what is real
    model(idx, attention_mask=mask)
    real = mask.bool()
    lam = alpha / r
    n_attention = n_ffn = 0
    for layer_name, layer in adapter_layers(model).items():
        (x, out), = calls[layer_name]
        # the equations in float64 on the layer's own fp32 input and weights: the exact value, up to float64
        layer, x = copy.deepcopy(layer).double(), x.double()
        if layer_name.endswith(("wq", "wv")):
            g = eq5_head_gate(layer, x, mask, pool)
            expected = eq6_attention(layer, x, g, lam)
            n_attention += 1
        else:
            expected = eq8_ffn(layer, x, lam, ffn_gate)
            n_ffn += 1
        # fp32 rounding is relative to the largest terms of a layer (the random gates make FFN outputs reach
        # several hundred), so an element that cancels to near zero is held to that scale, not to its own
        scale = max(1.0, expected[real].abs().max().item())
        torch.testing.assert_close(out[real].double(), expected[real], rtol=TOL["rtol"], atol=TOL["atol"] * scale,
                                   msg=lambda m: f"{layer_name}: {m}")
    assert n_attention == 2 * 4 and n_ffn == len(ffn_targets) * 4
    if ffn_gate == "sigmoid":  # InterLoRA*: no α
        assert not any(hasattr(layer, "gate_scale") and isinstance(layer.gate_scale, torch.nn.Parameter)
                       for layer in adapter_layers(model).values())


# ----------------------------------------------------------------------------- 4. padding

@pytest.mark.parametrize("pool", ["mean", "causal"])
@pytest.mark.parametrize("name", ["tiny", "tiny-gptj"])
def test_padding_changes_neither_gates_nor_outputs(name, pool):
    model, _ = adapted(name, gate_pool=pool)
    gates = record_head_gates(model)
    seq = random_tokens(torch.Generator().manual_seed(4), 1, 7)
    alone = model(seq)  # no padding, no mask at all
    alone_gates = {n: calls[-1] for n, calls in gates.items()}

    pad = 3
    batch = torch.zeros(2, 7 + pad, dtype=torch.long)
    mask = torch.zeros_like(batch)
    batch[0, pad:], mask[0, pad:] = seq[0], 1   # left-padded
    batch[1, :7], mask[1, :7] = seq[0], 1       # right-padded
    padded = model(batch, mask)  # the mask passed positionally reaches the gates too
    torch.testing.assert_close(padded[0, pad:], alone[0], **TOL)
    torch.testing.assert_close(padded[1, :7], alone[0], **TOL)
    for layer_name, calls in gates.items():
        g, g_alone = calls[-1], alone_gates[layer_name]
        if pool == "mean":  # one gate per sequence and head
            torch.testing.assert_close(g[:, 0], g_alone[:, 0].expand(2, -1), **TOL)
        else:               # one gate per real position and head
            torch.testing.assert_close(g[0, pad:], g_alone[0], **TOL)
            torch.testing.assert_close(g[1, :7], g_alone[0], **TOL)


def test_a_copy_of_an_adapted_model_reads_its_own_attention_mask():
    """copy.deepcopy copies the mask hook with the layers: the copy's gates see the copy's padding."""
    model, _ = adapted("tiny")
    copied = copy.deepcopy(model)
    idx = random_tokens(torch.Generator().manual_seed(14), 2, 9)
    mask = torch.ones_like(idx)
    mask[0, :3] = 0
    torch.testing.assert_close(copied(idx, attention_mask=mask), model(idx, attention_mask=mask), **TOL)
    remove_interlora(copied)
    assert not copied._forward_pre_hooks and len(model._forward_pre_hooks) == 1


# ----------------------------------------------------------------------------- 5. generation

@pytest.mark.parametrize("name", ["tiny", "tiny-gptj"])
def test_causal_gate_decoding_with_cache_equals_full_recomputation(name):
    model, _ = adapted(name, gate_pool="causal")
    generator = torch.Generator().manual_seed(5)
    idx, mask = left_padded([random_tokens(generator, 12).tolist(), random_tokens(generator, 8).tolist()])
    full = model(idx, attention_mask=mask)
    prompt_len = 6
    model.setup_cache(2, idx.shape[1])
    try:
        steps = [model(idx[:, :prompt_len], attention_mask=mask[:, :prompt_len])]
        for pos in range(prompt_len, idx.shape[1]):
            steps.append(model(idx[:, pos:pos + 1], attention_mask=mask[:, :pos + 1], start_pos=pos))
    finally:
        model.clear_cache()
    cached = torch.cat(steps, dim=1)
    real = mask.bool()
    torch.testing.assert_close(cached[real], full[real], **TOL)


def test_causal_gate_decoding_without_attention_mask_is_right_or_refused():
    """model.py allows start_pos without attention_mask (no padding); the gate must not restart there."""
    model, _ = adapted("tiny", gate_pool="causal")
    idx = random_tokens(torch.Generator().manual_seed(6), 1, 9)
    full = model(idx)
    model.setup_cache(1, 9)
    try:
        model(idx[:, :5])
        step = model(idx[:, 5:6], start_pos=5)
    except AdapterError:
        return  # refusing is fine: the gate needs the mask to know it is decoding
    finally:
        model.clear_cache()
    assert torch.allclose(step[0, -1], full[0, 5], **TOL), (
        "decoding with start_pos > 0 and attention_mask=None silently restarts the gate's running mean "
        "(InterLoRALinear sees no mask, so it cannot tell it is continuing): logits differ from a full "
        f"recomputation by {(step[0, -1] - full[0, 5]).abs().max():.3g}")


def test_mean_gate_is_eq5_over_the_prompt_and_fixed_while_decoding():
    model, _ = adapted("tiny", gate_pool="mean")
    calls, gates = record_inputs(model), record_head_gates(model)
    generator = torch.Generator().manual_seed(7)
    prompts = [random_tokens(generator, 9).tolist(), random_tokens(generator, 4).tolist()]
    _, prompt_mask = left_padded(prompts)
    max_new = 5
    model.generate(prompts, max_new_tokens=max_new)
    for layer_name, used in gates.items():
        assert len(used) == max_new  # the prefill, then one call per decoded token but the last
        prefill_input = calls[layer_name][0][0]
        expected = eq5_head_gate(adapter_layers(model)[layer_name], prefill_input, prompt_mask, "mean")
        torch.testing.assert_close(used[0], expected, **TOL)
        for g in used[1:]:
            assert torch.equal(g, used[0]), f"{layer_name}: the gate moved while decoding"


@pytest.mark.parametrize("pool", ["mean", "causal"])
@pytest.mark.parametrize("name", ["tiny", "tiny-gptj"])
def test_batched_generation_equals_one_prompt_at_a_time(name, pool):
    model, _ = adapted(name, gate_pool=pool)
    generator = torch.Generator().manual_seed(8)
    prompts = [random_tokens(generator, n).tolist() for n in (5, 11, 2)]
    batched = model.generate(prompts, max_new_tokens=6)
    assert batched == [model.generate([p], max_new_tokens=6)[0] for p in prompts]


def test_generation_in_training_mode_is_right_or_refused():
    """A stale gate state from an earlier eval call must not be used to decode another prompt."""
    model, _ = adapted("tiny", dropout=0.0)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    expected = model.generate(prompts, max_new_tokens=4)  # eval mode
    model(random_tokens(torch.Generator().manual_seed(9), 3, 5))  # leaves gate state for another batch
    model.train()
    try:
        got = model.generate(prompts, max_new_tokens=4)
    except AdapterError:
        return
    except Exception as e:
        pytest.fail(f"generate() in training mode after an eval call on another batch fails with "
                    f"{type(e).__name__} ({e}): the head gate reuses the stale state of that earlier call "
                    "(InterLoRALinear.pooled is not refreshed in training mode); expected an AdapterError "
                    "or the eval-mode result")
    assert got == expected, "generate() in training mode decoded with the gate of an earlier, other batch"


# ----------------------------------------------------------------------------- 6. someone else's model

def test_transformers_llama_trains_with_padding():
    # weights of std 0.1 rather than 0.02: a base whose features carry signal, as a pre-trained one does,
    # so that adapters alone (frozen base) fit a small batch within a few steps
    hf_model = tiny_hf_llama(initializer_range=0.1).train()
    add_interlora(hf_model, InterLoRAConfig(dropout=0.0), default_targets(hf_model))
    generator = torch.Generator().manual_seed(10)
    idx = random_tokens(generator, 4, 16, vocab=96)
    mask = torch.ones_like(idx)
    mask[1, 11:] = 0
    mask[3, 6:] = 0
    labels = idx.masked_fill(mask == 0, -100)
    optimizer = torch.optim.AdamW([p for p in hf_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(20):
        loss = hf_model(input_ids=idx, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], f"loss {losses[0]:.3f} -> {losses[-1]:.3f}"


@pytest.mark.parametrize("pool", ["mean", "causal"])
def test_transformers_llama_gates_see_the_attention_mask(pool):
    hf_model = tiny_hf_llama()
    add_interlora(hf_model, InterLoRAConfig(gate_pool=pool), default_targets(hf_model))
    randomise_adapters(hf_model).eval()
    gates = record_head_gates(hf_model)
    seq = random_tokens(torch.Generator().manual_seed(11), 1, 8, vocab=96)
    alone = hf_model(input_ids=seq).logits
    alone_gates = {n: calls[-1] for n, calls in gates.items()}
    padded_idx = torch.cat([seq, torch.zeros(1, 5, dtype=torch.long)], dim=1)  # right-padded
    mask = torch.cat([torch.ones(1, 8, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long)], dim=1)
    padded = hf_model(input_ids=padded_idx, attention_mask=mask).logits
    torch.testing.assert_close(padded[:, :8], alone, **TOL)
    for layer_name, calls in gates.items():
        torch.testing.assert_close(calls[-1][:, :8], alone_gates[layer_name][:, :8], **TOL)


# ----------------------------------------------------------------------------- 7. merging

@pytest.mark.parametrize("name, cfg_fields", [
    ("tiny", dict(VARIANTS["lora"])),
    ("tiny-gptj", dict(VARIANTS["lora"], r=3, alpha=4.5)),
    ("tiny-gptj", dict(attention_gate=False, ffn_gate="none")),  # gate-free LoRA on q, v and fc_out (biased)
])
def test_merged_lora_equals_unmerged(name, cfg_fields):
    model, _ = adapted(name, **cfg_fields)
    idx = random_tokens(torch.Generator().manual_seed(12), 2, 10)
    unmerged = model(idx)
    assert not torch.allclose(unmerged, tiny_model(name)(idx), atol=1e-3)  # the adapters matter
    merge(model)
    assert not adapter_layers(model)
    assert not any(is_adapter_parameter(n) for n, _ in model.named_parameters())
    torch.testing.assert_close(model(idx), unmerged, **TOL)


@pytest.mark.parametrize("variant", [v for v, spec in SPEC_VARIANTS.items()
                                     if spec["attention_gate"] or (spec["ffn"] and spec["ffn_gate"] != "none")])
def test_merging_a_gated_variant_is_refused_with_the_reason(variant):
    model, _ = adapted("tiny", **VARIANTS[variant])
    idx = random_tokens(torch.Generator().manual_seed(13), 1, 6)
    before = model(idx)
    with pytest.raises(AdapterError) as error:
        merge(model)
    message = str(error.value)
    assert "gate" in message and "input" in message and "\n" not in message, message
    assert adapter_layers(model) and torch.equal(model(idx), before)  # left as it was


# ----------------------------------------------------------------------------- 8. adapter files

def test_save_then_load_round_trips_exactly(tmp_path):
    model, cfg = adapted(ffn_gate="sigmoid", gate_pool="causal", r=5, alpha=3.0)
    path = tmp_path / "adapter.pt"
    info = {"task": "math", "step": 120, "loss": 0.75, "lr": [3e-4], "note": None}
    save_adapter(path, model, cfg, info=info)
    assert os.listdir(tmp_path) == ["adapter.pt"]  # nothing left beside it

    fresh = tiny_model("tiny")  # the same base: same seed
    loaded_cfg, loaded_info = load_adapter(fresh, path, default_targets(fresh))
    fresh.eval()
    assert loaded_cfg == cfg and loaded_info == info
    saved, restored = adapter_state_dict(model), adapter_state_dict(fresh)
    assert saved.keys() == restored.keys()
    assert all(torch.equal(saved[k], restored[k]) for k in saved)
    idx = random_tokens(torch.Generator().manual_seed(14), 2, 9)
    assert torch.equal(fresh(idx), model(idx))


def test_adapter_file_holds_only_adapter_tensors(tmp_path):
    model, cfg = adapted()
    path = tmp_path / "adapter.pt"
    save_adapter(path, model, cfg)
    tensors = adapters.read_adapter(path)["tensors"]
    assert set(tensors) == {n for n, _ in model.named_parameters() if is_adapter_parameter(n)}
    assert not any(".base." in n or n.startswith(("tok_embeddings", "output", "norm")) for n in tensors)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert path.stat().st_size < 0.1 * model_bytes


def test_failed_save_leaves_no_temporary_file_and_keeps_the_old_one(tmp_path):
    model, cfg = adapted()  # the project's writer (machinery/adapters.py), atomic
    path = tmp_path / "adapter.pt"
    adapters.save_adapter(path, model, cfg, info={"version": "old"})
    with pytest.raises(Exception):
        adapters.save_adapter(path, model, cfg, info={"callback": lambda: None})  # cannot be pickled
    assert adapters.read_adapter(path)["info"] == {"version": "old"}
    left = sorted(os.listdir(tmp_path))
    assert left == ["adapter.pt"], f"save_adapter left a temporary file behind after a failed write: {left}"


MISMATCHED_BASES = {  # a model the adapter of `tiny` does not fit
    "tiny-gptj": lambda: tiny_model("tiny-gptj"),
    "wider": lambda: tiny_model("tiny", dim=192),
    "more-heads": lambda: tiny_model("tiny", n_head=8),  # the same Linear shapes, another head-gate width
    "fewer-layers": lambda: tiny_model("tiny", n_layer=3),
}


# plain LoRA has no head gate, so it does fit a model that differs only in its number of heads
@pytest.mark.parametrize("base, method", [(base, method) for base in MISMATCHED_BASES for method in ("interlora", "lora")
                                          if (base, method) != ("more-heads", "lora")])
def test_loading_onto_a_mismatched_base_is_a_clear_error(tmp_path, base, method):
    model, cfg = adapted("tiny", **VARIANTS[method])
    path = tmp_path / "adapter.pt"
    adapters.save_adapter(path, model, cfg)
    with pytest.raises(AdapterError) as error:
        adapters.load_adapter(MISMATCHED_BASES[base](), path)
        pytest.fail(f"an adapter ({method}) of model.py's tiny LLaMA loaded without error onto {base}: the "
                    "file records only the (in, out) shapes of the adapted layers, which can coincide "
                    "across models (LoRA on q and v of tiny and tiny-gptj); it should record the base "
                    "architecture (family / class) too")
    message = str(error.value)
    assert str(path) in message and "\n" not in message, message


def corrupt_files(folder, adapter_path):
    """{case: path} of files that are not usable adapters."""
    data = adapter_path.read_bytes()
    cases = {"random-bytes": os.urandom(2000), "truncated": data[: len(data) // 2], "empty": b""}
    paths = {}
    for case, content in cases.items():
        paths[case] = folder / f"{case}.pt"
        paths[case].write_bytes(content)
    paths["plain-state-dict"] = folder / "plain.pt"
    torch.save({"layers.0.attention.wq.lora_A.weight": torch.zeros(4, 128)}, paths["plain-state-dict"])
    paths["missing"] = folder / "no-such-adapter.pt"
    return paths


@pytest.mark.parametrize("case", ["random-bytes", "truncated", "empty", "plain-state-dict", "missing"])
def test_unreadable_adapter_files_are_clear_errors(tmp_path, case):
    model, cfg = adapted()
    good = tmp_path / "good.pt"
    adapters.save_adapter(good, model, cfg)
    path = corrupt_files(tmp_path, good)[case]
    for load in (adapters.read_adapter, lambda p: adapters.load_adapter(tiny_model("tiny"), p)):
        with pytest.raises(AdapterError) as error:
            load(path)
        message = str(error.value)
        assert str(path) in message and "\n" not in message, message


def test_adapter_file_missing_a_tensor_is_an_error(tmp_path):
    model, cfg = adapted()
    path = tmp_path / "adapter.pt"
    adapters.save_adapter(path, model, cfg)
    payload = torch.load(path, weights_only=True)
    dropped = sorted(payload["tensors"])[0]
    del payload["tensors"][dropped]
    torch.save(payload, path)
    with pytest.raises(AdapterError, match="lora|gate"):
        adapters.load_adapter(tiny_model("tiny"), path)
        pytest.fail(f"load_adapter accepted a file without {dropped}: that tensor silently keeps its "
                    "fresh initialisation")


# ----------------------------------------------------------------------------- 9. configuration

def test_defaults_are_the_papers_interlora():
    cfg = InterLoRAConfig()
    assert (cfg.method, cfg.r, cfg.alpha, cfg.alpha / cfg.r, cfg.dropout) == ("interlora", 4, 8, 2, 0.05)
    assert set(cfg.attention_targets) == {"q", "v"} and tuple(cfg.ffn_targets) == ("down",)
    assert cfg.attention_gate is True and cfg.ffn_gate == "relu" and cfg.gate_scale_init == 10
    model = tiny_model("tiny")
    add_interlora(model, cfg, default_targets(model))
    layer = model.layers[0].feed_forward.w2
    assert layer.gate_scale.item() == 10.0 and layer.scaling == 2.0
    assert layer.dropout == 0.05


def test_lora_method_is_the_papers_baseline():
    cfg = InterLoRAConfig(**VARIANTS["lora"])
    assert (cfg.r, cfg.alpha / cfg.r) == (10, 2)
    assert set(cfg.attention_targets) == {"q", "v"} and not cfg.ffn_targets
    assert cfg.attention_gate is False and cfg.ffn_gate == "none"
    model = tiny_model("tiny")
    add_interlora(model, cfg, default_targets(model))
    assert set(adapter_layers(model)) == {f"layers.{i}.attention.{w}" for i in range(4) for w in ("wq", "wv")}
    assert not any(n.split(".")[-2].startswith("gate") for n in adapter_state_dict(model))


@pytest.mark.parametrize("fields", [
    dict(method="qlora"), dict(ffn_gate="tanh"), dict(gate_pool="max"), dict(alpha=0),
    dict(dropout=1.0), dict(method="lora"),  # "lora" alone keeps InterLoRA's gates: refused
])
def test_invalid_choices_are_adapter_errors(fields):
    with pytest.raises(AdapterError) as error:
        InterLoRAConfig(**fields)
    assert "\n" not in str(error.value)


def test_negative_rank_is_an_adapter_error():
    with pytest.raises(AdapterError):
        InterLoRAConfig(r=-1)
        pytest.fail("InterLoRAConfig(r=-1) is accepted; add_interlora then fails inside nn.Linear "
                    "with a RuntimeError")


def test_adding_twice_and_unknown_targets_are_adapter_errors():
    model = tiny_model("tiny-gptj")
    with pytest.raises(AdapterError, match="gate"):
        add_interlora(model, InterLoRAConfig(ffn_targets=("gate",)), default_targets(model))
    model = tiny_model("tiny")
    add_interlora(model, InterLoRAConfig(), default_targets(model))
    with pytest.raises(AdapterError, match="already"):
        add_interlora(model, InterLoRAConfig(), default_targets(model))
    assert default_targets(tiny_model("tiny-gptj"))["down"][0] == "feed_forward.w2"
    for fields in dict(attention_targets=("o",)), dict(ffn_targets=("fc_in",)):  # roles unknown
        model = tiny_model("tiny")
        with pytest.raises(AdapterError, match="no linear layer for target"):
            add_interlora(model, InterLoRAConfig(**fields), default_targets(model))


@pytest.mark.parametrize("p", [0.05, 0.3, 0.9])
def test_dropout_masks_are_independent_draws_with_the_right_probability(p):
    """interlora.dropout_mask against the Bernoulli process it must be: each element dropped with probability p
    (over the whole tensor and in each sixteenth of it, so the end is dropped as often as the start), two
    neighbours both dropped with probability p^2, and tensors of a few elements as often as large ones."""
    torch.manual_seed(0)
    x = torch.empty(1000, 2048)
    dropped = ~fused.dropout_mask(x, p)
    assert dropped.shape == x.shape and dropped.dtype == torch.bool

    def within(count, trials, q, sigmas=6):
        return abs(count - trials * q) <= sigmas * (trials * q * (1 - q)) ** 0.5

    flat = dropped.flatten()
    assert within(flat.sum().item(), flat.numel(), p)
    for part in flat.chunk(16):
        assert within(part.sum().item(), part.numel(), p)
    pairs = flat[:-1:2] & flat[1::2]  # disjoint neighbouring pairs
    assert within(pairs.sum().item(), pairs.numel(), p * p)
    small = torch.stack([~fused.dropout_mask(torch.empty(3), p) for _ in range(4000)])  # (4000, 3)
    for column in small.T:
        assert within(column.sum().item(), column.numel(), p)


def test_training_lora_output_is_unbiased_by_dropout():
    """dropout's 1 / (1 - p) goes into A: over many draws the training output averages to the eval output."""
    torch.manual_seed(1)
    layer = InterLoRALinear(torch.nn.Linear(12, 6, bias=False), InterLoRAConfig(**dict(VARIANTS["lora"], r=3, dropout=0.3)))
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(5, 12)
    with torch.no_grad():
        expected = layer.eval()(x) - layer.base(x)
        draws = torch.stack([layer.train()(x) - layer.base(x) for _ in range(20000)])
    spread = draws.std(0) / len(draws) ** 0.5
    assert (draws.mean(0) - expected).abs().le(6 * spread + 1e-6).all()
    assert not torch.allclose(draws[0], expected)  # dropout did act
