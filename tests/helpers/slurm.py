"""A private one-node Slurm on 127.0.0.1 for tests: munged, slurmctld and slurmd as our children.

Nothing touches a system Slurm or munge: the key, sockets, state, logs and slurm.conf live in one
temporary folder, the ports are free ones picked at start, and clients find it all through
SLURM_CONF (slurm.conf names munged's socket). Tested as root (Debian's slurm-wlm 22.05).
"""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from .repo import needed
from .servers import free_ports, stop_group

TOOLS = ("mungekey", "munged", "slurmctld", "slurmd", "sbatch", "sinfo", "squeue", "scancel")
SBIN = "/usr/sbin:/sbin"  # the daemons live here, which a non-root PATH may lack
START_SECONDS = 60  # for the node to turn idle: ~2 s here, more on a loaded CI runner


@dataclass(frozen=True)
class SlurmCluster:
    """A running cluster: its folder, its slurm.conf, and the environment its clients need."""

    root: Path
    conf: Path
    env: dict[str, str]


def tool(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=SBIN)


def slurm_conf(root: Path, ctld_port: int, slurmd_port: int, cpus: int, user: str) -> str:
    """One node, one partition, CPUs as the consumable: `cpus` one-CPU tasks run side by side."""
    return f"""\
ClusterName=test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root / "munge.sock"}
StateSaveLocation={root / "state"}
SlurmdSpoolDir={root / "spool"}
SlurmctldPidFile={root / "slurmctld.pid"}
SlurmdPidFile={root / "slurmd.pid"}
# No cgroups (none in most containers): processes tracked through /proc, tasks not bound to CPUs.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# Start-up logs errors that are harmless here: `can not load PMIx library` (Debian's mpi/pmix
# plugin, loaded whatever MpiDefault says) and `Could not open ... state file` (a fresh state dir).
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# `sbatch --wait` polls after 2 s, then 8, then every 32; it stays at 2 s only while
# MinJobAge/2 <= 2. Finished jobs are then kept >= 4 s, longer than one poll.
MinJobAge=4
ReturnToService=2
# Memory is not a consumable (CR_CPU): a small RealMemory never drains the node. Jobs must not ask --mem.
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def client_env(conf: Path) -> dict[str, str]:
    """Our environment pointed at `conf`, without SLURM_* from an outer job (sbatch would use them)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PATH"] = f"{env.get('PATH', '')}{os.pathsep}{SBIN}"
    return {**env, "SLURM_CONF": str(conf)}


def start(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """A daemon in the foreground, in its own process group (teardown kills the group), logging to `log`."""
    with open(log, "w") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def logs(root: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(root.glob("*.log")))


def wait_idle(env: dict[str, str], daemons: list[subprocess.Popen], root: Path) -> None:
    """Until sinfo shows the node idle; fail with the daemons' logs if one exits or time runs out."""
    deadline = time.monotonic() + START_SECONDS
    while True:
        state = subprocess.run(["sinfo", "-h", "-n", "localhost", "-o", "%t"], env=env, capture_output=True, text=True)
        if state.stdout.strip() == "idle":
            return
        dead = [p.args[0] for p in daemons if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            why = f"{', '.join(dead)} exited" if dead else f"not idle after {START_SECONDS} s"
            pytest.fail(f"Slurm did not start ({why}; sinfo: {state.stdout}{state.stderr}):\n{logs(root)}")
        time.sleep(0.2)


def cancel_all(env: dict[str, str]) -> None:
    """Cancel every job left on the cluster and give them 10 s to go (their processes are not ours)."""
    subprocess.run(["scancel", "--user", getpass.getuser()], env=env, capture_output=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        queue = subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True)
        if queue.returncode != 0 or not queue.stdout.strip():
            return
        time.sleep(0.2)


@contextmanager
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A one-node Slurm with one CPU per core of this machine; skipped (in CI: failed) without Slurm."""
    missing = [name for name in TOOLS if tool(name) is None]
    if missing:
        needed(None, f"no {', '.join(missing)}: `apt-get install slurm-wlm munge` (.ci/run does)")
    root = Path(tempfile.mkdtemp(prefix="slurm-"))
    root.chmod(0o755)  # munged wants its socket's folder searchable by all, and writable by no one else
    for folder in ("state", "spool"):
        (root / folder).mkdir()
    conf = root / "slurm.conf"
    user = getpass.getuser()
    cpus = len(os.sched_getaffinity(0))  # as `nproc`: a container's cpuset, not the host's cores
    conf.write_text(slurm_conf(root, *free_ports(2), cpus=cpus, user=user))
    env = client_env(conf)
    subprocess.run([tool("mungekey"), "--create", "--keyfile", root / "munge.key"], check=True, capture_output=True)
    daemons: list[subprocess.Popen] = []
    try:
        munge = [f"--socket={root / 'munge.sock'}", f"--key-file={root / 'munge.key'}"]
        munge += [f"--pid-file={root / 'munged.pid'}", f"--seed-file={root / 'munged.seed'}"]
        # In the foreground it logs to our file, not /var/log/munge (absent in a bare container).
        daemons.append(start([tool("munged"), "--foreground", *munge], root / "munged.log", env))
        daemons.append(start([tool("slurmctld"), "-D"], root / "slurmctld.log", env))
        # -N: the node is `localhost` whatever this machine's hostname is.
        daemons.append(start([tool("slurmd"), "-D", "-N", "localhost"], root / "slurmd.log", env))
        wait_idle(env, daemons, root)
        yield SlurmCluster(root, conf, env)
        cancel_all(env)
    finally:
        for proc in reversed(daemons):  # slurmd, slurmctld, then munged which both talk to
            stop_group(proc)
        shutil.rmtree(root, ignore_errors=True)


def submit_array(
    cluster: SlurmCluster,
    script: Path,
    args: list[str],
    n: int,
    submit_dir: Path,
    out_dir: Path,
    env: dict[str, str] | None = None,
    cpus_per_task: int = 1,
    timeout: float = 300,
) -> tuple[int, list[str]]:
    """`sbatch --wait --array=0-(n-1) script args` from `submit_dir`; the job runs in `out_dir` and
    logs there. Returns the job's exit status as sbatch reports it (the highest of its tasks) and
    each task's output, in task order. `env` (default: cluster.env) is what sbatch exports to the job."""
    out_dir.mkdir(parents=True, exist_ok=True)  # Slurm creates no folder for --output
    cmd = ["sbatch", "--wait", "--parsable", f"--array=0-{n - 1}", f"--cpus-per-task={cpus_per_task}"]
    cmd += [f"--chdir={out_dir}", f"--output={out_dir}/%A_%a.out", str(script), *args]
    environ = {**(cluster.env if env is None else env), "SLURM_CONF": str(cluster.conf)}
    result = subprocess.run(cmd, cwd=submit_dir, env=environ, capture_output=True, text=True, timeout=timeout)
    job = result.stdout.split(";")[0].strip()  # --parsable prints "<id>" or "<id>;<cluster>" on submit
    assert job.isdigit(), f"sbatch did not submit (exit {result.returncode}): {result.stdout}{result.stderr}"
    outputs = [out_dir / f"{job}_{i}.out" for i in range(n)]
    return result.returncode, [p.read_text() if p.exists() else "" for p in outputs]
