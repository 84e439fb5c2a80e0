"""InterLoRA (Gu et al.): LoRA with a gate per attention head and a gate per FFN neuron.

Where the adapters sit in one LLaMA block (the defaults; GPT-J's fc_out plays W_down):

    x -- norm --+-- W_q + LoRA * g_head --+
                +-- W_k ------------------+-- attention -- W_o     g_head: one value per head
                +-- W_v + LoRA * g_head --+                        (Eq. 5-6)
    h -- norm -- u = silu(W_gate h) * W_up h -- W_down + LoRA * g_ffn   g_ffn: per token and
                                                                        output feature (Eq. 7-8)
x: a layer's input (B, T, d_in); W frozen; lambda = alpha / r.
    Eq. 4  LoRA(x) = lambda * B(A(dropout(x)))     A: d_in -> r, B: r -> d_out, B = 0 at start
    Eq. 5  g = mean_t sigmoid(x_t W_att W_h)       W_att: d_in -> 1, W_h: 1 -> heads
    Eq. 6  out = W x + [LoRA(x)_head_i * g_i]_i    the LoRA output split into heads
    Eq. 7  g_ffn = alpha_ffn * relu(u W_ffn W_o)   W_ffn: d_ff -> 1, W_o: 1 -> d_out, alpha learned
    Eq. 8  out = W u + LoRA(u) * g_ffn

Padding: the mean of Eq. 5 runs over real tokens only. add_interlora hooks the model's
attention_mask (B, S), 1 = real token (keyword or second argument), and its start_pos if it
has one. With a KV cache the mask covers the cached tokens too (transformers' convention), so a
call of T tokens uses the mask's last T columns (or start_pos .. start_pos + T - 1); a call that
continues earlier tokens uses the running sums of Eq. 5 the layer kept from them.
This file needs only torch: copy it into another project as it is.
"""
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


class AdapterError(ValueError):
    """An adapter that cannot be built, loaded or merged, with the reason."""


@dataclass
class InterLoRAConfig:
    method: str = "interlora"    # "interlora", or "lora": the paper's baseline (q, v, no gates)
    r: int = 0                   # rank; 0: the paper's, 4 for interlora and 10 for lora
    alpha: float = 0.0           # lambda = alpha / r; 0: 2r, so lambda = 2
    dropout: float = 0.05        # on the LoRA input only (LLM-Adapters' default)
    attention_targets: tuple = ("q", "v")
    ffn_targets: tuple = None    # None: ("down",) for interlora, () for lora
    attention_gate: bool = None  # None: on for interlora; the per-head gate of Eq. 5-6
    ffn_gate: str = None         # "relu" (Eq. 7) | "sigmoid" (InterLoRA*, no alpha) | "none"
    gate_scale_init: float = 10.0  # alpha_ffn of Eq. 7 at the start
    gate_pool: str = "mean"      # "mean" over the sequence (Eq. 5) | "causal": running mean

    def __post_init__(self):
        paper = self.method == "interlora"
        if self.method not in ("interlora", "lora"):
            raise AdapterError(f"method {self.method!r} is unknown: expected interlora or lora")
        if self.r < 0 or self.alpha < 0 or not 0 <= self.dropout < 1:
            raise AdapterError(f"r {self.r}, alpha {self.alpha}, dropout {self.dropout}: expected "
                               "r >= 1 (0: the default), alpha >= 0 and 0 <= dropout < 1")
        self.r = self.r or (4 if paper else 10)
        self.alpha = self.alpha or 2 * self.r
        if self.ffn_targets is None:
            self.ffn_targets = ("down",) if paper else ()
        self.ffn_targets = tuple(self.ffn_targets)
        self.attention_targets = tuple(self.attention_targets)
        self.attention_gate = paper if self.attention_gate is None else self.attention_gate
        self.ffn_gate = self.ffn_gate or ("relu" if paper else "none")
        for name, choices in ("ffn_gate", ("relu", "sigmoid", "none")), ("gate_pool", ("mean",
                                                                                 "causal")):
            if getattr(self, name) not in choices:
                raise AdapterError(f"{name} {getattr(self, name)!r} is not one of "
                                   f"{', '.join(choices)}")
        roles = self.attention_targets + self.ffn_targets
        if not set(self.attention_targets) <= {"q", "k", "v"} or not set(self.ffn_targets) <= {
                "gate", "up", "down"}:
            raise AdapterError(f"targets {roles}: expected q, k, v (attention) and gate, up, "
                               "down (FFN)")


# The paper's variants by name (Tables 1-5, Fig. 2-3): InterLoRAConfig fields
VARIANTS = {
    "interlora": {},
    "lora": dict(method="lora"),
    "interlora-star": dict(ffn_gate="sigmoid"),          # "InterLoRA*", Tables 3-4
    "no-attention-gate": dict(attention_gate=False),     # "w/o gate on atten"
    "no-ffn-gate": dict(ffn_gate="none"),                # "w/o gate on FFN"
    "ffn-up": dict(ffn_targets=("up",)),                 # Fig. 2: which FFN matrix
    "ffn-gate": dict(ffn_targets=("gate",)),
    "ffn-all": dict(ffn_targets=("gate", "up", "down")),  # Fig. 3
}
ADAPTER_NAMES = {"lora_A", "lora_B", "gate_in", "gate_out", "gate_scale"}


