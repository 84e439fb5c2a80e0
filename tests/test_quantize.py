"""quantize.py: an int8 / nf4 frozen base, checked against the fp32 model it was made from.

Tolerances come from the quantization error itself, not from a number picked to pass:
- int8 (absmax per output channel): every weight within s/2 of the original, s = max|W_row| / 127.
- nf4 (QLoRA's 16 values, absmax per block of 64): every weight within half of the widest gap
  between neighbouring NF4 values (0.1385 · absmax), the codebook itself recomputed from
  QLoRA's recipe with torch.special.ndtri.
- Logits: rounding to nearest makes errors that behave like independent noise, uniform over the
  rounding cell (±s/2 for int8; ± half the NF4 cell the weight falls in, x absmax, for nf4). So
  the fp32 model with such noise added to the same weights predicts the logits error: the
  quantized model must land between 0.5x and 1.5x of that prediction (measured: 1.0x to 1.05x;
  int8 about 1.5%, nf4 about 20% of the logits' norm on the tiny model). A biased rounding
  (floor instead of round, a wrong scale) adds up coherently over the 128-344 inputs of a layer
  and lands far outside.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from machinery.adapters import default_targets
import interlora
from machinery import adapters
from interlora import AdapterError, InterLoRAConfig, add_interlora, load_adapter, merge, save_adapter
from machinery.checkpoints import load_model
from machinery.quantize import NF4, NF4_BLOCK, NF4_MIDPOINTS, QUANTIZE_KINDS, QuantizedLinear, quantize_model, quantize_weight



def tokens(batch, length, seed=0):
    return torch.randint(0, 259, (batch, length), generator=torch.Generator().manual_seed(seed))


def quantized_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def relative_error(logits, reference):
    return ((logits - reference).norm() / reference.norm()).item()


# ----------------------------------------------------------------------------- the codes themselves

def test_nf4_values_are_qlora_normal_float():
    """QLoRA's recipe (bitsandbytes' create_normal_map): 8 positive and 7 negative normal quantiles and 0,
    scaled to [-1, 1]."""
    offset = 0.5 * (1 - 1 / 32 + 1 - 1 / 30)  # 0.9677083, halfway between the 16- and 15-value spacings
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    torch.testing.assert_close(NF4.double(), values / values.abs().max(), atol=1e-6, rtol=0)


def test_int8_error_is_at_most_half_a_step():
    weight = torch.randn(96, 200, generator=torch.Generator().manual_seed(0)) * torch.rand(96, 1) * 3
    weight[5] = 0  # an all-zero row stays zero
    q = quantize_weight(weight, "int8")
    assert q["weight"].dtype == torch.int8 and q["weight"].shape == (96, 200) and q["scale"].shape == (96,)
    step = weight.abs().amax(dim=1) / 127
    error = (q["weight"].float() * q["scale"][:, None] - weight).abs()
    assert (error <= step[:, None] / 2 * (1 + 1e-5) + 1e-12).all()
    assert error.mean() > step.mean() / 8  # really rounded to 255 levels, not kept at full precision
    assert q["weight"].abs().amax(dim=1)[torch.arange(96) != 5].eq(127).all()  # the row's absmax maps to ±127


def test_nf4_error_is_at_most_half_the_widest_gap():
    weight = torch.randn(64, 344, generator=torch.Generator().manual_seed(1))  # 344 columns: blocks cross rows
    layer = QuantizedLinear.from_linear(nn.Linear(344, 64, bias=False).requires_grad_(False), "nf4")
    q = quantize_weight(weight, "nf4")
    assert q["weight"].dtype == torch.uint8 and q["weight"].numel() == weight.numel() // 2  # two codes per byte
    layer.weight, layer.scale = q["weight"], q["scale"]
    dequantized = layer.dequantized_weight()
    absmax = weight.reshape(-1, NF4_BLOCK).abs().amax(dim=1, keepdim=True)
    bound = (NF4[1:] - NF4[:-1]).max() / 2 * absmax  # 0.1385 · absmax
    error = (dequantized - weight).reshape(-1, NF4_BLOCK).abs()
    assert (error <= bound * (1 + 1e-5)).all()
    # and every dequantized weight is an NF4 value times its block's absmax
    normalized = dequantized.reshape(-1, NF4_BLOCK) / absmax
    assert (normalized[..., None] - NF4).abs().amin(-1).max() < 1e-5


@pytest.mark.parametrize("kind", QUANTIZE_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_equals_a_linear_with_the_dequantized_weight(kind, dtype):
    """Forward and input gradient, with a bias (GPT-J's MLP) kept in the compute dtype."""
    torch.manual_seed(2)
    linear = nn.Linear(128, 192).to(dtype)
    layer = QuantizedLinear.from_linear(linear, kind)
    assert layer.bias.dtype == dtype and not layer.bias.requires_grad
    weight = layer.dequantized_weight(dtype)
    x = torch.randn(2, 5, 128, dtype=dtype, requires_grad=True)
    x_reference = x.detach().clone().requires_grad_(True)
    # the bias added after the matmul, as the layer does (in bf16 a fused addmm rounds differently)
    out, reference = layer(x), F.linear(x_reference, weight) + linear.bias.detach()
    assert out.dtype == dtype
    torch.testing.assert_close(out, reference)
    grad = torch.randn_like(out)
    out.backward(grad)
    reference.backward(grad)
    torch.testing.assert_close(x.grad, x_reference.grad)


def test_autocast_dequantizes_into_the_autocast_dtype():
    layer = QuantizedLinear.from_linear(nn.Linear(64, 64), "int8")  # fp32 bias, as in an fp32 base
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(torch.randn(3, 64))
    assert out.dtype == torch.bfloat16


def test_quantize_model_keeps_embedding_and_head_in_the_compute_dtype():
    model = load_model("tiny-gptj", dtype=torch.bfloat16)
    names = quantize_model(model, "int8")
    assert len(names) == 4 * 6 and not any(n.startswith("output") for n in names)  # q, k, v, o, fc_in, fc_out
    assert type(model.output) is nn.Linear and model.output.weight.dtype == torch.bfloat16
    assert model.tok_embeddings.weight.dtype == torch.bfloat16
    assert model.layers[0].feed_forward.w1.bias.dtype == torch.bfloat16


# ----------------------------------------------------------------------------- the model's logits

def with_rounding_noise(model, kind, seed):
    """The fp32 model with independent noise uniform over each weight's rounding cell (see the top)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and name != "output":
                w = module.weight
                if kind == "int8":
                    half_cell = (w.abs().amax(dim=1, keepdim=True) / 127 / 2).expand_as(w)
                else:
                    blocks = w.reshape(-1, NF4_BLOCK)
                    absmax = blocks.abs().amax(dim=1, keepdim=True)
                    edges = torch.cat([NF4[:1], NF4_MIDPOINTS, NF4[-1:]])  # the cells of rounding to nearest
                    cell = torch.bucketize(blocks / absmax, NF4_MIDPOINTS)
                    half_cell = ((edges[cell + 1] - edges[cell]) / 2 * absmax).view_as(w)
                w += (torch.rand(w.shape, generator=generator) * 2 - 1) * half_cell
    return model


@pytest.mark.parametrize("name", ["tiny", "tiny-gptj"])
@pytest.mark.parametrize("kind", QUANTIZE_KINDS)
def test_logits_are_as_close_to_fp32_as_rounding_noise_predicts(name, kind):
    idx = tokens(4, 32)
    with torch.no_grad():
        reference = load_model(name)(idx)
        quantized = relative_error(load_model(name, quantize=kind)(idx), reference)
        predicted = sum(relative_error(with_rounding_noise(load_model(name), kind, seed)(idx), reference)
                        for seed in range(3)) / 3
    assert 0.5 * predicted < quantized < 1.5 * predicted, (quantized, predicted)


# ----------------------------------------------------------------------------- training through it

@pytest.mark.parametrize("kind", QUANTIZE_KINDS)
def test_training_adapters_on_a_quantized_base_lowers_the_loss(kind):
    model = load_model("tiny", quantize=kind)
    add_interlora(model, InterLoRAConfig(), default_targets(model))
    codes = {name: m.weight.clone() for name, m in quantized_layers(model).items()}
    model.train()
    params = [p for n, p in model.named_parameters() if interlora.is_adapter_parameter(n)]
    assert params and all(p.requires_grad for p in params)
    assert not any(p.requires_grad for n, p in model.named_parameters() if not interlora.is_adapter_parameter(n))
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    idx = tokens(4, 24, seed=3)
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(model(idx)[:, :-1].flatten(0, 1), idx[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    assert all(torch.equal(m.weight, codes[name]) for name, m in quantized_layers(model).items())


def saved_tensors(model, idx):
    """(dtype, numel) of every tensor autograd saves for backward in one forward pass, but the
    model's own parameters (a frozen nn.Linear saves a reference to its weight, no copy)."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved = []

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in own:
            saved.append((tensor.dtype, tensor.numel()))
        return tensor
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(idx)
    return saved


@pytest.mark.parametrize("kind", QUANTIZE_KINDS)
def test_backward_keeps_no_full_precision_copy_of_a_weight(kind):
    model = load_model("tiny", quantize=kind)
    add_interlora(model, InterLoRAConfig(), default_targets(model))
    model.train()
    # one sequence of 8 tokens: every activation (at most 8 x 344 values) is smaller than any weight (128 x 128)
    idx = tokens(1, 8)
    smallest_weight = min(m.in_features * m.out_features for m in quantized_layers(model).values())
    saved = saved_tensors(model, idx)
    large_floats = [(dtype, n) for dtype, n in saved if dtype.is_floating_point and n >= smallest_weight]
    assert large_floats == []
    assert not [1 for dtype, n in saved if n >= smallest_weight // 2]  # no copy of the codes either

    # the same count catches the naive way: autograd through F.linear on the dequantized weight
    def naive_forward(self, x):
        return F.linear(x, self.dequantized_weight(x.dtype))
    original = QuantizedLinear.forward
    QuantizedLinear.forward = naive_forward
    try:
        naive = saved_tensors(model, idx)
    finally:
        QuantizedLinear.forward = original
    # every layer whose input needs a gradient saves one: all but q, k, v of the first block (they read
    # the frozen embedding)
    assert len([1 for dtype, n in naive if dtype.is_floating_point and n >= smallest_weight]) == \
        len(quantized_layers(model)) - 3


# ----------------------------------------------------------------------------- adapter files and merging

def test_adapters_trained_on_an_int8_base_save_and_load(tmp_path):
    model = load_model("tiny", quantize="int8")
    cfg = InterLoRAConfig()
    add_interlora(model, cfg, default_targets(model))
    with torch.no_grad():  # adapters that change the logits (B starts at zero)
        for name, param in model.named_parameters():
            if interlora.is_adapter_parameter(name):
                param.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    idx = tokens(2, 12, seed=4)
    model.eval()
    with torch.no_grad():
        logits = model(idx)
    save_adapter(tmp_path / "adapter.pt", model, cfg)
    fresh = load_model("tiny", quantize="int8")
    with torch.no_grad():
        assert not torch.allclose(fresh(idx), logits, atol=1e-3)
    load_adapter(fresh, tmp_path / "adapter.pt", default_targets(fresh))
    with torch.no_grad():
        assert torch.equal(fresh(idx), logits)


def test_merging_into_an_int8_base_is_refused_with_the_reason():
    model = load_model("tiny", quantize="int8")
    add_interlora(model, InterLoRAConfig(**interlora.VARIANTS["lora"]), default_targets(model))  # plain LoRA: mergeable into a float base
    idx = tokens(1, 6)
    with torch.no_grad():
        before = model(idx)
    with pytest.raises(AdapterError) as error:
        adapters.merge(model)  # the project's merge: interlora.py's handles float bases
    message = str(error.value)
    assert "int8" in message and "quantized" in message and "unquantized" in message and "\n" not in message
    with torch.no_grad():
        assert torch.equal(model(idx), before)  # left as it was


# ----------------------------------------------------------------------------- quantizing while loading

@pytest.mark.parametrize("name", ["tiny", "tiny-gptj"])
@pytest.mark.parametrize("kind", QUANTIZE_KINDS)
def test_quantizing_while_loading_equals_quantizing_the_loaded_model(name, kind):
    loaded = load_model(name, quantize=kind)
    afterwards = load_model(name)
    quantize_model(afterwards, kind)
    assert list(loaded.state_dict()) == list(afterwards.state_dict())
    for key, tensor in loaded.state_dict().items():
        assert tensor.dtype == afterwards.state_dict()[key].dtype and torch.equal(tensor, afterwards.state_dict()[key])
