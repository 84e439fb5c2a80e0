"""InterLoRA (Gu et al.): LoRA with a gate per attention head and a gate per FFN neuron.

Where the adapters sit in one LLaMA block (defaults; GPT-J's is the same with fc_out as W_down):

    x ── norm ──┬── W_q ⊕ LoRA·g_head ──┐                  g_head: one value per head,
                ├── W_k ────────────────┼── attention ── W_o    pooled over the sequence (Eq. 5-6)
                └── W_v ⊕ LoRA·g_head ──┘        │
    h ── norm ── u = silu(W_gate h) * W_up h ── W_down ⊕ LoRA⊙g_ffn    g_ffn: per token and
                                                                      output feature (Eq. 7-8)
Equations (x: layer input (B, T, d_in); W frozen; λ = alpha / r):
    Eq. 4  LoRA(x) = λ · B(A(dropout(x)))               A: d_in -> r,  B: r -> d_out, B = 0 at start
    Eq. 5  g = mean_t sigmoid(x_t W_att W_h)           W_att: d_in -> 1,  W_h: 1 -> heads
    Eq. 6  out = W x + [LoRA(x)_head_i · g_i]_i         the LoRA output split into heads
    Eq. 7  g_ffn = α · relu(u W_ffn W_o)                W_ffn: d_ff -> 1,  W_o: 1 -> d_out,  α learned
    Eq. 8  out = W u + LoRA(u) ⊙ g_ffn

Padding: the mean of Eq. 5 runs over real tokens only. add_interlora hooks the model's
`attention_mask` argument (B, S), 1 = real token, which covers the cached tokens too when
generating with a KV cache (the Hugging Face convention): a layer that sees T tokens uses the
last T columns, and S > T tells it that T new tokens follow S - T earlier ones.
Depends only on torch; the public names are the ones without a leading underscore.
"""
import inspect
import io
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


class AdapterError(ValueError):
    """An adapter that cannot be built, saved, loaded or merged, with the reason."""


@dataclass
class InterLoRAConfig:
    method: str = "interlora"        # "interlora", or "lora": the paper's baseline (q and v, no gates)
    r: int = 0                       # rank; 0 picks the paper's: 4 for interlora, 10 for lora
    alpha: float = 0.0               # PEFT-style: λ = alpha / r; 0 picks 2r, so λ = 2
    dropout: float = 0.05            # on the LoRA input only (LLM-Adapters' default)
    attention_targets: tuple = ("q", "v")
    ffn_targets: tuple = None        # None: ("down",) for interlora, () for lora
    attention_gate: bool = None      # None: True for interlora; the per-head gate of Eq. 5-6
    ffn_gate: str = None             # "relu" (Eq. 7) | "sigmoid" ("InterLoRA*": no α) | "none"
    gate_scale_init: float = 10.0    # α of Eq. 7 at initialisation
    gate_pool: str = "mean"          # "mean" over the sequence (Eq. 5) | "causal" running mean

    def __post_init__(self):
        if self.method not in ("interlora", "lora"):
            raise AdapterError(f"method {self.method!r} is unknown: expected interlora or lora")
        paper = self.method == "interlora"
        if self.r < 0 or self.alpha < 0 or not 0 <= self.dropout < 1:
            raise AdapterError(f"r {self.r}, alpha {self.alpha}, dropout {self.dropout}: expected r >= 1 "
                               "(or 0 for the default), alpha >= 0 and 0 <= dropout < 1")
        self.r = self.r or (4 if paper else 10)
        self.alpha = self.alpha or 2 * self.r
        self.attention_targets = tuple(self.attention_targets)
        if self.ffn_targets is None:
            self.ffn_targets = ("down",) if paper else ()
        self.ffn_targets = tuple(self.ffn_targets)
        self.attention_gate = paper if self.attention_gate is None else self.attention_gate
        self.ffn_gate = ("relu" if paper else "none") if self.ffn_gate is None else self.ffn_gate
        for name, choices in (("ffn_gate", ("relu", "sigmoid", "none")), ("gate_pool", ("mean", "causal"))):
            if getattr(self, name) not in choices:
                raise AdapterError(f"{name} {getattr(self, name)!r} is not one of {', '.join(choices)}")
        if not set(self.attention_targets) <= {"q", "k", "v"} or not set(self.ffn_targets) <= {"gate", "up", "down"}:
            raise AdapterError(f"targets {self.attention_targets + self.ffn_targets} must be among q, k, v "
                               "(attention) and gate, up, down (FFN)")


# The paper's variants by name (Tables 1-5, Fig. 2-3); each is a set of InterLoRAConfig fields.
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


