"""Reading raw LLaMA and GPT-J checkpoints into model.py's Transformer.

Formats: Meta's download (params.json + consolidated.*.pth, model-parallel shards merged) and
Hugging Face folders (config.json + .safetensors or .bin, single or sharded), whose keys are
renamed through a table of templates and whose LLaMA q/k rows are un-permuted (transformers
stores them for its rotate-half kernel).

Loading builds the model on the meta device and fills it one tensor at a time: read with
plain file reads, converted to the chosen dtype (or quantized by quantize.py) on the device,
its source dropped. Configs come from the checkpoint's own params.json / config.json; what
model.py cannot run exactly (rope scaling, biases LLaMA has not, ...) is refused by name.
Pickled files are read with weights_only=True: nothing a file contains is executed.
"""
import json
import math
import pickle
import re
import struct
from pathlib import Path
from typing import NamedTuple

import torch

from model import PRESETS, RANDOM_PRESETS, SHAPE_FIELDS, CheckpointError, ModelConfig, Transformer
from machinery import checks
from machinery.checks import rule
from machinery.quantize import QUANTIZE_KINDS, Quantizer, quantize_model


# ----------------------------------------------------------------------------- reading files
#
# Tensors are read one at a time with plain file reads, at offsets taken from the file's header
# (.safetensors) or from a torch.load onto the meta device (it unpickles the index of a .pth/.bin
# with weights_only=True and reads no tensor data). A memory-mapped file is released only when
# its last tensor is, so converting fp16 -> bf16 from a mapping peaks at model + file; plain
# reads peak at model + one tensor, and the page cache they fill is not this process's memory.

_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


class StoredTensor(NamedTuple):
    """Where one tensor's bytes are in a weights file; read() reads just those."""
    path: Path
    offset: int              # byte offset of the tensor's storage in the file
    dtype: torch.dtype
    shape: tuple
    stride: tuple
    storage_offset: int = 0  # elements between the storage's start and the tensor's first element

    @property
    def nbytes(self):
        # the storage the tensor spans (a view may skip some of it)
        span = 1 + sum((n - 1) * s for n, s in zip(self.shape, self.stride)) if all(self.shape) else 0
        return span * self.dtype.itemsize

    def read(self, buffer=None):
        """The tensor, in a new buffer or in the first bytes of `buffer` (uint8, large enough)."""
        buffer = torch.empty(self.nbytes, dtype=torch.uint8) if buffer is None else buffer[:self.nbytes]
        view, done = memoryview(buffer.numpy()), 0
        with open(self.path, "rb") as f:
            f.seek(self.offset + self.storage_offset * self.dtype.itemsize)
            while done < len(view):  # a single read returns at most 2 GiB on Linux
                count = f.readinto(view[done:])
                if not count:
                    raise CheckpointError(f"{self.path} is truncated: it ends inside a tensor; download it again")
                done += count
        return buffer.view(self.dtype).as_strided(self.shape, self.stride)


# The safetensors library's rules for a header (safetensors 0.8, what transformers reads with):
# at most 100 MB of header; a JSON object of {name: {dtype, shape, data_offsets}} and an optional
# "__metadata__" of {str: str}; shapes and offsets whole numbers; each tensor's bytes exactly
# its shape's, and the tensors in offset order covering the data from its first byte to its last
# with no overlap and no gap ("invalid offset" otherwise).
SAFETENSORS_MAX_HEADER = 100_000_000
# dtypes the library knows that model.py's loader does not read (8-bit floats and smaller,
# unsigned above 8 bits, complex)
_SAFETENSORS_UNREAD = ("F4", "F6_E2M3", "F6_E3M2", "F8_E5M2", "F8_E4M3", "F8_E8M0", "U16", "U32",
                       "U64", "C64")
_SAFETENSORS_ADVICE = "the file is corrupt or not made by a safetensors writer; download it again"
_TENSOR_ENTRY = {"dtype": rule(str, required=True), "shape": rule(list, required=True),
                 "data_offsets": rule(list, required=True)}


