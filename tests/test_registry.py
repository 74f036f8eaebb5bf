"""pipeline.serving.registry: below the threshold nothing is registered; the champion alias follows the best
version; a model is registered once however often it is evaluated."""

import pytest
from mlflow import MlflowClient

from pipeline.params import RegisterConfig
from pipeline.serving.registry import ALIAS, register_if_good

from .helpers.tracking import model_run, run_id_of

pytestmark = pytest.mark.slow  # they share the session's trained model


def versions(client: MlflowClient, name: str) -> list:
    return client.search_model_versions(f"name = '{name}'")


def test_evaluate_registered_the_tiny_model_as_champion(in_trained) -> None:
    client = MlflowClient()
    champion = client.get_model_version_by_alias("mnist-cnn", ALIAS)
    assert champion.run_id == run_id_of(in_trained)
    assert float(champion.tags["test_accuracy"]) > 0.9
    assert client.get_logged_model(champion.source.removeprefix("models:/")).name == "classifier"  # serving model


def test_below_the_threshold_nothing_is_registered(in_trained) -> None:
    message = register_if_good(run_id_of(in_trained), 0.7, RegisterConfig(name="below", min_accuracy=0.9))
    assert message == "not registered: test accuracy 0.7000 is below register.min_accuracy 0.9"
    assert versions(MlflowClient(), "below") == []


def test_champion_moves_only_to_a_better_version(in_trained) -> None:
    client, cfg = MlflowClient(), RegisterConfig(name="race", min_accuracy=0.5)
    first, worse, better = model_run(client), model_run(client), model_run(client)
    assert "now points to it (no champion before)" in register_if_good(first, 0.90, cfg)
    assert "'champion' stays: its test accuracy 0.9000" in register_if_good(worse, 0.85, cfg)  # registered only
    champion = client.get_model_version_by_alias("race", ALIAS)
    assert int(champion.version) == 1 and champion.tags["test_accuracy"] == "0.9"
    assert len(versions(client, "race")) == 2
    assert "previous champion's 0.9000" in register_if_good(better, 0.95, cfg)
    champion = client.get_model_version_by_alias("race", ALIAS)
    assert int(champion.version) == 3 and champion.tags["test_accuracy"] == "0.95"
    # Evaluated again (another evaluate.batch_size): the same version, no new one, the alias where it was.
    assert register_if_good(better, 0.95, cfg) == (
        "race version 3 is this model, registered before; alias 'champion' still points to it"
    )
    assert "race version 1 is this model" in register_if_good(first, 0.90, cfg)
    assert len(versions(client, "race")) == 3 and str(client.get_model_version_by_alias("race", ALIAS).version) == "3"