class _TokenMask:
    """The attention_mask of the model's current call, shared by all its InterLoRA layers."""
    mask = None
    hook = None  # the handle of the forward pre-hook that fills `mask`


ADAPTER_NAMES = {"lora_A", "lora_B", "gate_in", "gate_out", "gate_scale"}


class InterLoRALinear(nn.Module):
    """A frozen nn.Linear plus LoRA (Eq. 4), gated per head (Eq. 5-6) or per feature (Eq. 7-8)."""

    def __init__(self, base, cfg, gate="none", n_heads=1, tokens=None):
        super().__init__()
        self.base, self.gate, self.n_heads, self.gate_pool = base, gate, n_heads, cfg.gate_pool
        self.tokens = tokens or _TokenMask()
        self.scaling = cfg.alpha / cfg.r  # λ
        # adapters are fp32 next to a bf16 base: autocast runs the matmuls in bf16
        factory = dict(device=base.weight.device, dtype=torch.float32)
        self.dropout = nn.Dropout(cfg.dropout)
        self.lora_A = nn.Linear(base.in_features, cfg.r, bias=False, **factory)
        self.lora_B = nn.Linear(cfg.r, base.out_features, bias=False, **factory)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as PEFT and loralib
        nn.init.zeros_(self.lora_B.weight)  # so the adapted model starts equal to the base
        if gate != "none":
            # W_att / W_ffn (d_in -> 1) then W_h / W_o (1 -> heads or d_out); no biases
            gate_width = n_heads if gate == "head" else base.out_features
            self.gate_in = nn.Linear(base.in_features, 1, bias=False, **factory)
            self.gate_out = nn.Linear(1, gate_width, bias=False, **factory)
        if gate == "relu":
            self.gate_scale = nn.Parameter(torch.tensor(cfg.gate_scale_init, **factory))  # α
        self.pooled = None  # the head gate's running state while decoding with a KV cache

    def forward(self, x):
        out = self.base(x)
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_A.weight.dtype)  # a bf16 base without autocast: adapters stay fp32
        lora = self.lora_B(self.lora_A(self.dropout(x))) * self.scaling  # Eq. 4
        if self.gate == "head":
            B, T, _ = x.shape
            g = self._head_gate(x).to(lora.dtype)  # (B, 1 or T, heads)
            lora = (lora.view(B, T, self.n_heads, -1) * g[..., None]).flatten(2)  # Eq. 6
        elif self.gate == "relu":
            lora = lora * (self.gate_scale * F.relu(self.gate_out(self.gate_in(x))))  # Eq. 7-8
        elif self.gate == "sigmoid":
            lora = lora * torch.sigmoid(self.gate_out(self.gate_in(x)))  # InterLoRA*: Eq. 7 with sigmoid, no α
        return out + lora.to(out.dtype)

    def _head_gate(self, x):
        """Eq. 5: the per-head sigmoid, averaged over real tokens ("mean") or real tokens so far ("causal")."""
        T = x.shape[1]
        mask = self.tokens.mask
        continuing = mask is not None and mask.shape[1] > T  # T new tokens after cached ones
        if continuing and self.pooled is None:
            raise AdapterError("decoding with a KV cache needs the prompt first, under torch.no_grad()")
        if continuing and self.gate_pool == "mean":
            return self.pooled  # fixed at prefill: the mean over the prompt
        s = torch.sigmoid(self.gate_out(self.gate_in(x))).float()  # (B, T, heads), pooled in fp32
        real = (mask[:, -T:, None] if mask is not None else torch.ones_like(s[..., :1])).to(s.dtype)  # (B, T, 1)
        if self.gate_pool == "mean":
            g = (s * real).sum(1, keepdim=True) / real.sum(1, keepdim=True).clamp(min=1)  # (B, 1, heads)
            state = g
        else:
            total, count = self.pooled if continuing else (0.0, 0.0)
            total = total + (s * real).cumsum(1)   # (B, T, heads): sum over real tokens <= t
            count = count + real.cumsum(1)        # (B, T, 1)
            g = total / count.clamp(min=1)
            state = (total[:, -1:], count[:, -1:])
        if not (self.training and torch.is_grad_enabled()):  # keep what decoding needs, never in training
            self.pooled = state
        return g


def is_adapter_parameter(name):
    """The one predicate that decides what is an adapter: freezing, the optimizer, saving, loading."""
    return any(part in ADAPTER_NAMES for part in name.split("."))


