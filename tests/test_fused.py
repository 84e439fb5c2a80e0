"""machinery/fused.py's FusedInterLoRALinear against interlora.py's clear InterLoRALinear: the same
parameters give the same outputs and gradients (training, fp32 and bf16 autocast, every variant,
both poolings, a padded batch) and the same tokens from cached generation (tests/test_fast_paths.py
holds the compiled decode step to the eager one)."""
import pytest
import torch

from machinery.adapters import default_targets
import interlora
from machinery import fused
from model import PRESETS, ModelConfig, Transformer

CASES = [(variant, pool) for variant in interlora.VARIANTS for pool in ("mean", "causal")]


def pair(variant, pool, dropout=0.0):
    """(clear, fused): the same random tiny LLaMA with the same random adapters, in training mode."""
    models = []
    for layer in (interlora.InterLoRALinear, fused.FusedInterLoRALinear):
        torch.manual_seed(0)
        model = Transformer(ModelConfig(**PRESETS["tiny"]))
        cfg = interlora.InterLoRAConfig(**interlora.VARIANTS[variant], gate_pool=pool,
                                        dropout=dropout)
        interlora.add_interlora(model, cfg, default_targets(model), layer=layer)
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if interlora.is_adapter_parameter(name):  # B starts at 0: make every part count
                    p.copy_(1.5 + torch.rand(p.shape, generator=generator) if p.dim() == 0
                            else torch.randn(p.shape, generator=generator) * 0.2)
        models.append(model.train())
    return models


def padded_batch():
    generator = torch.Generator().manual_seed(2)
    idx = torch.randint(3, PRESETS["tiny"]["vocab_size"], (3, 10), generator=generator)
    mask = torch.ones_like(idx)
    mask[1, 7:], mask[2, 4:] = 0, 0  # right padding, as train.py's batches
    return idx, mask


def outputs_and_grads(model, idx, mask, autocast=False):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(idx, attention_mask=mask)
    real = mask.bool()
    (logits.float()[real] ** 2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.float()[real], grads


@pytest.mark.parametrize("variant, pool", CASES)
def test_fused_equals_clear_in_fp32_training(variant, pool):
    clear, fast = pair(variant, pool)
    idx, mask = padded_batch()
    (out_c, grads_c), (out_f, grads_f) = (outputs_and_grads(m, idx, mask) for m in (clear, fast))
    torch.testing.assert_close(out_f, out_c, rtol=1e-4, atol=1e-4)  # logits of size ~1-10
    assert grads_c.keys() == grads_f.keys() and grads_c
    for name in grads_c:
        torch.testing.assert_close(grads_f[name], grads_c[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("variant", ["interlora", "interlora-star", "lora"])
def test_fused_under_bf16_autocast_is_as_close_to_fp32_as_the_clear_layer(variant):
    """bf16 rounds differently in the two forms, so each is compared with the fp32 result: the
    fused layer's bf16 error must stay near the clear layer's (3x for gradients)."""
    clear, fast = pair(variant, "mean")
    idx, mask = padded_batch()
    exact, exact_grads = outputs_and_grads(pair(variant, "mean")[0], idx, mask)
    (out_c, grads_c), (out_f, grads_f) = (outputs_and_grads(m, idx, mask, True)
                                          for m in (clear, fast))

    def error(x, y):
        return float((x - y).norm() / y.norm().clamp(min=1e-12))
    assert error(out_f, exact) <= 2 * error(out_c, exact) + 1e-3
    for name in grads_c:
        assert error(grads_f[name], exact_grads[name]) <= \
            3 * error(grads_c[name], exact_grads[name]) + 0.05, name


@pytest.mark.parametrize("variant, pool", [("interlora", "mean"), ("interlora", "causal"),
                                           ("interlora-star", "causal"), ("lora", "mean")])
def test_fused_and_clear_generate_the_same_tokens_with_the_kv_cache(variant, pool):
    clear, fast = (m.eval() for m in pair(variant, pool))
    prompts = [[5, 9, 13, 2, 7], [11, 4], [8, 8, 3, 6]]  # ragged: generate left-pads them
    with torch.no_grad():
        assert fast.generate(prompts, 8) == clear.generate(prompts, 8)


def test_dropout_keeps_the_expectation():
    """With dropout the fused layer draws its own masks (geometric gaps on a CPU), so compare one
    layer's mean over many draws with the clear layer's output without dropout: a layer's output
    is linear in the mask, so dropout leaves its expectation unchanged."""
    (clear, _), (_, fast) = pair("interlora", "mean"), pair("interlora", "mean", dropout=0.3)
    clear, fast = clear.layers[0].feed_forward.w2, fast.layers[0].feed_forward.w2  # relu gate
    x = torch.randn(2, 10, clear.base.in_features, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = clear(x)
        one = fast(x)
        mean = sum(fast(x) for _ in range(400)) / 400
    # the noise of one draw shrinks 20x over 400 independent draws; a bias would not
    assert (mean - reference).norm() < 0.15 * (one - reference).norm()
