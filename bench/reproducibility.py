"""What MKL's reproducible mode costs: train.py with MKL_CBWR=AUTO (what train.py and eval.py set)
and with it off, the same run in alternation, on this CPU.

    python bench/reproducibility.py                      # LLaMA-shaped, dim 512, 8 layers, real math data
    python bench/reproducibility.py --dim 128 --layers 4 --steps 20 --repeats 3

Writes a random LLaMA of the given shape in Meta's layout (params.json, consolidated.00.pth,
the sentencepiece tokenizer.model beside it) to a temporary folder, then runs the real command

    python train.py --model FOLDER --task math --max_steps STEPS --grad_accum 1 --dtype fp32 --out_dir ...

with MKL_CBWR=AUTO and with MKL_CBWR= (empty: MKL's default, alignment-dependent kernels),
alternating, REPEATS times each, and compares the median tokens/s of their steps (the first
STEPS // 4 of each run are warm-up). Other process settings are the same for both.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from model import ModelConfig, Transformer  # noqa: E402


def write_model(folder, dim, layers, heads, tokenizer):
    """A random LLaMA in Meta's layout: our module names are Meta's, so the state dict is the file."""
    params = {"dim": dim, "n_layers": layers, "n_heads": heads, "multiple_of": 256, "norm_eps": 1e-5,
              "vocab_size": 32000}
    multiple_of = params["multiple_of"]
    ffn_dim = multiple_of * ((int(2 * 4 * dim / 3) + multiple_of - 1) // multiple_of)
    config = ModelConfig(vocab_size=32000, dim=dim, n_layer=layers, n_head=heads, ffn_dim=ffn_dim)
    torch.manual_seed(0)
    folder.mkdir(parents=True)
    torch.save(Transformer(config).state_dict(), folder / "consolidated.00.pth")
    (folder / "params.json").write_text(json.dumps(params))
    shutil.copy(tokenizer, folder.parent / "tokenizer.model")
    return sum(p.numel() for p in Transformer(config).parameters())


def tokens_per_s(log, warmup):
    rows = [json.loads(line) for line in log.read_text().splitlines()][warmup:]
    return statistics.median(row["tokens_per_s"] for row in rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run (one micro-batch of 4 each)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each setting, alternating")
    parser.add_argument("--data_dir", default=str(ROOT.parent / "shared/data/llm-adapters"))
    parser.add_argument("--tokenizer", default=str(ROOT.parent / "shared/data/spm-tokenizer/tokenizer.model"))
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "llama" / "model"
        n_params = write_model(folder, args.dim, args.layers, args.heads, args.tokenizer)
        rates = {"AUTO": [], "": []}
        for repeat in range(args.repeats):
            for setting in rates:
                out = Path(scratch) / f"run-{setting or 'off'}-{repeat}"
                command = [sys.executable, str(ROOT / "train.py"), "--model", str(folder), "--task", "math",
                           "--max_steps", str(args.steps), "--grad_accum", "1", "--dtype", "fp32",
                           "--gate_log_every", "0",
                           "--data_dir", args.data_dir, "--out_dir", str(out)]
                result = subprocess.run(command, capture_output=True, text=True, env=os.environ | {"MKL_CBWR": setting})
                if result.returncode:
                    sys.exit(f"train.py failed: {result.stderr.strip().splitlines()[-1]}")
                rates[setting].append(tokens_per_s(out / "log.jsonl", args.steps // 4))
                print(f"MKL_CBWR={setting or '(off)':5s} run {repeat + 1}: {rates[setting][-1]:,.0f} tokens/s")
    on, off = statistics.median(rates["AUTO"]), statistics.median(rates[""])
    print(f"\nLLaMA-shaped, dim {args.dim}, {args.layers} layers, {args.heads} heads, {n_params / 1e6:.0f}M parameters, "
          f"fp32, torch {torch.__version__}, {torch.get_num_threads()} threads; {args.repeats} alternating runs of "
          f"{args.steps} steps each")
    print("| MKL_CBWR | tokens/s (median) | relative |\n|---|---|---|")
    print(f"| AUTO (train.py's) | {on:,.0f} | {on / off:.3f} |")
    print(f"| off | {off:,.0f} | 1.000 |")


if __name__ == "__main__":
    main()
