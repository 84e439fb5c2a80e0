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
Each adapted layer adds one matmul to W x: λ, α and the per-sequence head gates scale the rows of
B (d_out x r), never a (B, T, d_out) activation, and Eq. 7-8's relu gate is an exact rank-2r update.

Padding: the mean of Eq. 5 runs over real tokens only. add_interlora hooks the model's
`attention_mask` argument (B, S), 1 = real token, and its `start_pos` where it has one (model.py).
The mask covers the cached tokens too when generating with a KV cache (the Hugging Face
convention): a layer that sees T tokens uses the columns start_pos .. start_pos + T - 1 (the last
T without start_pos), and start_pos > 0 (or S > T) tells it that they follow earlier ones, whose
running sums of Eq. 5 it kept. A tensor start_pos is a compiled decode step: always continuing.
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
    """The attention_mask and start_pos of the model's current call, shared by all its InterLoRA layers.

    It is the model's forward pre-hook itself (not a closure), so that a deep copy of the model
    gets its own, shared by the copied layers.
    """
    mask = None   # (B, S), 1 = real token, or None: every token is real
    start = None  # where the call's tokens begin in the KV cache: an int, a 0-dim tensor, or None (not given)
    arguments = ()  # the names of the model's forward arguments, in order
    hook = None   # the handle of the hook

    def __call__(self, model, args, kwargs):
        self.mask, self.start = self._argument("attention_mask", args, kwargs), self._argument("start_pos", args, kwargs)

    def _argument(self, name, args, kwargs):
        if name in kwargs or name not in self.arguments:
            return kwargs.get(name)
        position = self.arguments.index(name)
        return args[position] if len(args) > position else None


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
        self.dropout = cfg.dropout  # p: in training LoRA reads dropout(x) (Eq. 4)
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
        # the head gate's running sums over the real tokens so far (B, 1, heads) and their count (B, 1, 1),
        # kept while decoding with a KV cache; updated in place, so CUDA graphs see fixed addresses
        self.register_buffer("gate_sum", None, persistent=False)
        self.register_buffer("gate_count", None, persistent=False)

    def forward(self, x):
        out = self.base(x)
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_A.weight.dtype)  # a bf16 base without autocast: adapters stay fp32
        # A (Eq. 4) and the gate's first projection (W_att, Eq. 5; W_ffn, Eq. 7) both read x: one matmul with
        # both stacked (r + 1 rows). In training with dropout, LoRA reads dropout(x) and the gate x: two matmuls;
        # dropout's 1 / (1 - p) goes into A (r x d_in), so dropout(x) A^T = (x ⊙ mask) (A / (1 - p))^T.
        if self.training and self.dropout > 0:
            a = F.linear(x * dropout_mask(x, self.dropout), self.lora_A.weight / (1 - self.dropout))
            z = None if self.gate == "none" else self.gate_in(x)
        elif self.gate == "none":
            a, z = self.lora_A(x), None
        else:
            az = F.linear(x, torch.cat((self.lora_A.weight, self.gate_in.weight)))  # (..., r + 1)
            a, z = az[..., :-1], az[..., -1:]                                         # (..., r), (..., 1)
        # every scale (λ, α, the head gates) goes into B, a (d_out, r) matrix, never into a (..., d_out) activation:
        # the update is then one matmul added to the base output, LoRA(x) = a B^T
        lora_B = self.lora_B.weight * self.scaling  # λ of Eq. 4: (d_out, r)

        if self.gate == "head":
            g = self._head_gate(z)  # Eq. 5: (B, 1, heads) one gate per sequence, or (B, T, heads) per token
            B, T, _ = out.shape
            if g.shape[1] == 1:
                # Eq. 6 with one gate per sequence and head: scale head i's rows of B by g_i, then one batched matmul
                B_gated = (lora_B.unflatten(0, (self.n_heads, -1)) * g.view(B, self.n_heads, 1, 1)).flatten(1, 2)
                return torch.baddbmm(out, a.to(out.dtype), B_gated.transpose(1, 2).to(out.dtype))  # (B, T, d_out)
            # Eq. 6 with a gate per token ("causal" pool): the LoRA output split into heads, head i times g_i
            lora = F.linear(a, lora_B).view(B, T, self.n_heads, -1)  # (B, T, heads, head_dim)
            gated = torch.addcmul(out.view(B, T, self.n_heads, -1), lora.to(out.dtype), g[..., None].to(out.dtype))
            return gated.flatten(2)
        if self.gate == "relu":
            # Eq. 7-8: out = W u + LoRA(u) ⊙ α relu(z W_o) with z = u W_ffn, one number per token. For a number z,
            # relu(z w) = relu(z) relu(w) + relu(-z) relu(-w), so the update is exactly the rank-2r product
            # [relu(z) a, relu(-z) a] [α B ⊙ relu(W_o), α B ⊙ relu(-W_o)]^T: the (B, T, d_out) gate is never formed
            w_o = self.gate_out.weight  # (d_out, 1)
            a = torch.cat((a * F.relu(z), a * F.relu(-z)), dim=-1)                                  # (..., 2r)
            lora_B = torch.cat((lora_B * F.relu(w_o), lora_B * F.relu(-w_o)), dim=-1) * self.gate_scale  # (d_out, 2r)
        elif self.gate == "sigmoid":
            # InterLoRA*: Eq. 7 with sigmoid and no α, which does not factor: the gate is formed, in one fused add
            g_ffn = torch.sigmoid(self.gate_out(z))  # (..., d_out)
            return torch.addcmul(out, F.linear(a, lora_B).to(out.dtype), g_ffn.to(out.dtype))
        return _add_low_rank(out, a, lora_B)  # Eq. 4 (no gate) or Eq. 8

    def _head_gate(self, z):
        """Eq. 5 from z = x W_att (B, T, 1): the mean of sigmoid(z W_h) over the real tokens ("mean") or over the
        real tokens so far ("causal"). Returns fp32 (B, 1, heads) for "mean" (and for one token), else (B, T, heads).
        """
        real, continuing = self._new_tokens(z.shape[1])
        if continuing and (self.gate_sum is None or self.gate_sum.shape[0] != z.shape[0]):
            raise AdapterError("decoding with a KV cache needs the prompt first, under torch.no_grad()")
        if continuing and self.gate_pool == "mean":
            return self.gate_sum / self.gate_count.clamp(min=1)  # fixed at prefill: the mean over the prompt
        s = torch.sigmoid(self.gate_out(z).float())  # (B, T, heads), pooled in fp32
        real = torch.ones_like(s[..., :1]) if real is None else real[..., None].to(s.dtype)  # (B, T, 1)
        if self.gate_pool == "mean":
            sums, counts = (s * real).sum(1, keepdim=True), real.sum(1, keepdim=True)  # (B, 1, heads), (B, 1, 1)
        else:
            sums, counts = (s * real).cumsum(1), real.cumsum(1)  # over real tokens <= t: (B, T, heads), (B, T, 1)
            if continuing:
                sums, counts = sums + self.gate_sum, counts + self.gate_count
        if not (self.training and torch.is_grad_enabled()):  # keep what decoding needs, never in training
            self._keep_sums(sums[:, -1:].detach(), counts[:, -1:].detach())
        return sums / counts.clamp(min=1)

    def _new_tokens(self, T):
        """(real, continuing) for the T tokens of this call: real (B, T) is their slice of the model's attention_mask
        (None: all real), continuing says they follow tokens already in the KV cache."""
        mask, start = self.tokens.mask, self.tokens.start
        if start is None:  # no start_pos (transformers' convention): the mask ends with the T new tokens
            start = 0 if mask is None else mask.shape[1] - T
        if mask is not None:
            columns = start + torch.arange(T, device=mask.device) if torch.is_tensor(start) else slice(start, start + T)
            mask = mask[:, columns]
        return mask, torch.is_tensor(start) or start > 0  # a tensor start_pos is a decode step

    def _keep_sums(self, sums, counts):
        if self.gate_sum is not None and self.gate_sum.shape == sums.shape and self.gate_sum.dtype == sums.dtype:
            self.gate_sum.copy_(sums)
            self.gate_count.copy_(counts)
        else:
            self.gate_sum, self.gate_count = sums.clone(), counts.clone()


