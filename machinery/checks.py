"""Every file the tools read is checked here, at the door, before anything is built or written.

A parsed file (JSON, a torch payload of plain data) is held against a table of rules, one per
field: the types it may have, its range, its allowed values, whether it must be there. A file
that breaks a rule gives one line naming the file, the field, what was expected, what was
found and what to do, raised as the error class of the caller (AdapterError, CheckpointError,
...), so each command's existing one-line handling applies unchanged.
"""
import json
import math
import re
from dataclasses import fields
from pathlib import Path
from typing import NamedTuple

import torch

ADAPTER_VERSIONS = (1, 2)  # the adapter file versions this code reads
# Deeper JSON is no file of ours or of a model's (tokenizer.json nests 5 levels): json.loads
# would recurse until Python's recursion limit and fail with a RecursionError
MAX_JSON_DEPTH = 64
# A code point from U+D800 to U+DFFF left alone: JSON's "\ud800" parses to it, and it can never
# be encoded to UTF-8 (a pair that makes one character parses to that character)
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class Rule(NamedTuple):
    """What one field may hold. types: a tuple of Python types (int also passes for float;
    bool never passes for int). low/high: inclusive bounds for numbers. choices: allowed values."""
    types: tuple
    low: float = None
    high: float = None
    choices: tuple = None
    required: bool = False
    none_ok: bool = False


def rule(*types, low=None, high=None, choices=None, required=False, none_ok=False):
    return Rule(types, low, high, choices, required, none_ok)


_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
               dict: "a JSON object", list: "a list", tuple: "a list"}


def found(value):
    """A value as the message shows it: short, with its type where the type is the problem."""
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _type_ok(value, types):
    if isinstance(value, bool):
        return bool in types
    if isinstance(value, int) and float in types:
        return True
    return isinstance(value, tuple(t for t in types if t is not bool))


