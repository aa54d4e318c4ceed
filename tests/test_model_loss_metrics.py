"""U-Net architecture, Dice loss, metrics, bootstrap interval, learning-rate schedule,
batch order and augmentation of brain_tumor_segmentation.py."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import brain_tumor_segmentation as bts

# -----------------------------------------------------------------------------
# UNet


def test_unet_width32_shapes_at_256():
    torch.manual_seed(0)
    model = bts.UNet(width=32).eval()
    seen = {}
    hooks = [model.bottleneck.register_forward_hook(lambda m, i, o: seen.__setitem__("bottleneck", o.shape))]
    for k, encoder in enumerate(model.encoders):
        hooks.append(encoder.register_forward_hook(
            lambda m, i, o, k=k: seen.__setitem__(f"enc{k}", o.shape)))
    with torch.no_grad():
        out = model(torch.rand(2, 1, 256, 256))
    for h in hooks:
        h.remove()
    assert out.shape == (2, 1, 256, 256)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert seen["bottleneck"] == (2, 512, 16, 16)
    assert [seen[f"enc{k}"][1] for k in range(4)] == [32, 64, 128, 256]
    assert [seen[f"enc{k}"][-1] for k in range(4)] == [256, 128, 64, 32]


def test_unet_layers():
    model = bts.UNet(width=32)
    assert len(model.encoders) == 4 and len(model.upsamples) == 4 and len(model.decoders) == 4
    for up, w in zip(model.upsamples, [256, 128, 64, 32]):
        assert isinstance(up, nn.ConvTranspose2d)
        assert up.kernel_size == (2, 2) and up.stride == (2, 2)
        assert (up.in_channels, up.out_channels) == (2 * w, w)
    assert isinstance(model.head, nn.Conv2d)
    assert model.head.kernel_size == (1, 1)
    assert (model.head.in_channels, model.head.out_channels) == (32, 1)
    assert isinstance(model.pool, nn.MaxPool2d)


def test_unet_width8_at_64_and_backward():
    torch.manual_seed(0)
    model = bts.UNet(width=8)
    x = torch.rand(2, 1, 64, 64)
    out = model(x)
    assert out.shape == (2, 1, 64, 64)
    out.mean().backward()
    assert model.encoders[0][0].weight.grad is not None
    assert model.encoders[0][0].weight.grad.abs().sum() > 0
    assert model.bottleneck[0].out_channels == 128


def test_unet_output_depends_on_input_position():
    """Each output pixel is a logit for the same input pixel: shifting the input shifts the logits
    (away from the borders; max pooling makes it exact only for shifts by multiples of 16)."""
    torch.manual_seed(0)
    model = bts.UNet(width=4).eval()
    x = torch.zeros(1, 1, 64, 64)
    x[..., 8:24, 8:24] = 1
    with torch.no_grad():
        a = model(x)
        b = model(torch.roll(x, (16, 16), (2, 3)))
    torch.testing.assert_close(a[..., 4:28, 4:28], b[..., 20:44, 20:44], atol=1e-4, rtol=1e-4)


# -----------------------------------------------------------------------------
# dice_loss


def logits_for(p):
    return torch.logit(torch.tensor(p, dtype=torch.float64)).float()


P_A = [[0.9, 0.2], [0.6, 0.1]]
T_A = [[1.0, 0.0], [1.0, 0.0]]
# sum(p*t) = 1.5, sum(p^2) = 0.81 + 0.04 + 0.36 + 0.01 = 1.22, sum(t^2) = 2
LOSS_A = 1 - (2 * 1.5 + 1) / (1.22 + 2 + 1)  # 1 - 4 / 4.22 = 0.052132...
P_B = [[0.5, 0.5], [0.5, 0.5]]
T_B = [[0.0, 0.0], [0.0, 1.0]]
# sum(p*t) = 0.5, sum(p^2) = 1.0, sum(t^2) = 1
LOSS_B = 1 - (2 * 0.5 + 1) / (1.0 + 1 + 1)  # 1/3


def test_dice_loss_hand_computed_2x2():
    logits = logits_for(P_A).view(1, 1, 2, 2)
    target = torch.tensor(T_A).view(1, 1, 2, 2)
    loss = bts.dice_loss(logits, target, smooth=1.0)
    assert loss.ndim == 0
    assert float(loss) == pytest.approx(1 - 4 / 4.22, abs=1e-6)
    assert float(loss) == pytest.approx(0.0521327, abs=1e-6)
    # smooth enters numerator and denominator
    loss2 = bts.dice_loss(logits, target, smooth=2.0)
    assert float(loss2) == pytest.approx(1 - (3 + 2) / (3.22 + 2), abs=1e-6)


def test_dice_loss_batch_vs_per_image():
    logits = torch.stack([logits_for(P_A), logits_for(P_B)]).view(2, 1, 2, 2)
    target = torch.tensor([T_A, T_B]).view(2, 1, 2, 2)
    per_image = bts.dice_loss(logits, target, smooth=1.0, per_image=True)
    assert float(per_image) == pytest.approx((LOSS_A + LOSS_B) / 2, abs=1e-6)
    # the batch loss pools the sums of both images: 1 - (2*2.0 + 1) / (2.22 + 3 + 1)
    batch = bts.dice_loss(logits, target, smooth=1.0)
    assert float(batch) == pytest.approx(1 - 5 / 6.22, abs=1e-6)
    assert abs(float(batch) - float(per_image)) > 1e-3  # 0.1961 vs 0.1927: the two modes differ


def test_dice_loss_perfect_prediction_near_zero():
    target = torch.zeros(2, 1, 16, 16)
    target[:, :, 4:10, 3:12] = 1
    logits = (target * 2 - 1) * 30
    assert float(bts.dice_loss(logits, target)) < 1e-4
    assert float(bts.dice_loss(logits, target, per_image=True)) < 1e-4
    assert float(bts.dice_loss(-logits, target)) > 0.95  # the opposite prediction is nearly 1


def test_dice_loss_smooth_makes_empty_vs_empty_zero():
    target = torch.zeros(1, 1, 8, 8)
    logits = torch.full((1, 1, 8, 8), -30.0)
    assert float(bts.dice_loss(logits, target, smooth=1.0)) == pytest.approx(0.0, abs=1e-6)
    # without the smooth term the same perfect prediction would score the worst loss
    assert float(bts.dice_loss(logits, target, smooth=0.0)) == pytest.approx(1.0, abs=1e-6)


def test_dice_loss_float32_for_bf16_logits():
    gen = torch.Generator().manual_seed(0)
    logits32 = torch.randn(2, 1, 8, 8, generator=gen)
    target = (torch.rand(2, 1, 8, 8, generator=gen) > 0.5).float()
    logits16 = logits32.to(torch.bfloat16)
    loss = bts.dice_loss(logits16, target)
    assert loss.dtype == torch.float32
    expected = bts.dice_loss(logits16.float(), target)
    assert float(loss) == float(expected)
    # same value in plain float64 arithmetic on the bf16 logits
    p, t = torch.sigmoid(logits16.double()), target.double()
    ref = 1 - (2 * (p * t).sum() + 1) / ((p * p).sum() + (t * t).sum() + 1)
    assert float(loss) == pytest.approx(float(ref), abs=1e-5)
    loss_bce = bts.compute_loss(logits16, target, bts.Config(loss="dice+bce"))
    assert loss_bce.dtype == torch.float32


def test_dice_loss_gradient_flows():
    logits = logits_for(P_A).view(1, 1, 2, 2).requires_grad_()
    bts.dice_loss(logits, torch.tensor(T_A).view(1, 1, 2, 2)).backward()
    g = logits.grad.view(-1)
    assert g[0] < 0 and g[2] < 0  # tumour pixels: raising the logit lowers the loss
    assert g[1] > 0 and g[3] > 0  # background pixels: raising it raises the loss


def test_compute_loss_dice_plus_bce():
    logits = torch.stack([logits_for(P_A), logits_for(P_B)]).view(2, 1, 2, 2)
    target = torch.tensor([T_A, T_B]).view(2, 1, 2, 2)
    p = torch.tensor([P_A, P_B]).view(-1).double()
    t = target.view(-1).double()
    bce = float(-(t * p.log() + (1 - t) * (1 - p).log()).mean())
    got = bts.compute_loss(logits, target, bts.Config(loss="dice+bce"))
    assert float(got) == pytest.approx((LOSS_A + LOSS_B) / 2 + bce, abs=1e-5)
    assert float(bts.compute_loss(logits, target, bts.Config(loss="dice"))) == pytest.approx(1 - 5 / 6.22, abs=1e-6)


# -----------------------------------------------------------------------------
# confusion_counts + scores_from_counts


def test_confusion_counts_and_scores_exact():
    target = torch.zeros(1, 1, 4, 4, dtype=torch.uint8)
    pred = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    target[0, 0, 0, :] = 1          # 4 tumour pixels in row 0
    target[0, 0, 1, 0] = 1          # and one in row 1: 5 in all
    pred[0, 0, 0, :3] = True        # 3 of them found (tp = 3)
    pred[0, 0, 3, 3] = True         # one false alarm (fp = 1); missed: (0,3), (1,0) (fn = 2)
    counts = bts.confusion_counts(pred, target)
    assert counts.dtype == torch.float64
    assert counts.tolist() == [[3.0, 1.0, 2.0]]
    s = bts.scores_from_counts(counts)
    assert s["dice"][0] == pytest.approx(6 / 9)
    assert s["iou"][0] == pytest.approx(3 / 6)
    assert s["precision"][0] == pytest.approx(3 / 4)
    assert s["recall"][0] == pytest.approx(3 / 5)


def test_confusion_counts_per_image():
    target = torch.zeros(3, 1, 4, 4)
    pred = torch.zeros(3, 1, 4, 4)
    target[0, 0, :2, :2] = 1
    pred[0, 0, :2, :2] = 1          # perfect
    pred[1, 0, 0, 0] = 1            # false alarm on an empty slice
    target[2, 0, 3, :] = 1          # missed tumour
    counts = bts.confusion_counts(pred > 0.5, target)
    assert counts.tolist() == [[4, 0, 0], [0, 1, 0], [0, 0, 4]]
    s = bts.scores_from_counts(counts)
    assert s["dice"].tolist() == [1.0, 0.0, 0.0]
    assert s["iou"].tolist() == [1.0, 0.0, 0.0]


def test_scores_both_empty_is_one():
    s = bts.scores_from_counts(np.array([[0, 0, 0]]))
    for key in ("dice", "iou", "precision", "recall"):
        assert s[key].tolist() == [1.0], key


def test_scores_empty_truth_with_prediction_is_zero():
    s = bts.scores_from_counts(np.array([[0, 7, 0]]))
    assert s["dice"][0] == 0 and s["iou"][0] == 0 and s["precision"][0] == 0
    assert s["recall"][0] == 0  # 0/0 with a non-empty prediction: scored 0, not 1 or nan


def test_scores_missed_tumour_is_zero():
    s = bts.scores_from_counts(np.array([[0, 0, 9]]))
    for key in ("dice", "iou", "precision", "recall"):
        assert s[key][0] == 0.0, key
        assert not np.isnan(s[key][0])


# -----------------------------------------------------------------------------
# hd95


def square(size=40, top=10, left=10, side=12):
    m = np.zeros((size, size), bool)
    m[top:top + side, left:left + side] = True
    return m


def test_mirror_averaged_prediction_of_a_mirrored_image_is_the_mirrored_prediction():
    torch.manual_seed(0)
    model = bts.UNet(width=4).eval()
    images = torch.randint(0, 256, (3, 1, 32, 32), dtype=torch.uint8)
    cpu = bts.Machine(torch.device("cpu"))
    plain = bts.predict_probabilities(model, images, 2, cpu)
    plain_of_mirror = bts.predict_probabilities(model, images.flip(-1), 2, cpu)
    assert not torch.equal(plain_of_mirror, plain.flip(-1))  # the U-Net alone is not mirror-symmetric
    averaged = bts.predict_probabilities(model, images, 2, cpu, flip=True)
    assert torch.allclose(averaged, (plain + plain_of_mirror.flip(-1)) / 2)
    averaged_of_mirror = bts.predict_probabilities(model, images.flip(-1), 2, cpu, flip=True)
    assert torch.equal(averaged_of_mirror, averaged.flip(-1))


def test_hd95_identical_is_zero():
    assert bts.hd95(square(), square()) == 0.0


def test_hd95_shift_by_3_pixels():
    a = square()
    b = np.roll(a, 3, axis=1)
    assert bts.hd95(a, b) == pytest.approx(3.0, abs=0.25)
    assert bts.hd95(b, a) == pytest.approx(bts.hd95(a, b))  # symmetric
    c = np.roll(a, 6, axis=0)
    assert bts.hd95(a, c) == pytest.approx(6.0, abs=0.5)


def test_hd95_empty_cases():
    empty = np.zeros((40, 40), bool)
    assert math.isnan(bts.hd95(empty, empty))
    assert bts.hd95(square(), empty) == math.inf
    assert bts.hd95(empty, square()) == math.inf


def test_hd95_mask_filling_the_image():
    full = np.ones((40, 40), bool)
    value = bts.hd95(full, square())
    assert math.isfinite(value) and value > 0


# -----------------------------------------------------------------------------
# bootstrap_interval


def test_bootstrap_interval_contains_mean_and_narrows():
    rng = np.random.default_rng(0)
    small = rng.random(40)
    small_groups = [f"p{i // 4}" for i in range(40)]       # 10 patients
    large = rng.random(800)
    large_groups = [f"p{i // 4}" for i in range(800)]      # 200 patients
    lo_s, hi_s = bts.bootstrap_interval(small, small_groups, n=500, seed=1)
    lo_l, hi_l = bts.bootstrap_interval(large, large_groups, n=500, seed=1)
    assert lo_s < small.mean() < hi_s
    assert lo_l < large.mean() < hi_l
    assert hi_l - lo_l < (hi_s - lo_s) / 2
    assert 0 <= lo_s and hi_s <= 1


def test_bootstrap_interval_deterministic_for_seed():
    rng = np.random.default_rng(1)
    values = rng.random(30)
    groups = [str(i % 7) for i in range(30)]
    a = bts.bootstrap_interval(values, groups, n=300, seed=5)
    assert a == bts.bootstrap_interval(values, groups, n=300, seed=5)
    assert a != bts.bootstrap_interval(values, groups, n=300, seed=6)


def test_bootstrap_interval_resamples_whole_groups():
    # Every patient's images average 0.5 while the images differ (0 and 1): resampling whole patients
    # gives 0.5 every time; resampling images would not.
    values = np.array([0.0, 1.0] * 6)
    groups = [f"p{i // 2}" for i in range(12)]
    lo, hi = bts.bootstrap_interval(values, groups, n=400, seed=0)
    assert lo == pytest.approx(0.5) and hi == pytest.approx(0.5)
    lo, hi = bts.bootstrap_interval(np.full(10, 0.3), [f"p{i // 2}" for i in range(10)], n=100, seed=0)
    assert lo == pytest.approx(0.3) and hi == pytest.approx(0.3)


def test_no_interval_from_fewer_than_five_groups():
    values = np.array([0.0] * 5 + [1.0] * 5)
    assert bts.bootstrap_interval(values, ["a"] * 5 + ["b"] * 5) is None  # once a zero-width "95%" interval
    assert bts.bootstrap_interval(values, [f"p{i % 4}" for i in range(10)]) is None
    assert bts.bootstrap_interval(values, [f"p{i % 5}" for i in range(10)]) is not None


# -----------------------------------------------------------------------------
# Precision: a fixed rule of the machine and --amp, never a measurement


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_loss_stays_float32_in_both_precisions(dtype):
    torch.manual_seed(0)
    model = bts.UNet(width=4)
    x = torch.rand(2, 1, 32, 32)
    with bts.Machine(torch.device("cpu"), dtype).autocast():
        logits = model(x)
    loss = bts.compute_loss(logits, (x > 0.5).float(), bts.Config())
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)


# -----------------------------------------------------------------------------
# MONAI, a well-kept library, as the oracle of the metrics


def random_masks(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """n binary masks of random blobs (some empty), as (n, 1, size, size) floats."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, 1, size, size), np.float32)
    for i in range(n):
        for _ in range(rng.integers(0, 3)):
            cy, cx, r = rng.integers(4, size - 4, 2).tolist() + [int(rng.integers(2, 8))]
            yy, xx = np.ogrid[:size, :size]
            masks[i, 0][(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1
    return torch.from_numpy(masks)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI's own deprecation inside HausdorffDistanceMetric
def test_dice_iou_and_hd95_agree_with_monai():
    import monai.metrics as monai  # a requirement of the tests (requirements-dev.txt): its absence fails here
    pred, truth = random_masks(300, seed=1), random_masks(300, seed=2)
    pred[:20] = truth[:20]  # some perfect predictions, and with the blobs' chance some empty pairs
    scores = bts.scores_from_counts(bts.confusion_counts(pred > 0.5, truth))
    dice = monai.DiceMetric(include_background=True, reduction="none", ignore_empty=False)(pred, truth)
    iou = monai.MeanIoU(include_background=True, reduction="none", ignore_empty=False)(pred, truth)
    np.testing.assert_allclose(scores["dice"], dice[:, 0].numpy(), atol=1e-6)
    np.testing.assert_allclose(scores["iou"], iou[:, 0].numpy(), atol=1e-6)
    both = [i for i in range(300) if pred[i].any() and truth[i].any()]
    assert len(both) > 100
    hd = monai.HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")(pred[both],
                                                                                                truth[both])
    ours = np.array([bts.hd95(pred[i, 0].numpy() > 0.5, truth[i, 0].numpy() > 0.5) for i in both])
    difference = np.abs(ours - hd[:, 0].numpy())
    assert difference.max() <= 1.0 and difference.mean() <= 0.25  # border conventions differ by under a pixel
