"""Every method of the paper's tables behind one interface, for train.py, eval.py and report.py.

    method                         what                                                  built by
    interlora (and its ablations)  LoRA with head and FFN gates, the paper's method     interlora.py
    lora                           LoRA r=10 on q and v, the paper's baseline            interlora.py
    adapter                        bottleneck adapters in series on the FFN (baseline)   baselines.py
    prefix                         30 learned keys and values per layer (baseline)       baselines.py

Each method's module stays usable on its own; this file only picks one by name. The adapter file
is the same for all of them: a torch file of plain data, loaded with weights_only=True,

    {"format": "interlora-adapter", "version": 2, "method": "prefix", "config": {the method's config},
     "info": {model, task, steps, ...}, "base": {what the base must match}, "tensors": {name: tensor}}

laid out and written atomically here for every method (interlora.save_adapter writes the same
layout without "base"; version-1 files, without "method", name theirs in the config). The project's
commands use the fused InterLoRA layer (machinery/fused.py) and the targets of default_targets.
Loading rebuilds the method from the file and checks that the base model fits before any tensor
is copied.
"""
import json
from dataclasses import asdict

import torch

import baselines
import interlora
from machinery import checks, fused, runs
from baselines import AdapterConfig, BaselineError, PrefixConfig
from interlora import AdapterError, InterLoRAConfig

# train.py's --method: InterLoRA's variants (lora among them), then the two baselines
BASELINES = {"adapter": AdapterConfig, "prefix": PrefixConfig}
METHODS = list(interlora.VARIANTS) + list(BASELINES)
CONFIG_CLASSES = {"interlora": InterLoRAConfig, "lora": InterLoRAConfig, **BASELINES}
ERRORS = (AdapterError, BaselineError)  # what building, saving and loading raise for bad input


def make_config(method, r=0, alpha=0.0, **lora):
    """The config of `method`: an InterLoRA variant with the LoRA settings in `lora` (dropout,
    gate_pool) and r and alpha (0: the variant's rank, and alpha 2r, so lambda = 2 as in the
    paper), or a baseline with its paper defaults (it takes no LoRA settings)."""
    if method in BASELINES:
        return BASELINES[method]()
    if method not in interlora.VARIANTS:
        raise AdapterError(f"method {method!r} is unknown: expected one of {', '.join(METHODS)}")
    variant = {**interlora.VARIANTS[method], **lora}
    variant["r"] = r or variant.get("r", InterLoRAConfig.r)
    variant["alpha"] = alpha or 2 * variant["r"]
    return InterLoRAConfig(**variant)


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


def describe(cfg):
    """The config as plain data, with its method first."""
    return {"method": cfg.method, **asdict(cfg)}


def add_adapters(model, cfg):
    """Add the method of `cfg` to `model` and freeze everything else."""
    if isinstance(cfg, AdapterConfig):
        return baselines.add_adapter(model, cfg)
    if isinstance(cfg, PrefixConfig):
        return baselines.add_prefix(model, cfg)
    return interlora.add_interlora(model, cfg, default_targets(model), fused.FusedInterLoRALinear)


def remove_adapters(model):
    baselines.remove_prefix(baselines.remove_adapter(model))
    return interlora.remove_interlora(model)


def is_adapter_parameter(name):
    """What trains, is checkpointed, saved and loaded, whatever the method."""
    return interlora.is_adapter_parameter(name) or baselines.is_baseline_parameter(name)


def adapter_state_dict(model):
    return {name: p.detach() for name, p in model.named_parameters() if is_adapter_parameter(name)}


# ----------------------------------------------------------------------------- adapter files

def method_of(payload):
    """The method an adapter file holds: its "method", or (version 1) the method in its config."""
    return payload.get("method") or payload.get("config", {}).get("method", "interlora")


def read_adapter(path):
    """The payload of an adapter file of any method, checked, its method named; loads tensors only."""
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
    # field by field before any of it is used: missing parts, unknown versions and fields, types
    checks.check_adapter_payload(path, payload, CONFIG_CLASSES, AdapterError)
    if problem := runs.bad_numbers(payload.get("tensors"), runs.ADAPTER_BOUND):
        raise AdapterError(f"{path}: {problem}: the run that wrote it diverged; "
                           "train it again with a lower --lr")
    payload["method"] = method_of(payload)
    return payload


def _base_description(model, cfg):
    """What an adapter file must match: the model's class and family, and the shapes its
    tensors attach to (the adapted layers' [in, out], a baseline adapter's side, a prefix's sizes;
    works on a model on the meta device)."""
    config = getattr(model, "config", None)
    family = getattr(config, "family", None) or getattr(config, "model_type", None)
    if isinstance(cfg, InterLoRAConfig):  # the adapted layers' [in, out], no tensor read
        shapes = {name: [m.base.in_features, m.base.out_features]
                  for name, m in model.named_modules() if isinstance(m, interlora.InterLoRALinear)}
    elif isinstance(cfg, PrefixConfig):
        prefix = model.prefix_tuning
        shapes = {"prefix": {"layers": prefix.n_layer, "kv_heads": prefix.n_kv_heads, "head_dim": prefix.head_dim}}
    elif isinstance(cfg, AdapterConfig):
        shapes = {name: [m.base.in_features, m.base.out_features, m.side]
                  for name, m in model.named_modules() if isinstance(m, baselines.SeriesAdapter)}
    return {"class": type(model).__name__, "family": family, "shapes": shapes}