def check_value(where, name, value, r, error, advice):
    """Raise `error` when `value` (the field `name` of the file `where`) breaks the rule `r`."""
    if value is None and r.none_ok:
        return
    expected = " or ".join(_TYPE_WORDS.get(t, t.__name__) for t in r.types)
    if not _type_ok(value, r.types):
        raise error(f"{where}: {name} is {found(value)}, expected {expected}: {advice}")
    if isinstance(value, str):
        check_text(where, name, value, error, advice)
    if isinstance(value, float) and not math.isfinite(value):
        raise error(f"{where}: {name} is {value}, expected a finite number: {advice}")
    if r.choices is not None and value not in r.choices:
        allowed = ", ".join(map(repr, r.choices))
        raise error(f"{where}: {name} is {value!r}, expected one of {allowed}: {advice}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if (r.low is not None and value < r.low) or (r.high is not None and value > r.high):
            span = (f"from {r.low} to {r.high}" if r.low is not None and r.high is not None
                    else f"at least {r.low}" if r.low is not None else f"at most {r.high}")
            raise error(f"{where}: {name} is {value!r}, expected {expected} {span}: {advice}")


def check_fields(where, record, rules, error, advice, unknown_ok=True, prefix=""):
    """Check the dict `record` (a file's settings) field by field against `rules` {field: Rule}.

    Fields absent from `rules` are refused unless unknown_ok (a Hugging Face config.json holds
    many fields no loader reads; our own files hold only what we wrote)."""
    if not isinstance(record, dict):
        what = prefix.rstrip(".") or "the file"
        raise error(f"{where}: {what} is {found(record)}, expected a JSON object: {advice}")
    if not unknown_ok:
        unknown = sorted(str(k) for k in record if k not in rules)
        if unknown:
            raise error(f"{where}: {prefix}{unknown[0]} is a field this version does not know "
                        f"(it knows {', '.join(rules)}): {advice}")
    for name, r in rules.items():
        if name not in record:
            if r.required:
                raise error(f"{where}: the field {prefix}{name} is missing: {advice}")
            continue
        check_value(where, prefix + name, record[name], r, error, advice)


def check_text(where, name, text, error, advice):
    """Refuse a string that holds a lone surrogate: no tokenizer can encode it (UTF-8 has none)."""
    bad = _LONE_SURROGATE.search(text)
    if bad:
        raise error(f"{where}: {name} holds a lone surrogate U+{ord(bad.group()):04X} at "
                    f"character {bad.start()}, which is no Unicode text (half of an escaped "
                    f"pair?): {advice}")


def _all_keep(values, r):
    """True when every value surely keeps the rule `r`, checked in bulk (a vocabulary of 128k
    entries one by one takes a second); False: look at them one by one."""
    values = list(values)
    if not values:
        return True
    if r.types == (int,) and all(type(v) is int for v in values):
        return ((r.low is None or min(values) >= r.low)
                and (r.high is None or max(values) <= r.high))
    if r.types == (str,) and r.choices is None and all(type(v) is str for v in values):
        return _LONE_SURROGATE.search("".join(values)) is None
    return False


def check_mapping(where, name, value, key_rule, value_rule, error, advice):
    """A dict whose every key and value keeps its rule (vocab.json's {token: id})."""
    if not isinstance(value, dict):
        raise error(f"{where}: {name} is {found(value)}, expected a JSON object: {advice}")
    if _all_keep(value.keys(), key_rule) and _all_keep(value.values(), value_rule):
        return
    for key, item in value.items():
        check_value(where, f"{name} key", key, key_rule, error, advice)
        check_value(where, f"{name}[{key!r}]", item, value_rule, error, advice)


def check_list(where, name, value, item_rule, error, advice):
    """A list whose every item keeps its rule."""
    if not isinstance(value, list):
        raise error(f"{where}: {name} is {found(value)}, expected a list: {advice}")
    for index, item in enumerate(value):
        check_value(where, f"{name}[{index}]", item, item_rule, error, advice)


def load_json(path, error, advice, expect=dict):
    """A JSON file parsed and held to MAX_JSON_DEPTH, its top level of type `expect`; unreadable,
    not UTF-8, no JSON or nested too deep is one `error` line ending in `advice`."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{path} not found: {advice}") from None
    except PermissionError:
        raise error(f"cannot read {path}: permission denied") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}): {advice}") from None
    return parse_json(text, path, error, advice, expect)


def parse_json(text, where, error, advice, expect=dict):
    """load_json for text already read (a .safetensors header)."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise error(f"{where}: JSON nested deeper than Python can parse: {advice}") from None
    except ValueError as e:  # json's JSONDecodeError is a ValueError
        raise error(f"{where} is not valid JSON ({e}): {advice}") from None
    try:
        depth(value, MAX_JSON_DEPTH)
    except ValueError as e:
        raise error(f"{where}: {e}, expected a flat file: {advice}") from None
    if expect is not None and not isinstance(value, expect):
        raise error(f"{where}: the file is {found(value)}, expected "
                    f"{_TYPE_WORDS.get(expect, expect.__name__)}: {advice}")
    return value


def depth(value, limit):
    """Raise ValueError when nested lists/dicts in `value` go deeper than `limit` (iterative: a
    deep file must not reach Python's recursion limit)."""
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if level > limit:
            raise ValueError(f"nested deeper than {limit} levels")
        if isinstance(item, dict):
            stack.extend((v, level + 1) for v in item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend((v, level + 1) for v in item)


# ----------------------------------------------------------------------------- adapter files

def dataclass_rules(cls):
    """Rules for a config dataclass as saved by asdict: each field of its annotated type (a tuple
    may come back as a list; a field whose default is None may be None)."""
    kinds = {"int": (int,), "float": (float,), "str": (str,), "bool": (bool,),
             "tuple": (tuple, list)}
    rules = {}
    for f in fields(cls):
        annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        types = kinds.get(annotation, (object,))
        rules[f.name] = Rule(types, none_ok=f.default is None)
    return rules


def check_adapter_payload(path, payload, config_classes, error):
    """An adapter file's payload (any method), checked before anything of it is used.

    config_classes: {method: config dataclass}. The tensors must be floating point: an integer
    or complex tensor copied into a parameter would be cast silently."""
    advice = "the file is damaged or not made by this project's train.py: train it again"
    check_fields(path, payload, {
        "format": rule(str, choices=("interlora-adapter",), required=True),
        "version": rule(int, required=True, choices=ADAPTER_VERSIONS),
        "method": rule(str, choices=tuple(config_classes)),
        "config": rule(dict, required=True), "info": rule(dict, required=True),
        "base": rule(dict), "tensors": rule(dict, required=True),  # no base: interlora.py wrote it
    }, error, f"this version reads adapter versions {', '.join(map(str, ADAPTER_VERSIONS))}; "
              "train it again", unknown_ok=False)
    if payload["version"] >= 2 and "method" not in payload:
        raise error(f"{path}: the field method is missing (a version-2 file names its method): "
                    f"{advice}")
    method = payload.get("method") or payload["config"].get("method", "interlora")
    if method not in config_classes:
        raise error(f"{path}: config.method is {method!r}, expected one of "
                    f"{', '.join(config_classes)}: {advice}")
    check_fields(path, payload["config"], dataclass_rules(config_classes[method]), error, advice,
                 unknown_ok=False, prefix="config.")
    base_rules = {"class": rule(str, required=True), "family": rule(str, none_ok=True),
                  "shapes": rule(dict, required=True)}
    if "base" in payload:
        check_fields(path, payload["base"], base_rules, error, advice, prefix="base.")
    # info is free-form (plain data), but what the commands read from it must have its type
    text = rule(str, none_ok=True)
    check_fields(path, payload["info"], {"model": text, "task": text, "method": text,
                                         "checkpoint_dir": text, "steps": rule(int, low=0),
                                         "trainable_parameters": rule(int, low=0)},
                 error, advice, prefix="info.")
    for name, tensor in payload["tensors"].items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise error(f"{path}: tensors[{name!r}] is {type(tensor).__name__}, expected a tensor: "
                        f"{advice}")
        if not tensor.is_floating_point():
            raise error(f"{path}: tensor {name} is {tensor.dtype}, expected floating point "
                        f"(float32, bfloat16, float16): {advice}")


# ----------------------------------------------------------------------------- run files

def check_settings_json(path, saved, settings_class, error, advice):
    """train.py's settings.json: each setting of its dataclass type, the recorded data and
    adapter objects (a list where an object belongs is an edited file, not an older one)."""
    check_fields(path, saved, {"settings": rule(dict, required=True),
                               "total_steps": rule(int, low=0, required=True),
                               "adapter": rule(dict), "data": rule(dict, none_ok=True)},
                 error, advice)
    check_fields(path, saved["settings"], dataclass_rules(settings_class), error, advice,
                 prefix="settings.")
    if isinstance(saved.get("data"), dict):
        check_fields(path, saved["data"], {"items": rule(int, low=0),
                                           "tokens_sha256": rule(str),
                                           "tokenizer_sha256": rule(str)}, error, advice,
                     prefix="data.")


# ----------------------------------------------------------------------------- flag ranges
#
# The one table of train.py's and eval.py's numeric flags: (lowest, highest), inclusive; None:
# no bound. The lows are also in the settings' metadata, which --help shows (a test keeps the
# two equal); the highs keep a typo from writing gigabytes or running for days, far past any
# run of the paper (batch 16, 3 epochs, a few thousand steps). Bounds that depend on the model
# are check_flags' below. --lr has no high: a diverging run is refused by the finite-number
# guard (machinery/runs.py) at its first save, with the advice to lower it.
_STEPS = 10_000_000
FLAG_BOUNDS = {
    # train.py
    "r": (0, 4096), "alpha": (0, 1e6), "dropout": (0, 1), "lr": (0, None), "epochs": (1, 1000),
    "micro_batch_size": (1, 65536), "grad_accum": (1, 65536), "warmup_steps": (0, _STEPS),
    "cutoff_len": (2, 1 << 21), "max_grad_norm": (0, None), "seed": (0, (1 << 63) - 1),
    "max_steps": (0, _STEPS), "save_every": (1, _STEPS), "gate_log_every": (0, _STEPS),
    # eval.py
    "limit": (0, _STEPS), "batch_size": (1, 65536), "max_new_tokens": (0, 1 << 21),
}


def check_flag_table(settings, error):
    """Each numeric field of a settings dataclass against FLAG_BOUNDS (before any file is read)."""
    for f in fields(settings):
        value = getattr(settings, f.name)
        if f.name not in FLAG_BOUNDS or isinstance(value, bool):
            continue
        low, high = FLAG_BOUNDS[f.name]
        if (low is not None and value < low) or (high is not None and value > high):
            span = f"at least {low}" if high is None else f"from {low} to {high:,}"
            raise error(f"--{f.name} {value}: expected a value {span}")


def check_flags(settings, config, error, cfg=None, prompt_len=None, max_new_tokens=None):
    """The bounds that depend on the model, before anything is written: --r at most the width
    of the narrowest layer it adapts (a rank past it adds parameters and no expressiveness),
    --cutoff_len, and (eval.py) the longest prompt + max_new_tokens, within the model's context."""
    r = getattr(cfg, "r", None)
    if r:
        kv_width = config.n_kv_heads * config.head_dim  # the k and v projections' outputs
        width = min(config.dim, kv_width)
        if r > width:
            raise error(f"--r {r}: expected a rank at most {width}, the width of this model's "
                        f"narrowest adapted layer (dim {config.dim}, k/v {kv_width}): a larger "
                        "rank adds parameters, not rank")
    context = config.max_seq_len
    cutoff = getattr(settings, "cutoff_len", None)
    if cutoff and cutoff > context:
        raise error(f"--cutoff_len {cutoff}: expected at most {context}, the model's context "
                    "(max_seq_len / max_position_embeddings): give a smaller one")
    if prompt_len is not None and prompt_len + max_new_tokens > context:
        room = context - prompt_len
        advice = (f"give --max_new_tokens at most {room}" if room > 0
                  else "the prompts alone are too long for this model")
        raise error(f"the longest prompt ({prompt_len} tokens) + --max_new_tokens "
                    f"{max_new_tokens} make {prompt_len + max_new_tokens} tokens, past the "
                    f"model's context of {context}: {advice}")