class TokenMask:
    """A forward pre-hook: the model's attention_mask and start_pos, shared by its layers."""
    mask = None   # (B, S), 1 = real token; None: all real
    start = None  # where this call's tokens begin in the KV cache (int, 0-dim tensor or None)
    hook = None

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
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as PEFT and loralib
        nn.init.zeros_(self.lora_B.weight)  # the adapted model starts equal to the base
        if gate != "none":  # W_att / W_ffn (d_in -> 1), then W_h / W_o (1 -> heads or d_out)
            self.gate_in = nn.Linear(base.in_features, 1, bias=False, **factory)
            width = n_heads if gate == "head" else base.out_features
            self.gate_out = nn.Linear(1, width, bias=False, **factory)
        if gate == "relu":
            self.gate_scale = nn.Parameter(torch.tensor(cfg.gate_scale_init, **factory))
        # Eq. 5's sums over the real tokens so far (B, 1, heads) and their count (B, 1, 1),
        # kept between the calls of a generation with a KV cache
        self.register_buffer("gate_sum", None, persistent=False)
        self.register_buffer("gate_count", None, persistent=False)

    def forward(self, x):
        out = self.base(x)
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_A.weight.dtype)  # a bf16 base without autocast: adapters in fp32
        x_drop = F.dropout(x, self.dropout, self.training)
        lora = self.lora_B(self.lora_A(x_drop)) * self.scaling  # Eq. 4: (B, T, d_out)
        if self.gate == "head":  # Eq. 6
            g = self.head_gate(self.gate_in(x))  # (B, 1 or T, heads)
            B, T, d_out = lora.shape
            lora = lora.view(B, T, self.n_heads, d_out // self.n_heads) * g[..., None]
            lora = lora.view(B, T, d_out)  # (B, T, heads, head_dim) -> (B, T, d_out)
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
        if self.gate_pool == "mean":
            sums, counts = (s * real).sum(1, keepdim=True), real.sum(1, keepdim=True)
        else:  # running sums over the real tokens <= t: (B, T, heads), (B, T, 1)
            sums, counts = (s * real).cumsum(1), real.cumsum(1)
            if continuing:
                sums, counts = sums + self.gate_sum, counts + self.gate_count
        if not (self.training and torch.is_grad_enabled()):  # what decoding needs next
            self.keep_gate_state(sums[:, -1:].detach(), counts[:, -1:].detach())
        return sums / counts.clamp(min=1)

    def real_tokens(self, T):
        """(real, continuing): this call's T columns of the attention mask (None: all real),
        and whether its tokens follow tokens already in the KV cache."""
        mask, start = self.tokens.mask, self.tokens.start
        if start is None:  # no start_pos: the mask ends with the T new tokens
            start = 0 if mask is None else mask.shape[1] - T
        if mask is not None:
            if torch.is_tensor(start):
                mask = mask[:, start + torch.arange(T, device=mask.device)]
            else:
                mask = mask[:, start:start + T]
        return mask, torch.is_tensor(start) or start > 0  # a tensor start: a decode step

    def keep_gate_state(self, sums, counts):
        self.gate_sum, self.gate_count = sums, counts


def is_adapter_parameter(name):
    """The one predicate for what is an adapter: freezing, the optimizer, saving, loading."""
    return any(part in ADAPTER_NAMES for part in name.split("."))


def default_targets(model):
    """{role: (module name suffix, heads)} for model.py's models and transformers' LLaMA kin."""
    c = getattr(model, "config", None)
    if getattr(c, "family", None) in ("llama", "gptj"):  # this project's model.py
        heads = c.n_head, c.n_kv_heads
        names = dict(q="attention.wq", k="attention.wk", v="attention.wv", down="feed_forward.w2")
        names |= dict(gate="feed_forward.w1", up="feed_forward.w3") if c.family == "llama" \
            else dict(up="feed_forward.w1")  # GPT-J's fc_in is the up projection
    elif hasattr(c, "num_key_value_heads"):  # transformers' LLaMA, Mistral, Qwen2
        heads = c.num_attention_heads, c.num_key_value_heads
        names = {role: f"self_attn.{role}_proj" for role in "qkv"}
        names |= {role: f"mlp.{role}_proj" for role in ("gate", "up", "down")}
    else:
        raise AdapterError(f"no default targets for {type(model).__name__}: pass "
                           "targets={role: (module name suffix, heads)}")
    return {role: (name, dict(q=heads[0], k=heads[1], v=heads[1]).get(role))
            for role, name in names.items()}


def add_interlora(model, cfg, targets=None, layer=InterLoRALinear):
    """Wrap the target linear layers of `model` in `layer` and freeze everything else.

    targets: {role (q, k, v, gate, up, down): (module name suffix, heads)}; a linear layer is
    anything with in_features, out_features and weight. Returns {name: the replaced layer}."""
    targets = targets or default_targets(model)
    if any(isinstance(m, InterLoRALinear) for m in model.modules()):
        raise AdapterError("this model already has InterLoRA layers")
    tokens, replaced = TokenMask(), {}
    for role in cfg.attention_targets + cfg.ffn_targets:
        if role not in targets:
            raise AdapterError(f"target {role!r} has no module in {type(model).__name__}")
        suffix, n_heads = targets[role]
        head = role in cfg.attention_targets
        gate = ("head" if cfg.attention_gate else "none") if head else cfg.ffn_gate
        for name, module in list(model.named_modules()):
            if (name == suffix or name.endswith("." + suffix)) and all(
                    hasattr(module, a) for a in ("in_features", "out_features", "weight")):
                if gate == "head" and module.out_features % n_heads:
                    raise AdapterError(f"{name}: {module.out_features} outputs do not split "
                                       f"into {n_heads} heads")
                parent, _, child = name.rpartition(".")
                new = layer(module, cfg, gate, n_heads, tokens).train(model.training)
                setattr(model.get_submodule(parent), child, new)
                replaced[name] = module
        if not any(name.endswith(suffix) for name in replaced):
            raise AdapterError(f"no linear layer named *{suffix} for target {role!r}")
    for name, param in model.named_parameters():
        param.requires_grad_(is_adapter_parameter(name))
    tokens.hook = model.register_forward_pre_hook(tokens, with_kwargs=True)
    return replaced


def remove_interlora(model):
    """Put the original layers back and drop the mask hook: the inverse of add_interlora."""
    for name, layer in list(model.named_modules()):
        if isinstance(layer, InterLoRALinear):
            if layer.tokens.hook is not None:
                layer.tokens.hook.remove()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer.base)
    return model


