"""A real one-node SLURM for the tests: munged, slurmctld and slurmd from Debian's ``munge`` and ``slurm-wlm``
(``.ci/run`` installs them), configured in a temporary directory, daemons run as root.

``SlurmCluster.start(root)`` returns a running cluster (or raises :class:`SlurmUnavailable` with the reason);
its ``env`` holds ``SLURM_CONF`` for ``sbatch``/``squeue``/``scontrol``/``sacct``-free job queries.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
MUNGE_SOCKET = "/run/munge/munge.socket.2"


class SlurmUnavailable(RuntimeError):
    pass


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _munge_running() -> bool:
    if not os.path.exists(MUNGE_SOCKET):
        return False
    return subprocess.run([_which("munge"), "-n"], check=False, capture_output=True).returncode == 0


def _start_munge() -> None:
    """munged as user munge, /run/munge owned by munge (Debian's package made the key at install)."""
    if _munge_running():
        return
    import pwd

    pw = pwd.getpwnam("munge")
    os.makedirs("/run/munge", exist_ok=True)
    os.chown("/run/munge", pw.pw_uid, pw.pw_gid)
    os.chmod("/run/munge", 0o755)
    subprocess.run(["runuser", "-u", "munge", "--", _which("munged")], check=True, capture_output=True)
    for _ in range(100):
        if _munge_running():
            return
        time.sleep(0.1)
    raise SlurmUnavailable("munged started but `munge -n` keeps failing")


class SlurmCluster:
    """One node (this host, 2 CPUs), one partition ``debug``. ``stop()`` ends the two slurm daemons."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.host = socket.gethostname().split(".")[0]
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    @classmethod
    def start(cls, root: Path) -> SlurmCluster:
        missing = [d for d in DAEMONS + ("sbatch", "munge") if _which(d) is None]
        if missing:
            raise SlurmUnavailable(f"{', '.join(missing)} not installed (apt-get install -y slurm-wlm munge)")
        if os.geteuid() != 0:
            raise SlurmUnavailable("the test SLURM runs its daemons as root; not root here")
        try:
            import pwd

            pwd.getpwnam("munge")
        except KeyError:
            raise SlurmUnavailable("no user munge (Debian's munge package creates it)") from None
        _start_munge()
        cluster = cls(root)
        cluster._configure()
        cluster._run_daemons()
        return cluster

    def _configure(self) -> None:
        for d in ("state", "spool", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        r = self.root
        self.conf.write_text(f"""\
ClusterName=mztest
SlurmctldHost={self.host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=5
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SchedulerParameters=sched_interval=2,bf_interval=1
MinJobAge=600
KillWait=30
InactiveLimit=0
NodeName={self.host} NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
""")

    def _run_daemons(self) -> None:
        env = self.env
        subprocess.run([_which("slurmctld"), "-i", "-f", str(self.conf)], env=env, check=True, capture_output=True)
        subprocess.run([_which("slurmd"), "-f", str(self.conf)], env=env, check=True, capture_output=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            p = subprocess.run(["sinfo", "-h", "-o", "%T"], check=False, env=env, capture_output=True, text=True)
            if p.returncode == 0 and p.stdout.strip() in ("idle", "mixed", "allocated"):
                return
            time.sleep(0.5)
        self.stop()
        raise SlurmUnavailable(f"the node never became idle; see {self.root}/log")

    def stop(self) -> None:
        for name in ("slurmd", "slurmctld"):
            pidfile = self.root / f"{name}.pid"
            try:
                pid = int(pidfile.read_text().strip())
            except (OSError, ValueError):
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)

    # --- job helpers ----------------------------------------------------------------------------------------
    def sbatch(self, *args: str, env: dict | None = None, cwd: str | None = None) -> int:
        p = subprocess.run(["sbatch", "--parsable", *args], check=False, env={**(env or os.environ), "SLURM_CONF": str(self.conf)},
                           cwd=cwd, capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)}: {p.stderr}")
        return int(p.stdout.strip().split(";")[0])

    def scontrol(self, *args: str) -> str:
        return subprocess.run(["scontrol", *args], check=False, env=self.env, capture_output=True, text=True).stdout

    def job(self, job_id: int) -> dict:
        """``scontrol show job`` as a dict (JobState, ExitCode, Restarts, ...); {} once the job is forgotten."""
        out = self.scontrol("show", "job", "-o", str(job_id))
        fields = {}
        for item in out.split():
            if "=" in item:
                k, v = item.split("=", 1)
                fields.setdefault(k, v)
        return fields

    def wait(self, job_id: int, timeout: float = 600, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                                "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED")) -> dict:
        """Poll until the job reaches one of ``states`` (final by default); returns its fields."""
        deadline = time.time() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            if time.time() > deadline:
                raise TimeoutError(f"job {job_id} still {info.get('JobState')} after {timeout:.0f} s: {info}")
            time.sleep(0.5)
