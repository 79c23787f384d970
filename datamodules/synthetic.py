"""Synthetic chest-radiograph phantoms for a normal vs tuberculosis task.

Each image is a PA-view phantom drawn on a normalized grid ([-1, 1]^2, y pointing
down), so the anatomy scales with the image size. Brightness means density: a dark
background, a soft-tissue body ellipse, two dark tapered superellipse lung fields
cut by diaphragm domes, a bright spine and heart (bulging to the image's right),
clavicles and posterior ribs as bright arcs, and faint vascular texture in the
lungs. Every anatomical parameter is drawn per image, and a low-frequency gain
field, smoothed noise and a global brightness/contrast/rotation/shift make images
differ far more than the disease shifts their global intensity statistics.

Tuberculosis images (label 1) add one to four lesions inside the lungs, biased to
the upper zones: soft nodules, cavities (bright wall, lucent centre) and patchy
infiltrates. Lesion contrast varies per image and a few cases are very faint.
Benign calcified dots occur in both classes, so a bright spot alone is no cue.
"""

import torch

_PIXELS_PER_CHUNK = 1 << 18  # keeps the (chunk, S, S) temporaries cache-sized: much faster
_RIBS_PER_SIDE = 9
_MAX_LESIONS = 4
_FAINT_CASE_FRACTION = 0.05


def _uniform(gen, n, low, high):
    """Per-image uniform samples of shape (n, 1, 1)."""
    return low + (high - low) * torch.rand(n, 1, 1, generator=gen)


def _chance(gen, n, p):
    """Per-image Bernoulli(p) draws as a float tensor of shape (n, 1, 1)."""
    return (torch.rand(n, 1, 1, generator=gen) < p).float()


def _rotate(x, y, angle):
    """Rotate coordinates by ``angle`` radians."""
    cos, sin = torch.cos(angle), torch.sin(angle)
    return cos * x + sin * y, cos * y - sin * x


def _bump(t_squared):
    """Smooth compact bump (1 - t^2)^2 on |t| < 1: a cheap stand-in for a Gaussian."""
    inside = (1.0 - t_squared).clamp(min=0.0)
    return inside * inside


def _blob(x, y, cx, cy, radius):
    """Round soft blob of the given radius with peak 1."""
    return _bump(((x - cx).square() + (y - cy).square()) / radius.square())


def _inside(level, edge):
    """Soft indicator of ``level < 1`` with a transition about ``edge`` wide."""
    return torch.sigmoid((1.0 - level) / edge)


def _superellipse(x, y, ax, ay):
    """Level function |x/ax|^3 + |y/ay|^3 of a centred superellipse: 1 on its boundary."""
    u, v = (x / ax).abs(), (y / ay).abs()
    return u * u * u + v * v * v


def _smooth_noise(gen, n, size, cells):
    """Unit-variance Gaussian noise of shape (n, size, size), smooth over size / cells pixels."""
    knots = torch.linspace(-1.0, 1.0, cells)
    pixels = torch.linspace(-1.0, 1.0, size)
    basis = torch.exp(-0.5 * ((pixels[:, None] - knots[None, :]) * (cells - 1) / 2).square())
    basis = basis / basis.norm(dim=1, keepdim=True)
    return basis @ torch.randn(n, cells, cells, generator=gen) @ basis.T


def _lungs(gen, n, x, y):
    """Both lung fields cut by diaphragm domes; returns the mask and per-side geometry."""
    mask = torch.zeros_like(x)
    geometry = {}
    for side in (-1.0, 1.0):  # -1: image left, i.e. the patient's right lung
        cx = side * _uniform(gen, n, 0.35, 0.42)
        cy = _uniform(gen, n, -0.12, -0.02)
        ax = _uniform(gen, n, 0.25, 0.31) * (0.92 if side > 0 else 1.0)
        ay = _uniform(gen, n, 0.5, 0.6)
        ly = y - cy
        lx = x - cx + side * _uniform(gen, n, 0.0, 0.15) * ly  # shear: apices lean medially
        taper = 1.0 + 0.3 * (ly / ay).clamp(-1.5, 1.5)  # narrow apex, wide base
        lung = _inside(_superellipse(lx / taper, ly, ax, ay), 0.12)
        # Diaphragm dome: highest near the lung centre, the patient's right one higher.
        dome_top = cy + ay * _uniform(gen, n, 0.55, 0.75) + (0.04 if side > 0 else 0.0)
        dome = dome_top + _uniform(gen, n, 0.15, 0.3) * ((x - cx) / ax).square()
        mask = torch.maximum(mask, lung * torch.sigmoid((dome - y) / 0.02))
        geometry[side] = (cx, cy, ax, ay)
    return mask, geometry


