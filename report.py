"""What the gates learned: a report on a trained InterLoRA adapter, with tables and pictures.

    python report.py --adapter out/llama-7b-math-interlora/adapter.pt
    python report.py --adapter out/tiny-math-interlora/adapter.pt --limit 20
    python report.py --adapter out/tiny-math-interlora/adapter.pt --runs out/tiny-math-lora

Runs the task's test prompts (or, with --items train, the training texts) through the model
with the adapter and records every gated layer's gates (gates.py): per layer and head the mean,
spread and distribution of the q and v head gates; per layer the FFN gate's fraction of exact
zeros (relu off), its mean magnitude and α; for each dataset and for all together. Writes into
--out_dir: gates.json (every number), gates.md (what stands out) and, with matplotlib, pictures
(PNG and SVG): a layers x heads map per attention role, the FFN gates per layer, the gates over
the training steps (from the run's log.jsonl) and the loss and learning rate of this run and of
the --runs beside it.
"""
import os

os.environ.setdefault("MKL_CBWR", "AUTO")  # reproducible matmuls, as train.py and eval.py

import io  # noqa: E402
import json  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from machinery import adapters  # noqa: E402
from machinery import gates  # noqa: E402
from machinery import memory  # noqa: E402
from machinery import runs  # noqa: E402
from data import (DataError, collate, generate_prompt, load_task, tokenize_item,  # noqa: E402
                  tokenizer_for)
from machinery.memory import NotEnoughMemory  # noqa: E402
from machinery.checkpoints import load_model, model_config  # noqa: E402
from model import CheckpointError  # noqa: E402
from machinery.quantize import QUANTIZE_KINDS  # noqa: E402
from machinery.runs import RunError  # noqa: E402

PICTURE_SIZE = (8, 5)  # inches at 100 dpi: 800 x 500 pixels


@dataclass
class ReportSettings:
    adapter: str = field(default="", metadata={"help": "adapter file written by train.py"})
    items: str = field(default="test", metadata={
        "help": "test: the prompts eval.py gives the model; train: the training texts as train.py "
                "sees them (default: test)"})
    data_dir: str = field(default="data", metadata={
        "help": "LLM-Adapters data (python data.py download)"})
    datasets: str = field(default="", metadata={
        "help": "comma-separated test sets (default: all of the task)"})
    limit: int = field(default=0, metadata={
        "help": "only the first N items of each set (default 0: all)", "min": 0})
    batch_size: int = field(default=16, metadata={"help": "prompts per forward pass", "min": 1})
    cutoff_len: int = field(default=256, metadata={
        "help": "tokens per training text (--items train)", "min": 2})
    runs: str = field(default="", metadata={
        "help": "comma-separated run folders whose loss curves go beside this one's"})
    checkpoint_dir: str = field(default="", metadata={
        "help": "folder of the base weights (default: the adapter's)"})
    dtype: str = field(default="", metadata={
        "help": "the base's dtype: bf16, fp16 or fp32 (default: the adapter's, as it was trained)"})
    quantize: str = field(default="", metadata={
        "help": "int8 or nf4: keep the base's block weights in 8 or 4 bits; none: do not "
                "(default: as the adapter was trained)"})
    out_dir: str = field(default="", metadata={
        "help": "output folder (default: report-<task> beside the adapter)"})
    device: str = field(default="", metadata={"help": "cuda or cpu (default: cuda when available)"})


def parse_settings(argv=None):
    s = runs.settings_from_command_line(ReportSettings, __doc__.split("\n\n")[0], argv)
    if not s.adapter:
        raise RunError("pass --adapter FILE (written by train.py)")
    if s.items not in ("test", "train"):
        raise RunError(f"--items {s.items!r}: expected test or train")
    if s.dtype not in ("", *memory.DTYPES) or s.quantize not in ("", "none", *QUANTIZE_KINDS):
        raise RunError(f"--dtype {s.dtype!r} --quantize {s.quantize!r}: expected a dtype among "
                       f"{', '.join(memory.DTYPES)} and a quantization among none, "
                       f"{', '.join(QUANTIZE_KINDS)}")
    s.device = runs.choose_device(s.device)
    return s


def token_batches(s, task, tokenizer):
    """{dataset: [(idx, mask), ...]}: the inputs of each dataset, right-padded in batches."""
    if s.items == "train":
        items = task.train[: s.limit or None]
        texts = {"training set": [tokenize_item(tokenizer, item, s.cutoff_len) for item in items]}
    else:
        texts = {}
        for name, test in task.test.items():
            items = test[: s.limit or None]
            prompts = [generate_prompt(item["instruction"], item["input"]) for item in items]
            texts[name] = [(ids, ids) for ids in map(tokenizer.encode, prompts)]
    batches = {}
    for name, examples in texts.items():
        starts = range(0, len(examples), s.batch_size)
        collated = [collate(examples[i:i + s.batch_size], tokenizer.pad_id) for i in starts]
        batches[name] = [(idx, mask) for idx, _, mask in collated]
    return batches


