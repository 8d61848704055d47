"""Small demo models the project trains itself and ships, plus a tiny flags classifier.

Three models live in ``unlearn_core/assets`` (rebuilt by ``python benchmarks/train_demo_models.py``):

- **flags** (``flags_sd3.safetensors``): a pixel-space ``SD3Transformer2DModel`` trained with
  rectified flow on six procedurally drawn 32x32 national flags. The class "prompt" is a fixed,
  seeded embedding (:func:`flags_conditioning`), like the output of a frozen text encoder, so it
  can be regenerated anywhere from code. Most samples are the right flag; the few that are not
  (an "ireland" with a red band, i.e. Italy) are what the demo unlearns.
- **shapes** (``shapes_ddpm.safetensors``): an unconditional epsilon-prediction ``UNet2DModel``
  on small images of one coloured circle, square or triangle on a plain background.
- **classifier** (``flags_classifier.safetensors``): a small CNN over the six flags, trained with
  augmentation and noise so that it judges generated samples; it finds wrong outputs and its
  penultimate layer is the feature space of distribution distances.

Weights of the two diffusion models are stored as fp16 and converted back to fp32 on load.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from ..diffusion.process import DDPMEpsilon, RectifiedFlow
from ..errors import InputError

__all__ = [
    "FLAG_CLASSES",
    "FLAG_SIZE",
    "SHAPES_SIZE",
    "ASSETS",
    "FLAGS_WEIGHTS",
    "SHAPES_WEIGHTS",
    "CLASSIFIER_WEIGHTS",
    "draw_flag",
    "flag_dataset",
    "flags_conditioning",
    "build_flags_transformer",
    "load_flags_model",
    "draw_shape",
    "draw_shapes_dataset",
    "build_shapes_unet",
    "shapes_scheduler",
    "load_shapes_model",
    "FlagClassifier",
    "load_flags_classifier",
    "classify_flags",
]

log = logging.getLogger(__name__)

FLAG_CLASSES = ("japan", "ireland", "italy", "ivory_coast", "france", "germany")
FLAG_SIZE = 32
SHAPES_SIZE = 16
SHAPE_KINDS = ("circle", "square", "triangle")

ASSETS = Path(__file__).resolve().parent.parent / "assets"
FLAGS_WEIGHTS = "flags_sd3.safetensors"
SHAPES_WEIGHTS = "shapes_ddpm.safetensors"
CLASSIFIER_WEIGHTS = "flags_classifier.safetensors"

#: Shape of the per-class "prompt": tokens x width, and the pooled width.
TEXT_TOKENS = 4
TEXT_DIM = 32
POOLED_DIM = 32
#: Seed of the frozen class embeddings. Changing it invalidates the shipped flags model.
CONDITIONING_SEED = 20260101
#: Supersampling factor for anti-aliased edges.
_SUPERSAMPLE = 4

# Colours (sRGB in [0, 1]) of the bands, left to right or top to bottom.
_WHITE = (1.0, 1.0, 1.0)
_FLAG_SPEC: dict[str, tuple[str, tuple[tuple[float, float, float], ...]]] = {
    "japan": ("disc", (_WHITE, (0.74, 0.0, 0.18))),
    "ireland": ("vertical", ((0.09, 0.61, 0.38), _WHITE, (1.0, 0.53, 0.24))),
    "italy": ("vertical", ((0.0, 0.57, 0.27), _WHITE, (0.81, 0.17, 0.22))),
    "ivory_coast": ("vertical", ((0.97, 0.50, 0.0), _WHITE, (0.0, 0.62, 0.38))),
    "france": ("vertical", ((0.0, 0.33, 0.64), _WHITE, (0.94, 0.25, 0.21))),
    "germany": ("horizontal", ((0.0, 0.0, 0.0), (0.87, 0.0, 0.0), (1.0, 0.81, 0.0))),
}


# --------------------------------------------------------------------------- flags: data


def _uniform(generator: torch.Generator | None, low: float, high: float, shape=()) -> torch.Tensor:
    if generator is None:
        return torch.full(shape, (low + high) / 2)
    return low + (high - low) * torch.rand(shape, generator=generator)


@functools.lru_cache(maxsize=8)
def _axis(size: int) -> torch.Tensor:
    """Supersampled pixel-centre coordinates in [0, 1] along one axis."""
    n = size * _SUPERSAMPLE
    return (torch.arange(n, dtype=torch.float32) + 0.5) / n


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Supersampled pixel-centre coordinates (y, x) in [0, 1]."""
    axis = _axis(size)
    return torch.meshgrid(axis, axis, indexing="ij")


