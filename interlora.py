"""InterLoRA (Gu et al.): LoRA with a gate per attention head and a gate per FFN neuron.

Where the adapters sit in one LLaMA block (the defaults; GPT-J's fc_out plays W_down):
    x -- norm --+-- W_q + LoRA * g_head --+
                +-- W_k ------------------+-- attention -- W_o     g_head: one value per head
                +-- W_v + LoRA * g_head --+                        (Eq. 5-6)
    h -- norm -- u = silu(W_gate h) * W_up h -- W_down + LoRA * g_ffn   g_ffn: per feature (Eq. 7-8)
x: a layer's input (B, T, d_in); W frozen; lambda = alpha / r.
    Eq. 4  LoRA(x) = lambda * B(A(dropout(x)))     A: d_in -> r, B: r -> d_out, B = 0 at start
    Eq. 5  g = mean_t sigmoid(x_t W_att W_h)       W_att: d_in -> 1, W_h: 1 -> heads
    Eq. 6  out = W x + [LoRA(x)_head_i * g_i]_i    the LoRA output split into heads
    Eq. 7  g_ffn = alpha_ffn * relu(u W_ffn W_o)   W_ffn: d_ff -> 1, W_o: 1 -> d_out, alpha learned
    Eq. 8  out = W u + LoRA(u) * g_ffn

Padding: Eq. 5 averages over real tokens only, read from the model's attention_mask by a hook
(TokenMask); with a KV cache, a call continues the sums of Eq. 5 kept from the cached tokens.
This file needs only torch: copy it into another project as it is.
"""
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


class AdapterError(ValueError):
    """An adapter that cannot be built, loaded or merged, with the reason."""


@dataclass
class InterLoRAConfig:
    """The paper's InterLoRA by default (Sec. 4.1); VARIANTS holds its other settings by name."""
    method: str = "interlora"    # what the file calls it: "interlora", or "lora" (no gates)
    r: int = 4                   # the rank
    alpha: float = 8.0           # lambda = alpha / r = 2
    dropout: float = 0.05        # on the LoRA input only (LLM-Adapters' default)
    attention_targets: tuple = ("q", "v")
    ffn_targets: tuple = ("down",)
    attention_gate: bool = True  # the per-head gate of Eq. 5-6
    ffn_gate: str = "relu"       # "relu" (Eq. 7) | "sigmoid" (InterLoRA*, no alpha) | "none"
    gate_scale_init: float = 10.0  # alpha_ffn of Eq. 7 at the start
    gate_pool: str = "mean"      # "mean" over the sequence (Eq. 5) | "causal": running mean

    def __post_init__(self):
        self.attention_targets, self.ffn_targets = map(tuple, (self.attention_targets,
                                                               self.ffn_targets))
        for name, allowed in dict(method=("interlora", "lora"), gate_pool=("mean", "causal"),
                                  ffn_gate=("relu", "sigmoid", "none")).items():
            if (value := getattr(self, name)) not in allowed:
                raise AdapterError(f"{name} {value!r} is not one of {', '.join(allowed)}")
        if self.r < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise AdapterError(f"r {self.r}, alpha {self.alpha}, dropout {self.dropout}: expected "
                               "r >= 1, alpha > 0 and 0 <= dropout < 1")
        if self.method == "lora" and (self.attention_gate or self.ffn_gate != "none"):
            raise AdapterError("method lora has no gates: use InterLoRAConfig(**VARIANTS['lora'])")


VARIANTS = {  # the paper's variants by name (Tables 1-5, Fig. 2-3): InterLoRAConfig fields
    "interlora": {},
    "lora": dict(method="lora", r=10, alpha=20.0, ffn_targets=(), attention_gate=False,
                 ffn_gate="none"),                        # the baseline: q and v, r 10
    "interlora-star": dict(ffn_gate="sigmoid"),          # "InterLoRA*", Tables 3-4
    "no-attention-gate": dict(attention_gate=False),     # "w/o gate on atten"
    "no-ffn-gate": dict(ffn_gate="none"),                # "w/o gate on FFN"
    "ffn-up": dict(ffn_targets=("up",)),                 # Fig. 2: which FFN matrix
    "ffn-gate": dict(ffn_targets=("gate",)),
    "ffn-all": dict(ffn_targets=("gate", "up", "down")),  # Fig. 3
}


class TokenMask:
    """A forward pre-hook that keeps the model's attention_mask and start_pos for its layers."""
    mask = start = hook = None  # mask (B, S): 1 = real token; start_pos: int or 0-dim tensor

    def __call__(self, model, args, kwargs):
        self.mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        self.start = kwargs.get("start_pos")