def report(s):
    # read once: the record and the tensors are the same file's
    adapter = runs.AdapterBytes(s.adapter)
    payload = adapters.read_adapter(adapter.open())
    info, method = payload["info"], payload["method"]
    cfg = adapters.config_of(s.adapter, payload)
    if method in adapters.BASELINES or not (cfg.attention_gate or cfg.ffn_gate != "none"):
        raise RunError(f"{s.adapter} has no gates (method {info.get('method', method)}): "
                       "a gate report needs an InterLoRA variant with a head or an FFN gate")
    if not info.get("model") or not info.get("task"):  # every adapter train.py writes names both
        raise RunError(f"{s.adapter} names no model or task (info.model, info.task): "
                       "train it again")
    task_name = info["task"]
    # the base the adapter was trained on, unless flags say otherwise
    model_name, checkpoint_dir, base_note = runs.recorded_base(s, info, s.adapter)
    config, folder = model_config(model_name, checkpoint_dir)
    s.dtype, note = memory.plan(config, s.device, s.dtype, s.quantize or None, training=False,
                                batch_size=s.batch_size, seq_len=s.cutoff_len)
    adapter_folder = os.path.dirname(os.path.abspath(s.adapter))
    out_dir = s.out_dir or os.path.join(adapter_folder, f"report-{task_name}")
    shown = asdict(s) | {"model": model_name, "task": task_name, "out_dir": out_dir}
    print(json.dumps(shown, indent=2))
    for line in (base_note, note):
        if line:
            print(line)
    datasets = [d.strip() for d in s.datasets.split(",") if d.strip()] or None
    task = load_task(task_name, s.data_dir, datasets=datasets, with_train=s.items == "train")
    tokenizer = tokenizer_for(folder)
    other_runs = [Path(folder) for folder in s.runs.split(",") if folder.strip()]
    for folder in other_runs:
        if not (folder / "log.jsonl").exists():
            raise RunError(f"{folder} holds no log.jsonl: --runs takes the output folders of "
                           "train.py")
    runs.check_output_dir(out_dir)

    model = load_model(model_name, folder, device=s.device, dtype=memory.DTYPES[s.dtype],
                       quantize=s.quantize or None)
    adapters.load_adapter(model, adapter.open())  # the bytes the record came from
    model.eval()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=s.device.startswith("cuda"))
    with torch.no_grad(), autocast, gates.GateRecorder(model) as recorder:
        for name, batches in token_batches(s, task, tokenizer).items():
            recorder.group = name
            for idx, mask in batches:
                model(idx.to(s.device), attention_mask=mask.to(s.device))
    statistics = recorder.statistics()
    log = Path(s.adapter).parent / "log.jsonl"
    steps = read_log(log)

    out = runs.OutputDir(out_dir)
    try:
        gates_per_step = [{"step": r["step"], **r["gates"]} for r in steps if "gates" in r]
        runs.write_json(out / "gates.json", {"adapter": s.adapter, "model": model_name,
                                             "task": task_name, "items": s.items,
                                             "config": asdict(cfg), "statistics": statistics,
                                             "steps": gates_per_step})
        runs.write_text(out / "gates.md", markdown(s, model_name, cfg, statistics))
        pictures = draw(out.path, statistics, steps, [(Path(s.adapter).parent, steps)] +
                        [(folder, read_log(folder / "log.jsonl")) for folder in other_runs])
    finally:
        out.close()
    print(f"wrote gates.json and gates.md into {out_dir}")
    if pictures is not None:
        print(f"pictures: {', '.join(pictures)}")
    else:
        print("pictures need matplotlib, which is not installed: pip install matplotlib, "
              "then run this again")
    return statistics


def read_log(path):
    """The records of a run's log.jsonl (a missing file has none)."""
    def is_step_record(record):
        return isinstance(record, dict) and {"step", "loss", "lr"} <= record.keys()
    return runs.JsonLines(path).read(is_step_record)[0]


# --------------------------------------------------------------------------- the Markdown summary

