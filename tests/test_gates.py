"""The gate report (gates.py, report.py): its numbers are Eq. 5 and Eq. 7 computed directly,
padding stays out of them, every picture is a real image, and every variant gets a report
that fits it (or one clear line when it has no gates)."""
import json
import math
import struct
import sys
import xml.etree.ElementTree as ElementTree

import pytest
import torch
import torch.nn.functional as F

from machinery.adapters import default_targets
from machinery import gates
import interlora
import report
import train as train_script
from conftest import read_jsonl
from machinery.checkpoints import load_model

SHORT = ["--model", "tiny", "--task", "math", "--micro_batch_size", "2", "--grad_accum", "2", "--lr", "1e-2",
         "--warmup_steps", "1", "--cutoff_len", "320", "--max_steps", "4", "--gate_log_every", "2"]


def gated_tiny(variant="interlora", pool="mean", name="tiny"):
    """A tiny model with random gates (trained gates are not at their initial values either)."""
    model = load_model(name)
    interlora.add_interlora(model, interlora.InterLoRAConfig(**interlora.VARIANTS[variant], gate_pool=pool), default_targets(model))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "gate_" in n:
                p.copy_(torch.randn_like(p) + (10.0 if n.endswith("gate_scale") else 0.0))
    return model.eval()


def prompts():
    torch.manual_seed(2)
    return [torch.randint(3, 259, (length,)).tolist() for length in (5, 11, 8, 3)]


def right_padded(batch):
    T = max(map(len, batch))
    idx = torch.zeros(len(batch), T, dtype=torch.long)
    mask = torch.zeros(len(batch), T, dtype=torch.bool)
    for row, ids in enumerate(batch):
        idx[row, :len(ids)], mask[row, :len(ids)] = torch.tensor(ids), True
    return idx, mask


def inputs_alone(model, ids):
    """{module name: the input its frozen linear layer received}, for one prompt run alone (no padding)."""
    seen, hooks = {}, []
    for name, module in model.named_modules():
        if isinstance(module, interlora.InterLoRALinear):
            hooks.append(module.base.register_forward_pre_hook(
                lambda m, args, name=name: seen.__setitem__(name, args[0][0].detach())))
    with torch.no_grad():
        model(torch.tensor([ids]))
    for hook in hooks:
        hook.remove()
    return seen


@pytest.mark.parametrize("pool", ["mean", "causal"])
@pytest.mark.parametrize("name", ["tiny", "tiny-gptj"])
def test_statistics_are_equations_5_and_7_and_padding_stays_out(name, pool):
    model = gated_tiny(pool=pool, name=name)
    with torch.no_grad(), gates.GateRecorder(model) as recorder:
        idx, mask = right_padded(prompts()[:2])  # two batches, both padded
        model(idx, attention_mask=mask)
        idx, mask = right_padded(prompts()[2:])
        model(idx, attention_mask=mask)
    statistics = recorder.statistics()["all"]

    alone = [inputs_alone(model, ids) for ids in prompts()]
    modules = dict(model.named_modules())
    for role, layers in statistics["heads"].items():
        for layer in layers:
            module_name = next(n for n in alone[0] if f".{layer['layer']}." in f".{n}" and
                               n.endswith({"q": "wq", "v": "wv"}[role]))
            m = modules[module_name]
            w_att, w_h = m.gate_in.weight.T, m.gate_out.weight.T  # (d, 1), (1, heads)
            values = []
            for seen in alone:
                s = torch.sigmoid(seen[module_name] @ w_att @ w_h)  # Eq. 5 before pooling: (T, heads)
                if pool == "mean":
                    values.append(s.mean(0, keepdim=True))  # the mean over the sentence
                else:
                    values.append(s.cumsum(0) / torch.arange(1, len(s) + 1)[:, None])  # the mean so far
            values = torch.cat(values)  # (sequences or tokens, heads)
            assert layer["values"] == len(values)
            assert torch.allclose(torch.tensor(layer["mean"]), values.mean(0), atol=1e-6)
            assert torch.allclose(torch.tensor(layer["std"]), values.std(0, correction=0), atol=1e-5)
            for q in (0.1, 0.5, 0.9):  # the smallest value with at least q of the values at or below it ...
                exact = values.sort(0).values[math.ceil(q * len(values)) - 1]
                # ... is given as the upper edge of its 0.01-wide histogram bin
                assert ((torch.tensor(layer[f"p{int(q * 100)}"]) - exact) >= -1e-6).all()
                assert ((torch.tensor(layer[f"p{int(q * 100)}"]) - exact) <= 0.01 + 1e-6).all()
    for role, layers in statistics["ffn"].items():
        for layer in layers:
            module_name = next(n for n in alone[0] if f".{layer['layer']}." in f".{n}" and n.endswith("w2"))
            m = modules[module_name]
            g = torch.cat([m.gate_scale * F.relu(seen[module_name] @ m.gate_in.weight.T @ m.gate_out.weight.T)
                           for seen in alone])  # Eq. 7 at every real token: (tokens, d_model)
            assert layer["values"] == g.numel()
            assert layer["zero_fraction"] == int((g == 0).sum()) / g.numel()  # exactly: counts of exact zeros
            assert layer["mean_magnitude"] == pytest.approx(float(g.abs().mean()), rel=1e-5)
            assert layer["alpha"] == pytest.approx(float(m.gate_scale))


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def svg_size(path):
    root = ElementTree.parse(path).getroot()
    assert root.tag.endswith("svg")
    return root.get("width"), root.get("height")