def _finish(image: torch.Tensor, generator: torch.Generator | None, noise: float) -> torch.Tensor:
    """Add pixel noise to a (3, H, W) image in [0, 1] and map it to [-1, 1]."""
    if generator is not None and noise > 0:
        image = image + noise * torch.randn(image.shape, generator=generator)
    return (image.clamp(0, 1) * 2 - 1).contiguous()


def draw_flag(name: str, generator: torch.Generator | None = None, size: int = FLAG_SIZE) -> torch.Tensor:
    """Draw flag ``name`` (one of :data:`FLAG_CLASSES`) as a (3, size, size) tensor in [-1, 1].

    Without a generator the canonical flag is drawn (square, equal bands, centred disc). With one,
    mild natural variation is added: per-band colour jitter, band boundaries shifted by up to about
    a pixel, disc position and radius jitter, a slight global brightness change and a little pixel
    noise, so that a model trained on these learns a distribution rather than six fixed images.
    """
    if name not in _FLAG_SPEC:
        raise InputError(f"unknown flag {name!r}; choose one of {', '.join(FLAG_CLASSES)}")
    layout, colours = _FLAG_SPEC[name]
    jitter = 0.0 if generator is None else 1.0
    rgb = torch.tensor(colours, dtype=torch.float32)  # (bands, 3)
    rgb = rgb + jitter * _uniform(generator, -0.04, 0.04, rgb.shape)
    brightness = 1.0 + jitter * float(_uniform(generator, -0.04, 0.04))
    rgb = (rgb * brightness).clamp(0, 1)
    pixel = 1.0 / size
    if layout == "disc":
        y, x = _grid(size)
        cy, cx = (0.5 + _uniform(generator, -1.5, 1.5, (2,)) * pixel * jitter).tolist()
        radius = 0.3 + float(_uniform(generator, -1.0, 1.0)) * pixel * jitter
        inside = ((y - cy) ** 2 + (x - cx) ** 2) < radius**2
        canvas = F.avg_pool2d(rgb[inside.long()].permute(2, 0, 1)[None], _SUPERSAMPLE)[0]
    else:  # bands only vary along one axis: anti-alias a 1-D profile and broadcast it
        coord = _axis(size)
        first = 1 / 3 + float(_uniform(generator, -1.0, 1.0)) * pixel * jitter
        second = 2 / 3 + float(_uniform(generator, -1.0, 1.0)) * pixel * jitter
        index = (coord >= first).long() + (coord >= second).long()
        profile = rgb[index].reshape(size, _SUPERSAMPLE, 3).mean(dim=1).T  # (3, size)
        canvas = profile[:, None, :] if layout == "vertical" else profile[:, :, None]
        canvas = canvas.expand(3, size, size)
    return _finish(canvas, generator, noise=0.015)