class InterLoRALinear(nn.Module):
    """A frozen linear layer plus LoRA (Eq. 4), gated per head (Eq. 5-6) or feature (Eq. 7-8)."""

    def __init__(self, base, cfg, gate="none", n_heads=1, tokens=None):
        super().__init__()
        self.base, self.gate, self.n_heads, self.gate_pool = base, gate, n_heads, cfg.gate_pool
        self.tokens = tokens or TokenMask()
        self.scaling, self.dropout = cfg.alpha / cfg.r, cfg.dropout  # lambda, p
        factory = dict(device=base.weight.device, dtype=torch.float32)  # fp32 beside any base
        self.lora_A = nn.Linear(base.in_features, cfg.r, bias=False, **factory)
        self.lora_B = nn.Linear(cfg.r, base.out_features, bias=False, **factory)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=5 ** 0.5)  # as PEFT and loralib
        nn.init.zeros_(self.lora_B.weight)  # the adapted model starts equal to the base
        if gate != "none":  # W_att / W_ffn (d_in -> 1), then W_h / W_o (1 -> heads or d_out)
            self.gate_in = nn.Linear(base.in_features, 1, bias=False, **factory)
            self.gate_out = nn.Linear(1, n_heads if gate == "head" else base.out_features,
                                      bias=False, **factory)
        if gate == "relu":
            self.gate_scale = nn.Parameter(torch.tensor(cfg.gate_scale_init, **factory))
        self.gate_sum = self.gate_count = None  # Eq. 5's sums so far, kept for decoding

    def forward(self, x):
        out = self.base(x)
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_A.weight.dtype)  # a bf16 base without autocast: adapters in fp32
        lora = self.lora_B(self.lora_A(F.dropout(x, self.dropout, self.training))) * self.scaling
        if self.gate == "head":  # Eq. 6
            g = self.head_gate(self.gate_in(x))  # (B, 1 or T, heads)
            lora = (lora.unflatten(-1, (self.n_heads, -1)) * g[..., None]).flatten(-2)  # per head
        elif self.gate != "none":  # Eq. 8
            lora = lora * self.ffn_gate(x)
        return out + lora.to(out.dtype)

    def ffn_gate(self, u):
        """Eq. 7: alpha * relu(u W_ffn W_o), or sigmoid(u W_ffn W_o) for InterLoRA*."""
        z = self.gate_out(self.gate_in(u))  # (..., d_out)
        return torch.sigmoid(z) if self.gate == "sigmoid" else self.gate_scale * F.relu(z)

    def head_gate(self, z):
        """Eq. 5 from z = x W_att (B, T, 1), pooled in fp32 over the real tokens: the mean
        over the sequence (B, 1, heads), or ("causal") over the tokens so far (B, T, heads)."""
        real, continuing = self.real_tokens(z.shape[1])
        if continuing and (self.gate_sum is None or self.gate_sum.shape[0] != z.shape[0]):
            raise AdapterError("decoding with a KV cache needs the prompt first, under no_grad")
        if continuing and self.gate_pool == "mean":
            return self.gate_sum / self.gate_count.clamp(min=1)  # fixed by the prompt
        s = torch.sigmoid(self.gate_out(z).float())  # (B, T, heads)
        real = torch.ones_like(s[..., :1]) if real is None else real[..., None].to(s.dtype)
        if self.gate_pool == "mean":  # sums over the whole sequence: (B, 1, .)
            sums, counts = (s * real).sum(1, keepdim=True), real.sum(1, keepdim=True)
        else:  # running sums over the real tokens <= t: (B, T, .)
            sums, counts = (s * real).cumsum(1), real.cumsum(1)
        if continuing:  # "causal" only: "mean" returned above
            sums, counts = sums + self.gate_sum, counts + self.gate_count
        if not (self.training and torch.is_grad_enabled()):  # what decoding needs next
            self.keep_gate_state(sums[:, -1:].detach(), counts[:, -1:].detach())
        return sums / counts.clamp(min=1)

    def real_tokens(self, T):
        """This call's T mask columns (None: all real), and whether cached tokens precede them."""
        mask, start = self.tokens.mask, self.tokens.start
        continuing = torch.is_tensor(start) or bool(start) or mask is not None and mask.shape[1] > T
        return (None if mask is None else mask[:, -T:]), continuing

    def keep_gate_state(self, sums, counts):
        self.gate_sum, self.gate_count = sums, counts


