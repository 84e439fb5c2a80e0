"""What train.py and eval.py need around the model and the data: settings from the command
line, one-line errors, the device, the output folder and the files written into it.

The promises kept here, each backed by a test (tests/test_faults.py):
- A problem is one line on stderr, `error: ...`, never a traceback: what was expected, what
  was found, what to do. Exit code 2 for a problem, 130 for an interruption (Ctrl-C).
- Output folders are created only once the inputs are known good, and only one process
  writes into a folder at a time (a lock on the folder itself, released when the process
  ends, however it ends).
- Files are replaced atomically: written to a temporary file beside them, flushed to disk,
  given the permissions a plainly created file would get (the umask's), then renamed. A
  reader sees the old file or the new one; a failed write names the file and the cause and
  leaves the old file and no temporary file.
- Every number saved is finite: no tensor file holds a NaN or an infinity, no JSON file a bare
  NaN (allow_nan=False), and an adapter whose weights ran past ADAPTER_BOUND is never saved.
- SIGTERM and SIGHUP (a scheduler's preemption, a closed terminal) are clean stops: one line
  saying what was kept, exit 128 + the signal's number (tests/test_signals.py).
"""
import argparse
import fcntl
import hashlib
import io
import json
import math
import os
import signal
import sys
import tempfile
import threading
from dataclasses import field, fields
from pathlib import Path

import torch

from machinery import checks
from model import PRESETS, RANDOM_PRESETS


class RunError(ValueError):
    """A bad setting, folder or file, or a failed write: the message is the one line the user sees."""


# ----------------------------------------------------------------------------- settings

def flag(default, help, **bounds):
    """A settings field that becomes --name: its default, its help, and bounds ("min", "above",
    "below") that settings_from_command_line checks."""
    return field(default=default, metadata={"help": help, **bounds})


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is a RunError (one line) instead of the usage text and exit."""

    def __init__(self, *args, **kwargs):
        # no prefix matching: --max_step 2 is a typo to refuse, not --max_steps 2 (and a flag
        # added later would silently change what an old abbreviation means)
        super().__init__(*args, **{"allow_abbrev": False} | kwargs)

    def error(self, message):
        raise RunError(f"{message} (see --help)")


def float_flag(text):
    """A float as the user typed it; one that rounds to 0.0 (1e-400) is refused, since 0 often
    means "the default" (--lr) and never what was typed."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    mantissa = text.strip().lower().split("e")[0]
    if value == 0 and any(digit in mantissa for digit in "123456789"):
        raise argparse.ArgumentTypeError(f"{text} is too small to be a float (below about "
                                         "5e-324 it rounds to 0): give a larger value, or 0 "
                                         "if 0 is meant")
    return value


def settings_from_command_line(settings_class, description, argv=None):
    """A settings dataclass from the command line: one --flag per field, help from its metadata.

    A field's metadata may bound it: "min" (inclusive) or "above" (exclusive), "below"
    (exclusive). Floats must be finite. Violations are RunErrors naming the flag.
    """
    parser = OneLineParser(description=description)
    for f in fields(settings_class):
        help_text = f.metadata["help"]
        if f.type is bool:
            parser.add_argument(f"--{f.name}", action="store_true", help=help_text)
            continue
        shown = "" if "default" in help_text or f.default == "" else f" (default: {f.default})"
        kind = float_flag if f.type is float else f.type
        parser.add_argument(f"--{f.name}", type=kind, default=f.default, help=help_text + shown)
    settings = settings_class(**vars(parser.parse_args(argv)))
    for f in fields(settings_class):
        value, bounds = getattr(settings, f.name), f.metadata
        if isinstance(value, float) and not math.isfinite(value):
            raise RunError(f"--{f.name} {value}: expected a finite number")
        for key, fails, words in (("min", lambda v, b: v < b, "at least"), ("above", lambda v, b: v <= b, "above"),
                                  ("below", lambda v, b: v >= b, "below")):
            if key in bounds and fails(value, bounds[key]):
                raise RunError(f"--{f.name} {value}: expected a value {words} {bounds[key]}")
    checks.check_flag_table(settings, RunError)  # the highs (and lows) of machinery/checks.py
    return settings


