"""memory.py against what the code really holds: the bytes of built models (on the meta device,
nothing allocated), the KV cache setup_cache makes, AdamW's state after a step, and the tensors
autograd saves for backward (counted with saved_tensors_hooks). The refusal is tested by
passing the available memory in; nothing here allocates a large model.
"""
import contextlib
import os
import re

import pytest
import torch

from machinery.adapters import default_targets
import interlora
from machinery import fused
from machinery.memory import (ACTIVATION_BYTES, DTYPES, NotEnoughMemory, check_memory, default_dtype, memory_available,
                    memory_needed, weight_bytes)
from conftest import ROOT
from machinery.checkpoints import load_model
from model import ModelConfig, Transformer
from machinery.quantize import QUANTIZE_KINDS, quantize_model

GiB = 2 ** 30
CONFIGS = {name: ModelConfig.from_name(name) for name in ("tiny", "tiny-gptj", "llama-7b", "llama-13b", "gptj-6b")}
# Llama-2-70B's shapes at 2 layers: grouped-query attention (8 kv heads) and a wide FFN
CONFIGS["llama2-70b-gqa"] = ModelConfig(dim=8192, n_layer=2, n_head=64, n_kv_heads=8, ffn_dim=28672)



def tensor_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("quantize", [None, *QUANTIZE_KINDS])
def test_weight_bytes_are_the_built_models(name, quantize):
    config = CONFIGS[name]
    for dtype in (["fp32", "bf16"] if name.startswith("tiny") else ["bf16"]):
        with torch.device("meta"):
            model = Transformer(config).to(DTYPES[dtype])
        if quantize:
            quantize_model(model, quantize)
        parts = weight_bytes(config, dtype, quantize)
        assert sum(parts.values()) == tensor_bytes(model.state_dict().values())
        assert parts["embedding"] == tensor_bytes([model.tok_embeddings.weight])
        assert parts["output"] == tensor_bytes(model.output.state_dict().values())
        assert memory_needed(config, dtype, quantize)["weights"] == sum(parts.values())


def test_llama_7b_in_bf16_is_its_published_size():
    assert sum(weight_bytes(CONFIGS["llama-7b"], "bf16").values()) == 2 * 6_738_415_616


def test_kv_cache_is_what_setup_cache_allocates():
    config = ModelConfig(vocab_size=50, dim=64, n_layer=3, n_head=8, n_kv_heads=2, ffn_dim=128)
    model = Transformer(config).to(torch.bfloat16)
    model.setup_cache(batch_size=3, max_len=40)
    cache = tensor_bytes(t for layer in model.layers for t in (layer.attention.cache.k, layer.attention.cache.v))
    assert memory_needed(config, "bf16", batch_size=3, seq_len=40)["KV cache"] == cache


def test_adapter_bytes_are_adamw_after_a_step():
    model = load_model("tiny")
    interlora.add_interlora(model, interlora.InterLoRAConfig(), default_targets(model), layer=fused.FusedInterLoRALinear)
    params = [p for n, p in model.named_parameters() if interlora.is_adapter_parameter(n)]
    optimizer = torch.optim.AdamW(params)
    model(torch.randint(0, 259, (1, 8))).float().square().mean().backward()
    optimizer.step()
    moments = [t for state in optimizer.state.values() for name, t in state.items() if name != "step"]
    held = tensor_bytes(params) + tensor_bytes(p.grad for p in params) + tensor_bytes(moments)
    trainable = sum(p.numel() for p in params)
    assert memory_needed(CONFIGS["tiny"], "fp32", training=True, trainable_params=trainable)["adapters + AdamW"] == held


def saved_activation_bytes(name, dtype, autocast, batch_size, seq_len, grad_checkpointing=False):
    """Bytes of the tensors autograd keeps for backward in one training forward of InterLoRA on `name`."""
    model = load_model(name, dtype=dtype)
    interlora.add_interlora(model, interlora.InterLoRAConfig(), default_targets(model), layer=fused.FusedInterLoRALinear)
    model.train()
    model.loss_function = fused.chunked_loss  # train.py's loss
    model.grad_checkpointing = grad_checkpointing
    own = {t.untyped_storage().data_ptr() for t in model.parameters()}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in own:
            storages[storage.data_ptr()] = storage.nbytes()  # views of one storage count once
        return tensor
    idx = torch.randint(0, 259, (batch_size, seq_len), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(idx, dtype=torch.bool)  # as train.py calls the model
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), context:
        model(idx, attention_mask=mask, labels=idx, right_padded=True)  # the loss included
    return sum(storages.values())


@pytest.mark.parametrize("name", ["tiny", "tiny-gptj"])
@pytest.mark.parametrize("dtype, autocast", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)],
                         ids=["fp32", "bf16", "bf16-autocast"])
def test_activation_estimate_bounds_what_autograd_saves(name, dtype, autocast):
    measured = saved_activation_bytes(name, dtype, autocast, batch_size=2, seq_len=96)
    estimate = memory_needed(CONFIGS[name], dtype, training=True, batch_size=2, seq_len=96,
                             autocast=autocast)["activations"]
    # an upper bound, and a close one: LLaMA's FFN sets the constants, GPT-J's stores a little less
    assert measured <= estimate <= 1.3 * measured, (measured, estimate)


def test_gradient_checkpointing_estimate_bounds_what_autograd_saves():
    measured = saved_activation_bytes("tiny", torch.float32, False, 2, 96, grad_checkpointing=True)
    estimate = memory_needed(CONFIGS["tiny"], "fp32", training=True, batch_size=2, seq_len=96,
                             grad_checkpointing=True)["activations"]
    full = memory_needed(CONFIGS["tiny"], "fp32", training=True, batch_size=2, seq_len=96)["activations"]
    assert measured <= estimate < full / 2


