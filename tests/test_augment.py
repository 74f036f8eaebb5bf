"""pipeline/core/augment.py and its use in training: seeded, label-keeping, geometric, batched."""

import copy
import dataclasses
import math

import pytest
import torch

from pipeline.common.errors import ParamsError
from pipeline.core import augment, engine
from pipeline.core.augment import Augment
from pipeline.core.step import StepConfig
from pipeline.parallel.distributed import ALONE, World
from pipeline.params import ModelConfig, TrainConfig

WARP = Augment(shift=2, rotate=15.0, scale=0.1, elastic=2.0)


def images(n: int, seed: int = 0) -> torch.Tensor:
    """n random (1, 28, 28) uint8 images with a blank border, as MNIST's."""
    x = torch.zeros(n, 1, 28, 28, dtype=torch.uint8)
    x[:, :, 4:24, 4:24] = torch.randint(0, 256, (n, 1, 20, 20), generator=torch.Generator().manual_seed(seed))
    return x


def draws(angle_degrees: float = 0.0, zoom: float = 1.0, dy: int = 0, dx: int = 0) -> torch.Tensor:
    """One image's row of Augment.draw, chosen rather than drawn."""
    return torch.tensor([[dy, dx, math.radians(angle_degrees), zoom]], dtype=torch.float32)


def batch(aug: Augment, seed: int, n: int = 64, world: World = ALONE) -> tuple[torch.Tensor, torch.Tensor]:
    step = StepConfig(batch_size=n, augment=aug, world=world)
    return engine.batch_of(images(n), torch.arange(n), step, torch.Generator().manual_seed(seed))