@pytest.fixture
def trained(data_dir, tmp_path):
    """An InterLoRA run and a LoRA run of a few steps, with gate summaries in the InterLoRA log."""
    for method in ("interlora", "lora"):
        train_script.main([*SHORT, "--method", method, "--data_dir", str(data_dir), "--out_dir", str(tmp_path / method)])
    return tmp_path


def test_the_report_writes_every_number_and_every_picture(trained, data_dir, capsys):
    log = read_jsonl(trained / "interlora" / "log.jsonl")
    assert [r["step"] for r in log if "gates" in r] == [2, 4]  # every --gate_log_every steps, and the last
    assert set(log[-1]["gates"]) == {"q_gate", "v_gate", "down_zero_fraction", "down_alpha"}

    out = trained / "report"
    report.main(["--adapter", str(trained / "interlora" / "adapter.pt"), "--data_dir", str(data_dir),
                 "--datasets", "AddSub,SVAMP", "--limit", "5", "--runs", str(trained / "lora"), "--out_dir", str(out)])
    saved = json.loads((out / "gates.json").read_text())
    assert set(saved["statistics"]) == {"AddSub", "SVAMP", "all"}
    assert [len(saved["statistics"]["all"]["heads"][role]) for role in ("q", "v")] == [4, 4]  # 4 layers each
    assert len(saved["statistics"]["all"]["heads"]["q"][0]["mean"]) == 4  # 4 heads
    assert [step["step"] for step in saved["steps"]] == [2, 4]
    summary = (out / "gates.md").read_text()
    assert "## Head gates on q (Eq. 5)" in summary and "## FFN gates on down (Eq. 7)" in summary
    assert "## Between datasets" in summary
    for name in ("heads-q", "heads-v", "ffn-down", "gates-over-steps", "loss"):  # one per figure, PNG and SVG
        assert png_size(out / f"{name}.png") == (800, 500), name
        assert svg_size(out / f"{name}.svg") == ("576pt", "360pt"), name
    loss_svg = (out / "loss.svg").read_text()
    assert "interlora" in loss_svg and "lora" in loss_svg  # both runs' curves, labelled by folder


@pytest.mark.parametrize("variant, pictures, absent", [
    ("no-attention-gate", {"ffn-down"}, "no head gates"),
    ("no-ffn-gate", {"heads-q", "heads-v"}, "no FFN gate"),
    ("interlora-star", {"heads-q", "heads-v", "ffn-down"}, None),
    ("ffn-up", {"heads-q", "heads-v", "ffn-up"}, None),
])
def test_each_gated_variant_gets_the_report_that_fits_it(data_dir, tmp_path, variant, pictures, absent):
    run = tmp_path / variant
    train_script.main([*SHORT, "--method", variant, "--data_dir", str(data_dir), "--out_dir", str(run)])
    report.main(["--adapter", str(run / "adapter.pt"), "--data_dir", str(data_dir), "--datasets", "AddSub",
                 "--limit", "3", "--out_dir", str(tmp_path / "report")])
    drawn = {p.stem for p in (tmp_path / "report").glob("*.png")} - {"loss", "gates-over-steps"}
    assert drawn == pictures
    summary = (tmp_path / "report" / "gates.md").read_text()
    if absent:
        assert absent in summary
    statistics = json.loads((tmp_path / "report" / "gates.json").read_text())["statistics"]["all"]
    if variant == "interlora-star":  # a sigmoid is never exactly 0, and there is no α
        assert statistics["ffn"]["down"][0]["zero_fraction"] == 0 and "alpha" not in statistics["ffn"]["down"][0]


def test_an_adapter_without_gates_is_one_clear_line(trained, data_dir, capsys):
    with pytest.raises(SystemExit) as stop:
        report.main(["--adapter", str(trained / "lora" / "adapter.pt"), "--data_dir", str(data_dir)])
    assert stop.value.code == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: ") and "has no gates (method lora)" in line and "\n" not in line


def test_without_matplotlib_the_tables_are_still_written(trained, data_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    out = trained / "report"
    report.main(["--adapter", str(trained / "interlora" / "adapter.pt"), "--data_dir", str(data_dir),
                 "--datasets", "AddSub", "--limit", "2", "--out_dir", str(out)])
    assert (out / "gates.json").exists() and (out / "gates.md").exists() and not list(out.glob("*.png"))
    assert "pictures need matplotlib" in capsys.readouterr().out