def markdown(s, model_name, cfg, statistics):
    everything = statistics["all"]
    groups = [g for g in statistics if g != "all"]
    lines = [f"# Gate report: {s.adapter}", "",
             f"{model_name}, {cfg.method} (gate pool {cfg.gate_pool}, FFN gate {cfg.ffn_gate}); "
             f"inputs: the {s.items} items of {', '.join(groups)}.", ""]
    if not everything["heads"]:
        lines += ["This variant has no head gates (attention_gate is off): no head maps.", ""]
    if not everything["ffn"]:
        lines += ["This variant has no FFN gate (ffn_gate is none): no FFN pictures.", ""]
    for role, layers in everything["heads"].items():
        cells = [(layer["mean"][h], layer["layer"], h)
                 for layer in layers for h in range(len(layer["mean"]))]
        cells.sort()
        most_open = ", ".join(f"layer {i} head {h} ({v:.3f})" for v, i, h in cells[::-1][:3])
        most_closed = ", ".join(f"layer {i} head {h} ({v:.3f})" for v, i, h in cells[:3])
        spread = max(layers, key=lambda layer: max(layer["mean"]) - min(layer["mean"]))
        lines += [f"## Head gates on {role} (Eq. 5)", "",
                  "Most open: " + most_open + ".",
                  "Most closed: " + most_closed + ".",
                  f"Widest spread between heads: layer {spread['layer']} "
                  f"({min(spread['mean']):.3f} to {max(spread['mean']):.3f}).", "",
                  "| layer | mean | lowest head | highest head "
                  "| std within sequences (mean over heads) |",
                  "|---|---|---|---|---|"]
        for layer in layers:
            means = layer["mean"]
            low = min(range(len(means)), key=means.__getitem__)
            high = max(range(len(means)), key=means.__getitem__)
            std = sum(layer["std"]) / len(layer["std"])  # within sequences, mean over heads
            lines.append(f"| {layer['layer']} | {sum(means) / len(means):.3f} | "
                         f"{low} ({means[low]:.3f}) | {high} ({means[high]:.3f}) | {std:.3f} |")
        lines.append("")
    for role, layers in everything["ffn"].items():
        most = max(layers, key=lambda layer: layer["zero_fraction"])
        least = min(layers, key=lambda layer: layer["zero_fraction"])
        lines += [f"## FFN gates on {role} (Eq. 7)", "",
                  "The gate is exactly 0 (the feature keeps its pre-trained value) for "
                  f"{most['zero_fraction']:.1%} of token-features in layer {most['layer']}, "
                  f"the most, and {least['zero_fraction']:.1%} in layer {least['layer']}, "
                  "the fewest.", "",
                  "| layer | zero fraction | mean magnitude | α |", "|---|---|---|---|"]
        for layer in layers:
            alpha = f"{layer['alpha']:.3f}" if "alpha" in layer else "-"
            lines.append(f"| {layer['layer']} | {layer['zero_fraction']:.3f} | "
                         f"{layer['mean_magnitude']:.4f} | {alpha} |")
        lines.append("")
    if len(groups) > 1:
        lines += ["## Between datasets", ""]
        for role, layers in everything["heads"].items():
            differences = []
            for position, layer in enumerate(layers):
                for h in range(len(layer["mean"])):
                    values = {g: statistics[g]["heads"][role][position]["mean"][h] for g in groups}
                    gap = max(values.values()) - min(values.values())
                    differences.append((gap, layer["layer"], h, values))
            gap, index, h, values = max(differences, key=lambda d: d[0])
            lines.append(f"- {role}: layer {index} head {h} differs most ({gap:.3f}): "
                         + ", ".join(f"{g} {v:.3f}" for g, v in values.items()) + ".")
        for role, layers in everything["ffn"].items():
            values = {}
            for g in groups:
                zero_fractions = [layer["zero_fraction"] for layer in statistics[g]["ffn"][role]]
                values[g] = sum(zero_fractions) / len(layers)

            lines.append(f"- FFN {role}, zero fraction over all layers: "
                         + ", ".join(f"{g} {v:.3f}" for g, v in values.items()) + ".")
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------- pictures

def draw(folder, statistics, steps, logs):
    """Every picture as PNG and SVG; the names written, or None without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # files only, no screen
    import matplotlib.pyplot as plt

    written = []
    for name, figure in figures(statistics, steps, logs).items():
        for suffix in ("png", "svg"):
            picture = io.BytesIO()  # drawn in memory, then written atomically like every output
            figure.savefig(picture, format=suffix, dpi=100)
            runs.write_atomically(folder / f"{name}.{suffix}",
                                  lambda f: f.write(picture.getvalue()), binary=True)
            written.append(f"{name}.{suffix}")
        plt.close(figure)
    return written


def marker(points):
    """A curve of a few points gets a dot at each (one logged step is a dot, not nothing)."""
    return "o" if points <= 50 else None


def alpha_limits(values):
    """α's axis starts at 0 (or below, for a negative α): a 2% change must look like 2%."""
    low, high = min(0.0, *values), max(0.0, *values)
    return (low * 1.1, high * 1.1) if high > low else (-1.0, 1.0)


