"""What the gates of a trained InterLoRA model do on some inputs, layer by layer.

    head gates (Eq. 5)   g = pool_t sigmoid(x_t W_att W_h)    one value in (0, 1) per head: which
                                                             heads' share of the LoRA update passes
    FFN gates (Eq. 7)    g = α · relu(u_t W_ffn W_o)          one value per token and output feature:
                                                             0 where the relu is off (the feature
                                                             keeps its pre-trained value)

A GateRecorder hooks every gated layer, takes its input as the model runs, and computes the
gates from it with the layer's own code (InterLoRALinear.head_gate and ffn_gate, in fp32), outside
the model's forward: the model runs as it always does. Statistics are kept as running sums and histograms, so any number of prompts fits
in memory. Used by report.py (the gate report) and train.py (a few numbers per logged step).
"""
import re
from collections import defaultdict

import torch

import interlora
from machinery import adapters

BINS = 100  # head gates live in (0, 1): histograms of 0.01-wide bins give quantiles to 0.01
ROLES = ("q", "k", "v", "gate", "up", "down")  # the order layers are listed in


def gated_layers(model):
    """[(layer index, role, module)] of the model's gated InterLoRA layers, in layer order.

    The role is the adapted projection: q, k, v (head gates) or gate, up, down (FFN gates).
    """
    suffixes = {suffix: role for role, (suffix, _) in adapters.default_targets(model).items()}
    found = []
    for name, module in model.named_modules():
        if isinstance(module, interlora.InterLoRALinear) and module.gate != "none":
            layer = int(re.search(r"\.(\d+)\.", f".{name}.").group(1))
            role = next(role for suffix, role in suffixes.items() if name.endswith(suffix))
            found.append((layer, role, module))
    return sorted(found, key=lambda item: (item[0], ROLES.index(item[1])))


def head_gates(layer, x, real):
    """Eq. 5 per sequence ("mean": (B, heads)) or per real token ("causal": (tokens, heads))."""
    g = layer.head_gate(layer.gate_in(x.float()))  # (B, 1, heads) or (B, T, heads)
    return g[:, 0] if layer.gate_pool == "mean" else g[real]


def ffn_gates(layer, u, real):
    """Eq. 7 at every real token: (tokens, d_out); the sigmoid variant ("InterLoRA*") has no α."""
    return layer.ffn_gate(u.float()[real])


class GateRecorder:
    """Statistics of every gated layer's gates over the inputs the model sees while recording.

        with GateRecorder(model) as recorder:
            model(idx, attention_mask=mask)    # any number of calls; recorder.group = "SVAMP" to split
        recorder.statistics()
    """

    def __init__(self, model):
        self.layers = gated_layers(model)
        self.group = "inputs"  # what the next inputs are counted under (a dataset name, say); "all" sums them
        self.sums = defaultdict(lambda: defaultdict(float))  # (group, layer, role) -> running sums
        self.hooks = []

    def __enter__(self):
        for index, role, module in self.layers:
            self.hooks.append(module.register_forward_pre_hook(self._hook(index, role)))
        return self

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()
        self.hooks = []

    def _hook(self, index, role):
        def record(module, args):
            x = args[0].detach()
            real, _ = module.real_tokens(x.shape[1])  # (B, T) or None: all real
            real = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if real is None \
                else real.bool()
            # the layer's own gate code, in fp32 whatever autocast the model runs under
            with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
                if module.gate == "head":
                    self._add_head(self.sums[(self.group, index, role)], head_gates(module, x, real))
                else:
                    self._add_ffn(self.sums[(self.group, index, role)], module, ffn_gates(module, x, real))
        return record

    @staticmethod
    def _add_head(sums, g):  # g: (n, heads)
        sums["n"] += g.shape[0]
        sums["sum"] = sums["sum"] + g.sum(0).double().cpu()
        sums["squares"] = sums["squares"] + (g.double() ** 2).sum(0).cpu()
        bins = (g * BINS).long().clamp(0, BINS - 1)  # (n, heads)
        counts = torch.zeros(g.shape[1], BINS, dtype=torch.long, device=g.device)
        counts.scatter_add_(1, bins.T, torch.ones_like(bins.T))
        sums["histogram"] = sums["histogram"] + counts.cpu()

    @staticmethod
    def _add_ffn(sums, module, g):  # g: (tokens, d_out)
        sums["n"] += g.numel()
        sums["zeros"] += int((g == 0).sum())
        sums["magnitude"] += float(g.abs().double().sum())
        if module.gate == "relu":
            sums["alpha"] = float(module.gate_scale)

    def statistics(self):
        """{group: {"heads": {role: [per layer: {...}]}, "ffn": {role: [...]}}} for each group and for
        "all" of them together; plain numbers, ready for JSON."""
        groups = defaultdict(dict)
        for (group, index, role), sums in self.sums.items():
            groups[group][(index, role)] = sums
            merged = groups["all"].setdefault((index, role), defaultdict(float))
            for key, value in sums.items():
                merged[key] = value if key == "alpha" else merged[key] + value
        out = {}
        for group, layers in groups.items():
            table = out[group] = {"heads": {}, "ffn": {}}
            for (index, role), sums in sorted(layers.items(), key=lambda kv: (kv[0][0], ROLES.index(kv[0][1]))):
                kind = "heads" if "histogram" in sums else "ffn"
                stats = head_statistics(sums) if kind == "heads" else ffn_statistics(sums)
                table[kind].setdefault(role, []).append({"layer": index, **stats})
        return out


def head_statistics(sums):
    n = sums["n"]
    mean = sums["sum"] / n
    std = (sums["squares"] / n - mean ** 2).clamp(min=0).sqrt()
    histogram = sums["histogram"]
    cumulative = histogram.cumsum(1)

    def quantile(q):  # the upper edge of the first bin that reaches q of the values
        return ((cumulative < q * n).sum(1) + 1).double() / BINS
    return {"values": n, "mean": mean.tolist(), "std": std.tolist(), "p10": quantile(0.1).tolist(),
            "p50": quantile(0.5).tolist(), "p90": quantile(0.9).tolist(), "histogram": histogram.tolist()}


def ffn_statistics(sums):
    stats = {"values": sums["n"], "zero_fraction": sums["zeros"] / sums["n"], "mean_magnitude": sums["magnitude"] / sums["n"]}
    if "alpha" in sums:
        stats["alpha"] = sums["alpha"]
    return stats


def summary(model, idx, mask):
    """A few numbers for the training log: the mean q and v head gates, the FFN gates' zero
    fraction and mean α over all layers, on one batch (run without gradients)."""
    if not gated_layers(model):
        return {}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), GateRecorder(model) as recorder:
            model(idx, attention_mask=mask)
    finally:
        model.train(was_training)
    stats, numbers = recorder.statistics()["all"], {}
    for role, layers in stats["heads"].items():
        numbers[f"{role}_gate"] = sum(sum(layer["mean"]) / len(layer["mean"]) for layer in layers) / len(layers)
    for role, layers in stats["ffn"].items():
        numbers[f"{role}_zero_fraction"] = sum(layer["zero_fraction"] for layer in layers) / len(layers)
        if "alpha" in layers[0]:
            numbers[f"{role}_alpha"] = sum(layer["alpha"] for layer in layers) / len(layers)
    return {key: round(value, 5) for key, value in numbers.items()}
