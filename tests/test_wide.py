"""The `fast3`, `wide`, `deep` and `vgg` networks keep the contract (raw pixels in, 10 logits out, exported and
reloaded as the logged model is) and the weight average (train.ema) is validated, saved and resumed."""

import copy
import dataclasses

import pytest
import torch

from pipeline.common.errors import ParamsError
from pipeline.core import engine
from pipeline.core.checkpoint import load_model, save_model
from pipeline.core.ema import EMA
from pipeline.core.model import NETWORKS, build_model
from pipeline.params import ModelConfig, TrainConfig


def pixels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


ARCHS = ["fast3", "wide", "deep", "vgg"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("nf", [4, 16])
def test_takes_raw_pixels_of_any_dtype_and_gives_ten_logits(arch, nf) -> None:
    model = build_model(ModelConfig(arch=arch, nf=nf)).eval()
    assert isinstance(model, NETWORKS[arch]) and model.convs[0].out_channels == nf
    x = pixels(5)
    assert model(x).shape == (5, 10)
    assert torch.equal(model(x), model(x.float()))


def test_fast3_is_fast_with_a_third_conv_at_6x6() -> None:
    fast, fast3 = (build_model(ModelConfig(arch=arch, nf=4)) for arch in ("fast", "fast3"))
    convs = [m for m in fast3.convs if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 3 and (convs[-1].in_channels, convs[-1].out_channels, convs[-1].kernel_size) == (8, 8, (3, 3))
    x = torch.zeros(2, 1, 24, 24)
    assert fast3.convs(x).shape == fast.convs(x).shape == (2, 8, 6, 6)  # the same head fits both


@pytest.mark.parametrize("arch", ARCHS)
def test_exports_with_a_dynamic_batch_and_reloads(arch, tmp_path) -> None:
    """torch.export as the logged `model` (pt2) is made: every dimension above 1 left to the
    exporter (mlflow.pytorch marks them Dim.AUTO), saved, loaded, run on other batch sizes."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, nf=4)).eval()
    example = pixels(4).float()
    auto = torch.export.Dim.AUTO
    program = torch.export.export(model, (example,), dynamic_shapes=({0: auto, 2: auto, 3: auto},))
    torch.export.save(program, tmp_path / "model.pt2")
    loaded = torch.export.load(tmp_path / "model.pt2").module()
    for n in (2, 7):
        x = pixels(n, seed=n).float()
        out = loaded(x)
        assert out.shape == (n, 10) and torch.allclose(out, model(x), atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_model_file_round_trips_as_evaluate_and_serving_read_it(arch, tmp_path) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, nf=4)
    model = build_model(cfg).eval()
    save_model(tmp_path / "model.pt", model, cfg, classes=[str(k) for k in range(10)])
    loaded, classes = load_model(tmp_path / "model.pt", expected=cfg)
    assert isinstance(loaded, NETWORKS[arch]) and len(classes) == 10
    assert torch.equal(loaded(pixels(3)), model(pixels(3)))


def test_ema_follows_the_weights_after_its_warm_up() -> None:
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, decay=0.5)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)  # decay min(0.5, 2 / 11): 2/11 of the old, 9/11 of the new
    assert torch.allclose(ema.model.weight, start + 9 / 11)
    for _ in range(50):
        ema.update(model)
    assert torch.allclose(ema.model.weight, model.weight) and not ema.model.weight.requires_grad
    copy = EMA(model, decay=0.5)
    copy.load_state_dict(ema.state_dict())
    assert copy.updates == 51 and torch.equal(copy.model.weight, ema.model.weight)


def tiny_fit(cfg: TrainConfig, resume: dict | None = None, states: list | None = None):
    """fit the wide network (nf 4) on 256 synthetic images: the model, its history, each epoch's state."""
    x, y = pixels(256, seed=1), torch.randint(0, 10, (256,), generator=torch.Generator().manual_seed(2))
    model = engine.build(ModelConfig(arch="wide", nf=4), cfg, torch.device("cpu"))
    # A deep copy, as train's checkpoint is: fit's state holds the live tensors and history.
    on_epoch = (lambda _row, state: states.append(copy.deepcopy(state))) if states is not None else None
    history = engine.fit(model, (x, y), (x[:64], y[:64]), cfg, resume=resume, on_epoch=on_epoch)
    return model, history, (x[:64], y[:64])


def weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [t.clone() for t in model.state_dict().values()]


def test_the_average_is_validated_saved_and_resumed() -> None:
    cfg = TrainConfig(epochs=2, batch_size=64, lr=0.01, device="cpu", precision="fp32", ema=0.9, rotate=5.0)
    states: list = []
    model, history, val = tiny_fit(cfg, states=states)
    # What fit leaves in the model (and train saves) is the average, which the last epoch validated.
    assert engine.evaluate(model, *val, batch_size=64)["accuracy"] == history[-1]["val_accuracy"]
    assert all(torch.equal(a, b) for a, b in zip(weights(model), states[-1]["ema"]["model"].values(), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(weights(model), states[-1]["model"].values(), strict=True))
    assert len(states[0]["history"]) == 1  # the second epoch runs again, from the first's state
    resumed, resumed_history, _ = tiny_fit(cfg, resume=states[0])
    assert all(torch.equal(a, b) for a, b in zip(weights(model), weights(resumed), strict=True))
    assert resumed_history == history
    plain, _, _ = tiny_fit(dataclasses.replace(cfg, ema=0.0))
    assert not all(torch.equal(a, b) for a, b in zip(weights(model), weights(plain), strict=True))


def test_bad_ema_names_the_key() -> None:
    with pytest.raises(ParamsError, match=r"train.ema must be a decay in \[0, 1\) \(0: no weight averaging\), got 1.0"):
        TrainConfig(ema=1.0)
