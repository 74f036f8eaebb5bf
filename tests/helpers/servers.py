"""Real services on 127.0.0.1 for the tests, each in its own process group and stopped with it:
PostgreSQL, `mlflow server` on it, an SSH server (a DVC remote) and `git daemon` (a git origin)."""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, closing, contextmanager
from pathlib import Path

DB_USER = "mlflow"


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (all held open while picking, so they differ)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    return free_ports(1)[0]


def stop_group(proc: subprocess.Popen, grace: float = 10) -> None:
    """Stop a service started in its own process group (a server and its workers, a daemon):
    SIGTERM the group, SIGKILL what is left after `grace` seconds."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def check(cmd: list, **kwargs) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{result.stdout}{result.stderr}"


def wait_for_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    """Until something accepts on 127.0.0.1:`port`; fail with the service's log if it exits or hangs."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)


def postgres_bin() -> Path | None:
    """Debian's server binaries (initdb, pg_ctl) live in /usr/lib/postgresql/<major>/bin."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return found[-1].parent if found else None


def as_db_owner(root: Path) -> dict:
    """subprocess arguments that run PostgreSQL as `postgres` when we are root: it refuses root."""
    if os.geteuid() != 0:
        return {}
    owner = pwd.getpwnam("postgres")
    for path in [root, *root.rglob("*")]:
        os.chown(path, owner.pw_uid, owner.pw_gid)
    return {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []}


@contextmanager
def postgres(bindir: Path) -> Iterator[tuple[int, str]]:
    """A throwaway PostgreSQL cluster on 127.0.0.1 with a password-protected `mlflow` database:
    (port, password)."""
    import psycopg2

    # Not under pytest's tmp_path: its parents are 0700 root, which the postgres user cannot enter.
    root = Path(tempfile.mkdtemp(prefix="mlflow-pg-"))
    password = secrets.token_hex(12)
    (root / "pwfile").write_text(password + "\n")
    user = as_db_owner(root)
    env = {"PATH": os.environ["PATH"], "LC_ALL": "C"}
    check(
        [bindir / "initdb", "-D", root / "data", "-U", DB_USER, "--pwfile", root / "pwfile", "--no-locale"]
        + ["-E", "UTF8", "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync"],
        env=env,
        **user,
    )
    port = free_port()
    options = f"-h 127.0.0.1 -p {port} -k {root}"  # TCP on loopback only; the socket in our folder
    pg_ctl = [bindir / "pg_ctl", "-D", root / "data"]
    check([*pg_ctl, "-l", root / "server.log", "-o", options, "-w", "-t", "60", "start"], env=env, **user)
    try:
        with closing(
            psycopg2.connect(host="127.0.0.1", port=port, user=DB_USER, password=password, dbname="postgres")
        ) as c:
            c.autocommit = True  # CREATE DATABASE refuses to run inside a transaction
            c.cursor().execute("CREATE DATABASE mlflow")
        yield port, password
    finally:
        subprocess.run([*pg_ctl, "-m", "fast", "-w", "stop"], env=env, capture_output=True, **user)
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def mlflow_server(pg_port: int, password: str, root: Path) -> Iterator[tuple[str, Path]]:
    """`mlflow server` on PostgreSQL with proxied artifacts in root/artifacts: (its URI, that folder)."""
    artifacts = root / "artifacts"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PGPASSWORD"] = password  # libpq reads it: the password is in no URI, no file
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no job runner (GenAI scorers): 10 fewer processes
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server"]
    # The driver named: SQLAlchemy's default for plain postgresql:// is now psycopg 3.
    cmd += ["--backend-store-uri", f"postgresql+psycopg2://{DB_USER}@127.0.0.1:{pg_port}/mlflow"]
    cmd += ["--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    uri = f"http://127.0.0.1:{port}"
    with open(root / "server.log", "w") as log:
        server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90  # creating the schema in PostgreSQL takes a while
        while True:
            assert server.poll() is None, f"mlflow server exited:\n{(root / 'server.log').read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, (root / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        yield uri, artifacts
    finally:
        stop_group(server, grace=5)  # uvicorn waits for idle keep-alive clients; no need


@contextmanager
def sshd(root: Path) -> Iterator[tuple[int, Path]]:
    """OpenSSH's server on 127.0.0.1, letting in only the key it generates: (port, private key)."""
    binary = shutil.which("sshd") or "/usr/sbin/sshd"
    root.mkdir(parents=True, exist_ok=True)
    check(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", root / "host_key"])
    check(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", root / "client_key"])
    shutil.copy(root / "client_key.pub", root / "authorized_keys")
    Path("/run/sshd").mkdir(exist_ok=True)  # its privilege-separation folder (Debian creates it at boot)
    port = free_port()
    config = root / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {root / 'host_key'}\nPidFile {root / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {root / 'authorized_keys'}\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\nSubsystem sftp internal-sftp\n"
    )
    with open(root / "sshd.log", "w") as log:
        server = subprocess.Popen(
            [binary, "-D", "-e", "-f", config], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_for_port(port, server, root / "sshd.log")
        yield port, root / "client_key"
    finally:
        stop_group(server, grace=5)


@contextmanager
def git_daemon(base: Path, writable: bool) -> Iterator[str]:
    """`git daemon` serving the repositories under `base` at git://127.0.0.1:<port>/, taking pushes
    only if `writable`: yields that URL."""
    port = free_port()
    cmd = ["git", "daemon", "--reuseaddr", "--export-all", f"--base-path={base}", "--listen=127.0.0.1"]
    cmd += [f"--port={port}", *(["--enable=receive-pack"] if writable else []), str(base)]
    log = base.parent / f"git-daemon-{port}.log"
    with open(log, "w") as out:
        daemon = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_port(port, daemon, log)
        yield f"git://127.0.0.1:{port}/"
    finally:
        stop_group(daemon, grace=5)
