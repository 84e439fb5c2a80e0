"""The machinery behind the commands: what a reader of the method need not open.

    checkpoints.py   Meta's and Hugging Face's checkpoint folders read into model.py's Transformer
    quantize.py      the int8 / nf4 frozen base
    memory.py        what a run needs, checked before any weight is read
    distributed.py   torchrun: data-parallel training, a sharded base, sharded evaluation
    runs.py          command lines, one-line errors, output folders, atomic files
    adapters.py      one adapter file for every method (InterLoRA, LoRA, Adapter, Prefix)
    peft_export.py   a LoRA adapter file written in PEFT's format (python -m machinery.peft_export)
    gates.py         the gate statistics of the report and of the training log
    download.py      the LLM-Adapters data files, pinned and checked
"""
