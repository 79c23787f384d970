import pytest
import torch

from datamodules.synthetic import generate_phantoms


def _lung_region(size, top=-0.55, bottom=-0.1):
    """Boolean mask of a band of pixels inside the lung fields of (nearly) every phantom."""
    axis = torch.linspace(-1.0, 1.0, size)
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    return (x.abs() > 0.25) & (x.abs() < 0.55) & (y > top) & (y < bottom)


def _corners(size):
    """Boolean mask of the four image corners, outside the body."""
    axis = torch.linspace(-1.0, 1.0, size)
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    return (x.abs() > 0.85) & (y.abs() > 0.85)


def _abdomen(size):
    """Boolean mask of soft tissue below the diaphragm."""
    axis = torch.linspace(-1.0, 1.0, size)
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    return (x.abs() < 0.3) & (y > 0.5) & (y < 0.8)


def _logistic_regression_accuracy(features, labels, train_fraction=0.7, steps=500):
    """Held-out accuracy of a logistic regression trained by full-batch Adam."""
    features = (features - features.mean(0)) / (features.std(0) + 1e-8)
    features = torch.cat([features, torch.ones(len(features), 1)], dim=1)
    split = int(train_fraction * len(features))
    weights = torch.zeros(features.shape[1], requires_grad=True)
    optimizer = torch.optim.Adam([weights], lr=0.05)
    targets = labels.float()
    for _ in range(steps):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(features[:split] @ weights, targets[:split])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        predictions = (features[split:] @ weights > 0).long()
    return (predictions == labels[split:]).float().mean().item()


pytestmark = pytest.mark.usefixtures("single_thread")  # many small element-wise ops


@pytest.fixture(scope="module")
def dataset(single_thread):
    return generate_phantoms(2000, 32, seed=11)


@pytest.mark.parametrize("num_images, positive_fraction", [(50, 0.5), (37, 0.3), (20, 0.0), (20, 1.0)])
def test_shapes_dtypes_range_and_label_count(num_images, positive_fraction):
    images, labels = generate_phantoms(num_images, 24, seed=0, positive_fraction=positive_fraction)
    assert images.shape == (num_images, 1, 24, 24)
    assert images.dtype == torch.float32
    assert labels.shape == (num_images,)
    assert labels.dtype == torch.int64
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert set(labels.unique().tolist()) <= {0, 1}
    assert labels.sum().item() == round(positive_fraction * num_images)


def test_labels_are_shuffled():
    _, labels = generate_phantoms(200, 16, seed=0)
    assert 0 < labels[:100].sum() < 100


def test_same_seed_is_bit_identical():
    images_a, labels_a = generate_phantoms(40, 32, seed=5)
    images_b, labels_b = generate_phantoms(40, 32, seed=5)
    assert torch.equal(images_a, images_b)
    assert torch.equal(labels_a, labels_b)


def test_different_seeds_give_different_images():
    images_a, _ = generate_phantoms(40, 32, seed=5)
    images_b, _ = generate_phantoms(40, 32, seed=6)
    assert (images_a - images_b).abs().mean() > 0.01


def test_global_rng_is_untouched():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    generate_phantoms(10, 16, seed=0)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("size", [16, 64, 128])
def test_anatomy_is_present_at_every_size(size):
    images, _ = generate_phantoms(8, size, seed=1)
    per_image_std = images.flatten(1).std(dim=1)
    assert per_image_std.min() > 0.08
    # Dark lungs inside a brighter body, dark background outside it.
    lungs = images[:, 0][:, _lung_region(size)].mean(dim=1)
    corners = images[:, 0][:, _corners(size)].mean(dim=1)
    abdomen = images[:, 0][:, _abdomen(size)].mean(dim=1)
    assert (lungs < abdomen - 0.1).all()
    assert (corners < abdomen - 0.2).all()


def test_image_statistics_do_not_separate_the_classes(dataset):
    images, labels = dataset
    flat = images.flatten(1)
    stats = torch.stack([flat.mean(1), flat.std(1), flat.amin(1), flat.amax(1)], dim=1)
    assert _logistic_regression_accuracy(stats, labels) <= 0.65
    # Even the best threshold on the image mean, chosen on the same data, is weak.
    sorted_labels = labels[flat.mean(1).argsort()]
    num_below = torch.arange(len(labels) + 1)
    positives_below = torch.cat([torch.zeros(1), sorted_labels.cumsum(0).float()])
    correct_if_dark_is_normal = (num_below - positives_below) + (labels.sum() - positives_below)
    best_correct = torch.maximum(correct_if_dark_is_normal, len(labels) - correct_if_dark_is_normal).max()
    assert best_correct.item() / len(labels) <= 0.65


def test_disease_signal_lies_in_the_lungs(dataset):
    images, labels = dataset
    difference = (images[labels == 1].mean(0) - images[labels == 0].mean(0))[0]
    inside_lungs = difference[_lung_region(32)].mean()
    # Lesions are denser than air, so TB lungs are brighter on average; elsewhere only noise differs.
    assert inside_lungs > 0.01
    assert inside_lungs > 3 * difference[_corners(32)].abs().mean()
    assert inside_lungs > 3 * difference[_abdomen(32)].abs().mean()
    # Upper-lobe predominance.
    assert difference[_lung_region(32, -0.55, -0.25)].mean() > difference[_lung_region(32, -0.1, 0.2)].mean()


def test_rejects_too_small_images():
    with pytest.raises(ValueError):
        generate_phantoms(4, 8, seed=0)