def _heart(gen, n, x, y):
    """Soft indicator of the heart: an ellipse, apex down and out, flattened where it sits on the diaphragm."""
    heart_y = y - _uniform(gen, n, 0.12, 0.2)
    heart_x = x - _uniform(gen, n, 0.08, 0.14) - _uniform(gen, n, 0.1, 0.3) * heart_y
    heart_y = torch.where(heart_y > 0, 0.5 * heart_y, heart_y)
    width, height = _uniform(gen, n, 0.28, 0.36), _uniform(gen, n, 0.22, 0.28)
    return _inside((heart_x / width).square() + (heart_y / height).square(), 0.12)


def _ribs(gen, n, x, y):
    """Posterior ribs: bright arcs on both sides of the spine."""
    lateral = x.abs()
    first_rib = _uniform(gen, n, -0.82, -0.72)
    spacing = _uniform(gen, n, 0.11, 0.14)
    rise, droop = _uniform(gen, n, 0.1, 0.25), _uniform(gen, n, 0.6, 0.9)
    # Ribs are level lines of a rib index: each arc leaves the spine, rises a little, then droops.
    rib_index = (y - first_rib + lateral * (rise - droop * lateral)) / spacing
    nearest_rib = rib_index.round().clamp(0, _RIBS_PER_SIDE - 1)
    width = 0.03 * (1.0 + 0.5 * lateral)
    ribs = _bump(((rib_index - nearest_rib) * spacing / width).square())
    return ribs * torch.sigmoid((lateral - 0.06) / 0.02) * torch.sigmoid((0.85 - lateral) / 0.03)


def _clavicles(gen, n, x, y):
    """Two clavicles: bright bands rising slightly from the midline to the shoulders."""
    lateral = x.abs()
    centre = _uniform(gen, n, -0.62, -0.52) - _uniform(gen, n, 0.1, 0.25) * lateral
    clavicles = _bump(((y - centre) / 0.05).square())
    return clavicles * torch.sigmoid((lateral - 0.08) / 0.02) * torch.sigmoid((0.7 - lateral) / 0.03)


def _lesions(gen, x, y, geometry, texture):
    """Sum of 1-4 TB lesions per image: nodules, cavities or patchy infiltrates."""
    n = x.shape[0]
    count = torch.randint(1, _MAX_LESIONS + 1, (n, 1, 1), generator=gen)
    faint = _chance(gen, n, _FAINT_CASE_FRACTION)
    contrast = faint * _uniform(gen, n, 0.01, 0.025) + (1 - faint) * _uniform(gen, n, 0.2, 0.4)
    field = torch.zeros_like(x)
    for slot in range(_MAX_LESIONS):
        right = torch.rand(n, 1, 1, generator=gen) < 0.5
        cx, cy, ax, ay = (torch.where(right, r, l) for r, l in zip(geometry[1.0], geometry[-1.0]))
        upper_zone = _chance(gen, n, 0.75)  # TB is upper-lobe predominant
        upper, lower = _uniform(gen, n, -0.8, -0.15), _uniform(gen, n, -0.15, 0.55)
        px = cx + ax * _uniform(gen, n, -0.6, 0.6)
        py = cy + ay * (upper_zone * upper + (1 - upper_zone) * lower)
        radius = _uniform(gen, n, 0.1, 0.2)
        kind = torch.randint(0, 3, (n, 1, 1), generator=gen)
        cavity, infiltrate = (kind == 1).float(), (kind == 2).float()
        # Every kind is a soft blob; a cavity punches a lucent hole in it, and an
        # infiltrate is larger, grows a satellite blob and takes the lung texture.
        distance_sq = (x - px).square() + (y - py).square()
        shape = _bump(distance_sq / (radius * (1.0 + 0.5 * infiltrate)).square())
        shape = shape - 1.3 * cavity * _bump(distance_sq / (0.5 * radius).square())
        ox, oy = (1.5 * radius * torch.randn(n, 1, 1, generator=gen) for _ in range(2))
        shape = shape + infiltrate * _blob(x, y, px + ox, py + oy, 1.3 * radius)
        shape = shape.clamp(max=1.0) * (1.0 + 0.4 * infiltrate * texture)
        field = field + (count > slot) * _uniform(gen, n, 0.7, 1.3) * shape
    return contrast * field


