"""A `--method lora` adapter written out in PEFT's format, for transformers, vLLM and llama.cpp.

    python -m machinery.peft_export out/lora/adapter.pt out/lora-peft [--model FOLDER]

OUT_DIR then holds what PEFT's save_pretrained writes and PeftModel.from_pretrained reads:

    adapter_config.json          peft_type LORA, task_type CAUSAL_LM, r, lora_alpha (PEFT's
                                 scaling is lora_alpha / r, ours alpha / r: the same number),
                                 lora_dropout, target_modules (q_proj, v_proj, ...)
    adapter_model.safetensors    base_model.model.<transformers' module>.lora_{A,B}.weight, fp32

What changes on the way out:
- names: model.py's follow Meta's checkpoint (layers.0.attention.wq), transformers' its own
  (model.layers.0.self_attn.q_proj; GPT-J transformer.h.0.attn.q_proj); the renaming table is
  checkpoints.py's, read backwards. Mistral and Qwen2 share LLaMA's names.
- q and k rows: model.py keeps Meta's interleaved rotary pairs whichever folder the base was
  read from (checkpoints.py un-permutes a Hugging Face folder's q/k rows on loading), while
  transformers' LLaMA kin want each head's rows in rotate-half order [evens..., odds...]. So
  lora_B of q and k (whose rows are the weight's output rows) gets transformers' permutation,
  with the query heads for q and the key/value heads for k; lora_A is untouched. GPT-J's
  transformers code rotates interleaved pairs as Meta does: nothing to permute.
The head counts come from the base's config (params.json or config.json, no weights read): the
folder the adapter file names (its info's "model"), or --model when it has moved.

Only plain LoRA leaves: an InterLoRA adapter's head and FFN gates depend on the input (Eq. 5-8),
and no runtime outside this code computes them; the baselines are no LoRA at all. Both are
refused in one line. The safetensors file is written here by hand (an 8-byte little-endian
header length, a JSON header, the raw bytes), keeping the dependencies at torch; OUT_DIR appears
whole or not at all (written beside it, then renamed into place).
"""
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from interlora import AdapterError
from machinery import adapters, runs
from machinery.checkpoints import _HF_GPTJ_KEYS, _HF_LLAMA_KEYS, _rename, model_config
from model import CheckpointError

PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")

# why each other method cannot be a PEFT LoRA file
REFUSALS = {
    "interlora": "its head and FFN gates depend on the input (Eq. 5-8), so its update is no fixed "
                 "LoRA product, and no runtime outside this code computes them",
    "adapter": "a bottleneck adapter, U tanh(D z) in series with the FFN, is no LoRA",
    "prefix": "a prefix adds learned keys and values to every layer's attention, it is no LoRA",
}


def peft_tensors(payload, config):
    """{PEFT's name: tensor} of a plain LoRA adapter file's tensors, on a base of `config`."""
    templates = {ours: hf for hf, ours in
                 (_HF_GPTJ_KEYS if config.family == "gptj" else _HF_LLAMA_KEYS).items()}
    out = {}
    for name, tensor in payload["tensors"].items():
        # layers.{i}.attention.wq.lora_B.weight: the base module, then the LoRA part
        module, _, part = name.rpartition(".lora_")
        hf_module = _rename(module + ".weight", templates)
        if hf_module is None or part not in ("A.weight", "B.weight"):
            raise AdapterError(f"tensor {name} of the adapter sits on no module transformers' "
                               f"{config.family} has: is this a {config.family} adapter?")
        hf_module = hf_module.removesuffix(".weight")
        heads = {"wq": config.n_head, "wk": config.n_kv_heads}.get(module.rpartition(".")[2])
        if config.family == "llama" and part == "B.weight" and heads:
            tensor = rotate_half_rows(tensor, heads)
        out[f"base_model.model.{hf_module}.lora_{part}"] = tensor.float().contiguous()
    return out


def rotate_half_rows(weight, heads):
    """transformers' q/k row order from Meta's: per head, the interleaved pairs (e0, o0, e1, o1,
    ...) become [e0, e1, ..., o0, o1, ...] (the inverse of what checkpoints.py does on loading)."""
    out_dim, width = weight.shape
    half = out_dim // heads // 2
    pairs = weight.reshape(heads, half, 2, width)  # (heads, half, 2, r): row 2i + j of a head
    return pairs.transpose(1, 2).reshape(out_dim, width)  # (heads, 2, half, r): row j * half + i


