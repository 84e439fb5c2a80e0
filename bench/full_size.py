"""A full-size LLaMA-7B on this machine: load time and peak memory per dtype, then the real commands.

    python bench/full_size.py --folder /tmp/llama/7B                # write 13.5 GB, measure, delete
    python bench/full_size.py --folder /tmp/llama/7B --steps load   # loading only, through the Python API
    python bench/full_size.py --folder /tmp/llama/7B --keep         # keep the folder for another run
    python bench/full_size.py --folder /tmp/llama/7B --settings fp32,bf16,bf16+int8   # without nf4

It writes a random LLaMA-7B in the layout of Meta's download (13.5 GB of disk, and 13.5 GB of
memory while writing; both are checked first):

    <folder>/params.json           LLaMA-1's: dim 4096, 32 layers, 32 heads, multiple_of 256, vocab_size -1
    <folder>/consolidated.00.pth   fp16, weights N(0, 0.02), norm weights 1: finite, not meaningful
    <folder>/../tokenizer.model    copied from --tokenizer, where Meta's download keeps it

then, for each setting (fp32; bf16; bf16 with int8 weights; bf16 with nf4 weights), runs in a
fresh process each:

    load    memory.check_memory, then checkpoints.load_model(folder, dtype, quantize)   (the Python API)
    eval    python eval.py --base --model llama-7b --task math --checkpoint_dir DIR --datasets SVAMP
              --limit 2 --max_new_tokens 4 --dtype X [--quantize K] --out_dir OUT
    train   python train.py --model llama-7b --task math --checkpoint_dir DIR --max_steps 1
              --micro_batch_size 1 --grad_accum 1 --cutoff_len 32 --dtype X [--quantize K] --out_dir OUT

fp32 (25.1 GiB of weights) must be refused up front by the memory check on a 24 GB machine.
Wall time is the parent's clock around each child; peak RSS is the child's ru_maxrss, from
os.wait4. Linux starts a child's count at its parent's RSS at the fork, so the model is
written in a child too and this parent stays near 0.3 GiB, below any child that imports torch.
Each child's output goes to <out>/<setting>-<step>.log. Prints a Markdown table.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as python bench/full_size.py
from machinery import memory  # noqa: E402
from machinery.checkpoints import load_model, model_config  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402

GiB = 2 ** 30
SETTINGS = [("fp32", None), ("bf16", None), ("bf16", "int8"), ("bf16", "nf4")]
PROMPTS, PROMPT_TOKENS = 2, 300  # eval's 2 SVAMP prompts: about 300 tokens each with the paper's header


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--folder", required=True, help="where to write the model (Meta's layout: .../7B)")
    parser.add_argument("--tokenizer", default=str(ROOT.parent / "shared/data/spm-tokenizer/tokenizer.model"),
                        help="a sentencepiece tokenizer.model to copy beside the folder (default: "
                             "../shared/data/spm-tokenizer/tokenizer.model from the repository)")
    parser.add_argument("--data_dir", default="data", help="LLM-Adapters data for eval.py and train.py")
    parser.add_argument("--out", default="out/bench/full_size", help="logs and train.py's output folders")
    parser.add_argument("--steps", default="load,eval,train", help="which of load, eval, train to run")
    parser.add_argument("--settings", default="fp32,bf16,bf16+int8,bf16+nf4",
                        help="which of fp32, bf16, bf16+int8, bf16+nf4 to run (nf4 loads slowly on a CPU)")
    parser.add_argument("--keep", action="store_true", help="keep the folder afterwards (default: delete it)")
    parser.add_argument("--seed", type=int, default=0)
    # internal: the child processes that write the model and measure one load
    parser.add_argument("--write_child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--load_child", nargs=2, metavar=("DTYPE", "QUANTIZE"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------- writing the model

META_PARAMS = {"dim": "dim", "n_heads": "n_head", "n_layers": "n_layer", "norm_eps": "norm_eps"}


def write_meta_llama(folder, config, tokenizer, multiple_of=256, seed=0):
    """Write a random LLaMA of `config` as Meta's download lays it out (see the top); returns the bytes written."""
    folder = Path(folder)
    # params.json gives no FFN width: Meta's rule 2/3 * 4 * dim rounded up to multiple_of must give the config's
    meta_ffn = multiple_of * -(-int(2 * 4 * config.dim / 3) // multiple_of)
    if config.family != "llama" or meta_ffn != config.ffn_dim:
        raise ValueError(f"params.json cannot describe {config}: expected a LLaMA with ffn_dim {meta_ffn}")
    folder.mkdir(parents=True, exist_ok=True)
    params = {key: getattr(config, field) for key, field in META_PARAMS.items()}
    params.update(multiple_of=multiple_of, vocab_size=-1)  # LLaMA-1's params.json; the embedding knows the vocab
    (folder / "params.json").write_text(json.dumps(params) + "\n")
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in Transformer(config).state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            state[name] = torch.ones(shape, dtype=torch.float16)
        else:
            state[name] = torch.empty(shape, dtype=torch.float16).normal_(0, 0.02, generator=generator)
    torch.save(state, folder / "consolidated.00.pth")
    shutil.copy(tokenizer, folder.parent / "tokenizer.model")
    return (folder / "consolidated.00.pth").stat().st_size


def check_room(folder, file_bytes):
    """Refuse before writing when the disk or the memory (the whole state dict is built first) is short."""
    parent = Path(folder).resolve()
    while not parent.exists():
        parent = parent.parent
    free_disk = shutil.disk_usage(parent).free
    available = memory.memory_available("cpu")
    print(f"writing a random LLaMA-7B: {file_bytes / 1e9:.1f} GB to {folder} ({free_disk / 1e9:.1f} GB free), "
          f"holding {file_bytes / GiB:.1f} GiB in memory while writing ({(available or 0) / GiB:.1f} GiB available)")
    if free_disk < file_bytes + 2 ** 30:
        sys.exit(f"error: {folder} needs {file_bytes / 1e9:.1f} GB of free disk, found {free_disk / 1e9:.1f} GB: "
                 "choose a --folder on a bigger disk")
    if available is not None and available < file_bytes + 2 * GiB:
        sys.exit(f"error: writing needs {file_bytes / GiB + 2:.1f} GiB of free memory, found {available / GiB:.1f} "
                 "GiB: stop other programs first")


# ----------------------------------------------------------------------------- measuring

def load_child(folder, dtype, quantize):
    """In a fresh process: the memory check, then the load, as train.py / eval.py will do it."""
    quantize = None if quantize == "none" else quantize
    config, folder = model_config(folder)
    try:
        memory.check_memory(config, "cpu", dtype, quantize, batch_size=PROMPTS, seq_len=PROMPT_TOKENS)
    except memory.NotEnoughMemory as e:
        print(json.dumps({"refused": str(e)}))
        return
    start = time.perf_counter()
    model = load_model(str(folder), dtype=memory.DTYPES[dtype], quantize=quantize)
    seconds = time.perf_counter() - start
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    rss = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmRSS:"))
    print(json.dumps({"load_s": seconds, "model_bytes": model_bytes, "rss_after_load": rss}))


def run(command, log_path):
    """Run a child; its wall time, its own peak RSS (os.wait4), return code and last output line."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    lines = Path(log_path).read_text().strip().splitlines() or [""]
    return {"seconds": time.perf_counter() - start, "peak_rss": usage.ru_maxrss * 1024,  # Linux: KiB
            "returncode": process.returncode, "last_line": lines[-1][:300]}


def commands(args, step, dtype, quantize, out):
    flags = ["--dtype", dtype] + (["--quantize", quantize] if quantize else [])
    if step == "load":
        return [sys.executable, __file__, "--folder", args.folder, "--load_child", dtype, quantize or "none"]
    common = ["--model", "llama-7b", "--task", "math", "--checkpoint_dir", args.folder, "--data_dir", args.data_dir]
    if step == "eval":
        return [sys.executable, "eval.py", "--base", *common, "--datasets", "SVAMP", "--limit", "2",
                "--max_new_tokens", "4", *flags, "--out_dir", str(out / f"eval-{dtype}-{quantize or 'none'}")]
    return [sys.executable, "train.py", *common, "--max_steps", "1", "--micro_batch_size", "1", "--grad_accum", "1",
            "--cutoff_len", "32", *flags, "--out_dir", str(out / f"train-{dtype}-{quantize or 'none'}")]


def describe(step, result):
    """One table cell: what happened, in a few words."""
    if step == "load" and result["returncode"] == 0:
        child = json.loads(result["last_line"])
        if "refused" in child:
            return "refused: " + child["refused"].split(" (")[0]
        return (f"{child['load_s']:.0f} s to load, {child['model_bytes'] / GiB:.1f} GiB of weights, RSS after "
                f"{child['rss_after_load'] / GiB:.1f} GiB")
    return "ok" if result["returncode"] == 0 else f"exit {result['returncode']}: {result['last_line']}"


def main(argv=None):
    args = parse_args(argv)
    if args.load_child:
        return load_child(args.folder, *args.load_child)
    if args.write_child:
        return write_meta_llama(args.folder, ModelConfig.from_name("llama-7b"), args.tokenizer, seed=args.seed)
    steps = [step for step in args.steps.split(",") if step]
    unknown = set(steps) - {"load", "eval", "train"}
    if unknown:
        sys.exit(f"error: unknown --steps {', '.join(sorted(unknown))}: choose among load, eval, train")
    names = {dtype + (f"+{quantize}" if quantize else ""): (dtype, quantize) for dtype, quantize in SETTINGS}
    unknown = [name for name in args.settings.split(",") if name not in names]
    if unknown:
        sys.exit(f"error: unknown --settings {', '.join(unknown)}: choose among {', '.join(names)}")
    settings = [names[name] for name in args.settings.split(",")]
    if not Path(args.tokenizer).is_file():
        sys.exit(f"error: tokenizer {args.tokenizer} not found: pass --tokenizer path/to/tokenizer.model")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    folder = Path(args.folder)
    if (folder / "consolidated.00.pth").exists():
        print(f"using the model already in {folder}")
    else:
        check_room(folder, sum(memory.weight_bytes(ModelConfig.from_name("llama-7b"), "fp16").values()))
        result = run([sys.executable, __file__, "--folder", args.folder, "--tokenizer", args.tokenizer, "--seed",
                      str(args.seed), "--write_child"], out / "write.log")
        if result["returncode"]:
            sys.exit(f"error: writing the model failed: {result['last_line']} (see {out / 'write.log'})")
        print(f"wrote {(folder / 'consolidated.00.pth').stat().st_size / 1e9:.1f} GB in {result['seconds']:.0f} s, "
              f"peak RSS {result['peak_rss'] / GiB:.1f} GiB")

    rows = []
    try:
        for dtype, quantize in settings:
            row = {"setting": dtype + (f" + {quantize}" if quantize else "")}
            for step in steps:
                log = out / f"{dtype}-{quantize or 'none'}-{step}.log"
                shutil.rmtree(out / f"{step}-{dtype}-{quantize or 'none'}", ignore_errors=True)  # an earlier run's
                result = run(commands(args, step, dtype, quantize, out), log)
                row[step] = result | {"what": describe(step, result)}
                print(f"{row['setting']:12s} {step:5s} {result['seconds']:6.0f} s  peak RSS "
                      f"{result['peak_rss'] / GiB:5.1f} GiB  {row[step]['what']}")
            rows.append(row)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
            print(f"deleted {folder} (pass --keep to keep it)")

    print()
    print(f"LLaMA-7B, random fp16 weights in Meta's layout ({folder}); CPU, {torch.get_num_threads()} threads, "
          f"{(memory.memory_available('cpu') or 0) / GiB:.1f} GiB available now")
    header = ["setting"] + [f"{step} {what}" for step in steps for what in ("s", "peak RSS GiB")] + ["notes"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        cells = [row["setting"]]
        for step in steps:
            cells += [f"{row[step]['seconds']:.0f}", f"{row[step]['peak_rss'] / GiB:.1f}"]
        cells.append("; ".join(f"{step}: {row[step]['what']}" for step in steps))
        print("| " + " | ".join(cells) + " |")
    return rows


if __name__ == "__main__":
    main()
