"""Run train.py or eval.py and SIGKILL the process at a chosen moment, for tests/test_faults.py.

    python tests/kill_at.py [SIGNAL/]MOMENT SCRIPT [ARGS...]

MOMENT is one of
    step:N     as optimizer step N begins (train.py)
    micro:N    as the N-th micro-batch of this process is put together (train.py)
    save:N     halfway through writing the N-th checkpoint.pt of this process (train.py)
    adapter    with adapter.pt's temporary file written, before it takes the file's place (train.py)
    batch:N    as the N-th batch of prompts starts generating (eval.py)
    append:N   halfway through appending the N-th batch of predictions (eval.py)

and may end in @R: only the process of rank R of a torchrun launch dies (the others go on).

SIGNAL (SIGTERM, SIGHUP) sends that signal instead of SIGKILL, and the process goes on to
handle it; SIGTERM-to-torchrun sends SIGTERM to the parent torchrun, which passes it on to
every process of the launch, and waits until this process has it too.

SIGKILL cannot be caught: no handler runs, no file is closed, as when the machine dies or the
kernel kills the process for memory. The moment is chosen here, inside the process, so that a
test hits it every time.
"""
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
moment, script, *args = sys.argv[1:]
sent, _, moment = moment.rpartition("/")
moment, _, rank = moment.partition("@")
kind, _, number = moment.partition(":")
number = int(number or 0)
command = __import__(Path(script).stem)  # the script's own settings (MKL's) apply before torch loads
if rank and os.environ.get("RANK") != rank:  # not the process that dies: run as usual
    command.main(args)
    sys.exit()

from machinery import adapters  # noqa: E402
import model  # noqa: E402
from machinery import runs  # noqa: E402

calls = {"count": 0, "armed": False}


def die():
    sys.stdout.flush()
    if not sent:
        os.kill(os.getpid(), signal.SIGKILL)
    elif sent == "SIGTERM-to-torchrun":
        os.kill(os.getppid(), signal.SIGTERM)
        for _ in range(3000):  # until torchrun's SIGTERM reached this process (a stop is noted)
            if runs.pending_stop():
                return
            time.sleep(0.01)
    else:
        os.kill(os.getpid(), getattr(signal, sent))  # handled before os.kill returns


def counted(function, on_call):
    """function, calling on_call(n) before its n-th call."""
    def wrapper(*a, **k):
        calls["count"] += 1
        on_call(calls["count"])
        return function(*a, **k)
    return wrapper


if kind == "micro":
    command.collate = counted(command.collate, lambda n: n == number and die())
elif kind == "step":
    get_lr = command.get_lr

    def lr_or_die(step, *rest):
        if step == number - 1:
            die()  # a signal is handled, and the step goes on
        return get_lr(step, *rest)
    command.get_lr = lr_or_die
elif kind == "save":
    def arm(n):
        calls["armed"] = n == number
    runs.save_torch = counted(runs.save_torch, arm)
    write = runs._Sink.write

    def write_then_die(self, data):
        result = write(self, data)
        if calls["armed"]:  # some of the bytes are in the temporary file: die now
            self.flush()
            calls["armed"] = False  # a signal is sent once; the write goes on
            die()
        return result
    runs._Sink.write = write_then_die
elif kind == "adapter":
    save_adapter, fsync = adapters.save_adapter, os.fsync

    def armed_save(*a, **k):
        calls["armed"] = True
        return save_adapter(*a, **k)
    adapters.save_adapter = armed_save
    os.fsync = lambda fd: die() if calls["armed"] else fsync(fd)
elif kind == "batch":
    model.Transformer.generate = counted(model.Transformer.generate, lambda n: n == number and die())
elif kind == "append":
    append = runs.JsonLines.append

    def append_half(self, records, durable=False):
        calls["count"] += 1
        if calls["count"] == number:  # half a batch's lines reach the file, then the process dies
            text = "".join(runs.json.dumps(r) + "\n" for r in records)
            with open(self.path, "a") as f:
                f.write(text[: len(text) // 2])
            die()
        return append(self, records, durable)
    runs.JsonLines.append = append_half
else:
    sys.exit(f"unknown moment {moment!r}")

command.main(args)
