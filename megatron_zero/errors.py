"""The one error boundary of every entry point, and the exit codes a batch script can rely on.

Every command (``tools/*.py``, ``python -m megatron_zero.training.pretrain_lm`` / ``pretrain_vlm``, the demo)
runs its ``main`` through :func:`run_main`:

* a :class:`UserError` (bad flag, file, record, checkpoint) prints **one line**, ``<prog>: error: <message>``,
  naming the file, flag or record, and exits :data:`EXIT_USER_ERROR` (2);
* an argument error prints one line (``<prog>: error: ... (see --help)``) instead of argparse's usage dump
  (every parser is a :class:`megatron_zero.arguments.ArgumentParser`);
* a missing/unreadable file (``OSError`` with a file name) is a user error too;
* anything else is a bug: one line naming the exception and where it was raised, exit 1;
* ``MEGATRON_ZERO_TRACEBACK=1`` prints the full traceback in every case;
* a run stopped early by a preemption signal, after saving a checkpoint, exits :data:`EXIT_PREEMPTED` (75,
  ``EX_TEMPFAIL``: "stopped early, resumable" — requeue the job with the same ``--load``).

Under torchrun, errors found before the process group exists (the same on every rank) are printed once per
node; later ones by every rank that hits them, prefixed with ``[rank N]``.
"""
from __future__ import annotations

import os
import sys
import traceback
from typing import Callable, Optional, Sequence

EXIT_OK = 0
EXIT_INTERNAL_ERROR = 1
EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: a checkpoint was saved, run again with the same --load
TRACEBACK_ENV = "MEGATRON_ZERO_TRACEBACK"


class UserError(Exception):
    """Bad input (a flag, file, record or checkpoint): the message is one line naming it and what was expected.

    Every error class of the library that describes bad input derives from this (and from the built-in class
    it refines, e.g. ``ValueError``), so the boundary reports it as one line.
    """


class DataError(UserError, ValueError):
    """A data file or record that cannot be used (names the file and record)."""


class StoppedWithoutCheckpoint(Exception):
    """A preemption signal stopped a run that has no ``--save``: nothing to resume from (exit 1)."""


class Preempted(SystemExit):
    """Raised after a preemption signal once the checkpoint is saved: exits :data:`EXIT_PREEMPTED`."""

    def __init__(self, message: str = "stopped early, resumable"):
        super().__init__(EXIT_PREEMPTED)
        self.message = message


