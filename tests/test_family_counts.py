"""bench/families.py's parameter counts (meta device): ours and the closed form agree, the base
has transformers' parameter count for the same config.json, and LoRA's count is PEFT's."""
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from bench import families
from conftest import ROOT
from machinery import adapters


def meta_model(hf_config):
    """transformers' model of the config, on the meta device (no memory, no time)."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config)


@pytest.mark.parametrize("name", ["Llama-3.2-1B", "Qwen2.5-7B"])  # tied; q/k/v biases, 4 kv heads
def test_counts_agree_two_ways_and_with_transformers_and_peft(name):
    config = families.model_config(name)
    hf_config = AutoConfig.for_model(**families.CONFIGS[name])
    hf_model = meta_model(hf_config)
    counts = {}
    for method in families.METHODS:
        counts[method], frozen = families.counted(config, method)
        assert counts[method] == families.closed_form(config, adapters.make_config(method))
        assert frozen == sum(p.numel() for p in hf_model.parameters())  # tied: once in both
    peft = get_peft_model(hf_model, LoraConfig(r=10, target_modules=["q_proj", "v_proj"]))
    assert counts["lora"] == sum(p.numel() for p in peft.parameters() if p.requires_grad)
    # InterLoRA: PEFT's LoRA r=4 on the same three matrices, plus the gates of Eq. 5 and 7
    gates = config.n_layer * (2 * config.dim + config.n_head + config.n_kv_heads  # q, v
                              + config.ffn_dim + config.dim + 1)                  # down, alpha
    lora4 = get_peft_model(meta_model(hf_config),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    assert counts["interlora"] == gates + sum(
        p.numel() for p in lora4.parameters() if p.requires_grad)


def test_the_table_has_every_family_and_the_readme_gives_it():
    rows = list(families.rows())
    table = families.table(rows)
    assert [row["model"] for row in rows] == list(families.CONFIGS)
    assert "!=" not in table and len(table.splitlines()) == 2 + len(rows)
    readme = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    missing = [line for line in table.splitlines() if line not in readme]
    assert not missing, f"the README's table is not what python bench/families.py prints: {missing}"
    for row in rows:  # nf4 weights are smaller, and the total holds the weights
        assert sum(row["nf4"].values()) < sum(row["bf16"].values())
        assert row["bf16"]["weights"] < sum(row["bf16"].values())