def flag_dataset(n_per_class: int, seed: int, size: int = FLAG_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_per_class`` varied drawings of every flag: images (N, 3, H, W) in [-1, 1], labels (N,).

    Classes are interleaved (label ``i % 6``) so any prefix of the set is balanced; the same
    ``seed`` always gives the same set.
    """
    if n_per_class < 1:
        raise InputError(f"n_per_class must be at least 1, got {n_per_class}")
    generator = torch.Generator().manual_seed(int(seed))
    labels = torch.arange(len(FLAG_CLASSES)).repeat(n_per_class)
    images = torch.stack([draw_flag(FLAG_CLASSES[int(label)], generator, size) for label in labels])
    return images, labels


def _class_embeddings() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(CONDITIONING_SEED)
    tokens = torch.randn(len(FLAG_CLASSES), TEXT_TOKENS, TEXT_DIM, generator=generator)
    pooled = torch.randn(len(FLAG_CLASSES), POOLED_DIM, generator=generator)
    return tokens, pooled


def flags_conditioning(labels: torch.Tensor | list[int] | int) -> dict[str, torch.Tensor]:
    """The frozen "prompt" of each flag class, as SD3 conditioning for a batch of labels.

    Returns ``{"encoder_hidden_states": (N, 4, 32), "pooled_projections": (N, 32)}``. The class
    embeddings are drawn from a fixed seed (not learned), like the output of a frozen text
    encoder, so every process regenerates exactly the same tensors from code.
    """
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if len(labels) and (labels.min() < 0 or labels.max() >= len(FLAG_CLASSES)):
        raise InputError(f"flag labels must lie in 0..{len(FLAG_CLASSES) - 1}, got {labels.tolist()}")
    tokens, pooled = _class_embeddings()
    return {"encoder_hidden_states": tokens[labels].clone(), "pooled_projections": pooled[labels].clone()}


# --------------------------------------------------------------------------- flags: model


def build_flags_transformer() -> torch.nn.Module:
    """The (randomly initialised) pixel-space SD3 transformer of the flags demo.

    3 channels, 32x32 pixels in 2x2 patches (256 image tokens), 4 joint blocks of width 64
    (2 heads x 32), conditioned on :func:`flags_conditioning` (about 0.58 M parameters).
    """
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=FLAG_SIZE, patch_size=2, in_channels=3, out_channels=3, num_layers=4,
        attention_head_dim=32, num_attention_heads=2, joint_attention_dim=TEXT_DIM,
        caption_projection_dim=64, pooled_projection_dim=POOLED_DIM, pos_embed_max_size=32,
    )  # fmt: skip


def flags_process() -> RectifiedFlow:
    """The forward process the flags model was trained with (SD3's shift 3)."""
    return RectifiedFlow(shift=3.0)


def _weights_path(filename: str, folder: str | Path | None) -> Path:
    path = Path(folder) / filename if folder is not None else ASSETS / filename
    if not path.is_file():
        raise InputError(
            f"demo model weights {path} are missing; rebuild them with "
            "`python benchmarks/train_demo_models.py` (or reinstall the package)"
        )
    return path


def _load_into(model: torch.nn.Module, path: Path) -> torch.nn.Module:
    from safetensors.torch import load_file

    state = {key: value.float() for key, value in load_file(str(path)).items()}
    model.load_state_dict(state, strict=True)
    model.eval().requires_grad_(False)
    return model


def load_flags_model(folder: str | Path | None = None) -> tuple[torch.nn.Module, RectifiedFlow]:
    """The shipped flags transformer (fp32, eval, frozen) and its ``RectifiedFlow(shift=3.0)``.

    ``folder`` defaults to the package's ``assets``; a missing file raises :class:`InputError`.
    """
    path = _weights_path(FLAGS_WEIGHTS, folder)
    model = _load_into(build_flags_transformer(), path)
    log.debug("loaded flags model from %s", path)
    return model, flags_process()


# --------------------------------------------------------------------------- shapes DDPM


def draw_shape(generator: torch.Generator, size: int = SHAPES_SIZE, kind: str | None = None) -> torch.Tensor:
    """One random shape (circle, square or triangle; ``kind`` when given) on a plain background,
    (3, size, size) in [-1, 1].

    Colours, position and size are random; foreground and background are kept clearly apart.
    """
    y, x = _grid(size)
    drawn = SHAPE_KINDS[int(torch.randint(len(SHAPE_KINDS), (), generator=generator))]  # drawn either way: same stream
    kind = drawn if kind is None else kind
    background = torch.rand(3, generator=generator)
    while True:  # a foreground colour that stands out from the background
        foreground = torch.rand(3, generator=generator)
        if float((foreground - background).abs().sum()) > 0.6:
            break
    half = float(_uniform(generator, 0.15, 0.3))  # half-extent as a fraction of the image
    cy, cx = _uniform(generator, half + 0.05, 0.95 - half, (2,)).tolist()
    if kind == "circle":
        inside = ((y - cy) ** 2 + (x - cx) ** 2) < half**2
    elif kind == "square":
        inside = ((y - cy).abs() < half * 0.9) & ((x - cx).abs() < half * 0.9)
    else:  # upward triangle: apex at the top, base at the bottom
        top, bottom = cy - half, cy + half
        progress = ((y - top) / (bottom - top)).clamp(0, 1)
        inside = (y >= top) & (y <= bottom) & ((x - cx).abs() <= progress * half)
    canvas = torch.where(inside[None], foreground[:, None, None], background[:, None, None])
    return _finish(F.avg_pool2d(canvas[None], _SUPERSAMPLE)[0], None, noise=0.0)


def draw_shapes_dataset(n: int, seed: int, size: int = SHAPES_SIZE) -> torch.Tensor:
    """``n`` random shape images (N, 3, size, size) in [-1, 1]; the same seed gives the same set."""
    if n < 1:
        raise InputError(f"n must be at least 1, got {n}")
    generator = torch.Generator().manual_seed(int(seed))
    return torch.stack([draw_shape(generator, size) for _ in range(n)])


def build_shapes_unet() -> torch.nn.Module:
    """The (randomly initialised) unconditional UNet of the shapes DDPM (16x16 RGB, ~1.1 M parameters)."""
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=SHAPES_SIZE, in_channels=3, out_channels=3, block_out_channels=(32, 64, 64),
        layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), norm_num_groups=8,
        attention_head_dim=32,
    )  # fmt: skip