def test_the_constants_are_the_ones_the_readme_gives():
    readme = " ".join((ROOT / "README.md").read_text().split())
    found = re.search(r"measured on this code by a test: (\d+) fp32, (\d+) 16-bit, (\d+) under autocast", readme)
    assert found, "the README no longer gives the activation constants"
    assert ACTIVATION_BYTES == dict(zip(("fp32", "16-bit", "16-bit autocast"), map(int, found.groups())))


# ----------------------------------------------------------------------------- refusing and choosing

def settings_of(flags, training, base):
    """memory_needed's arguments after applying a suggestion such as '--dtype bf16 --micro_batch_size 2'."""
    settings, words = dict(base), flags.split()
    while words:
        flag = words.pop(0)
        if flag == "--grad_checkpointing":
            settings["grad_checkpointing"] = True
        else:
            key = {"--dtype": "dtype", "--quantize": "quantize", "--micro_batch_size": "batch_size",
                   "--batch_size": "batch_size"}[flag]
            value = words.pop(0)
            settings[key] = int(value) if key == "batch_size" else value
            assert flag != ("--batch_size" if training else "--micro_batch_size")
    return settings


@pytest.mark.parametrize("case", [
    # LLaMA-7B in fp32 for evaluation on a 24 GB machine: what users hit
    dict(config="llama-7b", dtype="fp32", training=False, batch_size=2, seq_len=300, available=22.8),
    # the paper's run (bf16, micro-batches of 4 x 256 tokens, autocast; 20.8 GiB) on a card with 20 GiB free
    dict(config="llama-7b", dtype="bf16", training=True, batch_size=4, seq_len=256, available=20.0,
         trainable_params=4_778_016, autocast=True),
    # LLaMA-13B in bf16 does not fit a 24 GB card: an 8-bit base with a smaller batch does
    dict(config="llama-13b", dtype="bf16", training=True, batch_size=4, seq_len=256, available=22.3,
         trainable_params=7_478_440, autocast=True),
])
def test_refusal_gives_the_figures_and_only_flags_that_fit(case):
    case = dict(case)
    config, available = CONFIGS[case.pop("config")], int(case.pop("available") * GiB)
    base = dict(dtype=case["dtype"], quantize=None, training=case["training"], batch_size=case["batch_size"],
                seq_len=case["seq_len"], trainable_params=case.get("trainable_params", 0),
                autocast=case.get("autocast", False), grad_checkpointing=False)
    with pytest.raises(NotEnoughMemory) as error:
        check_memory(config, "cpu", available=available, **case)
    message, total = str(error.value), sum(memory_needed(config, **base).values())
    assert "\n" not in message and isinstance(error.value, ValueError)
    assert f"needs {total / GiB:.1f} GiB but {available / GiB:.1f} GiB are available" in message
    assert "weights" in message
    assert error.value.fits, message
    for flags in error.value.fits:
        assert flags in message
        assert sum(memory_needed(config, **settings_of(flags, case["training"], base)).values()) <= available
    for flags in error.value.fits:  # no suggestion asks for more changes than another one that fits
        assert not any(set(other.split("--")) < set(flags.split("--")) for other in error.value.fits)


def test_the_fp32_7b_evaluation_names_bf16_and_int8():
    with pytest.raises(NotEnoughMemory) as error:
        check_memory(CONFIGS["llama-7b"], "cpu", "fp32", batch_size=2, seq_len=300, available=int(22.8 * GiB))
    assert {"--dtype bf16", "--quantize int8"} <= set(error.value.fits)
    with pytest.raises(NotEnoughMemory) as error:  # 10 GiB: a bf16 base (12.6 GiB) no longer fits
        check_memory(CONFIGS["llama-7b"], "cpu", "fp32", batch_size=2, seq_len=300, available=10 * GiB)
    assert "--dtype bf16" not in error.value.fits and "--quantize int8" in error.value.fits


def test_nothing_fits_says_so():
    with pytest.raises(NotEnoughMemory) as error:
        check_memory(CONFIGS["llama-13b"], "cuda", "bf16", training=True, batch_size=4, available=2 * GiB)
    assert error.value.fits == [] and "nothing fits" in str(error.value)


def test_a_run_that_fits_returns_its_parts(monkeypatch):
    parts = check_memory(CONFIGS["tiny"], "cpu", "fp32", available=2 * GiB)
    assert set(parts) == {"weights", "KV cache", "logits", "margin"}
    monkeypatch.setattr("machinery.memory.memory_available", lambda device: None)  # e.g. not Linux: never refused
    assert check_memory(CONFIGS["llama-13b"], "cpu", "fp32")["weights"] > 48 * GiB


def test_default_dtype():
    config = CONFIGS["llama-7b"]
    assert default_dtype(config, "cuda")[0] == "bf16"  # never asks the device
    dtype, note = default_dtype(config, "cpu", available=64 * GiB)
    assert dtype == "fp32" and "fits" in note
    dtype, note = default_dtype(config, "cpu", available=int(22.8 * GiB))
    assert dtype == "bf16" and "22.8" in note and "--dtype fp32" in note and "\n" not in note
    assert default_dtype(CONFIGS["tiny"], "cpu", available=int(22.8 * GiB))[0] == "fp32"


@pytest.mark.skipif(not os.path.exists("/proc/meminfo"), reason="MemAvailable is read from Linux's /proc/meminfo")
def test_memory_available_on_the_cpu_is_below_physical_memory():
    available = memory_available("cpu")
    assert 0 < available <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