def choose_device(name):
    """The torch device for --device: "" picks cuda when there is one, else the cpu."""
    if not name:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RunError(f"--device {name!r} is not a device: expected cpu or cuda (or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise RunError(f"--device {name}: expected cpu or cuda (or cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"--device {name}: torch sees no CUDA GPU here (torch {torch.__version__}, "
                       f"CUDA build: {torch.version.cuda is not None}): use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise RunError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
    return name


def run_command(command, argv=None, errors=()):
    """Call command(argv); a known problem becomes one `error:` line and exit 2, Ctrl-C exit 130,
    SIGTERM or SIGHUP one line saying what was kept and exit 128 + its number (143, 129).

    OSError (disk full, permission denied, a read-only folder) is a known problem too: its
    message names the file and the cause. Anything else is a bug and keeps its traceback.
    Under torchrun only rank 0 prints the line (every process checks the same settings; the
    others' exit codes reach torchrun's own report).
    """
    def say(message):
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {message}", file=sys.stderr)
    main_thread = threading.current_thread() is threading.main_thread()  # handlers live there
    previous = {signum: signal.signal(signum, stop_signal) for signum in STOP_SIGNALS} \
        if main_thread else {}
    try:
        return command(argv)
    except Stopped as e:  # a clean stop: what was kept is said in the line, not an error
        if int(os.environ.get("RANK", "0")) == 0:
            print(str(e) or f"stopped by {e.name}: run the same command again", file=sys.stderr)
        sys.exit(128 + e.signum)
    except KeyboardInterrupt as e:
        say(f"interrupted{': ' + str(e) if str(e) else ''}")
        sys.exit(130)
    except (RunError, *errors) as e:
        say(e)
        sys.exit(2)
    except OSError as e:
        say(describe_os_error(e))
        sys.exit(2)
    finally:
        for signum, handler in previous.items():  # an in-process caller (a test) gets its own
            signal.signal(signum, handler)


# ----------------------------------------------------------------------------- clean stops

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived; the message is the one line saying what was kept."""

    def __init__(self, signum, message=""):
        super().__init__(message)
        self.signum = signum

    @property
    def name(self):
        return signal.Signals(self.signum).name


_stops = {"deferred": False, "pending": None}


def stop_signal(signum, frame):
    """The handler of SIGTERM and SIGHUP while a command runs (distributed.py's passes them on)."""
    # outside a deferred stretch nothing is half done that a stop could lose (every write is
    # atomic): stop at once. Inside one (defer_stops), the loop stops itself at its next safe
    # point; a second signal meanwhile stops at once.
    if _stops["deferred"] and _stops["pending"] is None:
        _stops["pending"] = signum
        return
    raise Stopped(signum)


def defer_stops(on=True):
    """From defer_stops() to defer_stops(False), SIGTERM and SIGHUP are noted, not raised: the
    loop asks pending_stop() where it can stop cleanly (between micro-batches, after a step)."""
    _stops.update(deferred=on, pending=None)


def pending_stop():
    """The signal that asked for a stop while stops were deferred, or None."""
    return _stops["pending"]


def interrupted(e, context):
    """The interruption `e` (Ctrl-C, torchrun's stop or a Stopped) again, its line ending with
    `context` (what was kept and what to do)."""
    if isinstance(e, Stopped):
        # a clean stop's line already says what was kept
        return e if str(e) else Stopped(e.signum, f"stopped by {e.name} {context}")
    return KeyboardInterrupt(f"{e}; {context}" if str(e) else context)


def cause(e):
    """What went wrong in an OSError, in the system's words ("No space left on device")."""
    return e.strerror or str(e)


def describe_os_error(e):
    return f"{e.filename}: {cause(e)}" if e.filename else cause(e)


# ----------------------------------------------------------------------------- output folders

def check_output_dir(path):
    """Make sure `path` is or can become a writable folder, without creating anything yet."""
    path = Path(path).absolute()
    existing = path
    while not existing.exists():  # the nearest ancestor that exists decides
        existing = existing.parent
    if not existing.is_dir():
        raise RunError(f"cannot write to output folder {path}: {existing} is a file, not a folder; "
                       "choose another folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunError(f"cannot write to output folder {path}: {existing} is not writable (permission denied); "
                       "choose another folder")


class OutputDir:
    """An output folder held by this process: created, locked, cleared of stale temporary files.

    The lock is an flock on the folder itself: no lock file is left behind, and the kernel
    releases it when the process ends, even by SIGKILL.
    """

    def __init__(self, path):
        self.path = Path(path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise RunError(f"cannot write to output folder {self.path}: {cause(e)}") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise RunError(f"another process is writing into {self.path}: wait for it to finish, "
                           "or choose another output folder") from None
        for stale in self.path.glob(".*.tmp"):  # left by a process killed while writing
            stale.unlink()

    def __truediv__(self, name):
        return self.path / name

    def close(self):
        os.close(self.fd)  # releases the lock


# ----------------------------------------------------------------------------- files

class _Sink:
    """A file that remembers the OSError of a failed write: torch.save turns it into an opaque
    RuntimeError ("unexpected pos"), and the user should read "No space left on device"."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data):
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        return self.file.flush()


def plain_file_mode():
    """The permissions open() would give a new file: 0o666 less the umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_atomically(path, write, binary=False):
    """Replace `path` by what write(file) writes; all or nothing (see the module's docstring)."""
    path = Path(path)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    sink = None
    try:
        # the file is closed inside the try: closing flushes, and on a full disk that fails too
        with os.fdopen(handle, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            sink = _Sink(f)
            write(sink)
            f.flush()
            os.fsync(f.fileno())  # on disk before it takes the old file's place
        os.chmod(temp, plain_file_mode())  # mkstemp makes it private; a plain open() would not
        os.replace(temp, path)
    except OSError as e:
        raise RunError(f"cannot write {path}: {cause(e)}") from None
    except RuntimeError:
        if sink is None or sink.error is None:
            raise
        raise RunError(f"cannot write {path}: {cause(sink.error)}") from None
    finally:
        if os.path.exists(temp):
            os.unlink(temp)


# ----------------------------------------------------------------------------- finite numbers

# The largest |weight| a saved adapter may hold. Past it the run has diverged: AdamW moves each
# weight by about lr per step whatever the gradient (Adam's step is normalised, and train.py
# clips the gradient first), so from an initial |w| <= 1 a weight reaches 1e4 only after
# lr x steps ~ 1e4: 3e7 steps at the default 3e-4. One step at --lr 1e10 lands at ~1e10. And
# 1e4 keeps a merged update inside fp16's range (65504) with room to spare.
ADAPTER_BOUND = 1e4


def tensors_in(obj, name=""):
    """(name, tensor) for every tensor in nested dicts, lists and tuples (an optimizer's state)."""
    if torch.is_tensor(obj):
        yield name, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from tensors_in(value, f"{name}.{key}" if name else str(key))
    elif isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            yield from tensors_in(value, f"{name}.{index}" if name else str(index))


def bad_numbers(obj, bound=None):
    """Why `obj` must not be saved (a tensor holding a NaN or an infinity, or a value past
    `bound` in size), or None when every number in it is fine."""
    for name, tensor in tensors_in(obj):
        if not (tensor.is_floating_point() or tensor.is_complex()) or tensor.numel() == 0:
            continue  # integers are always finite
        tensor = tensor.detach()
        finite = torch.isfinite(tensor)
        if not finite.all():
            return f"{name} holds {int((~finite).sum()):,} non-finite numbers of {tensor.numel():,}"
        largest = tensor.abs().max().item()
        if bound is not None and largest > bound:
            return f"{name} holds a weight of {largest:.3g}, past the {bound:g} of any sane adapter"
    return None


def json_text(obj, path, **options):
    """json.dumps that refuses NaN and infinity (bare NaN is no JSON: other readers reject it)."""
    try:
        return json.dumps(obj, allow_nan=False, **options)
    except ValueError:
        raise RunError(f"not writing {path}: it would hold a NaN or an infinity "
                       "(a diverged run?)") from None


def write_text(path, text):
    write_atomically(path, lambda f: f.write(text))


def write_json(path, obj):
    write_text(path, json_text(obj, path, indent=2) + "\n")


def save_torch(path, obj):
    write_atomically(path, lambda f: torch.save(obj, f), binary=True)


def read_json(path, what):
    """A JSON file we wrote earlier; unreadable or corrupt is a RunError saying what to do."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except PermissionError:
        raise RunError(f"cannot read {path}: permission denied") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # also nested past the limit
        raise RunError(f"{path} is corrupt ({e}): {what}") from None


def load_torch(path, what):
    """A torch file we wrote earlier (tensors and plain data only); corrupt is a RunError saying what to do."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError:
        raise RunError(f"cannot read {path}: permission denied") from None
    except Exception as e:  # a truncated zip, random bytes, a pickle that is more than tensors
        # torch's own message would advise weights_only=False, i.e. running the file's code: never
        raise RunError(f"cannot read {path} ({type(e).__name__}): the file is corrupt; {what}") from None


class JsonLines:
    """An append-only file of one JSON record per line, flushed as each is written.

    read() returns the records and the numbers of the lines that are not records (a line
    cut short by a crash, or garbage), which the caller reports and drops.
    """

    def __init__(self, path):
        self.path, self.file = Path(path), None

    def read(self, is_record=lambda record: True):
        records, bad = [], []
        if not self.path.exists():
            return records, bad
        try:
            lines = self.path.read_bytes().splitlines()
        except PermissionError:
            raise RunError(f"cannot read {self.path}: permission denied") from None
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):  # a cut line, garbage, or nesting past the limit
                record = None
            if is_record(record):
                records.append(record)
            else:
                bad.append(number)
        return records, bad

    def rewrite(self, records):
        write_text(self.path, "".join(json_text(r, self.path) + "\n" for r in records))

    def append(self, records, durable=False):
        text = "".join(json_text(r, self.path) + "\n" for r in records)
        try:
            if self.file is None:
                self.file = open(self.path, "a", encoding="utf-8")
            self.file.write(text)
            self.file.flush()
            if durable:
                os.fsync(self.file.fileno())
        except OSError as e:
            raise RunError(f"cannot write {self.path}: {cause(e)}") from None

    def close(self):
        if self.file is not None:
            try:
                self.file.close()
            except OSError:
                pass  # the write that failed already said why
            self.file = None


# ----------------------------------------------------------------------------- adapters to evaluate

class AdapterBytes:
    """An adapter file's bytes, read once: hashed, and loaded from these same bytes, so a file
    replaced meanwhile cannot lend its record to another file's tensors. Messages name its path."""

    def __init__(self, path):
        self.path = str(path)
        try:
            self.data = Path(path).read_bytes()
        except FileNotFoundError:
            raise RunError(f"adapter file {path} not found") from None
        except PermissionError:
            raise RunError(f"cannot read adapter {path}: permission denied") from None
        except IsADirectoryError:
            raise RunError(f"adapter {path} is a folder: pass the adapter.pt file in it") from None
        self.sha256 = hashlib.sha256(self.data).hexdigest()

    def open(self):
        """A file object over the bytes, from their start, that names the path in messages."""
        return _NamedBytes(self.data, self.path)

    def __str__(self):
        return self.path


class _NamedBytes(io.BytesIO):
    def __init__(self, data, path):
        super().__init__(data)
        self.path = path

    def __str__(self):
        return self.path


def recorded_base(s, info, adapter):
    """(model, checkpoint folder or None, a line to print): the base `adapter` is evaluated on, by
    default the one it was trained on, as its record says: model, folder, dtype and quantization.
    Flags override (--quantize none for an unquantized base); s.dtype and s.quantize are set, and
    the line says which base it is. A folder model moved elsewhere is found with
    --checkpoint_dir."""
    model = getattr(s, "model", "") or info.get("model")
    is_folder = model not in PRESETS and model not in RANDOM_PRESETS
    if not getattr(s, "model", "") and s.checkpoint_dir and is_folder:
        model, folder = s.checkpoint_dir, None  # the folder model itself, found elsewhere
    else:
        recorded = info.get("checkpoint_dir") if not getattr(s, "model", "") else ""
        folder = s.checkpoint_dir or recorded
    trained = (info.get("dtype") or "", info.get("quantize") or "")
    given = (s.dtype, "" if s.quantize == "none" else s.quantize)
    s.dtype = s.dtype or trained[0]
    s.quantize = given[1] if s.quantize else trained[1]
    def name(dtype, quantize):
        bits = f"quantized {quantize}" if quantize else "not quantized"
        return f"{dtype or 'the default dtype'}, {bits}"
    if not any(trained):
        note = f"base: {name(s.dtype, s.quantize)} ({adapter} does not record its base's precision)"
    elif (s.dtype, s.quantize) == trained:
        note = f"base: {name(*trained)}, as {adapter} was trained (--dtype, --quantize override)"
    else:
        note = (f"base: {name(s.dtype, s.quantize)} as given, though {adapter} was trained on "
                f"{name(*trained)}")
    return model, folder or None, note