def default_targets(model):
    """{role: (module name suffix, heads)} for this project's LLaMA / GPT-J and transformers' LLaMA."""
    config = getattr(model, "config", None)
    if getattr(config, "family", None) in ("llama", "gptj"):  # model.py's Transformer
        heads = {"q": config.n_head, "k": config.n_kv_heads, "v": config.n_kv_heads}
        names = {"q": "attention.wq", "k": "attention.wk", "v": "attention.wv", "down": "feed_forward.w2"}
        names.update({"gate": "feed_forward.w1", "up": "feed_forward.w3"} if config.family == "llama"
                     else {"up": "feed_forward.w1"})  # GPT-J: fc_in is the up projection; it has no gate
    elif getattr(config, "model_type", None) == "llama":  # transformers' LlamaForCausalLM
        heads = {"q": config.num_attention_heads, "k": config.num_key_value_heads, "v": config.num_key_value_heads}
        names = {role: f"self_attn.{role}_proj" for role in "qkv"}
        names.update({role: f"mlp.{role}_proj" for role in ("gate", "up", "down")})
    else:
        raise AdapterError(f"no default targets for {type(model).__name__}: pass targets={{role: (suffix, heads)}}")
    return {role: (name, heads.get(role)) for role, name in names.items()}


def add_interlora(model, cfg, targets=None):
    """Wrap the target linear layers of `model` (nn.Linear, or any layer with in_features, out_features
    and weight, such as a quantized one) in InterLoRALinear and freeze everything else.

    targets maps each role (q, k, v, gate, up, down) to (module name suffix, number of heads);
    the default covers model.py's models and transformers' LLaMA. Returns {name: replaced Linear}.
    """
    targets = targets or default_targets(model)
    if any(isinstance(m, InterLoRALinear) for m in model.modules()):
        raise AdapterError("this model already has InterLoRA layers")
    tokens, replaced = _TokenMask(), {}
    for role in cfg.attention_targets + cfg.ffn_targets:
        if role not in targets:
            raise AdapterError(f"target {role!r} has no module in {type(model).__name__} "
                               f"(it has {', '.join(targets)})")
        suffix, n_heads = targets[role]
        if role in cfg.attention_targets:
            gate = "head" if cfg.attention_gate else "none"
        else:
            gate = cfg.ffn_gate
        for name, module in list(model.named_modules()):
            # a linear layer is anything with in_features, out_features and a weight: nn.Linear or a
            # quantized base layer (its weight int8 codes), whose forward computes the frozen W x
            if (name == suffix or name.endswith("." + suffix)) and all(
                    hasattr(module, a) for a in ("in_features", "out_features", "weight")):
                if gate == "head" and module.out_features % n_heads:
                    raise AdapterError(f"{name}: {module.out_features} outputs do not split into {n_heads} heads")
                parent_name, _, child = name.rpartition(".")
                layer = InterLoRALinear(module, cfg, gate, n_heads, tokens).train(model.training)
                setattr(model.get_submodule(parent_name), child, layer)
                replaced[name] = module
        if not any(name.endswith(suffix) for name in replaced):
            raise AdapterError(f"no linear layer named *{suffix} in {type(model).__name__} for target {role!r}")
    for name, param in model.named_parameters():
        param.requires_grad_(is_adapter_parameter(name))

    # Padding reaches the gates through the model's attention_mask argument (keyword or positional);
    # a Meta-style start_pos without a mask means start_pos cached tokens, none of them padding.
    params = list(inspect.signature(model.forward).parameters)

    def argument(name, args, kwargs):
        if name in kwargs or name not in params:
            return kwargs.get(name)
        position = params.index(name)
        return args[position] if len(args) > position else None

    def capture_mask(module, args, kwargs):
        mask, start_pos = argument("attention_mask", args, kwargs), argument("start_pos", args, kwargs)
        if mask is None and start_pos:
            idx = args[0] if args else next(iter(kwargs.values()))  # the tokens: (B, T)
            mask = torch.ones(idx.shape[0], start_pos + idx.shape[1], dtype=torch.bool, device=idx.device)
        tokens.mask = mask
    tokens.hook = model.register_forward_pre_hook(capture_mask, with_kwargs=True)
    return replaced


def remove_interlora(model):
    """Put the original nn.Linear layers back and drop the mask hook: the inverse of add_interlora."""
    for name, layer in list(model.named_modules()):
        if isinstance(layer, InterLoRALinear):
            if layer.tokens.hook is not None:
                layer.tokens.hook.remove()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, layer.base)
    return model


def adapter_state_dict(model):
    return {name: p.detach() for name, p in model.named_parameters() if is_adapter_parameter(name)}