def write_safetensors(path, tensors):
    """A .safetensors file of `tensors` (fp32, contiguous): 8-byte little-endian header length,
    the JSON header {name: {dtype, shape, data_offsets}}, then each tensor's bytes in turn."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": "F32", "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it

    def write(f):
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for tensor in tensors.values():  # safetensors is little-endian, whatever the host
            f.write(tensor.numpy().astype("<f4", copy=False).tobytes())
    runs.write_atomically(path, write, binary=True)


def peft_config(cfg, config, names, base):
    """adapter_config.json: PEFT's LoraConfig fields, plain LoRA on every layer of the targets."""
    targets = sorted({name.split(".")[-3] for name in names})  # ...q_proj.lora_A.weight
    alpha = int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
            "revision": None, "inference_mode": True, "r": cfg.r, "lora_alpha": alpha,
            "lora_dropout": cfg.dropout, "target_modules": targets, "bias": "none",
            "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
            "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None,
            "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}}


def check_exportable(path, payload):
    """The plain-LoRA config of the adapter file, or AdapterError saying why it cannot leave."""
    method = payload["method"]
    if method != "lora":
        raise AdapterError(f"{path} holds a {method} adapter, and only --method lora adapters "
                           f"export to PEFT: {REFUSALS.get(method, 'it is no plain LoRA')}")
    cfg = adapters.config_of(path, payload)
    gated = [n for n in payload["tensors"] if not n.rpartition(".lora_")[1]]
    if cfg.attention_gate or cfg.ffn_gate != "none" or gated:
        raise AdapterError(f"{path} holds LoRA with gates ({(gated or ['its config'])[0]}): "
                           f"{REFUSALS['interlora']}; only ungated LoRA exports to PEFT")
    return cfg


def base_config(path, payload, model):
    """The base's ModelConfig: from `model` (a folder or preset), else the one the file names."""
    info = payload.get("info", {})
    model = model or info.get("model")
    if not model:
        raise AdapterError(f"{path} does not name the base it was trained on: pass --model, its "
                           "checkpoint folder")
    try:
        config, _ = model_config(model, None if model != info.get("model")
                                 else info.get("checkpoint_dir") or None)
    except CheckpointError as e:
        raise AdapterError(f"the base of {path} cannot be read ({e}); pass --model, the folder "
                           "it was trained on") from None
    # the adapted shapes must be this base's: a wrong folder would give wrong head counts
    wanted = {"layers.0.attention.wq": [config.dim, config.n_head * config.head_dim],
              "layers.0.attention.wk": [config.dim, config.n_kv_heads * config.head_dim]}
    for name, shape in payload.get("base", {}).get("shapes", {}).items():  # none: interlora.py's
        if name in wanted and shape[:2] != wanted[name]:
            raise AdapterError(f"{path} was trained on a base whose {name} is {shape[:2]} "
                               f"(in, out), but {model} gives {wanted[name]}: pass --model, the "
                               "folder it was trained on")
    return config, model


def export(adapter_path, out_dir, model=None):
    """Write the PEFT files of the lora adapter file `adapter_path` into `out_dir` (created, or
    replaced when it holds only an earlier export); returns the out_dir Path."""
    payload = adapters.read_adapter(adapter_path)
    cfg = check_exportable(adapter_path, payload)
    config, base = base_config(adapter_path, payload, model)
    tensors = peft_tensors(payload, config)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or not set(os.listdir(out)) <= set(PEFT_FILES)):
        raise runs.RunError(f"{out} exists and holds other files than an earlier export "
                            f"({', '.join(PEFT_FILES)}): choose another OUT_DIR, or empty it")
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    old = None
    try:
        write_safetensors(temp / PEFT_FILES[1], tensors)
        runs.write_json(temp / PEFT_FILES[0], peft_config(cfg, config, tensors, base))
        os.chmod(temp, 0o777 & ~_umask())  # mkdtemp makes it private; mkdir would not
        if out.exists():  # an earlier export: moved aside, then the new one takes its name
            old = out.with_name(temp.name + ".old")
            os.replace(out, old)
        os.replace(temp, out)
    except OSError as e:
        if old is not None and not out.exists():
            os.replace(old, out)
        raise runs.RunError(f"cannot write {out}: {runs.cause(e)}") from None
    finally:
        shutil.rmtree(temp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return out


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def main(argv=None):
    parser = runs.OneLineParser(prog="python -m machinery.peft_export",
                                description="Export a --method lora adapter file to PEFT's "
                                            "format (adapter_config.json + "
                                            "adapter_model.safetensors).")
    parser.add_argument("adapter", help="the adapter.pt that train.py wrote")
    parser.add_argument("out_dir", help="the folder to write (created; an earlier export there "
                                        "is replaced)")
    parser.add_argument("--model", default="",
                        help="the base's checkpoint folder (default: the one the adapter names)")

    def command(argv):
        args = parser.parse_args(argv)
        out = export(args.adapter, args.out_dir, args.model or None)
        print(f"wrote {out / PEFT_FILES[0]} and {out / PEFT_FILES[1]}")
    return runs.run_command(command, argv, errors=(*adapters.ERRORS, CheckpointError))


if __name__ == "__main__":
    sys.exit(main())