def shapes_scheduler():
    """The diffusers scheduler the shapes DDPM was trained with (1000 steps, linear betas)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")


def load_shapes_model(folder: str | Path | None = None) -> tuple[torch.nn.Module, DDPMEpsilon]:
    """The shipped shapes UNet (fp32, eval, frozen) and its :class:`DDPMEpsilon` process."""
    path = _weights_path(SHAPES_WEIGHTS, folder)
    model = _load_into(build_shapes_unet(), path)
    log.debug("loaded shapes model from %s", path)
    return model, DDPMEpsilon.from_scheduler(shapes_scheduler())


# --------------------------------------------------------------------------- classifier


class FlagClassifier(torch.nn.Module):
    """A small CNN over the six flags.

    Input: images in [0, 1], shape (N, 3, 32, 32). :meth:`forward` returns logits over
    :data:`FLAG_CLASSES`; :meth:`features` returns the 128-wide penultimate embedding. The head
    keeps the spatial layout (no global pooling), so mirrored flags (Ireland vs Ivory Coast) stay
    apart.
    """

    embedding_dim = 128

    def __init__(self, num_classes: int = len(FLAG_CLASSES)):
        super().__init__()

        def block(cin: int, cout: int) -> torch.nn.Sequential:
            return torch.nn.Sequential(
                torch.nn.Conv2d(cin, cout, 3, padding=1), torch.nn.BatchNorm2d(cout), torch.nn.ReLU(),
                torch.nn.MaxPool2d(2),
            )  # fmt: skip

        self.body = torch.nn.Sequential(block(3, 16), block(16, 32), block(32, 32))  # 32 -> 4
        self.embed = torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(32 * 4 * 4, self.embedding_dim), torch.nn.ReLU()
        )
        self.head = torch.nn.Linear(self.embedding_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate embedding (N, 128) of images in [0, 1]."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise InputError(f"the classifier takes (N, 3, H, W) images, got {tuple(x.shape)}")
        if x.shape[-2:] != (FLAG_SIZE, FLAG_SIZE):
            x = F.interpolate(x, size=(FLAG_SIZE, FLAG_SIZE), mode="bilinear", align_corners=False, antialias=True)
        return self.embed(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, 6) of images in [0, 1]."""
        return self.head(self.features(x))


def load_flags_classifier(folder: str | Path | None = None) -> FlagClassifier:
    """The shipped :class:`FlagClassifier` (eval, frozen)."""
    path = _weights_path(CLASSIFIER_WEIGHTS, folder)
    model = _load_into(FlagClassifier(), path)
    log.debug("loaded flags classifier from %s", path)
    return model


def outer_bands_mask(height: int = FLAG_SIZE, width: int = FLAG_SIZE) -> torch.Tensor:
    """(1, 1, H, W) repaint mask a user would paint on a wrong tricolour: 1 on the outer bands,
    where the confusable flags differ; 0 on the white middle band, the structure that is kept."""
    mask = torch.ones(1, 1, height, width)
    third = width // 3
    mask[..., third : width - third] = 0
    return mask


class _FlagFeatures(torch.nn.Module):
    def __init__(self, classifier: FlagClassifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images)


def flag_copy_detector(classifier: FlagClassifier | None = None):
    """Copy similarity in the flag classifier's penultimate features: the offline stand-in for
    SSCD on the flags model (a learned feature space of exactly this data)."""
    from ..verify.metrics import FeatureCopyDetector

    return FeatureCopyDetector(_FlagFeatures(classifier or load_flags_classifier()), "flag-classifier features")


@torch.no_grad()
def classify_flags(classifier: FlagClassifier, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted labels (N,) and their probabilities (N,) for images in [-1, 1]."""
    probs = classifier(((images.float() + 1) / 2).clamp(0, 1)).softmax(dim=1)
    confidence, labels = probs.max(dim=1)
    return labels, confidence
