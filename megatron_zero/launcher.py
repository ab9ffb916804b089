"""``python -m megatron_zero.launcher``: torchrun (same flags) that turns preemption into save-and-exit.

    python -m megatron_zero.launcher --nproc-per-node 8 ... -m megatron_zero.training.pretrain_vlm --stage 3 ...

What it adds to ``torchrun`` (``examples/launch_torchrun.sh`` and ``examples/slurm/common.sh`` use it):

* **SIGUSR1 and SIGTERM** (SLURM's ``--signal=USR1@<s>`` and its time-limit/preemption SIGTERM) are forwarded to
  every worker, and the launcher keeps waiting for them: each rank finishes its step, the ranks save a
  checkpoint together and exit. Plain torchrun does not handle SIGUSR1 at all (it dies and leaves the ranks
  training as orphans) and kills the workers 30 s after a SIGTERM, however long the save takes. The workers
  start with SIGUSR1 blocked: one that comes (from SLURM, which signals every process of the step, or from the
  launcher) while a rank is still starting up waits until the rank's handler is in place.
* **Exit status**: 0 finished; :data:`~megatron_zero.errors.EXIT_PREEMPTED` (75) stopped early by a signal
  after saving — resumable, requeue with the same ``--load``; 2 bad input; 1 anything else. One summary line
  instead of torchrun's failure report (``MEGATRON_ZERO_TRACEBACK=1`` restores it).
* ``MEGATRON_ZERO_EXIT_STATUS_FILE=<path>``: the exit status is also appended to that file (one line per node),
  so a SLURM script can tell a preempted run from a crash after ``srun --kill-on-bad-exit`` (see ``common.sh``,
  which requeues the job on 75).

Under a plain ``torchrun`` the ranks still save and exit on SIGTERM (forwarded by torchrun), on SIGUSR1 sent
to them directly, and when torchrun itself is killed (they ask the kernel for SIGTERM on the launcher's death),
but torchrun's own exit status is 1 or the signal's.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from functools import partial
from typing import Optional, Sequence

from megatron_zero.errors import EXIT_INTERNAL_ERROR, EXIT_OK, EXIT_PREEMPTED, EXIT_USER_ERROR, want_traceback

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
STARTUP_BLOCKED = {signal.SIGUSR1}
PROG = "megatron_zero.launcher"


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc)."""
    out: list[int] = []
    task_dir = f"/proc/{pid}/task"
    try:
        for tid in os.listdir(task_dir):
            try:
                with open(os.path.join(task_dir, tid, "children")) as f:
                    out += [int(x) for x in f.read().split()]
            except OSError:
                pass
    except OSError:
        pass
    if out:
        return out
    for entry in os.listdir("/proc"):  # kernels without /proc/<pid>/task/<tid>/children
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    out.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return out


class _Forwarder:
    def __init__(self):
        self.received: Optional[int] = None

    def __call__(self, signum, _frame):
        if self.received is None:
            print(f"{PROG}: got {signal.Signals(signum).name}: asking every rank to save a checkpoint and exit",
                  file=sys.stderr, flush=True)
        self.received = signum
        for child in _children(os.getpid()):
            try:
                os.kill(child, signum)
            except ProcessLookupError:
                pass

    def wait_for(self, signals):
        """Take blocked ``signals`` from a thread (``sigwait``) and forward them."""
        while True:
            self(signal.sigwait(signals), None)


def _with_signals_option(argv: list[str]) -> list[str]:
    """Let torchrun handle SIGINT/SIGHUP/SIGQUIT only: SIGTERM/SIGUSR1 are ours (forwarded, no kill timeout)."""
    for a in argv:
        if a.startswith(("--signals-to-handle", "--signals_to_handle")):
            return argv
        if not a.startswith("-"):  # the training script: torchrun's own options end here
            break
    return ["--signals-to-handle=SIGINT,SIGHUP,SIGQUIT", *argv]


def _record_status(code: int) -> None:
    path = os.environ.get("MEGATRON_ZERO_EXIT_STATUS_FILE")
    if path:
        try:
            with open(path, "a") as f:
                f.write(f"{code}\n")
        except OSError as e:
            print(f"{PROG}: warning: cannot write MEGATRON_ZERO_EXIT_STATUS_FILE {path}: {e}", file=sys.stderr)


def launch(argv: Sequence[str]) -> int:
    from torch.distributed import run as torchrun

    from megatron_zero.arguments import ArgumentParser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    forwarder = _Forwarder()
    for s in PREEMPTION_SIGNALS:
        signal.signal(s, forwarder)
    # SIGUSR1 stays blocked here and in the workers (they inherit the mask): one that arrives while a rank starts
    # up stays pending until the rank's handler is in place (training.loop.install_exit_signals unblocks it)
    # instead of killing the rank. The launcher takes it with sigwait.
    signal.pthread_sigmask(signal.SIG_BLOCK, STARTUP_BLOCKED)
    threading.Thread(target=forwarder.wait_for, args=(STARTUP_BLOCKED,), daemon=True).start()
    if not want_traceback():
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        parser = torchrun.get_args_parser()
        parser.error = partial(ArgumentParser.error, parser)  # torchrun's flag errors: one line too
        torchrun.run(parser.parse_args(_with_signals_option(list(argv))))
        code = EXIT_OK
    except ChildFailedError as e:
        codes = sorted({f.exitcode for f in e.failures.values()})
        if forwarder.received is not None and all(c in (EXIT_OK, EXIT_PREEMPTED) for c in codes):
            code = EXIT_PREEMPTED
        elif EXIT_USER_ERROR in codes:
            code = EXIT_USER_ERROR
        elif codes == [EXIT_PREEMPTED]:
            code = EXIT_PREEMPTED
        else:
            code = EXIT_INTERNAL_ERROR
        if code != EXIT_PREEMPTED:
            ranks = sorted(e.failures)
            detail = ", ".join(f"rank {r}: {_describe_exit(e.failures[r].exitcode)}" for r in ranks[:8])
            print(f"{PROG}: error: {len(ranks)} rank(s) failed ({detail}{', ...' if len(ranks) > 8 else ''}); "
                  f"their own error lines are above", file=sys.stderr, flush=True)
    if code == EXIT_PREEMPTED:
        print(f"{PROG}: stopped early after a preemption signal; checkpoint saved, resumable "
              f"(exit {EXIT_PREEMPTED}: run again with the same --load)", file=sys.stderr, flush=True)
    elif forwarder.received is not None and code == EXIT_OK:
        print(f"{PROG}: the run finished before the signal took effect", file=sys.stderr, flush=True)
    return code


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit {code}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    code = launch(sys.argv[1:] if argv is None else argv)
    _record_status(code)
    return code


if __name__ == "__main__":
    from megatron_zero.errors import run_main

    run_main(main, prog=PROG)