def want_traceback() -> bool:
    return os.environ.get(TRACEBACK_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _world() -> tuple[int, int, bool]:
    """(rank, local rank, process group initialised)."""
    initialized = False
    rank = int(os.environ.get("RANK", "0") or 0)
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            initialized = True
            rank = dist.get_rank()
    except Exception:  # noqa: BLE001 - reporting an error must not raise another
        pass
    return rank, int(os.environ.get("LOCAL_RANK", "0") or 0), initialized


def emit_error(prog: str, message: str) -> None:
    rank, local_rank, initialized = _world()
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 and not initialized and local_rank != 0:
        return  # the same (pre-initialisation) error is reported by local rank 0 of this node
    prefix = f"[rank {rank}] " if world > 1 and initialized else ""
    # one line: a multi-line message is folded
    text = " ".join(line.strip() for line in str(message).strip().splitlines() if line.strip())
    print(f"{prefix}{prog}: error: {text}", file=sys.stderr, flush=True)


def _where(exc: BaseException) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    if not tb:
        return ""
    frame = tb[-1]
    return f" [{os.path.basename(frame.filename)}:{frame.lineno} in {frame.name}]"


def _raised_by_us(exc: BaseException) -> bool:
    tb = traceback.extract_tb(exc.__traceback__)
    if not tb:
        return False
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    last = os.path.abspath(tb[-1].filename)
    return last.startswith(os.path.join(here, "megatron_zero") + os.sep) or \
        last.startswith(os.path.join(here, "tools") + os.sep) or last.startswith(os.path.join(here, "examples") + os.sep)


def describe(exc: BaseException) -> tuple[str, int]:
    """The one-line message and exit code for ``exc``."""
    if isinstance(exc, UserError):
        return str(exc), EXIT_USER_ERROR
    if isinstance(exc, StoppedWithoutCheckpoint):
        return str(exc), EXIT_INTERNAL_ERROR
    if isinstance(exc, UnicodeDecodeError):
        return (f"not UTF-8 text ({exc.reason} at byte {exc.start}); give a UTF-8 file", EXIT_USER_ERROR)
    if isinstance(exc, OSError) and exc.filename is not None:
        name = exc.filename if exc.filename2 is None else f"{exc.filename} -> {exc.filename2}"
        return f"{name}: {exc.strerror or exc}", EXIT_USER_ERROR
    if isinstance(exc, (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)):
        return str(exc), EXIT_USER_ERROR  # raised by our own checks, the message names the path
    if isinstance(exc, ValueError) and _raised_by_us(exc):
        return str(exc), EXIT_USER_ERROR  # the library's convention for bad input (the message names it)
    if isinstance(exc, MemoryError):
        return "out of memory (host RAM); use a smaller model/batch or more nodes", EXIT_INTERNAL_ERROR
    msg = str(exc).strip().splitlines()
    first = msg[0] if msg else ""
    return (f"internal error: {type(exc).__name__}: {first}{_where(exc)} "
            f"(set {TRACEBACK_ENV}=1 for the full traceback)", EXIT_INTERNAL_ERROR)


def run_main(main: Callable[..., Optional[int]], prog: Optional[str] = None,
             argv: Optional[Sequence[str]] = None) -> None:
    """Run an entry point's ``main`` behind the error boundary and exit with its status (never returns).

    ``main`` returns an exit status (``None`` = 0) or a list (a training run's losses: 0). Tears down
    torch.distributed / megatron's parallel state on the way out.
    """
    from megatron_zero import platform

    prog = prog or os.path.basename(sys.argv[0]) or "megatron_zero"
    platform.import_megatron_core()  # before the entry point imports it some slower, noisier way
    code: int = EXIT_OK
    try:
        result = main() if argv is None else main(list(argv))
        code = result if isinstance(result, int) and not isinstance(result, bool) else EXIT_OK
    except Preempted as e:
        rank, _, _ = _world()
        if rank == 0:
            print(f"{prog}: {e.message} (exit {EXIT_PREEMPTED}: resume with the same --load)", file=sys.stderr,
                  flush=True)
        code = EXIT_PREEMPTED
        _ignore_preemption_signals()
    except SystemExit as e:
        if isinstance(e.code, str):  # sys.exit("message"): as Python reports it (errors are UserError)
            print(e.code.strip(), file=sys.stderr, flush=True)
        code = e.code if isinstance(e.code, int) else (EXIT_OK if e.code is None else EXIT_INTERNAL_ERROR)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        code = 130
    except BaseException as e:  # noqa: BLE001 - this is the boundary
        if want_traceback():
            traceback.print_exc()
        message, code = describe(e)
        emit_error(prog, message)
    if code in (EXIT_OK, EXIT_PREEMPTED):  # after an error, peers may be stuck in a collective: just exit
        _teardown()
    sys.stdout.flush()
    sys.exit(code)


def _ignore_preemption_signals() -> None:
    """After the save: ignore further SIGTERM/SIGUSR1 (torchrun's shutdown of the other ranks), also during
    interpreter finalisation, which resets Python-level handlers to the default (terminate) action."""
    import signal

    for s in (signal.SIGTERM, signal.SIGUSR1):
        try:
            signal.signal(s, signal.SIG_IGN)
        except ValueError:
            pass


def _teardown() -> None:
    try:  # megatron's parallel state and the process group, if this process set them up
        parallel_state = sys.modules.get("megatron.core.parallel_state")
        if parallel_state is not None and parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        dist = sys.modules.get("torch.distributed")
        if dist is not None and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - the run's status is already decided
        pass