def test_draws_and_batches_are_seeded() -> None:
    a, b, c = (WARP.draw(32, torch.Generator().manual_seed(s)) for s in (1, 1, 2))
    assert a.shape == (32, 4 + 2 * augment.ELASTIC_GRID**2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    (xa, _), (xb, _), (xc, _) = batch(WARP, 1), batch(WARP, 1), batch(WARP, 2)
    assert xa.dtype == torch.float32 and xa.shape == (64, 1, 28, 28)
    assert torch.equal(xa, xb) and not torch.equal(xa, xc)


def test_draws_stay_in_their_ranges() -> None:
    d = Augment(shift=1, rotate=10.0, scale=0.2).draw(4096, torch.Generator().manual_seed(0))
    assert set(d[:, :2].unique().tolist()) == {-1.0, 0.0, 1.0}
    assert d[:, 2].abs().max() <= math.radians(10) and d[:, 2].abs().max() > math.radians(9.9)
    assert 0.8 <= d[:, 3].min() < 0.81 and 1.19 < d[:, 3].max() <= 1.2


def test_off_is_todays_batch_and_draws_nothing() -> None:
    generator = torch.Generator().manual_seed(3)
    state = generator.get_state()
    x, idx = engine.batch_of(images(16), torch.arange(16).flip(0), StepConfig(batch_size=16), generator)
    assert torch.equal(x, images(16)[idx]) and x.dtype == torch.uint8
    assert torch.equal(generator.get_state(), state)  # the seeded stream is as it was


def test_shift_alone_keeps_its_gather_and_its_draws() -> None:
    """train.shift without a warp: the same whole-pixel gather, from the same random numbers, as before."""
    x, _ = batch(Augment(shift=2), seed=5)
    offsets = torch.randint(-2, 3, (64, 2), generator=torch.Generator().manual_seed(5))
    assert x.dtype == torch.uint8 and torch.equal(x, engine.shifted(images(64), offsets, 2))


def test_labels_follow_their_images_on_every_rank() -> None:
    """The returned indices pick the labels; two ranks' shares together are the one-rank batch."""
    x, idx = batch(WARP, seed=4)
    assert torch.equal(idx, torch.arange(64))
    parts = [batch(WARP, seed=4, world=World(rank=r, size=2)) for r in (0, 1)]
    assert torch.equal(torch.cat([p[1] for p in parts]), idx)
    assert torch.equal(torch.cat([p[0] for p in parts]), x)


def test_a_bar_turned_a_quarter_counterclockwise_points_up() -> None:
    bar = torch.zeros(1, 1, 28, 28)
    bar[0, 0, 13:15, 14:26] = 255  # from the centre to the right
    out = augment.warped(bar, draws(angle_degrees=90), Augment(rotate=90.0))[0, 0]
    expected = torch.zeros(28, 28)
    expected[2:14, 13:15] = 255  # from the centre up
    assert torch.allclose(out, expected, atol=1e-3)
    down = augment.warped(bar, draws(angle_degrees=-90), Augment(rotate=90.0))[0, 0]
    assert torch.allclose(down, expected.flip(0), atol=1e-3)


def test_a_small_turn_moves_a_dot_along_its_circle() -> None:
    dot = torch.zeros(1, 1, 28, 28)
    dot[0, 0, 13:15, 23:25] = 255  # 10 pixels right of the centre (13.5, 13.5 in pixel indices)
    out = augment.warped(dot, draws(angle_degrees=20), Augment(rotate=20.0))[0, 0]
    grid = torch.arange(28.0)
    row, col = (out.sum(1) * grid).sum() / out.sum(), (out.sum(0) * grid).sum() / out.sum()
    turn = math.radians(20)
    assert row.item() == pytest.approx(13.5 - 10 * math.sin(turn), abs=0.2)  # up
    assert col.item() == pytest.approx(13.5 + 10 * math.cos(turn), abs=0.2)


def test_whole_pixel_moves_match_the_shift_gather() -> None:
    x = images(5)
    offsets = torch.tensor([[0, 0], [2, 0], [0, -2], [-1, 1], [2, 2]])
    rows = torch.cat([offsets.float(), torch.zeros(5, 1), torch.ones(5, 1)], 1)
    out = augment.warped(x, rows, Augment(shift=2, scale=0.1))
    assert torch.allclose(out, engine.shifted(x, offsets, 2).float(), atol=1e-3)


def test_zoom_grows_a_centred_square() -> None:
    square = torch.zeros(1, 1, 28, 28)
    square[0, 0, 10:18, 10:18] = 255  # 8 x 8 about the centre
    out = augment.warped(square, draws(zoom=1.5), Augment(scale=0.5))[0, 0]
    assert torch.equal(out[8:20, 8:20] > 127, torch.ones(12, 12, dtype=torch.bool))  # 12 x 12
    assert (out > 127).sum() == 144


def test_elastic_bends_smoothly_and_no_further_than_asked() -> None:
    x = images(8)
    plain = torch.cat([torch.zeros(8, 2), torch.zeros(8, 1), torch.ones(8, 1)], 1)
    field = torch.rand(8, 2 * augment.ELASTIC_GRID**2, generator=torch.Generator().manual_seed(0)) * 2 - 1
    aug = Augment(elastic=1.5)
    assert torch.allclose(augment.warped(x, torch.cat([plain, 0 * field], 1), aug), x.float(), atol=1e-3)
    bent = augment.warped(x, torch.cat([plain, field], 1), aug)
    assert not torch.allclose(bent, x.float(), atol=1.0)
    # A one-pixel-wide dot moves by at most ~elastic pixels: its centre of mass stays within 2 pixels.
    dot = torch.zeros(8, 1, 28, 28)
    dot[:, 0, 14, 14] = 255
    moved = augment.warped(dot, torch.cat([plain, field], 1), aug)[:, 0]
    grid = torch.arange(28.0)
    cy = (moved.sum(2) * grid).sum(1) / moved.sum((1, 2))
    cx = (moved.sum(1) * grid).sum(1) / moved.sum((1, 2))
    assert ((cy - 14) ** 2 + (cx - 14) ** 2).sqrt().max() < 2.0


@pytest.mark.parametrize("n", [8, 256])
def test_one_grid_sample_per_batch_whatever_its_size(n, monkeypatch) -> None:
    calls = {"affine_grid": 0, "grid_sample": 0, "interpolate": 0}
    for name in calls:
        real = getattr(augment.F, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(augment.F, name, counted)
    batch(WARP, seed=0, n=n)
    assert calls == {"affine_grid": 1, "grid_sample": 1, "interpolate": 1}


def letter_l() -> torch.Tensor:
    """A (1, 1, 28, 28) image unlike its mirror: an L, a bar down the left and a foot to the right."""
    x = torch.zeros(1, 1, 28, 28, dtype=torch.uint8)
    x[0, 0, 6:22, 8:11] = 200
    x[0, 0, 19:22, 8:20] = 255
    return x


@pytest.mark.parametrize("aug", [Augment(flip=True), Augment(shift=1, flip=True), Augment(rotate=5.0, flip=True)])
def test_flip_mirrors_exactly_the_drawn_images_and_keeps_labels(aug) -> None:
    x = letter_l().expand(64, 1, 28, 28).clone()
    step = StepConfig(batch_size=64, augment=aug)
    out, idx = engine.batch_of(x, torch.arange(64), step, torch.Generator().manual_seed(0))
    again, _ = engine.batch_of(x, torch.arange(64), step, torch.Generator().manual_seed(0))
    assert torch.equal(idx, torch.arange(64)) and torch.equal(out, again)
    # The L's foot points right; a mirrored one's points left: its mass sits right or left of its bar.
    col = (out.float().sum((1, 2)) * torch.arange(28.0)).sum(1) / out.float().sum((1, 2, 3))
    mirrored = col > 13.5
    assert 16 <= mirrored.sum() <= 48  # about half of 64
    if aug == Augment(flip=True):  # whole pixels: the mirror exactly, the rest untouched
        assert torch.equal(out[mirrored], x[mirrored].flip(3)) and torch.equal(out[~mirrored], x[~mirrored])


def test_a_flip_sign_mirrors_the_warp_exactly() -> None:
    rows = torch.tensor([[0.0, 0.0, 0.0, 1.0, -1.0], [0.0, 0.0, 0.0, 1.0, 1.0]])  # dy, dx, angle, zoom, flip
    x = letter_l().expand(2, 1, 28, 28)
    out = augment.warped(x, rows, Augment(scale=0.1, flip=True))
    assert torch.allclose(out[0], x[0].flip(2).float(), atol=1e-3)
    assert torch.allclose(out[1], x[1].float(), atol=1e-3)


def test_erase_zeroes_one_square_of_the_drawn_side() -> None:
    x = torch.full((3, 1, 28, 28), 255, dtype=torch.uint8)
    boxes = torch.tensor([[6.0, 0.5, 0.5], [4.0, 0.0, 0.99], [0.0, 0.3, 0.3]])  # side, centre row, column
    out = augment.erased(x, boxes)
    assert out.dtype == torch.uint8
    assert torch.equal(out[0, 0, 11:17, 11:17], torch.zeros(6, 6, dtype=torch.uint8)) and (out[0] == 0).sum() == 36
    assert torch.equal(out[1, 0, :2, 25:], torch.zeros(2, 3, dtype=torch.uint8)) and (out[1] == 0).sum() == 6  # cut
    assert torch.equal(out[2], x[2])
    d = Augment(erase=8).draw_erase(4096, torch.Generator().manual_seed(0))
    assert set(d[:, 0].unique().tolist()) == set(range(9)) and 0 <= d[:, 1:].min() and d[:, 1:].max() < 1


def test_erase_in_a_batch_is_seeded_and_labels_stay() -> None:
    aug = Augment(shift=1, flip=True, erase=10)
    (xa, ia), (xb, _), (xc, _) = batch(aug, 1), batch(aug, 1), batch(aug, 2)
    assert xa.dtype == torch.uint8 and torch.equal(xa, xb) and not torch.equal(xa, xc)
    assert torch.equal(ia, torch.arange(64))
    plain, _ = batch(Augment(shift=1, flip=True), 1)
    assert torch.equal(xa <= plain, torch.ones_like(xa, dtype=torch.bool)) and not torch.equal(xa, plain)


def test_flip_and_erase_cost_no_python_per_image(monkeypatch) -> None:
    calls = {"flipped": 0, "erased": 0}
    for name in calls:
        real = getattr(augment, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(augment, name, counted)
    batch(Augment(shift=1, flip=True, erase=8), seed=0, n=256)
    assert calls == {"flipped": 1, "erased": 1}


def tiny_fit(cfg: TrainConfig, resume: dict | None = None, states: list | None = None) -> list[torch.Tensor]:
    """fit the fast network on 256 synthetic images; the final weights (and each epoch's state)."""
    x, y = images(256, seed=1), torch.randint(0, 10, (256,), generator=torch.Generator().manual_seed(2))
    model = engine.build(ModelConfig(arch="fast", nf=4), cfg, torch.device("cpu"))
    # A deep copy, as train's checkpoint is: fit's state holds the live tensors and history.
    on_epoch = (lambda _row, state: states.append(copy.deepcopy(state))) if states is not None else None
    engine.fit(model, (x, y), (x[:64], y[:64]), cfg, resume=resume, on_epoch=on_epoch)
    return [t.clone() for t in model.state_dict().values()]


def equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(s, t) for s, t in zip(a, b, strict=True))


def test_training_with_augmentation_is_seeded_and_resumes_identically() -> None:
    cfg = TrainConfig(epochs=2, batch_size=64, lr=0.01, device="cpu", precision="fp32", rotate=10.0, elastic=1.0)
    states: list = []
    a, b = tiny_fit(cfg, states=states), tiny_fit(cfg)
    assert equal(a, b)
    assert not equal(a, tiny_fit(dataclasses.replace(cfg, rotate=0.0, elastic=0.0)))
    assert not equal(a, tiny_fit(dataclasses.replace(cfg, flip=True)))
    assert not equal(a, tiny_fit(dataclasses.replace(cfg, seed=1)))
    assert len(states[0]["history"]) == 1
    assert equal(a, tiny_fit(cfg, resume=states[0]))  # the second epoch again, from the first's state


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("rotate", -1.0, "train.rotate must be a number of degrees in [0, 180], got -1.0"),
        ("rotate", 200.0, "train.rotate must be a number of degrees in [0, 180], got 200.0"),
        ("scale", 1.0, "train.scale must be a fraction in [0, 1) (the zoom factor stays positive), got 1.0"),
        ("elastic", float("nan"), "train.elastic must be a number of pixels in [0, 8], got nan"),
        ("elastic", 9.0, "train.elastic must be a number of pixels in [0, 8], got 9.0"),
        ("flip", 1, "train.flip must be true or false, got 1"),
        ("erase", 29, "train.erase must be an integer number of pixels in [0, 28], got 29"),
        ("erase", 2.5, "train.erase must be an integer number of pixels in [0, 28], got 2.5"),
    ],
)
def test_bad_augmentation_params_name_the_key(key, value, message) -> None:
    with pytest.raises(ParamsError) as e:
        TrainConfig(**{key: value})
    assert str(e.value) == message