def adapter_state_dict(model):
    return {name: p.detach() for name, p in model.named_parameters() if is_adapter_parameter(name)}


def adapter_payload(model, cfg, info=None):
    """What an adapter file holds: the config, the base's adapted shapes, info, the tensors."""
    shapes = {name: [m.base.in_features, m.base.out_features]
              for name, m in model.named_modules() if isinstance(m, InterLoRALinear)}
    config = getattr(model, "config", None)
    family = getattr(config, "family", None) or getattr(config, "model_type", None)
    return {"format": "interlora-adapter", "version": 2, "method": cfg.method,
            "config": asdict(cfg), "info": info or {},
            "base": {"class": type(model).__name__, "family": family, "shapes": shapes},
            "tensors": {k: v.cpu() for k, v in adapter_state_dict(model).items()}}


def save_adapter(file, model, cfg, info=None):
    torch.save(adapter_payload(model, cfg, info), file)


def load_adapter(model, file, targets=None, layer=InterLoRALinear):
    """Add the adapters saved in `file` (a path, or the dict torch.load gave) to `model` and
    load their tensors; returns (cfg, info). On a mismatch the model is left as it was."""
    payload = file if isinstance(file, dict) else torch.load(file, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != "interlora-adapter":
        raise AdapterError(f"{file} is not an InterLoRA adapter file")
    method = payload.get("method", payload["config"].get("method"))  # version 1: in the config
    if method not in ("interlora", "lora"):
        raise AdapterError(f"{file} holds a {method!r} adapter, not InterLoRA or LoRA")
    cfg = InterLoRAConfig(**payload["config"])
    add_interlora(model, cfg, targets, layer)
    params = {n: p for n, p in model.named_parameters() if is_adapter_parameter(n)}
    tensors, saved = payload["tensors"], payload["base"]
    wrong = [n for n in params.keys() | tensors.keys()
             if n not in params or n not in tensors or params[n].shape != tensors[n].shape]
    if wrong:
        remove_interlora(model)
        raise AdapterError(f"the adapter was made for a {saved['class']} ({saved['family']}) "
                           f"whose layers differ from this one's at {sorted(wrong)[0]}: load it "
                           f"onto the model it was trained on ({payload['info'].get('model')})")
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)
    return cfg, payload["info"]


def merge(model):
    """Fold plain LoRA into the base weights (W += lambda B A) and drop the adapter layers."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, InterLoRALinear)]
    if not layers:
        raise AdapterError(f"nothing to merge: {type(model).__name__} has no InterLoRA layers")
    for name, layer in layers:
        if layer.gate != "none":
            raise AdapterError(f"cannot merge {name}: its gate depends on the input (Eq. 5/7), "
                               "so the update is no fixed matrix; run it unmerged")
    for name, layer in layers:
        with torch.no_grad():
            delta = layer.scaling * (layer.lora_B.weight @ layer.lora_A.weight)  # (d_out, d_in)
            layer.base.weight += delta.to(layer.base.weight.dtype)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.base)
    return model