def legend_below(figure, lines):
    """One legend for the lines of both y axes, under the plot: inside it, the twin axis (drawn
    last) would cover it, and it would cover the curves."""
    figure.legend(handles=lines, loc="outside lower center", ncols=len(lines))


def figures(statistics, steps, logs):
    """{name: matplotlib figure} of every picture. Gates live in [0, 1] (a sigmoid, or a fraction
    of zeros), so their axes and colour scales are 0 to 1 on every picture: two maps compare by
    colour, and a small change looks small."""
    import matplotlib.pyplot as plt

    drawn = {}
    everything = statistics["all"]
    for role, layers in everything["heads"].items():
        figure, axes = plt.subplots(figsize=PICTURE_SIZE)
        means = torch.tensor([layer["mean"] for layer in layers], dtype=torch.float64)
        means = means.numpy()  # (layers, heads), the values of gates.json exactly
        image = axes.imshow(means, aspect="auto", cmap="viridis", origin="lower", vmin=0, vmax=1,
                            extent=(-0.5, means.shape[1] - 0.5, -0.5, means.shape[0] - 0.5))
        axes.set(xlabel="head", ylabel="layer", title=f"mean head gate on {role} (Eq. 5)")
        axes.set_yticks(range(means.shape[0]), [layer["layer"] for layer in layers])
        if means.shape[1] <= 64:
            axes.set_xticks(range(means.shape[1]))
        figure.colorbar(image, ax=axes, label="gate (one 0-1 scale on every map)")
        drawn[f"heads-{role}"] = figure
    for role, layers in everything["ffn"].items():
        figure, axes = plt.subplots(figsize=PICTURE_SIZE, layout="constrained")
        index = [layer["layer"] for layer in layers]
        lines = axes.plot(index, [layer["zero_fraction"] for layer in layers], "o-",
                          color="tab:blue", label="fraction of gates exactly 0")
        axes.set(xlabel="layer", ylabel="fraction of gates exactly 0",
                 title=f"FFN gate on {role} (Eq. 7)", ylim=(0, 1))
        if "alpha" in layers[0]:
            alphas = [layer["alpha"] for layer in layers]
            twin = axes.twinx()
            lines += twin.plot(index, alphas, "s--", color="tab:red", label="α")
            twin.set(ylabel="α", ylim=alpha_limits(alphas))
            twin.yaxis.label.set_color("tab:red")
            twin.ticklabel_format(axis="y", useOffset=False)
        axes.set_xticks(index)
        legend_below(figure, lines)
        drawn[f"ffn-{role}"] = figure
    logged = [r for r in steps if "gates" in r]
    if logged:
        figure, axes = plt.subplots(figsize=PICTURE_SIZE, layout="constrained")
        axes.set(xlabel="step", ylabel="gate, or fraction of FFN gates exactly 0", ylim=(0, 1),
                 title="gates over training (one batch per logged step)")
        step_numbers, lines, twin, alphas = [r["step"] for r in logged], [], None, []
        for colour, key in enumerate(logged[0]["gates"]):
            values = [r["gates"][key] for r in logged]
            if key.endswith("_alpha"):  # α is about 10, the gates below 1: its own axis
                if twin is None:
                    twin = axes.twinx()
                alphas += values
                lines += twin.plot(step_numbers, values, "--", marker=marker(len(values)),
                                   color=f"C{colour}", label=key)
            else:
                lines += axes.plot(step_numbers, values, marker=marker(len(values)),
                                   color=f"C{colour}", label=key)
        if twin is not None:
            twin.set(ylabel="α (dashed)", ylim=alpha_limits(alphas))
            twin.ticklabel_format(axis="y", useOffset=False)
        legend_below(figure, lines)
        drawn["gates-over-steps"] = figure
    figure, (loss_axes, lr_axes) = plt.subplots(2, 1, figsize=PICTURE_SIZE, sharex=True)
    for folder_of_run, records in logs:
        step_numbers = [r["step"] for r in records]
        style = dict(marker=marker(len(records)), markersize=3, label=folder_of_run.name)
        loss_axes.plot(step_numbers, [r["loss"] for r in records], **style)
        lr_axes.plot(step_numbers, [r["lr"] for r in records], **style)
    loss_axes.set(ylabel="loss", title="training loss")
    lr_axes.set(xlabel="step", ylabel="learning rate")
    lr_axes.set_ylim(bottom=0)
    loss_axes.legend()
    drawn["loss"] = figure
    return drawn


def main(argv=None):
    return runs.run_command(lambda argv: report(parse_settings(argv)), argv,
                            errors=(CheckpointError, DataError, *adapters.ERRORS, NotEnoughMemory))


if __name__ == "__main__":
    main()
