"""Runs cached everywhere, for real: DVC's run-cache for every stage, shared by a team through a git
origin (`git daemon`), two DVC remotes (a folder and an SSH server) and one tracking server
(PostgreSQL + `mlflow server`); `mlflow run` from a git URI whose experiment comes back."""

import getpass
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow import MlflowClient

from .helpers import servers
from .helpers.repo import needed, sh, synthetic_repo

pytestmark = pytest.mark.slow
TRAINED = "Running stage 'train'"


@dataclass(frozen=True)
class Team:
    """A git origin served by `git daemon`, DVC remotes `local` and `ssh`, a tracking server."""

    root: Path
    origin: str  # git://127.0.0.1:<port>/origin.git, taking pushes
    read_only_origin: str  # the same repository, refusing pushes
    tracking_uri: str
    ssh_key: Path

    def clone(self, name: str, remote: str = "local") -> Path:
        """A teammate's clone of the origin, its default DVC remote `remote`."""
        path = self.root / name
        sh(self.root, "git", "clone", "-q", self.origin, str(path))
        sh(path, "dvc", "remote", "modify", "--local", "ssh", "keyfile", str(self.ssh_key))
        sh(path, "dvc", "remote", "default", "--local", remote)
        return path

    def sh(self, repo: Path, *cmd: str, ok: bool = True) -> str:
        return sh(repo, *cmd, ok=ok, MLFLOW_TRACKING_URI=self.tracking_uri, TMPDIR=str(self.root / "tmp"))


@pytest.fixture(scope="module")
def team(tmp_path_factory) -> Team:
    root = tmp_path_factory.mktemp("team")
    (root / "tmp").mkdir()  # MLflow's clones of the git URI land here (TMPDIR), not in /tmp
    (root / "git").mkdir()
    needed(shutil.which("sshd"), "no sshd: `apt-get install openssh-server` (.ci/run does)")
    bindir = needed(servers.postgres_bin(), "PostgreSQL not found: `apt-get install postgresql` (.ci/run does)")
    with (
        servers.postgres(bindir) as (pg_port, password),
        servers.mlflow_server(pg_port, password, root) as (tracking_uri, _),
        servers.sshd(root / "ssh") as (ssh_port, key),
        servers.git_daemon(root / "git", writable=True) as origin,
        servers.git_daemon(root / "git", writable=False) as read_only,
    ):
        repo = synthetic_repo(root)  # root/repo, its data in root/source
        sh(repo, "dvc", "remote", "add", "--default", "local", str(root / "dvc-remote"))
        sh(repo, "dvc", "remote", "add", "ssh", f"ssh://{getpass.getuser()}@127.0.0.1:{ssh_port}{root}/ssh-remote")
        sh(repo, "git", "commit", "-qam", "the team's DVC remotes")
        sh(root, "git", "clone", "-q", "--bare", str(repo), str(root / "git/origin.git"))
        # The same project whose default DVC remote cannot be reached (nothing listens on port 1).
        sh(repo, "dvc", "remote", "add", "--default", "gone", f"ssh://{getpass.getuser()}@127.0.0.1:1/srv/dvc")
        sh(repo, "git", "commit", "-qam", "a DVC remote that is gone")
        sh(root, "git", "clone", "-q", "--bare", str(repo), str(root / "git/gone.git"))
        yield Team(root, f"{origin}origin.git", f"{read_only}origin.git", tracking_uri, key)


def run_file(repo: Path) -> dict:
    return json.loads((repo / "models/mlflow_run.json").read_text())


def all_runs(client: MlflowClient) -> list:
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


@pytest.fixture(scope="module")
def alice(team: Team) -> Path:
    """A clone that ran experiment `first` (the committed params) and pushed it, with outputs and
    run-cache, to the git origin and both DVC remotes."""
    repo = team.clone("alice")
    assert TRAINED in team.sh(repo, "dvc", "exp", "run", "-n", "first")
    for remote in ("local", "ssh"):
        team.sh(repo, "dvc", "exp", "push", "--run-cache", "-r", remote, "origin", "first")
    return repo


def test_going_back_to_trained_params_trains_nothing_and_names_the_original_run(team, alice) -> None:
    client = MlflowClient(team.tracking_uri)
    first = run_file(alice)
    assert TRAINED in team.sh(alice, "dvc", "exp", "run", "-n", "other", "-S", "train.lr=0.01")
    assert run_file(alice)["run_id"] != first["run_id"]
    before = len(all_runs(client))
    start = time.monotonic()
    out = team.sh(alice, "dvc", "exp", "run", "-n", "back", "-S", "train.lr=0.002")  # first's value again
    took = time.monotonic() - start
    assert "Stage 'train' is cached" in out and "Stage 'evaluate' is cached" in out, out
    assert "Running stage" not in out
    assert run_file(alice) == first  # the run that trained these weights
    assert len(all_runs(client)) == before  # no new MLflow run, training or evaluation
    show = team.sh(alice, "dvc", "exp", "show", "--csv", "--no-pager")
    back = next(line for line in show.splitlines() if line.startswith("back,"))
    assert ",first," in back, show  # `dvc exp show` says which run trained it
    # The training run's row compares by test accuracy: evaluate logged it there too.
    run = client.get_run(first["run_id"])
    assert {"test_accuracy", "test_loss", "test_macro_f1"} <= set(run.data.metrics) and run.info.status == "FINISHED"
    assert took < 30, f"restoring took {took:.1f} s"  # 2-3 s on an idle 2-core machine (bench/cache.py)


