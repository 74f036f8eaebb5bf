"""pipeline.registry: below the threshold nothing is registered; the champion alias moves only up."""

import pytest
from mlflow import MlflowClient

from pipeline.params import RegisterConfig
from pipeline.registry import ALIAS, register_if_good

from .conftest import run_id_of

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
    client, run_id, cfg = MlflowClient(), run_id_of(in_trained), RegisterConfig(name="race", min_accuracy=0.5)
    assert "now points to it (no champion before)" in register_if_good(run_id, 0.90, cfg)
    assert "'champion' stays" in register_if_good(run_id, 0.85, cfg)  # registered, not promoted
    champion = client.get_model_version_by_alias("race", ALIAS)
    assert int(champion.version) == 1 and champion.tags["test_accuracy"] == "0.9"
    assert len(versions(client, "race")) == 2
    assert "previous champion's 0.9000" in register_if_good(run_id, 0.95, cfg)
    champion = client.get_model_version_by_alias("race", ALIAS)
    assert int(champion.version) == 3 and champion.tags["test_accuracy"] == "0.95"