def read_safetensors_header(path):
    """(header {name: entry}, where the data begins) of a .safetensors file, every rule above
    checked; a CheckpointError names the first broken one. Reads the header only."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is not a valid .safetensors file ({size} bytes, "
                                  f"expected an 8-byte header length first): "
                                  f"{_SAFETENSORS_ADVICE}")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(size - 8, SAFETENSORS_MAX_HEADER):
            what = (f"more than {SAFETENSORS_MAX_HEADER:,}" if header_len > SAFETENSORS_MAX_HEADER
                    else f"past the end of a {size}-byte file")
            raise CheckpointError(f"{path} is not a valid .safetensors file (a header of "
                                  f"{header_len:,} bytes, {what}): it may be truncated; "
                                  "download it again")
        raw = f.read(header_len)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: the header is not UTF-8 ({e.reason} at byte {8 + e.start})"
                              f": {_SAFETENSORS_ADVICE}") from None
    header = checks.parse_json(text, f"{path}: the header", CheckpointError, _SAFETENSORS_ADVICE)
    data_start, entries = 8 + header_len, []
    for name, info in header.items():
        if name == "__metadata__":
            checks.check_mapping(path, "__metadata__", info, rule(str), rule(str),
                                 CheckpointError, _SAFETENSORS_ADVICE)
            continue
        where = f"{path}: tensor {name}"
        if not isinstance(info, dict):
            raise CheckpointError(f"{where}: its header entry is {checks.found(info)}, expected "
                                  f"{{dtype, shape, data_offsets}}: {_SAFETENSORS_ADVICE}")
        checks.check_fields(where, info, _TENSOR_ENTRY, CheckpointError, _SAFETENSORS_ADVICE)
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in _SAFETENSORS_DTYPES:
            known = ", ".join(_SAFETENSORS_DTYPES)
            why = ("a safetensors type this loader does not read" if dtype in _SAFETENSORS_UNREAD
                   else "no safetensors type")
            raise CheckpointError(f"{where}: dtype {dtype!r} is {why} (expected one of {known}):"
                                  " use the model's original fp32/fp16/bf16 weights")
        whole = rule(int, low=0, high=1 << 62)
        checks.check_list(where, "shape", shape, whole, CheckpointError, _SAFETENSORS_ADVICE)
        checks.check_list(where, "data_offsets", offsets, whole, CheckpointError,
                          _SAFETENSORS_ADVICE)
        if len(offsets) != 2 or offsets[0] > offsets[1]:
            raise CheckpointError(f"{where}: data_offsets is {offsets}, expected [begin, end] with "
                                  f"begin <= end: {_SAFETENSORS_ADVICE}")
        begin, end = offsets
        nbytes = math.prod(shape) * _SAFETENSORS_DTYPES[dtype].itemsize
        if end - begin != nbytes:
            raise CheckpointError(f"{where} is {dtype} {shape} ({nbytes} bytes) but its "
                                  f"data_offsets [{begin}, {end}] hold {end - begin}: "
                                  f"{_SAFETENSORS_ADVICE}")
        entries.append((begin, end, name))
    covered = 0  # the library's check: sorted by offsets, each tensor starts where the last ended
    for begin, end, name in sorted(entries):
        if begin != covered:
            what = (f"overlaps the bytes before {covered}" if begin < covered
                    else f"leaves bytes {covered} to {begin} to no tensor")
            raise CheckpointError(f"{path}: invalid offset for tensor {name}: it begins at {begin} "
                                  f"and {what}, expected tensors laid end to end: "
                                  f"{_SAFETENSORS_ADVICE}")
        covered = end
    if data_start + covered > size:
        raise CheckpointError(f"{path} is truncated: its tensors end at byte "
                              f"{data_start + covered} of a {size}-byte file; download it again")
    if data_start + covered < size:
        raise CheckpointError(f"{path}: {size - data_start - covered} bytes after the last tensor "
                              f"belong to none (the header covers {covered} of "
                              f"{size - data_start}): {_SAFETENSORS_ADVICE}")
    return header, data_start


def index_safetensors(path):
    """{name: StoredTensor} of a .safetensors file: an 8-byte little-endian header length, a JSON
    header of {name: {dtype, shape, data_offsets}}, then the raw bytes. Reads the header only."""
    header, data_start = read_safetensors_header(path)
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        shape = info["shape"]
        stride = torch.empty(shape, device="meta").stride()  # row-major, as safetensors stores them
        tensors[name] = StoredTensor(path, data_start + info["data_offsets"][0],
                                     _SAFETENSORS_DTYPES[info["dtype"]], tuple(shape), stride)
    return tensors


def index_torch_file(path):
    """{name: StoredTensor} of a torch .pth/.bin, from its pickled index: no tensor data is read."""
    index = _torch_load(path, map_location="meta")
    if not isinstance(index, dict) or not all(isinstance(t, torch.Tensor) for t in index.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors: expected model weights (name -> tensor), "
                              "not e.g. a training checkpoint")
    offsets = {name: getattr(t.untyped_storage(), "_checkpoint_offset", None) for name, t in index.items()}
    if None in offsets.values():
        # torch's pre-1.6 format records no offsets: read it whole (such files are old and small)
        return _torch_load(path, map_location="cpu")
    return {name: StoredTensor(path, offsets[name], t.dtype, tuple(t.shape), t.stride(), t.storage_offset())
            for name, t in index.items()}


def _torch_load(path, map_location):
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        refused = re.search(r"GLOBAL (\S+)", str(e))
        if refused:  # weights_only=True met an object whose unpickling would call code
            raise CheckpointError(f"{path} is not plain weights: it holds the pickled Python object "
                                  f"{refused.group(1)}, which was not loaded (unpickling it can run code); use "
                                  "plain weights (.safetensors, or a state dict of tensors) from a trusted source"
                                  ) from None
        raise CheckpointError(f"cannot read {path}: it is no torch weights file, or it is truncated or corrupt; "
                              "download it again") from None
    except Exception as e:  # torch raises several types for truncated zips and foreign files
        reason = (str(e).strip().splitlines() or [""])[0][:150]
        if "weights_only" in reason:  # never pass on advice to turn the safety off
            reason = ""
        raise CheckpointError(f"cannot read {path} ({type(e).__name__}{': ' + reason if reason else ''}): "
                              "the file is truncated or corrupt; download it again") from None


def index_weights(path):
    """{name: StoredTensor} of one weights file: .safetensors, or a torch .pth/.bin (never unpickling code)."""
    return index_safetensors(path) if path.suffix == ".safetensors" else index_torch_file(path)




# ----------------------------------------------------------------------------- configs

def _read_json(path):
    """A config or index file: JSON, an object at the top, nested no deeper than checks allows."""
    return checks.load_json(path, CheckpointError, "repair it or download it again")


def _positive_int(values, key, path):
    if key not in values:
        raise CheckpointError(f"{path} lacks the field {key!r}: is it complete? download it again")
    if not isinstance(values[key], int) or values[key] <= 0:
        raise CheckpointError(f"{path}: {key} is {values[key]!r}, expected a positive integer")
    return values[key]


# Every field of Meta's params.json (LLaMA 1, 2, 3); anything else is refused rather than ignored.
_META_FIELDS = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
                "norm_eps", "rope_theta", "max_seq_len", "max_batch_size", "use_scaled_rope"}


# Types and ranges of the fields read, checked before a model is built or a folder made. The
# bounds are far past every released model (widths to 2^16, 1,024 layers, 2^21 tokens of context)
# and keep a damaged file from building a model that hangs or a width that divides by zero.
_WIDTH, _LAYERS, _VOCAB, _CONTEXT = 1 << 16, 1024, 1 << 22, 1 << 21
_EPS = rule(float, low=1e-12, high=0.1)
_THETA, _ID = rule(float, low=1, high=1e12), rule(int, low=0, high=_VOCAB, none_ok=True)
_EOS = rule(int, list, low=0, high=_VOCAB, none_ok=True)  # a list's ids are checked below


def _count(high, none_ok=False, low=1):
    return rule(int, low=low, high=high, none_ok=none_ok)


_META_RULES = {"dim": _count(_WIDTH), "n_layers": _count(_LAYERS), "n_heads": _count(_WIDTH),
               "n_kv_heads": _count(_WIDTH, none_ok=True), "vocab_size": _count(_VOCAB, low=-1),
               "multiple_of": _count(_WIDTH), "norm_eps": _EPS, "rope_theta": _THETA,
               "ffn_dim_multiplier": rule(float, low=0.01, high=100, none_ok=True),
               "max_seq_len": _count(_CONTEXT), "max_batch_size": rule(int, low=1),
               "use_scaled_rope": rule(bool, none_ok=True)}
_HF_RULES = {
    "llama": {"hidden_size": _count(_WIDTH), "num_hidden_layers": _count(_LAYERS),
              "num_attention_heads": _count(_WIDTH), "num_key_value_heads": _count(_WIDTH, True),
              "intermediate_size": _count(16 * _WIDTH), "vocab_size": _count(_VOCAB),
              "rms_norm_eps": _EPS, "rope_theta": _THETA,
              "max_position_embeddings": _count(_CONTEXT),
              "bos_token_id": _ID, "eos_token_id": _EOS, "head_dim": _count(_WIDTH, True)},
    "gptj": {"n_embd": _count(_WIDTH), "n_layer": _count(_LAYERS), "n_head": _count(_WIDTH),
             "n_inner": _count(16 * _WIDTH, True), "rotary_dim": _count(_WIDTH, True, low=2),
             "vocab_size": _count(_VOCAB), "layer_norm_epsilon": _EPS,
             "n_positions": _count(_CONTEXT),
             "bos_token_id": _ID, "eos_token_id": _EOS},
}
# Mistral and Qwen2 read LLaMA's fields; Mistral's window is a count of tokens
_HF_RULES["mistral"] = {**_HF_RULES["llama"], "sliding_window": _count(_CONTEXT, True)}
_HF_RULES["qwen2"] = _HF_RULES["llama"]
_CONFIG_ADVICE = "repair the file or download it again"


def _check_heads(path, dim, n_head, n_kv_heads, names):
    """Heads must split the width, and key/value heads the heads (grouped-query attention)."""
    if dim % n_head:
        raise CheckpointError(f"{path}: {names[0]} {dim} is not a multiple of {names[1]} {n_head}: "
                              f"{_CONFIG_ADVICE}")
    if n_kv_heads and (n_kv_heads > n_head or n_head % n_kv_heads):
        raise CheckpointError(f"{path}: {names[1]} {n_head} is not a multiple of {names[2]} "
                              f"{n_kv_heads}: {_CONFIG_ADVICE}")


def _meta_shard_files(folder):
    files = sorted(folder.glob("consolidated.*.pth"))
    if not files:
        raise CheckpointError(f"{folder} has params.json but no consolidated.*.pth weights")
    expected = [f"consolidated.{i:02d}.pth" for i in range(len(files))]
    if [f.name for f in files] != expected:
        raise CheckpointError(f"{folder}: found shards {[f.name for f in files]}, expected {expected}: "
                              "a shard is missing")
    return files


def _meta_config(folder):
    """The config of Meta's LLaMA download, from params.json."""
    path = folder / "params.json"
    params = _read_json(path)
    unknown = sorted(params.keys() - _META_FIELDS)
    if unknown:
        raise CheckpointError(f"{path}: {unknown[0]} = {json.dumps(params[unknown[0]])} is a field this loader "
                              "does not know, so it cannot promise to run the model exactly")
    checks.check_fields(path, params, _META_RULES, CheckpointError, _CONFIG_ADVICE)
    _check_heads(path, _positive_int(params, "dim", path), _positive_int(params, "n_heads", path),
                 params.get("n_kv_heads"), ("dim", "n_heads", "n_kv_heads"))
    # Meta's FFN width: 2/3 of 4*dim, times an optional multiplier, rounded up to multiple_of
    dim = _positive_int(params, "dim", path)
    ffn_dim = int(2 * 4 * dim / 3)
    if params.get("ffn_dim_multiplier"):
        ffn_dim = int(params["ffn_dim_multiplier"] * ffn_dim)
    multiple_of = params.get("multiple_of", 256)
    ffn_dim = multiple_of * ((ffn_dim + multiple_of - 1) // multiple_of)
    vocab_size = params.get("vocab_size", -1)
    if not isinstance(vocab_size, int):
        raise CheckpointError(f"{path}: vocab_size is {vocab_size!r}, expected an integer (-1: the embedding's)")
    if vocab_size <= 0:  # LLaMA-1/2 say -1: the embedding's shape knows, read from the file's index only
        index = index_torch_file(_meta_shard_files(folder)[0])
        if "tok_embeddings.weight" not in index:
            raise CheckpointError(f"{folder}: consolidated.00.pth has no tok_embeddings.weight: is it LLaMA?")
        vocab_size = index["tok_embeddings.weight"].shape[0]
    # Llama 3.2's 1B and 3B may ship without an output matrix: the embedding serves as one
    shards = sorted(folder.glob("consolidated.*.pth"))
    tied = bool(shards) and "output.weight" not in index_torch_file(shards[0])
    rope = {}
    if params.get("use_scaled_rope"):
        # Meta's fixed constants (llama-models' apply_scaling): factor 8 for Llama 3.1 and 3.3;
        # Llama 3.2 (1B dim 2048, 3B dim 3072; every 3.1/3.3 model is at least 4096 wide) uses 32,
        # as transformers' convert_llama_weights_to_hf.py sets for version 3.2
        rope = dict(rope_factor=32.0 if dim < 4096 else 8.0, rope_low_freq_factor=1.0,
                    rope_high_freq_factor=4.0, rope_original_max_len=8192)
    return ModelConfig(family="llama", vocab_size=vocab_size, dim=dim, n_layer=_positive_int(params, "n_layers", path),
                       n_head=_positive_int(params, "n_heads", path), n_kv_heads=params.get("n_kv_heads") or 0,
                       ffn_dim=ffn_dim, norm_eps=params.get("norm_eps", 1e-5),
                       rope_theta=params.get("rope_theta", 10000.0),
                       max_seq_len=params.get("max_seq_len", 2048),
                       tie_embeddings=tied, **rope)


# Hugging Face model types that run exactly on model.py's LLaMA (serial SwiGLU blocks, RMSNorm):
# Mistral is LLaMA with a sliding window, Qwen2 LLaMA with q/k/v biases; and GPT-J.
_HF_TYPES = ("llama", "mistral", "qwen2", "gptj")
_REFUSED_TYPES = {
    "qwen3": "its q and k are RMS-normalised per head, which model.py does not do",
    "gemma": "Gemma scales the embedding, uses GeGLU and (1 + w) norms",
    "gemma2": "Gemma 2 adds logit soft-capping and sliding-window layers",
    "gemma3": "Gemma 3 adds q/k norms and sliding-window layers",
    "qwen2_moe": "mixture-of-experts FFNs", "mixtral": "mixture-of-experts FFNs",
}


def _hf_rope(hf, path, refuse):
    """ModelConfig's rope fields from config.json: rope_theta, and llama3 scaling if named."""
    # transformers 5 writes rope_parameters (with rope_theta in it), older files rope_scaling;
    # a file may hold both, so the one that names a scaling decides
    fields = [f for f in ("rope_parameters", "rope_scaling") if hf.get(f)]
    for f in fields:
        if not isinstance(hf[f], dict):
            refuse(f, "expected an object")

    def kind_of(rope):
        return rope.get("rope_type", rope.get("type", "default"))
    scaled = [f for f in fields if kind_of(hf[f]) != "default"]
    field = (scaled or fields or ["rope_scaling"])[0]
    rope = hf.get(field) or {}
    kind = kind_of(rope)
    theta = next((hf[f]["rope_theta"] for f in fields if "rope_theta" in hf[f]),
                 hf.get("rope_theta", 10000.0))
    if kind == "default":
        return dict(rope_theta=theta)
    if kind != "llama3":
        refuse(field, "rope scaling other than llama3; only plain rotary and llama3 are")
    try:
        args = dict(rope_theta=theta, rope_factor=float(rope["factor"]),
                    rope_low_freq_factor=float(rope["low_freq_factor"]),
                    rope_high_freq_factor=float(rope["high_freq_factor"]),
                    rope_original_max_len=int(rope["original_max_position_embeddings"]))
    except (KeyError, TypeError, ValueError):
        refuse(field, "llama3 scaling needs factor, low_freq_factor, high_freq_factor and "
                      "original_max_position_embeddings as numbers")
    low, high = args["rope_low_freq_factor"], args["rope_high_freq_factor"]
    if not (args["rope_factor"] > 0 and high > low > 0
            and args["rope_original_max_len"] > 0):
        refuse(field, "expected factor > 0, high_freq_factor > low_freq_factor > 0 and "
                      "original_max_position_embeddings > 0")
    return args


def _hf_config(folder):
    """(config, the raw config.json) of a Hugging Face LLaMA or GPT-J folder."""
    path = folder / "config.json"
    hf = _read_json(path)
    kind = hf.get("model_type")
    if kind in _REFUSED_TYPES:
        raise CheckpointError(f"{path}: model_type = {json.dumps(kind)} is not supported "
                              f"({_REFUSED_TYPES[kind]}); expected one of {', '.join(_HF_TYPES)}")
    if kind not in _HF_TYPES:
        raise CheckpointError(f"{path}: model_type = {json.dumps(kind)} is not supported: "
                              "expected one "
                              f"of {', '.join(_HF_TYPES)}")
    name = {"llama": "LLaMA", "mistral": "Mistral", "qwen2": "Qwen2", "gptj": "GPT-J"}[kind]

    checks.check_fields(path, hf, _HF_RULES[kind], CheckpointError, _CONFIG_ADVICE)
    if kind != "gptj":
        names = ("hidden_size", "num_attention_heads", "num_key_value_heads")
        _check_heads(path, _positive_int(hf, names[0], path), _positive_int(hf, names[1], path),
                     hf.get(names[2]), names)
    else:
        _check_heads(path, _positive_int(hf, "n_embd", path), _positive_int(hf, "n_head", path),
                     None, ("n_embd", "n_head", ""))

    def refuse(field, why):
        raise CheckpointError(f"{path}: {field} = {json.dumps(hf[field])} is not supported "
                              f"({why}); only "
                              f"plain {name} runs exactly here")
    if hf.get("quantization_config"):
        refuse("quantization_config", "pre-quantized weights: load the original ones and pass --quantize")
    eos = hf.get("eos_token_id", 50256 if kind == "gptj" else 2)
    eos_ids = eos if isinstance(eos, list) else [eos]  # Llama 3 instruct: [end_of_text, eom, eot]
    if not eos_ids or not all(isinstance(i, int) and i >= 0 for i in eos_ids):
        refuse("eos_token_id", "expected a token id or a list of them")

    if kind != "gptj":
        rope_args = _hf_rope(hf, path, refuse)
        for field in ("mlp_bias",) + (("attention_bias",) if kind != "qwen2" else ()):
            if hf.get(field):
                refuse(field, f"{name} has no such biases")
        window = 0
        if kind == "llama" and hf.get("sliding_window"):
            refuse("sliding_window", "LLaMA has full causal attention")
        if kind == "mistral" and hf.get("sliding_window"):
            window = _positive_int(hf, "sliding_window", path)  # checked against each run's lengths
        if kind == "qwen2" and hf.get("use_sliding_window"):
            refuse("use_sliding_window", "sliding-window layers are not implemented")
        if hf.get("hidden_act", "silu") != "silu":
            refuse("hidden_act", f"{name}'s FFN is SwiGLU")
        dim, n_head = _positive_int(hf, "hidden_size", path), _positive_int(hf, "num_attention_heads", path)
        if hf.get("head_dim") not in (None, dim // n_head):
            refuse("head_dim", f"it must be hidden_size / num_attention_heads = {dim // n_head}")
        return ModelConfig(family="llama", vocab_size=_positive_int(hf, "vocab_size", path), dim=dim,
                           n_layer=_positive_int(hf, "num_hidden_layers", path), n_head=n_head,
                           n_kv_heads=hf.get("num_key_value_heads") or 0,
                           ffn_dim=_positive_int(hf, "intermediate_size", path),
                           norm_eps=hf.get("rms_norm_eps", 1e-6),
                           max_seq_len=hf.get("max_position_embeddings", 2048),
                           bos_id=1 if hf.get("bos_token_id") is None else hf["bos_token_id"],
                           eos_id=eos_ids[0], eos_ids=tuple(eos_ids), qkv_bias=kind == "qwen2",
                           tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                           sliding_window=window, **rope_args), hf

    if hf.get("activation_function", "gelu_new") != "gelu_new":
        refuse("activation_function", "GPT-J's MLP uses gelu_new (tanh)")
    if hf.get("tie_word_embeddings"):
        refuse("tie_word_embeddings", "GPT-J's head is its own matrix with a bias")
    if "rotary_dim" in hf and hf["rotary_dim"] is None:
        refuse("rotary_dim", "transformers' GPT-J needs a rotary width")
    dim = _positive_int(hf, "n_embd", path)
    return ModelConfig(family="gptj", vocab_size=_positive_int(hf, "vocab_size", path), dim=dim,
                       n_layer=_positive_int(hf, "n_layer", path), n_head=_positive_int(hf, "n_head", path),
                       ffn_dim=hf.get("n_inner") or 4 * dim, rotary_dim=_positive_int(hf, "rotary_dim", path),
                       norm_eps=hf.get("layer_norm_epsilon", 1e-5), max_seq_len=hf.get("n_positions", 2048),
                       bos_id=hf.get("bos_token_id", 50256), eos_id=eos_ids[0],
                       eos_ids=tuple(eos_ids)), hf


def read_config(folder):
    """The ModelConfig of a checkpoint folder, from its params.json (Meta) or config.json (Hugging Face)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} not found: pass the folder that holds params.json "
                              "(Meta) or config.json (Hugging Face)")
    if (folder / "params.json").exists():
        return _meta_config(folder)
    if (folder / "config.json").exists():
        return _hf_config(folder)[0]
    raise CheckpointError(f"{folder} is no checkpoint folder: expected params.json + consolidated.*.pth "
                          "(Meta's LLaMA) or config.json + weights (Hugging Face)")


def model_config(model, checkpoint_dir=None):
    """(ModelConfig, folder or None) of `model`, a preset name or a checkpoint folder; reads no weights.

    Random presets (tiny, tiny-gptj): their config and no folder. Other presets: the config of
    checkpoint_dir (default checkpoints/<name>), which must have the preset's shapes. A folder:
    its own params.json / config.json.
    """
    if model in RANDOM_PRESETS:
        return ModelConfig.from_name(model), None
    if model in PRESETS:
        folder = Path(checkpoint_dir or Path("checkpoints") / model)
        if not folder.is_dir():
            raise CheckpointError(f"{model} needs its weights: checkpoint folder {folder} not found; pass "
                                  "--checkpoint_dir, or the folder itself as --model (see the README: Weights)")
        config = read_config(folder)
        check_against_preset(config, model, folder)
        return config, folder
    folder = Path(model)
    if not folder.is_dir():
        raise CheckpointError(f"model {model!r} is neither a preset ({', '.join(PRESETS)}) nor a checkpoint "
                              "folder: name a preset, or the folder that holds params.json or config.json")
    if checkpoint_dir and Path(checkpoint_dir).resolve() != folder.resolve():
        raise CheckpointError(f"model {model!r} is a folder and checkpoint_dir {checkpoint_dir!r} another one: "
                              "pass the checkpoint folder once")
    return read_config(folder), folder


def check_window(config, seq_len, what):
    """Refuse a run whose sequences (seq_len tokens) reach past a sliding attention window: model.py
    attends to every earlier token, which equals sliding-window attention only inside the window."""
    if config.sliding_window and seq_len > config.sliding_window:
        raise CheckpointError(f"{what} makes sequences of {seq_len} tokens but the model's "
                              f"sliding_window is {config.sliding_window}: attention past the window "
                              "is not implemented; "
                              f"use sequences of at most {config.sliding_window} tokens")


def check_against_preset(config, name, where="checkpoint"):
    """Raise CheckpointError when `config` does not have the shapes of the preset `name`."""
    preset = ModelConfig.from_name(name)
    for field in SHAPE_FIELDS:
        found, wanted = getattr(config, field), getattr(preset, field)
        if found != wanted:
            # name the preset the weights do fit, when there is one
            fits = [other for other in PRESETS if all(getattr(config, f) == getattr(ModelConfig.from_name(other), f)
                                                     for f in SHAPE_FIELDS)]
            hint = f"these are {fits[0]} weights" if fits else f"is this the folder of {name}?"
            raise CheckpointError(f"{where}: checkpoint {field} {found} != {name} {field} {wanted}: {hint}")


# ----------------------------------------------------------------------------- checkpoint formats
#
# Each yields (our name, pieces, dim, heads): the stored pieces of one tensor, joined along dim
# (Meta's model-parallel shards; None: one piece or replicated), and the number of heads whose
# q/k rows must be un-permuted (Hugging Face LLaMA; None: leave as stored).

def _meta_tensors(folder, config):
    """Meta's LLaMA download: consolidated.NN.pth model-parallel shards."""
    files = _meta_shard_files(folder)
    shards = [index_torch_file(f) for f in files]
    for file, shard in zip(files[1:], shards[1:]):
        if shard.keys() != shards[0].keys():
            raise CheckpointError(f"{file} holds other tensors than {files[0].name}: the shards do not belong "
                                  "together")
    # every shard holds a 1/n slice of the embedding's width: a missing last shard shows here
    width = shards[0]["tok_embeddings.weight"].shape[1] * len(shards)
    if width != config.dim:
        raise CheckpointError(f"{folder}: {len(shards)} shard(s) give an embedding width of {width} but "
                              f"params.json says dim {config.dim}: is a shard missing?")
    for name in shards[0]:
        if name == "rope.freqs":  # a precomputed rotary table in LLaMA-1 files; we compute it
            continue
        yield name, [shard[name] for shard in shards], _shard_dim(name), None


def _shard_dim(name):
    """The dimension along which Meta split a tensor across model-parallel shards (None: replicated)."""
    if name.endswith("norm.weight"):
        return None
    if name == "tok_embeddings.weight" or name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
        return 1  # the embedding is split along its width; wo, w2 are row-parallel
    return 0      # wq, wk, wv, w1, w3 and output are column-parallel


# Hugging Face key -> our key; "{}" is the layer index.
_HF_LLAMA_KEYS = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attention.wq.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attention.wk.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attention.wv.weight",
    "model.layers.{}.self_attn.q_proj.bias": "layers.{}.attention.wq.bias",  # Qwen2
    "model.layers.{}.self_attn.k_proj.bias": "layers.{}.attention.wk.bias",
    "model.layers.{}.self_attn.v_proj.bias": "layers.{}.attention.wv.bias",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attention.wo.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.feed_forward.w1.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.feed_forward.w2.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.feed_forward.w3.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norm.weight",
}
_HF_GPTJ_KEYS = {
    "transformer.wte.weight": "tok_embeddings.weight",
    "transformer.ln_f.weight": "norm.weight",
    "transformer.ln_f.bias": "norm.bias",
    "lm_head.weight": "output.weight",
    "lm_head.bias": "output.bias",
    "transformer.h.{}.ln_1.weight": "layers.{}.attention_norm.weight",
    "transformer.h.{}.ln_1.bias": "layers.{}.attention_norm.bias",
    "transformer.h.{}.attn.q_proj.weight": "layers.{}.attention.wq.weight",
    "transformer.h.{}.attn.k_proj.weight": "layers.{}.attention.wk.weight",
    "transformer.h.{}.attn.v_proj.weight": "layers.{}.attention.wv.weight",
    "transformer.h.{}.attn.out_proj.weight": "layers.{}.attention.wo.weight",
    "transformer.h.{}.mlp.fc_in.weight": "layers.{}.feed_forward.w1.weight",
    "transformer.h.{}.mlp.fc_in.bias": "layers.{}.feed_forward.w1.bias",
    "transformer.h.{}.mlp.fc_out.weight": "layers.{}.feed_forward.w2.weight",
    "transformer.h.{}.mlp.fc_out.bias": "layers.{}.feed_forward.w2.bias",
}
# Buffers that old Hugging Face files carry and our model computes instead.
_HF_DROPPED = ("rotary_emb.inv_freq", "attn.bias", "attn.masked_bias")


def _hf_weight_files(folder):
    for index_name, single_name in (("model.safetensors.index.json", "model.safetensors"),
                                    ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (folder / index_name).exists():
            weight_map = _read_json(folder / index_name).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{folder / index_name} has no weight_map: download it again")
            checks.check_mapping(folder / index_name, "weight_map", weight_map, rule(str),
                                 rule(str), CheckpointError, "download it again")
            outside = [name for name in weight_map.values() if Path(name).name != name]
            if outside:  # the shards are files of this folder, never a path elsewhere
                raise CheckpointError(f"{folder / index_name}: weight_map names {outside[0]!r}, "
                                      "expected a file name in the folder: download it again")
            files = [folder / name for name in dict.fromkeys(weight_map.values())]
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise CheckpointError(f"{folder}/{index_name} lists {', '.join(missing)}, which are missing: "
                                      "download every shard")
            return files
        if (folder / single_name).exists():
            return [folder / single_name]
    raise CheckpointError(f"{folder} has config.json but no weights: expected model.safetensors or "
                          "pytorch_model.bin (or a sharded index of them)")


def _hf_tensors(folder, config, hf):
    """A Hugging Face LLaMA or GPT-J folder: .safetensors or .bin weights, single or sharded."""
    templates = _HF_LLAMA_KEYS if config.family == "llama" else _HF_GPTJ_KEYS
    stored = {}
    for file in _hf_weight_files(folder):
        stored.update(index_weights(file))
    # transformers ties lm_head to the embedding: a copy in the file is unused
    if config.tie_embeddings:
        stored.pop("lm_head.weight", None)
    for hf_name, tensor in stored.items():
        if hf_name.endswith(_HF_DROPPED):
            continue
        name = _rename(hf_name, templates)
        # q/k/v biases belong to Qwen2 only: in a LLaMA or Mistral file they are unexpected
        if name is None or name.endswith(".bias") and config.family == "llama" and not config.qkv_bias:
            raise CheckpointError(f"{folder}: unexpected tensor {hf_name} in a {config.family} checkpoint")
        heads = None
        if config.family == "llama" and name.endswith(("attention.wq.weight", "attention.wk.weight",
                                                        "attention.wq.bias", "attention.wk.bias")):
            heads = config.n_head if ".wq." in name else config.n_kv_heads
        yield name, [tensor], None, heads


def _rename(hf_name, templates):
    parts = hf_name.split(".")
    numbers = [p for p in parts if p.isdigit()]
    template = ".".join("{}" if p.isdigit() else p for p in parts)
    if template not in templates:
        return None
    return templates[template].format(*numbers)


# ----------------------------------------------------------------------------- loading

DTYPE_CHOICES = (torch.float32, torch.bfloat16, torch.float16)


def load_checkpoint(path, name=None, device="cpu", dtype=None, quantize=None):
    """The model in a checkpoint folder (Meta's LLaMA download, or Hugging Face LLaMA / GPT-J), in eval mode.

    The config comes from the folder's own params.json or config.json; when `name` names a
    preset, the shapes must agree with it. dtype is the frozen base's (default: the
    checkpoint's own); quantize ("int8", "nf4" or None) stores the linear layers of the blocks
    quantized. The model is built on the meta device and filled one tensor at a time, each read,
    converted (or quantized) on `device` and its source dropped, so memory stays near one copy
    of the finished model.
    """
    folder = Path(path)
    config = read_config(folder)
    if name is not None:
        check_against_preset(config, name, folder)
    if (folder / "params.json").exists():
        tensors = _meta_tensors(folder, config)
    else:
        tensors = _hf_tensors(folder, config, _hf_config(folder)[1])
    return _assemble(config, tensors, device, dtype, quantize, folder)


def load_model(model, checkpoint_dir=None, device="cpu", dtype=None, quantize=None, seed=0):
    """`model` (a preset name or a checkpoint folder, as in model_config) in eval mode: random weights
    (seeded) for the tiny presets, else the checkpoint. dtype and quantize as in load_checkpoint."""
    config, folder = model_config(model, checkpoint_dir)
    if folder is not None:
        return load_checkpoint(folder, name=model if model in PRESETS else None, device=device, dtype=dtype,
                               quantize=quantize)
    with torch.random.fork_rng(devices=[]):  # the same weights on every machine, the caller's RNG untouched
        torch.manual_seed(seed)
        random = Transformer(config)
    tensors = ((key, [tensor], None, None) for key, tensor in random.state_dict().items())
    return _assemble(config, tensors, device, dtype or torch.float32, quantize, model)


class _ReadBuffer:
    """One buffer for every tensor that is read to be converted, joined or quantized: a buffer per
    tensor would leave the allocator's heap full of holes (measured: +40% RSS on a 650 MB model)."""

    def __init__(self):
        self.buffer = torch.empty(0, dtype=torch.uint8)

    def read(self, stored):
        if not isinstance(stored, StoredTensor):  # already in memory (random presets, torch's pre-1.6 files)
            return stored
        if self.buffer.numel() < stored.nbytes:
            self.buffer = torch.empty(stored.nbytes, dtype=torch.uint8)
        return stored.read(self.buffer)  # valid until the next read


def _materialize(pieces, shape, dim, heads, dtype, device, reader):
    """One tensor of `shape` in `dtype` on `device`, in one allocation: each stored piece is read into
    the reader's buffer and copied (converted, un-permuted) into its slice. A single piece already in
    `dtype` on the CPU is read into memory of its own instead, which becomes the parameter."""
    first = pieces[0]
    if len(pieces) == 1 and not heads and first.dtype == dtype and torch.device(device).type == "cpu":
        return first.read() if isinstance(first, StoredTensor) else first
    tensor = torch.empty(shape, dtype=dtype, device=device)
    if heads:
        # Hugging Face permutes the q/k rows of each head for its rotate-half rotary: [evens..., odds...];
        # Meta's (and ours) are the interleaved pairs [e0, o0, e1, o1, ...]
        out_dim, in_dim = (*shape, 1)[:2]  # a bias (Qwen2's q, k) is one column
        half = out_dim // heads // 2
        tensor.view(heads, half, 2, in_dim).transpose(1, 2).copy_(
            reader.read(first).reshape(heads, 2, half, in_dim))  # (heads, 2, half, in) <- rotate-half
    elif dim is None:  # one piece, or the same in every shard
        tensor.copy_(reader.read(first))
    else:
        start = 0
        for piece in pieces:
            tensor.narrow(dim, start, piece.shape[dim]).copy_(reader.read(piece))
            start += piece.shape[dim]
    return tensor


def _assemble(config, tensors, device, dtype, quantize, where):
    """A model of `config` on `device` from (name, pieces, dim, heads) of stored tensors, in eval mode."""
    if dtype not in (None, *DTYPE_CHOICES):
        raise CheckpointError(f"dtype {dtype} is not one of {', '.join(map(str, DTYPE_CHOICES))}")
    if quantize not in (None, *QUANTIZE_KINDS):
        raise CheckpointError(f"quantize {quantize!r} is not one of {', '.join(QUANTIZE_KINDS)} (or None)")
    with torch.device("meta"):
        model = Transformer(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}  # the shapes stored in a checkpoint
    to_quantize = set()
    if quantize:
        try:  # empty quantized layers in place of the blocks' nn.Linear, still on the meta device
            to_quantize = {f"{name}.weight" for name in quantize_model(model, quantize)}
        except ValueError as e:
            raise CheckpointError(f"{where}: {e}") from None

    state, converted = {}, {}  # converted: source -> its copy on the device (tied weights: one copy)
    reader = _ReadBuffer()
    quantizer = Quantizer(quantize, device) if quantize else None
    for key, pieces, dim, heads in tensors:
        if key not in expected:
            raise CheckpointError(f"{where}: unexpected tensor {key}: is this a {config.family} checkpoint?")
        if dtype is None:  # the checkpoint's own dtype, taken from the first tensor, for every tensor
            dtype = pieces[0].dtype
        if len(pieces) == 1 and pieces[0] in converted:
            state[key] = converted[pieces[0]]
            continue
        shape = list(pieces[0].shape)
        if dim is not None:  # Meta's model-parallel pieces, joined
            shape[dim] = sum(p.shape[dim] for p in pieces)
        if tuple(shape) != tuple(expected[key]):
            raise CheckpointError(f"{where}: tensor {key} has shape {tuple(shape)} but the config gives "
                                  f"{tuple(expected[key])}: the weights do not match params.json/config.json")
        if key not in to_quantize:
            state[key] = converted[pieces[0]] = _materialize(pieces, shape, dim, heads, dtype, device, reader)
            continue
        # quantized from its stored precision (quantize_weight works in fp32), on the CPU straight
        # from the read buffer
        if len(pieces) == 1 and not heads and torch.device(device).type == "cpu":
            weight = reader.read(pieces[0])
        else:
            weight = _materialize(pieces, shape, dim, heads, pieces[0].dtype, device, reader)
        prefix = key.removesuffix("weight")
        state.update({prefix + buffer: t for buffer, t in quantizer(weight).items()})
        del weight
    if config.tie_embeddings and "tok_embeddings.weight" in state:
        state.setdefault("output.weight", state["tok_embeddings.weight"])
    missing = [k for k in model.state_dict() if k not in state]
    if missing:
        raise CheckpointError(f"{where}: the checkpoint lacks {len(missing)} tensors, e.g. {missing[0]}: "
                              "is a weights file missing?")
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_embeddings:  # assign replaced both parameters: share one again
        model.output.weight = model.tok_embeddings.weight
    return model.eval()