@pytest.mark.parametrize("remote", ["local", "ssh"])
def test_a_teammate_gets_the_experiment_without_training(team, alice, remote) -> None:
    bob = team.clone(f"bob-{remote}", remote)
    team.sh(bob, "dvc", "exp", "pull", "origin", "first")  # the experiment, its outputs too
    assert "first" in team.sh(bob, "dvc", "exp", "show", "--csv", "--no-pager")
    # The same params, run by bob: everything comes from the team's remote, nothing is computed.
    out = team.sh(bob, "dvc", "exp", "run", "--pull", "-n", f"bob-{remote}")
    assert "Running stage" not in out and "Stage 'train' is cached" in out, out
    assert run_file(bob) == run_file(alice)
    run = MlflowClient(team.tracking_uri).get_run(run_file(bob)["run_id"])  # alice's run, opened from bob
    assert run.info.status == "FINISHED" and "test_accuracy" in run.data.metrics
    assert (bob / "models/model.pt").read_bytes() == (alice / "models/model.pt").read_bytes()


def mlflow_run(team: Team, uri: str, *params: str) -> str:
    """`mlflow run` of the git URI, as on another machine: MLflow clones it (into team.root/tmp)."""
    cmd = ["mlflow", "run", uri, "--env-manager", "local", "--experiment-name", "remote"]
    cmd += [flag for p in ("device=cpu", "batch_size=32", *params) for flag in ("-P", p)]
    return team.sh(team.root, *cmd)


def newest_run(team: Team):
    client = MlflowClient(team.tracking_uri)
    experiment = client.get_experiment_by_name("remote")
    return client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])[0]


def test_mlflow_run_from_a_git_uri_comes_back_to_the_team(team, alice) -> None:
    out = mlflow_run(team, team.origin, "epochs=1", "lr=0.005")
    run = newest_run(team)
    name = run.info.run_name
    assert run.info.status == "FINISHED" and run.data.tags["dvc.exp_name"] == name  # named alike
    assert f"pushed experiment {name} to {team.origin} and DVC remote 'local'" in out, out[-3000:]
    models = MlflowClient(team.tracking_uri).search_logged_models(experiment_ids=[run.info.experiment_id])
    assert {m.name for m in models if m.source_run_id == run.info.run_id} == {"model", "classifier"}
    carol = team.clone("carol")
    team.sh(carol, "dvc", "exp", "pull", "origin", name)
    assert name in team.sh(carol, "dvc", "exp", "show", "--csv", "--no-pager")
    team.sh(carol, "dvc", "exp", "apply", name)
    assert run_file(carol)["run_id"] == run.info.run_id and (carol / "models/model.pt").is_file()
    assert "up to date" in team.sh(carol, "dvc", "status")  # every output there, as the lock says

    # Alice's params from another box: DVC's run-cache answers, nothing trains, the run says whose.
    out = mlflow_run(team, team.origin, "epochs=2", "lr=0.002")
    assert TRAINED not in out and "restored from DVC's run-cache" in out, out[-3000:]
    hit = newest_run(team)
    assert hit.info.status == "FINISHED" and hit.data.tags["dvc.run_cache"] == "hit"
    assert hit.data.tags["model_run_id"] == run_file(alice)["run_id"]
    assert (
        hit.data.metrics["test_accuracy"] == json.loads((alice / "reports/metrics.json").read_text())["test_accuracy"]
    )


def test_remotes_that_refuse_are_one_warning_each_and_lose_nothing(team) -> None:
    """A git origin that refuses the push, a DVC remote that cannot be reached: the run trains,
    logs and ends FINISHED; each remote is one warning."""
    out = mlflow_run(team, team.read_only_origin.replace("origin.git", "gone.git"), "epochs=1", "lr=0.003")
    assert TRAINED in out
    unread = [line for line in out.splitlines() if "cannot be read" in line]
    assert len(unread) == 1 and "DVC remote 'gone'" in unread[0], out[-3000:]
    warnings = [line for line in out.splitlines() if "could not push experiment" in line]
    assert len(warnings) == 1 and "dvc exp push --no-cache origin" not in warnings[0], out[-3000:]
    assert "dvc exp push --run-cache origin" in warnings[0]
    run = newest_run(team)
    assert run.info.status == "FINISHED" and "test_accuracy" in run.data.metrics
    models = MlflowClient(team.tracking_uri).search_logged_models(experiment_ids=[run.info.experiment_id])
    assert {m.name for m in models if m.source_run_id == run.info.run_id} == {"model", "classifier"}