def save_adapter(path, model, cfg, info=None):
    """Write the adapter file of `model`'s method atomically."""
    if problem := runs.bad_numbers(adapter_state_dict(model), runs.ADAPTER_BOUND):
        raise AdapterError(f"not writing {path}: {problem} (a diverged run): lower --lr")
    info = info or {}
    try:  # the file is read with weights_only=True: only plain data loads back
        json.dumps(info)
    except TypeError as e:
        raise AdapterError(f"adapter info must be plain JSON-like data: {e}") from None
    payload = {"format": "interlora-adapter", "version": 2, "method": cfg.method, "config": asdict(cfg),
               "info": info, "base": _base_description(model, cfg),
               "tensors": {k: v.cpu() for k, v in adapter_state_dict(model).items()}}
    try:
        runs.save_torch(path, payload)
    except OSError as e:
        raise AdapterError(f"cannot write {path}: {e.strerror or e}") from None


def load_adapter(model, path):
    """Add the method described in the adapter file `path` to `model` and load its tensors; returns (cfg, info).

    On any mismatch the model is left as it was and the error says what differs.
    """
    payload = read_adapter(path)
    check_base(model, path, payload)  # one message for every method, before any tensor is copied
    cfg = config_of(path, payload)
    add_adapters(model, cfg)
    try:
        params = {n: p for n, p in model.named_parameters() if is_adapter_parameter(n)}
        copy_tensors(path, params, payload["tensors"])
    except AdapterError:
        remove_adapters(model)
        raise
    return cfg, payload["info"]


def config_of(path, payload):
    """The config an adapter file's payload (read_adapter's) records, of its method's class."""
    method = payload["method"]
    try:
        return (BASELINES[method] if method in BASELINES else InterLoRAConfig)(**payload["config"])
    except TypeError as e:
        raise AdapterError(f"{path}: the {method} config {payload['config']} does not fit this "
                           f"version ({e})") from None


def check_base(model, path, payload=None):
    """Refuse the adapter file `path` for `model` when it was made for another base; the model is
    left as it was. Works on a model built on the meta device (eval.py checks before any weight
    is read)."""
    payload = payload or read_adapter(path)
    cfg = config_of(path, payload)
    add_adapters(model, cfg)
    try:
        base = _base_description(model, cfg)
        _check_base(path, payload, base)
    finally:
        remove_adapters(model)


def _check_base(path, payload, base):
    """Refuse a base other than the adapter's, saying which model it was made for and what to do."""
    if "base" not in payload:  # written by interlora.save_adapter: the tensors' shapes decide
        return
    saved, trained_on = payload["base"], payload["info"].get("model")
    hint = (f"load it onto {trained_on}, the model it was trained on (eval.py --model {trained_on})"
            if trained_on else "load it onto the model it was trained on")
    made_for = f"{path} was made for another base model" + (f", {trained_on}" if trained_on else "")
    prefix, found = saved["shapes"].get("prefix"), base["shapes"].get("prefix")
    if prefix and found and prefix != found:
        raise AdapterError(f"{made_for}: its prefix holds keys and values for {prefix['layers']} "
                           f"layers of {prefix['kv_heads']} heads x {prefix['head_dim']}, this "
                           f"model has {found['layers']} layers of {found['kv_heads']} x "
                           f"{found['head_dim']}: {hint}")
    for key in ("class", "family"):
        if saved[key] != base[key]:
            raise AdapterError(f"{made_for}: its base {key} is {saved[key]}, this model's is "
                               f"{base[key]}: {hint}")
    ours, theirs = base["shapes"], saved["shapes"]
    for name in sorted(ours.keys() | theirs.keys()):
        if ours.get(name) != theirs.get(name):
            if name not in ours:
                what = f"it adapts {name}, which this model does not have"
            elif name not in theirs:
                what = f"this model has {name}, which it does not adapt"
            else:
                what = f"its {name} is {theirs[name]} wide (in, out), this model's {ours[name]}"
            raise AdapterError(f"{made_for} ({len(theirs)} adapted layers): {what}: {hint}")


def merge(model):
    """Fold plain LoRA into the base weights (interlora.merge); the baselines refuse, with the reason."""
    adapted = [name for name, m in model.named_modules() if isinstance(m, baselines.SeriesAdapter)]
    if adapted:
        raise AdapterError(f"cannot merge the bottleneck adapter of {adapted[0]}: U tanh(D z) is nonlinear in "
                           "its input, so no fixed matrix added to the weight equals it; run it unmerged")
    if isinstance(getattr(model, "prefix_tuning", None), baselines.Prefix):
        raise AdapterError("cannot merge a prefix: it adds keys and values to every layer's attention, it changes "
                           "no weight; run it unmerged")
    layers = [m for m in model.modules() if isinstance(m, interlora.InterLoRALinear)]
    quantized = [m.base.weight.dtype for m in layers if not m.base.weight.is_floating_point()]
    if quantized:
        raise AdapterError(f"cannot merge into a {quantized[0]} (quantized) base weight: W + λ·B·A "
                           "rounded back to it would lose the update; load the base unquantized to "
                           "merge, or run the adapters unmerged")
    return interlora.merge(model)


def copy_tensors(path, params, tensors):
    """Copy an adapter file's tensors {name: tensor} into the model's adapter parameters, after
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