def _base_description(model):
    """What an adapter file must match: the model's class and family, and each adapted layer's (in, out)."""
    config = getattr(model, "config", None)
    family = getattr(config, "family", None) or getattr(config, "model_type", None)
    shapes = {name: [m.base.in_features, m.base.out_features]
              for name, m in model.named_modules() if isinstance(m, InterLoRALinear)}
    return {"class": type(model).__name__, "family": family, "shapes": shapes}


def save_adapter(path, model, cfg, info=None):
    """Write the config, the base's adapted shapes, `info` and the adapter tensors to one file, atomically."""
    info = info or {}
    try:  # the file is read with weights_only=True: only plain data loads back
        json.dumps(info)
    except TypeError as e:
        raise AdapterError(f"adapter info must be plain JSON-like data: {e}") from None
    payload = {"format": "interlora-adapter", "version": 1, "config": asdict(cfg), "info": info,
               "base": _base_description(model),
               "tensors": {k: v.cpu() for k, v in adapter_state_dict(model).items()}}
    # a temporary file beside the target, renamed over it: readers see the old file or the new one
    folder, name = os.path.split(os.path.abspath(path))
    buffer = io.BytesIO()
    torch.save(payload, buffer)  # in memory first: torch.save into a file hides a full disk's OSError
    handle, temp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(temp, 0o666 & ~mask)  # the permissions of a plainly created file, not mkstemp's 0600
        os.replace(temp, path)
    except OSError as e:
        raise AdapterError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if os.path.exists(temp):
            os.unlink(temp)


def read_adapter(path):
    """The saved payload of an adapter file, checked; loads tensors only (weights_only=True)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise AdapterError(f"adapter file {path} not found") from None
    except PermissionError:
        raise AdapterError(f"cannot read adapter {path}: permission denied") from None
    except Exception as e:  # truncated zip, foreign pickle, not a torch file at all
        raise AdapterError(f"cannot read adapter {path} ({type(e).__name__}): the file is corrupt or "
                           "not an InterLoRA adapter") from None
    if not isinstance(payload, dict) or payload.get("format") != "interlora-adapter":
        raise AdapterError(f"{path} is not an InterLoRA adapter file (no 'interlora-adapter' format tag)")
    return payload


def load_adapter(model, path, targets=None):
    """Add the adapters described in `path` to `model` and load their tensors; returns (cfg, info).

    On any mismatch the model is left as it was and AdapterError says what differs.
    """
    payload = read_adapter(path)
    cfg = InterLoRAConfig(**payload["config"])
    add_interlora(model, cfg, targets)
    try:
        base, saved = _base_description(model), payload["base"]
        for key in ("class", "family", "shapes"):
            if base[key] != saved[key]:
                raise AdapterError(f"{path} was made for another base model: its {key} is {saved[key]}, "
                                   f"this model's is {base[key]}"[:400])
        params = {n: p for n, p in model.named_parameters() if is_adapter_parameter(n)}
        tensors = payload["tensors"]
        if params.keys() != tensors.keys():
            name = sorted(params.keys() ^ tensors.keys())[0]
            raise AdapterError(f"{path}: tensor {name} is in {'the model' if name in params else 'the file'} only")
        for name, tensor in tensors.items():
            if params[name].shape != tensor.shape:
                raise AdapterError(f"{path}: tensor {name} {tuple(tensor.shape)} does not fit this model's "
                                   f"{tuple(params[name].shape)}")
            with torch.no_grad():
                params[name].copy_(tensor)
    except AdapterError:
        remove_interlora(model)
        raise
    return cfg, payload["info"]


def merge(model):
    """Fold plain LoRA into the base weights (W += λ·B·A) and drop the adapter layers."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, InterLoRALinear)]
    gated = [name for name, m in layers if m.gate != "none"]
    if gated:
        raise AdapterError(f"cannot merge {gated[0]}: its gate depends on the input (Eq. 5/7), so the update is "
                           "no fixed matrix; run gated InterLoRA unmerged")
    quantized = [(name, m.base.weight.dtype) for name, m in layers if not m.base.weight.is_floating_point()]
    if quantized:
        raise AdapterError(f"cannot merge into {quantized[0][0]}: its base weight is {quantized[0][1]} (quantized), "
                           "and W + λ·B·A rounded back to it would lose the update; load the base unquantized "
                           "to merge, or run the adapters unmerged")
    for name, layer in layers:
        with torch.no_grad():
            delta = layer.scaling * (layer.lora_B.weight @ layer.lora_A.weight)  # (d_out, d_in), fp32
            layer.base.weight += delta.to(layer.base.weight.dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.base)
    return model