def dropout_mask(x, p):
    """Dropout's mask for x: True (kept) with probability 1 - p, for each element independently.

    On a CPU the dropped places are drawn as the gaps between them, which are geometric: about p·n random numbers
    for n elements instead of n (torch's CPU generator makes them one at a time, and n of them cost more than the
    small layers' matmuls). 1.5·p·n + 200 gaps reach past the last element except with probability below 1e-55
    (Chernoff's bound on n Bernoulli draws making that many drops); elsewhere (CUDA) a draw per element.
    """
    if x.device.type != "cpu":
        return torch.empty_like(x, dtype=torch.bool).bernoulli_(1 - p)
    n = x.numel()
    gaps = torch.empty(int(1.5 * p * n) + 200, dtype=torch.float64).geometric_(p).clamp_(max=n + 1)
    places = gaps.cumsum_(0).clamp_(max=n + 1).long() - 1  # where the dropped are; n: past the end
    keep = torch.ones(n + 1, dtype=torch.bool)
    return keep.index_fill_(0, places, False)[:n].view(x.shape)


def _add_low_rank(out, a, b):
    """out + a b^T as one fused matmul-add in out's dtype: out (..., d_out), a (..., k), b (d_out, k)."""
    flat = torch.addmm(out.reshape(-1, out.shape[-1]), a.reshape(-1, a.shape[-1]).to(out.dtype), b.t().to(out.dtype))
    return flat.view(out.shape)


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

    # Padding reaches the gates through the model's attention_mask argument (keyword or positional), and
    # decoding through start_pos (model.py's; a start_pos without a mask means cached tokens, none of them padding).
    tokens.arguments = list(inspect.signature(model.forward).parameters)
    tokens.hook = model.register_forward_pre_hook(tokens, with_kwargs=True)
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
    payload = {"format": "interlora-adapter", "version": 2, "method": cfg.method, "config": asdict(cfg), "info": info,
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
    method = payload.get("method", payload["config"].get("method"))  # version 1 files: in the config only
    if method not in ("interlora", "lora"):
        raise AdapterError(f"{path} holds a {method!r} adapter, not InterLoRA or LoRA: load it with the module that "
                           "built it (in this project adapters.load_adapter loads every method)")
    cfg = InterLoRAConfig(**payload["config"])
    add_interlora(model, cfg, targets)
    try:
        base, saved = _base_description(model), payload["base"]
        for key in ("class", "family", "shapes"):
            if base[key] != saved[key]:
                raise AdapterError(f"{path} was made for another base model: its {key} is {saved[key]}, "
                                   f"this model's is {base[key]}"[:400])
        copy_tensors(path, {n: p for n, p in model.named_parameters() if is_adapter_parameter(n)}, payload["tensors"])
    except AdapterError:
        remove_interlora(model)
        raise
    return cfg, payload["info"]


def copy_tensors(path, params, tensors):
    """Copy an adapter file's tensors {name: tensor} into the model's adapter parameters {name: param}, after
    checking that the names and shapes match exactly (AdapterError names the first that does not)."""
    if params.keys() != tensors.keys():
        name = sorted(params.keys() ^ tensors.keys())[0]
        raise AdapterError(f"{path}: tensor {name} is in {'the model' if name in params else 'the file'} only")
    for name, tensor in tensors.items():
        if params[name].shape != tensor.shape:
            raise AdapterError(f"{path}: tensor {name} {tuple(tensor.shape)} does not fit this model's "
                               f"{tuple(params[name].shape)}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)


def merge(model):
    """Fold plain LoRA into the base weights (W += λ·B·A) and drop the adapter layers."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, InterLoRALinear)]
    if not layers:
        raise AdapterError(f"nothing to merge: {type(model).__name__} has no InterLoRA layers")
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