def is_adapter_parameter(name):
    """The one predicate for what is an adapter: freezing, the optimizer, saving, loading."""
    return bool({"lora_A", "lora_B", "gate_in", "gate_out", "gate_scale"} & set(name.split(".")))


def add_interlora(model, cfg, targets, layer=InterLoRALinear):
    """Wrap the target linear layers of `model` in `layer`, freeze the rest, hook the mask.

    targets: {role (q, k, v, gate, up, down): (module name suffix, heads)}, as for transformers'
    LLaMA {"q": ("self_attn.q_proj", 32), "down": ("mlp.down_proj", None), ...}."""
    if any(isinstance(m, InterLoRALinear) for m in model.modules()):
        raise AdapterError("this model already has InterLoRA layers")
    tokens, replaced = TokenMask(), {}
    for role in cfg.attention_targets + cfg.ffn_targets:
        suffix, n_heads = targets.get(role, ("", None))
        gate = cfg.ffn_gate if role in cfg.ffn_targets else "head" if cfg.attention_gate else "none"
        found = [(name, m) for name, m in model.named_modules() if hasattr(m, "in_features")
                 and suffix and (name == suffix or name.endswith("." + suffix))]
        if not found:
            raise AdapterError(f"no linear layer for target {role!r}: {suffix or 'not in targets'}")
        for name, module in found:
            parent, _, child = name.rpartition(".")
            new = layer(module, cfg, gate, n_heads, tokens).train(model.training)
            setattr(model.get_submodule(parent), child, new)
            replaced[name] = module
    for name, param in model.named_parameters():
        param.requires_grad_(is_adapter_parameter(name))
    tokens.hook = model.register_forward_pre_hook(tokens, with_kwargs=True)
    return replaced


def remove_interlora(model):
    """Put the original layers back and drop the mask hook: the inverse of add_interlora."""
    for name, layer in list(model.named_modules()):
        if isinstance(layer, InterLoRALinear):
            if layer.tokens.hook is not None:  # add_interlora's, shared (removing twice is fine)
                layer.tokens.hook.remove()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer.base)
    return model


def adapter_state_dict(model):
    return {name: p.detach() for name, p in model.named_parameters() if is_adapter_parameter(name)}


def save_adapter(file, model, cfg, info=None):
    """Write what load_adapter reads: the config, `info` (plain data) and the adapter tensors."""
    torch.save({"format": "interlora-adapter", "version": 2, "method": cfg.method,
                "config": asdict(cfg), "info": info or {},
                "tensors": {k: v.cpu() for k, v in adapter_state_dict(model).items()}}, file)


def load_adapter(model, file, targets, layer=InterLoRALinear):
    """Add the adapters saved in `file` (a path, or torch.load's dict) to `model`: (cfg, info)."""
    payload = file if isinstance(file, dict) else torch.load(file, weights_only=True)
    method = payload.get("method", "interlora")  # version 1 files name it in the config
    if payload.get("format") != "interlora-adapter" or method not in ("interlora", "lora"):
        raise AdapterError(f"{file} holds no InterLoRA or LoRA adapter (method {method!r})")
    cfg = InterLoRAConfig(**payload["config"])
    add_interlora(model, cfg, targets, layer)
    params, tensors = adapter_state_dict(model), payload["tensors"]
    if wrong := sorted(n for n in params.keys() | tensors.keys() if n not in params
                       or n not in tensors or params[n].shape != tensors[n].shape):
        remove_interlora(model)
        raise AdapterError(f"the adapter does not fit this model at {wrong[0]}: load it onto "
                           f"the model it was trained on ({payload['info'].get('model')})")
    for name, tensor in tensors.items():
        params[name].copy_(tensor)  # params are detached views of the parameters
    return cfg, payload["info"]


def merge(model):
    """Fold plain LoRA into the base weights (W += lambda B A) and drop the adapter layers."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, InterLoRALinear)]
    if gated := [name for name, m in layers if m.gate != "none"]:
        raise AdapterError(f"cannot merge {gated[0]}: its gate depends on the input (Eq. 5/7), "
                           "so the update is no fixed matrix; run it unmerged")
    for _, layer in layers:
        with torch.no_grad():
            delta = layer.scaling * (layer.lora_B.weight @ layer.lora_A.weight)  # (d_out, d_in)
            layer.base.weight += delta.to(layer.base.weight.dtype)
    return remove_interlora(model)  # the merged base layers back in place, the hook removed
