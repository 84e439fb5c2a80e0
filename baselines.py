"""The paper's other two baselines, as it ran them (LLM-Adapters' code and defaults): the bottleneck
Adapter and Prefix tuning.

Where they sit in one LLaMA block (GPT-J: one adapter on the input of fc_in, one on the output of
fc_out):

    x ─ norm ─ attention: q against [P_k ; k], [P_v ; v] ─ W_o
    h ─ norm ─┬─ h + a_g(h) ─ W_gate ┐
              └─ h + a_u(h) ─ W_up ──┴─ u = silu(·) * (·) ─ W_down ─ y + a_d(y)

    P_k, P_v: the layer's prefix, 30 keys and values before every sequence;  y = W_down u.

Adapter (bottleneck 256, "series"): a(z) = U tanh(D z),  D: d -> 256,  U: 256 -> d,  no biases,
    scale 1, D and U both N(0, 0.02) at the start, so the adapted model is not the base at step 0.
    It runs in fp32 on an fp32 copy of its input (under autocast its matmuls take autocast's dtype,
    as every adapter here); its output is cast back to the input's dtype.
Prefix (30 virtual tokens, no reparameterisation): one table
    (30, n_layer · 2 · n_kv_heads · head_dim), N(0, 1) at the start. Row p holds position p of
    every layer's keys and values, layer i's keys at slice 2i and its values at slice 2i + 1
    (PEFT's layout). The model receives them as past_key_values, the keys and values of 30
    positions before its tokens: always attended, used as stored (never rotated), and the tokens'
    positions start at 30 (model.py's Transformer.forward says how).

Neither folds into the base weights: the adapter is nonlinear, a prefix changes no weight.
Depends only on torch; the public names are the ones without a leading underscore.
"""
import inspect
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn


class BaselineError(ValueError):
    """A baseline that cannot be built on a model, with the reason."""


@dataclass
class AdapterConfig:
    method: ClassVar[str] = "adapter"
    bottleneck: int = 256   # LLM-Adapters' bottleneck_size
    init_std: float = 0.02  # D, U ~ N(0, init_std): LLM-Adapters' default "bert" init

    def __post_init__(self):
        if self.bottleneck < 1 or not self.init_std >= 0:
            raise BaselineError(f"bottleneck {self.bottleneck}, init_std {self.init_std}: "
                                "expected bottleneck >= 1 and init_std >= 0")


@dataclass
class PrefixConfig:
    method: ClassVar[str] = "prefix"
    virtual_tokens: int = 30  # PEFT's num_virtual_tokens

    def __post_init__(self):
        if self.virtual_tokens < 1:
            raise BaselineError(f"virtual_tokens {self.virtual_tokens}: expected at least 1")


BASELINE_NAMES = {"adapter_down", "adapter_up", "prefix_tuning"}


def is_baseline_parameter(name):
    """The one predicate that decides what trains, is saved and loaded: the adapters' D and U,
    the prefix table."""
    return any(part in BASELINE_NAMES for part in name.split("."))


def _train_only_baselines(model):
    for name, param in model.named_parameters():
        param.requires_grad_(is_baseline_parameter(name))


def _has_baseline(model):
    return any(isinstance(m, (SeriesAdapter, Prefix)) for m in model.modules())


# --------------------------------------------------------------------------- the bottleneck adapter

class SeriesAdapter(nn.Module):
    """A frozen linear layer with a bottleneck adapter in series: on its input, W (z + a(z)), or on
    its output, y + a(y) with y = W z (+ bias)."""

    def __init__(self, base, side, cfg):
        super().__init__()
        self.base, self.side = base, side
        width = base.in_features if side == "input" else base.out_features
        # fp32 next to any base dtype, on the base's device
        factory = dict(device=base.weight.device, dtype=torch.float32)
        self.adapter_down = nn.Linear(width, cfg.bottleneck, bias=False, **factory)  # D
        self.adapter_up = nn.Linear(cfg.bottleneck, width, bias=False, **factory)    # U
        nn.init.normal_(self.adapter_down.weight, std=cfg.init_std)
        nn.init.normal_(self.adapter_up.weight, std=cfg.init_std)

    def adapt(self, z):
        """z + U tanh(D z), the adapter computed on an fp32 copy of z and cast back to z's dtype."""
        a = self.adapter_up(torch.tanh(self.adapter_down(z.float())))  # (..., width)
        return z + a.to(z.dtype)

    def forward(self, x):
        if self.side == "input":
            return self.base(self.adapt(x))
        return self.adapt(self.base(x))


def default_adapter_targets(model):
    """{module name suffix: "input" | "output"}: LLM-Adapters' targets and sides, for model.py's
    LLaMA and GPT-J and transformers' LlamaForCausalLM / GPTJForCausalLM."""
    config = getattr(model, "config", None)
    family = getattr(config, "family", None)  # model.py's Transformer
    if family == "llama":
        return {"feed_forward.w1": "input", "feed_forward.w3": "input", "feed_forward.w2": "output"}
    if family == "gptj":
        return {"feed_forward.w1": "input", "feed_forward.w2": "output"}
    model_type = getattr(config, "model_type", None)  # transformers'
    if model_type == "llama":
        return {"mlp.gate_proj": "input", "mlp.up_proj": "input", "mlp.down_proj": "output"}
    if model_type == "gptj":
        return {"mlp.fc_in": "input", "mlp.fc_out": "output"}
    raise BaselineError(f"no default adapter targets for {type(model).__name__}: "
                        "pass targets={suffix: 'input' or 'output'}")