def _render(gen, labels, size):
    """Render one chunk of phantoms: (n, size, size) intensities in [0, 1] and (n, size, size) bool lung fields."""
    n = labels.shape[0]
    axis = torch.linspace(-1.0, 1.0, size)
    grid_y, grid_x = torch.meshgrid(axis, axis, indexing="ij")
    x, y = _rotate(
        grid_x - _uniform(gen, n, -0.05, 0.05),
        grid_y - _uniform(gen, n, -0.05, 0.05),
        _uniform(gen, n, -0.07, 0.07),
    )
    body = _inside(_superellipse(x, y - 0.15, _uniform(gen, n, 0.85, 0.95), 1.12), 0.15)
    lungs, geometry = _lungs(gen, n, x, y)
    heart = _heart(gen, n, x, y)
    lungs = lungs * (1.0 - heart)  # the soft lung field every lung term below is drawn with
    mediastinum = _bump((x / _uniform(gen, n, 0.13, 0.18)).square()) * body
    texture = _smooth_noise(gen, n, size, 12)

    density = 0.06 + _uniform(gen, n, 0.4, 0.5) * body
    density = density - _uniform(gen, n, 0.28, 0.36) * lungs * (1.0 + 0.1 * texture)
    density = density + 0.12 * mediastinum + _uniform(gen, n, 0.03, 0.08) * heart
    # Ribs stand out against lung air but fade over soft tissue.
    density = density + _uniform(gen, n, 0.06, 0.11) * _ribs(gen, n, x, y) * body * (0.3 + 0.7 * lungs)
    density = density + _uniform(gen, n, 0.12, 0.2) * _clavicles(gen, n, x, y) * body
    # Benign calcified granulomas occur in both classes.
    dot = _blob(x, y, _uniform(gen, n, -0.6, 0.6), _uniform(gen, n, -0.5, 0.3), _uniform(gen, n, 0.02, 0.035))
    density = density + _chance(gen, n, 0.3) * _uniform(gen, n, 0.15, 0.3) * dot * lungs
    positive = labels == 1
    if positive.any():  # lesions are drawn for the positive images only, to save work
        lung_geometry = {side: [param[positive] for param in params] for side, params in geometry.items()}
        lesions = _lesions(gen, x[positive], y[positive], lung_geometry, texture[positive])
        density[positive] += lesions * lungs[positive]

    # Acquisition: uneven exposure, global brightness/contrast and quantum noise.
    density = density * (1.0 + 0.1 * _smooth_noise(gen, n, size, 4))
    density = density + _uniform(gen, n, -0.05, 0.05) * grid_x + _uniform(gen, n, -0.05, 0.05) * grid_y
    density = (density - 0.35) * _uniform(gen, n, 0.75, 1.3) + 0.35 + _uniform(gen, n, -0.1, 0.1)
    density = density + 0.015 * _smooth_noise(gen, n, size, max(4, size // 2))
    return density.clamp(0.0, 1.0), lungs > 0.5


def generate_phantoms(
    num_images: int, image_size: int, seed: int, positive_fraction: float = 0.5, masks: bool = False
) -> tuple[torch.Tensor, ...]:
    """Generate chest-X-ray-like phantoms for normal (0) vs tuberculosis (1).

    Returns images of shape (N, 1, S, S), float32 in [0, 1] (bright = dense), and
    labels of shape (N,), int64, with exactly round(positive_fraction * N) positives
    in a seeded random order; with `masks`, also each image's lung-field mask,
    (N, 1, S, S) float32 in {0, 1}. The lung field is where the soft indicator the
    lungs are drawn with (both superellipse lungs below their diaphragm domes, less
    the heart) exceeds 0.5: the pixels at least half lung. The output depends only
    on the arguments; `masks` does not change the images.
    """
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16, got {image_size}")
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction}")
    gen = torch.Generator().manual_seed(seed)
    labels = torch.zeros(num_images, dtype=torch.int64)
    labels[torch.randperm(num_images, generator=gen)[: round(positive_fraction * num_images)]] = 1
    chunk = max(1, _PIXELS_PER_CHUNK // (image_size * image_size))
    empty = torch.zeros(0, image_size, image_size)
    chunks = [_render(gen, labels[i : i + chunk], image_size) for i in range(0, num_images, chunk)] or [(empty, empty)]
    images, lung_fields = (torch.cat(parts).unsqueeze(1).to(torch.float32) for parts in zip(*chunks))
    return (images, labels, lung_fields) if masks else (images, labels)
