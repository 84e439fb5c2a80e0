"""Several processes, one run: data-parallel training and sharded evaluation on torch.distributed.

    torchrun --standalone --nproc_per_node 2 train.py ...   each process holds the frozen base and
                                                             trains on its share of every batch
    torchrun ... train.py ... --shard_base                   each holds 1/N of every block (FSDP2)
    torchrun --standalone --nproc_per_node 2 eval.py ...     each generates every N-th batch

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE. Without them (a plain `python train.py`),
start() returns None and nothing else here runs. The adapters are small, so every process
keeps them whole, also when the base is sharded: each process computes the gradients of its
share of the micro-batches and one all-reduce sums them before the optimizer step, so every
process takes the same step and holds the same adapters. Only rank 0 prints and writes files.
"""
import os
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from machinery import runs
from machinery.runs import RunError


class PeerLost(RunError):
    """Another process of the run stopped or died: the collective this one waited in failed."""


@dataclass
class Group:
    rank: int
    world_size: int
    device: str

    @property
    def main(self):
        return self.rank == 0


def start(device):
    """Join the process group of a torchrun launch; None for a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return None
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"  # one GPU per process
        torch.cuda.set_device(device)
    # a peer that died makes the others fail in their next collective; 10 minutes covers a slow save
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=timedelta(minutes=10))
    if rank:
        sys.stdout = open(os.devnull, "w")  # one set of messages and one progress bar: rank 0's
    # torchrun sends SIGTERM to the others when one process fails, and passes on a SIGTERM it gets
    # itself (a scheduler's preemption): the two are told apart by whether a peer has gone
    signal.signal(signal.SIGTERM, _on_sigterm)
    return Group(rank, world_size, device)


def _on_sigterm(signum, frame):
    if _a_peer_is_gone():
        raise KeyboardInterrupt("torchrun stopped this process because another process of the "
                                "run failed")
    runs.stop_signal(signum, frame)  # a clean stop, as for a single process


def _a_peer_is_gone():
    """Whether a process of this launch on this machine has ended. torchrun reaps a failed process
    before it stops the others, so with all LOCAL_WORLD_SIZE of them still alive the SIGTERM came
    to torchrun itself. Without /proc (not Linux) a peer is taken to have failed, as before."""
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return True
    parent, alive = os.getppid(), 0
    for entry in entries:
        try:
            with open(f"/proc/{entry}/stat") as f:
                # "pid (name) state ppid ...": the name may hold spaces and parentheses
                state, ppid = f.read().rpartition(")")[2].split()[:2]
        except (OSError, ValueError):
            continue  # it ended meanwhile
        alive += int(ppid) == parent and state not in ("Z", "X")
    return alive < int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def finish(group):
    if group is not None and dist.is_initialized():
        dist.destroy_process_group()


def _collective(function, *args):
    try:
        return function(*args)
    except RuntimeError as e:  # gloo: "Connection closed by peer", nccl: a watchdog or a timeout
        reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise PeerLost(f"another process of the run stopped ({reason})") from None


def sum_across(tensors):
    """Replace each tensor by its sum over all processes (one all-reduce for all of them)."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    _collective(dist.all_reduce, flat)
    for t, total in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(total.view_as(t))


def sum_gradients(params):
    """Sum the adapters' gradients over the processes: each computed those of its own micro-batches."""
    for p in params:
        if p.grad is None:  # a process with no micro-batch in this step (the short last one of an epoch)
            p.grad = torch.zeros_like(p)
    sum_across([p.grad for p in params])


def gather(obj, group):
    """[obj of rank 0, obj of rank 1, ...] on every process (plain Python objects)."""
    objects = [None] * group.world_size
    _collective(dist.all_gather_object, objects, obj)
    return objects


def barrier():
    _collective(dist.barrier)


def shard_base(model, adapter_params, device):
    """FSDP2: shard every block's frozen weights over the processes; the adapters stay whole.

    Each block's weights are gathered just before the block runs and freed after it, so a
    process holds 1/N of the base plus one block at a time. FSDP moves its shards to the
    device; the adapters, which it ignores, are moved here.
    """
    from torch.distributed.fsdp import fully_shard  # only on this path: nothing else needs it
    keep = set(adapter_params)
    for block in model.layers:
        fully_shard(block, ignored_params=keep)
    fully_shard(model, ignored_params=keep)  # the embedding, the final norm and the output head
    with torch.no_grad():
        for p in adapter_params:
            p.data = p.data.to(device)
    return model