def _matches(name, suffix):
    """Whether the module called `name` is the one a target `suffix` names."""
    return name == suffix or name.endswith("." + suffix)


def add_adapter(model, cfg, targets=None):
    """Wrap the target linear layers of `model` (nn.Linear, or any layer with in_features,
    out_features and weight, such as a quantized one) in SeriesAdapter and freeze everything else.

    targets maps a module name suffix to the side its adapter sits on ("input" or "output"); the
    default is LLM-Adapters' (default_adapter_targets). Returns {name: replaced layer}.
    """
    targets = targets or default_adapter_targets(model)
    if _has_baseline(model):
        raise BaselineError("this model already has a baseline adapter or prefix")
    if set(targets.values()) - {"input", "output"}:
        sides = sorted(set(targets.values()))
        raise BaselineError(f"adapter sides {sides}: expected 'input' or 'output'")
    replaced = {}
    for name, module in list(model.named_modules()):
        side = next((side for suffix, side in targets.items() if _matches(name, suffix)), None)
        if side and all(hasattr(module, a) for a in ("in_features", "out_features", "weight")):
            parent_name, _, child = name.rpartition(".")
            adapted = SeriesAdapter(module, side, cfg).train(model.training)
            setattr(model.get_submodule(parent_name), child, adapted)
            replaced[name] = module
    missing = [suffix for suffix in targets if not any(_matches(n, suffix) for n in replaced)]
    if missing:
        remove_adapter(model)
        raise BaselineError(f"no linear layer named *{missing[0]} in {type(model).__name__} "
                            "for an adapter")
    _train_only_baselines(model)
    return replaced


def remove_adapter(model):
    """Put the original layers back: the inverse of add_adapter."""
    for name, layer in list(model.named_modules()):
        if isinstance(layer, SeriesAdapter):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, layer.base)
    return model


# --------------------------------------------------------------------------- the prefix

class Prefix(nn.Module):
    """The prefix table, and the forward pre-hook that hands it to the model as past_key_values.

    The hook is this module's own method, so that a deep copy of the model feeds the copy's table.
    """

    def __init__(self, cfg, n_layer, n_kv_heads, head_dim, device=None):
        super().__init__()
        self.n_layer, self.n_kv_heads, self.head_dim = n_layer, n_kv_heads, head_dim
        # N(0, 1), as PEFT's nn.Embedding of the same shape; fp32 next to any base dtype
        width = n_layer * 2 * n_kv_heads * head_dim
        table = torch.randn(cfg.virtual_tokens, width, device=device, dtype=torch.float32)
        self.table = nn.Parameter(table)
        self.hook = None  # the handle of the hook on the model

    def key_values(self):
        """Per layer (keys, values), each (1, n_kv_heads, P, head_dim): views of the table."""
        P = self.table.shape[0]
        kv_shape = (P, 2 * self.n_layer, self.n_kv_heads, self.head_dim)
        kv = self.table.view(kv_shape)  # (P, 2L, nkv, hd)
        kv = kv.permute(1, 2, 0, 3)     # (2L, nkv, P, hd)
        return tuple((kv[2 * i][None], kv[2 * i + 1][None]) for i in range(self.n_layer))

    def inject(self, model, args, kwargs):
        if kwargs.get("past_key_values") is not None:
            raise BaselineError("the model was called with past_key_values and has a prefix, "
                                "which takes that argument: remove the prefix (remove_prefix) "
                                "to pass your own")
        return args, {**kwargs, "past_key_values": self.key_values()}


def add_prefix(model, cfg, n_layer=None, n_kv_heads=None, head_dim=None):
    """Give `model` a trainable prefix (as its submodule `prefix_tuning`) and freeze everything
    else.

    The model's forward must take past_key_values as per-layer (keys, values) pairs of shape
    (batch or 1, n_kv_heads, P, head_dim), with the meaning model.py gives them; the shapes default
    to model.py's config. Returns the Prefix.
    """
    config = getattr(model, "config", None)
    if getattr(config, "family", None) in ("llama", "gptj"):  # model.py's Transformer
        n_layer = n_layer or config.n_layer
        n_kv_heads, head_dim = n_kv_heads or config.n_kv_heads, head_dim or config.head_dim
    if not (n_layer and n_kv_heads and head_dim):
        raise BaselineError(f"{type(model).__name__} is not model.py's Transformer: pass n_layer, "
                            "n_kv_heads and head_dim (transformers' models take a Cache object "
                            "instead: use PEFT there)")
    if "past_key_values" not in inspect.signature(model.forward).parameters:
        raise BaselineError(f"{type(model).__name__}.forward takes no past_key_values: a prefix "
                            "cannot reach its attention")
    if _has_baseline(model) or hasattr(model, "prefix_tuning"):
        raise BaselineError("this model already has a baseline adapter or prefix")
    device = next(model.parameters()).device
    prefix = Prefix(cfg, n_layer, n_kv_heads, head_dim, device).train(model.training)
    model.prefix_tuning = prefix

    prefix.hook = model.register_forward_pre_hook(prefix.inject, with_kwargs=True)
    _train_only_baselines(model)
    return prefix


def remove_prefix(model):
    """Drop the prefix and its hook: the inverse of add_prefix."""
    prefix = getattr(model, "prefix_tuning", None)
    if isinstance(prefix, Prefix):
        prefix.hook.remove()
        del model.prefix_tuning
    return model
