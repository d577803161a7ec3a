"""``equiadapt``: equiadapt 0.1.2's learned canonicalisation as published, in front of equibench's
shared prediction networks (Kaba et al., "Equivariance with Learned Canonicalization Functions",
ICML 2023; Mondal et al., "Equivariant Adaptation of Large Pretrained Models", NeurIPS 2023;
library ``equiadapt``, GitHub arnab39/equiadapt). Counterpart: ``canonicalization``.

graph3d (n-body only): ``EuclideanGroupNBody(VNDeepSets(hyperparams))``. The canonicaliser is a
vector-neuron deep set on the complete 5-particle graph: features ``[N, 3, C]`` (coordinates x
channels) from the centred positions (``canon_feature`` "p"; "pv", "pva", "pvc", "pvac" add
velocities, angular momenta x × v, charge-weighted positions), ``canon_layers`` VN layers
(``nn.Linear`` over channels, mean-pooled neighbours, VN-ReLU, dropout, residual), mean over the
graph, a linear layer to 4 vectors. The first three go through the library's modified
Gram–Schmidt to R; the translation is the centroid (plus the fourth vector with
``canon_translation``). The shared backbone phi sees the canonical input x_c = R (x - t),
v_c = R v (charges and edge attributes as they are) and the library maps its point output back:
f(X) = R^T phi(X_c) + t (``invert_canonicalization``). The library's call is reproduced: the
keyword inputs ``loc, edges, vel, edge_attr, charges`` are unpacked *by position* (their order
matters), the node count (5) is fixed in its code and the batch size in its hyperparameters (the
wrapper sets the latter to each batch's graph count; graphs of another size are refused).
Defaults are its n-body example's (hidden 16, 4 layers, mean pooling, ReLU, feature "p", no
learned translation, dropout 0.5, **no prior**). The library's continuous-group prior and identity
metric read a key ``EuclideanGroupNBody`` never writes (a ``KeyError`` as published); the wrapper
hands them R under that key: prior = MSE(R, I) (``prior_weight`` x, ``auxiliary_loss``),
``identity_metric`` = 1 - MSE(R, I), ``prior_mse`` = MSE(R, I) (``extra_metrics``).

Not equivariant as written (measured, see ``INEXACT_GRAPH``): the canonicaliser's vectors are
``[..., 3, 4]`` (coordinates, vectors) and the Gram–Schmidt takes ``vectors[:, k]``, i.e. the
k-th *coordinate row*, across the three vectors, so R is built from rows of U instead of its
columns (U -> Q U does not give R -> R Q^T); independently, every ``nn.Linear`` of the VN layers
and the output layer carries a bias, which adds the fixed direction b (1, 1, 1) to each vector
channel. Dropout (p = 0.5) acts on single coordinates in training (eval: off). Measured in float64
(E(3) with reflections, translations, permutations; 32 nbody test graphs, 4 samples, seed 0,
default options): rel_max 0.29 at init; 0.26 with the Gram–Schmidt fed the vectors, 0.27 with the
biases zeroed, 1.9e-10 with both (round-off of an ill-conditioned frame); after 200 training steps
(quick's budget, params 20 000) 0.056 (fp64 and fp32 alike).

image2d (C_N tasks; SO(2) uses C8): ``GroupEquivariantImageCanonicalization(
ESCNNEquivariantNetwork(in_shape, out_channels, kernel_size, "rotation", N, num_layers), cfg,
in_shape)``: an e2cnn C_N network of valid (unpadded) convolutions on regular fields (BatchNorm,
ReLU, dropout 0.5 between them), averaged over channels and space, scores the N rotations; the
argmax (a straight-through softmax in training, ``beta`` 1) gives the angle theta and the image is
rotated by -theta with kornia (bilinear; exact at quarter turns up to the rounding of cos/sin).
Our CNN (``blocks.cnn.ConvCore``, the baseline's) classifies the canonical image; logits are
invariant, nothing is mapped back. Sizes: kernel 3 and 3 layers as in its rotated-MNIST config;
``canon_width`` regular fields (its rotated-MNIST config: 16) or, by default, ``canonicalization``'s
rule max(2, w // (2N)) for CNN width w, the whole model parameter-matched to the default baseline
CNN (or to ``params``), so that the pair ``equiadapt`` / ``canonicalization`` is compared at equal
size. Prior: CE(scores, identity index) x ``prior_weight`` (default 100, its image experiments'
default; its rotated-MNIST config sets 0) through ``auxiliary_loss``; ``identity_metric`` = share
of inputs whose argmax is the identity, ``prior_ce`` = that CE (both computed by the library).
Measured invariant to 1e-16 (float64) under C4 on the digits test images (``exact_by_domain``).

Precision: the library makes its angle table and identity matrix in the default dtype; the wrapper
runs those calls under the input's dtype (kornia refuses mixed dtypes) so float64 measurements
measure the construction.
"""
from __future__ import annotations

import copy
import importlib.util
import warnings
from typing import Any, ClassVar, cast

import torch
from torch import nn
from torch_geometric.data import Batch

from ...core.registry import register_method
from ...core.spec import TaskSpec
from ...symmetry.fieldtypes import POINT
from ...symmetry.group2d import group_order
from ...symmetry.precision import default_dtype
from ..base import Method, build_at_params
from ..blocks.backbone import BackboneModel
from ..blocks.cnn import ConvCore, ImageModel, image_field, resolve_group
from ..blocks.image import build_image_model, image_size_options
from ..wrappers.baseline import Baseline
from ..wrappers.canonicalization import CANONICALISER_METRICS

LIBRARY = "equiadapt"
#: particles per graph, fixed in ``VNDeepSets.forward`` (``repeat(1, 5)``)
NBODY_NODES = 5
#: its n-body example's canonicaliser (examples/nbody/configs/canonicalization/vndeepsets.yaml)
GRAPH_WIDTH, GRAPH_LAYERS = 16, 4
#: its rotated-MNIST example's canonicaliser depth (configs/group_equivariant/rotmnist.yaml)
IMAGE_LAYERS = 3
#: prior weight per domain: none in its n-body example, 100 in its image experiments' default
DEFAULT_PRIOR_WEIGHT: dict[str, float] = {"graph3d": 0.0, "image2d": 100.0}
FEATURES = ("p", "pv", "pva", "pvc", "pvac")
NONLINEARITIES = ("relu", "leakyrelu", "softplus")

INEXACT_GRAPH = (
    "equiadapt 0.1.2's n-body canonicaliser is not O(3)-equivariant as written: its Gram-Schmidt "
    "orthonormalises the coordinate rows of the [3 x 3] vector block (vectors[:, k] indexes a "
    "coordinate, not a vector) and its vector-neuron layers add biases (nn.Linear(bias=True)), "
    "a fixed (1, 1, 1) direction; measured float64 rel_max 0.16-0.29 on nbody test graphs at init, "
    "0.056 after 200 steps")


def _quiet_import() -> Any:
    """``import equiadapt`` without torchvision's image-extension warning (it is built without
    its C++ ops on purpose: equiadapt only uses pure-tensor transforms)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import equiadapt  # optional dependency
    return equiadapt


def _nbody_library() -> tuple[Any, Any]:
    _quiet_import()
    from equiadapt.nbody.canonicalization.euclidean_group import EuclideanGroupNBody
    from equiadapt.nbody.canonicalization_networks.custom_equivariant_networks import VNDeepSets
    return EuclideanGroupNBody, VNDeepSets


def _image_library() -> tuple[Any, Any]:
    lib = _quiet_import()
    return lib.GroupEquivariantImageCanonicalization, lib.ESCNNEquivariantNetwork


def _config(**values: Any) -> Any:
    from omegaconf import OmegaConf  # equiadapt's own configuration type (a dependency of it)
    return OmegaConf.create(values)


class _Last:
    """The last forward's batch and canonicaliser output (R or scores) for the prior and metric
    hooks; deep copies and pickles start empty (a non-leaf tensor cannot be deep-copied)."""

    def __init__(self) -> None:
        self.key: Any = None
        self.value: torch.Tensor | None = None

    def store(self, key: Any, value: torch.Tensor) -> None:
        self.key, self.value = key, value

    def get(self, key: Any) -> torch.Tensor | None:
        return self.value if self.key is key else None

    def __deepcopy__(self, memo: dict) -> _Last:
        return _Last()

    def __getstate__(self) -> dict:
        return {"key": None, "value": None}


def _pop_info(canonicalizer: Any) -> dict:
    """Empty the library's ``canonicalization_info_dict`` (it holds the last graph's tensors)."""
    info = dict(canonicalizer.canonicalization_info_dict)
    canonicalizer.canonicalization_info_dict = {}
    return info


# ---- graph3d: n-body --------------------------------------------------------------------------
class NBodyCanonicalised(nn.Module):
    """f(X) = R^T phi(R (X - t)) + t with R, t from ``EuclideanGroupNBody`` (module docstring)."""

    def __init__(self, canonicalizer: nn.Module, backbone: nn.Module, spec: TaskSpec,
                 fields: dict[str, str]) -> None:
        super().__init__()
        self.canonicalizer, self.backbone, self.spec = canonicalizer, backbone, spec
        self.pos, self.vel, self.charge = fields["point"], fields["vector"], fields["scalar"]
        self._last = _Last()

    def forward(self, batch: Batch) -> torch.Tensor:
        pos, vel = batch[self.pos], batch[self.vel]
        B = int(batch.num_graphs)
        counts = torch.bincount(batch.batch, minlength=B)
        if not bool((counts == NBODY_NODES).all()):
            raise ValueError(f"equiadapt's VNDeepSets handles graphs of exactly {NBODY_NODES} nodes "
                             f"(fixed in its code); got sizes {sorted(set(counts.tolist()))}")
        lib: Any = self.canonicalizer
        net = lib.canonicalization_network
        net.batch_size, net.device = B, pos.device  # baked into its hyperparameters / constructor
        nodes = vel.norm(dim=1, keepdim=True).detach()  # its example's node feature (unused by VNDeepSets)
        edge_attr = batch[next(iter(self.spec.edge_inputs))] if self.spec.edge_inputs else None
        # keyword inputs unpacked by position inside the library: this order is its signature's
        loc_c, vel_c = self.canonicalizer(nodes, loc=pos, edges=batch.edge_index, vel=vel,
                                          edge_attr=edge_attr, charges=batch[self.charge])
        canon = copy.copy(batch)
        canon[self.pos], canon[self.vel] = loc_c, vel_c
        out = lib.invert_canonicalization(self.backbone(canon))
        info = _pop_info(self.canonicalizer)
        self._last.store(batch, info["group_element"]["rotation_matrix"])
        return out

    def rotation(self, batch: Batch) -> torch.Tensor:
        """The library's R per *node* ``[N, 3, 3]`` (each graph's repeated on its 5 nodes)."""
        R = self._last.get(batch)
        if R is None:
            self(batch)
            R = self._last.get(batch)
        return cast(torch.Tensor, R)


def library_prior_and_identity(canonicalizer: Any, R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """equiadapt's continuous-group ``get_prior_regularization_loss`` (MSE(R, I)) and
    ``get_identity_metric`` (1 - MSE(R, I)), given R under the key they read."""
    info = canonicalizer.canonicalization_info_dict
    info["group_element_matrix_representation"] = R
    canonicalizer.device = R.device
    try:
        with default_dtype(R.dtype):  # its identity matrix is made in the default dtype
            return canonicalizer.get_prior_regularization_loss(), canonicalizer.get_identity_metric()
    finally:
        info.pop("group_element_matrix_representation", None)


def nbody_fields(spec: TaskSpec) -> dict[str, str] | None:
    """The (point, 1o vector, 0e scalar) inputs standing for loc, vel, charges; None if absent."""
    found: dict[str, str] = {}
    for name, t in spec.inputs.items():
        kind = {POINT: "point", "1o": "vector", "0e": "scalar", "1x0e": "scalar", "1x1o": "vector"}.get(t)
        if kind and kind not in found:
            found[kind] = name
    return found if len(found) == 3 and len(spec.inputs) == 3 else None


# ---- image2d -----------------------------------------------------------------------------------
def unshare_bases(module: nn.Module) -> nn.Module:
    """Give ``module`` its own copies of e2cnn's kernel-basis modules. e2cnn caches them per
    (basis, grid) process-wide and hands the *same* module to every ``R2Conv`` that needs it, so
    casting one model (``.to(float64)``) would cast the bases of every other model too."""
    from e2cnn.nn.modules.r2_conv.basisexpansion_singleblock import SingleBlockBasisExpansion

    def walk(parent: nn.Module) -> None:  # every path, not ``modules()``: it skips repeats
        for name, child in list(parent._modules.items()):
            if isinstance(child, SingleBlockBasisExpansion):
                parent._modules[name] = copy.deepcopy(child)
            elif child is not None:
                walk(child)

    walk(module)
    return module


class ImageCanonicalised(ImageModel):
    """f(x) = phi(rotate(x, -theta(x))) with theta from ``GroupEquivariantImageCanonicalization``."""

    def __init__(self, spec: TaskSpec, canonicalizer: nn.Module, width: int, depth: int,
                 kernel: int, convs: int) -> None:
        super().__init__(spec)
        self.canonicalizer = canonicalizer
        self.core = ConvCore(self.in_channels, self.n_out, width, depth)
        self.size, self.shrink = width, convs * (kernel - 1)
        self._last = _Last()

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        if min(images.shape[-2:]) <= self.shrink:
            raise ValueError(f"equiadapt's canonicaliser (valid convolutions) shrinks images by "
                             f"{self.shrink} pixels: {tuple(images.shape[-2:])} is too small; use a "
                             f"smaller canon_kernel or fewer canon_layers")
        with default_dtype(images.dtype):  # the library makes its angle tables in the default dtype
            canonical = self.canonicalizer(images)
        self._last.store(images, _pop_info(self.canonicalizer)["group_activations"])
        return self.core(canonical)

    def scores(self, batch: Batch) -> torch.Tensor:
        """The canonicaliser's scores of ``batch`` (from the last forward when it saw it)."""
        images = batch[self.field]
        if self._last.get(images) is None:
            self.logits(images)
        return cast(torch.Tensor, self._last.get(images))


def library_image_prior_and_identity(canonicalizer: Any, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """equiadapt's discrete-group prior (CE to the identity index) and identity metric (share of
    argmax = identity), computed by the library from ``scores``."""
    info = canonicalizer.canonicalization_info_dict
    info["group_activations"] = scores
    canonicalizer.device = scores.device
    try:
        return canonicalizer.get_prior_regularization_loss(), canonicalizer.get_identity_metric()
    finally:
        info.pop("group_activations", None)


# ---- the method --------------------------------------------------------------------------------
@register_method("equiadapt")
class Equiadapt(Baseline):
    """equiadapt's canonicalisers (n-body: VNDeepSets; images: e2cnn C_N) before our networks."""

    exact = False
    group: str | None = "O3"
    domains: ClassVar[tuple[str, ...]] = ("graph3d", "image2d")
    exact_by_domain: ClassVar[dict[str, bool]] = {"graph3d": False, "image2d": True}
    origin: ClassVar[str] = LIBRARY
    counterpart: ClassVar[str | None] = "canonicalization"
    smoke_options: ClassVar[dict[str, Any]] = {"width": 16, "depth": 2, "canon_width": 4, "canon_layers": 2}
    METRICS = tuple(CANONICALISER_METRICS[k] for k in ("identity_metric", "prior_mse", "prior_ce"))

    def __init__(self, *, width: int = 64, depth: int = 4, params: int | None = None,
                 prior_weight: float | None = None, canon_width: int | None = None,
                 canon_layers: int | None = None, canon_kernel: int = 3, canon_feature: str = "p",
                 canon_translation: bool = False, canon_nonlinearity: str = "relu",
                 canon_dropout: float = 0.5, beta: float = 1.0) -> None:
        super().__init__(width=width, depth=depth, params=params)
        if prior_weight is not None and prior_weight < 0:
            raise ValueError(f"prior_weight must be >= 0, got {prior_weight}")
        if (canon_width is not None and canon_width < 1) or (canon_layers is not None and canon_layers < 1):
            raise ValueError("canon_width and canon_layers must be positive")
        if canon_kernel < 1 or canon_kernel % 2 == 0:
            raise ValueError(f"canon_kernel must be a positive odd number, got {canon_kernel}")
        if canon_feature not in FEATURES:
            raise ValueError(f"canon_feature must be one of {FEATURES}, got {canon_feature!r}")
        if canon_nonlinearity not in NONLINEARITIES:
            raise ValueError(f"canon_nonlinearity must be one of {NONLINEARITIES}, got {canon_nonlinearity!r}")
        if not 0 <= canon_dropout < 1:
            raise ValueError(f"canon_dropout must be in [0, 1), got {canon_dropout}")
        self.prior_weight_option, self.canon_width, self.canon_layers = prior_weight, canon_width, canon_layers
        self.canon_kernel, self.canon_feature, self.canon_translation = canon_kernel, canon_feature, canon_translation
        self.canon_nonlinearity, self.canon_dropout, self.beta = canon_nonlinearity, canon_dropout, beta
        self.options.update(prior_weight=prior_weight, canon_width=canon_width, canon_layers=canon_layers,
                            canon_kernel=canon_kernel, canon_feature=canon_feature,
                            canon_translation=canon_translation, canon_nonlinearity=canon_nonlinearity,
                            canon_dropout=canon_dropout, beta=beta)

    # ---- support and claims
    def supports(self, spec: TaskSpec) -> str | None:
        if importlib.util.find_spec("equiadapt") is None:
            return f"{LIBRARY} is not installed (pip install -e .[reference])"
        reason = Method.supports(self, spec)
        if reason:
            return reason
        if spec.domain == "image2d":
            if spec.group != "SO2" and not spec.group.startswith("C"):
                return (f"equiadapt's ESCNNEquivariantNetwork is used with rotation groups C_N here, "
                        f"task group is {spec.group!r}")
            return None
        if importlib.util.find_spec("torch_scatter") is None:
            return "equiadapt's n-body canonicaliser imports torch_scatter, which is not installed"
        if nbody_fields(spec) is None or spec.output != POINT or spec.level != "node":
            return (f"equiadapt's n-body canonicaliser (EuclideanGroupNBody + VNDeepSets) takes the positions, "
                    f"velocities and charges of 5-particle systems and predicts positions; task {spec.name!r} "
                    f"has inputs {spec.inputs} and output {spec.output!r} ({spec.level} level)")
        return None

    def inexact_reason(self, spec: TaskSpec) -> str | None:
        if spec.domain == "graph3d":
            return INEXACT_GRAPH
        return super().inexact_reason(spec)

    def prior_weight_for(self, domain: str) -> float:
        """``prior_weight`` or the library example's default for ``domain`` (0 n-body, 100 images)."""
        if self.prior_weight_option is not None:
            return float(self.prior_weight_option)
        return DEFAULT_PRIOR_WEIGHT.get(domain, 0.0)

    # ---- builds
    def nbody_canonicalizer(self) -> nn.Module:
        EuclideanGroupNBody, VNDeepSets = _nbody_library()
        hyper = _config(num_layers=self.canon_layers or GRAPH_LAYERS, hidden_dim=self.canon_width or GRAPH_WIDTH,
                        layer_pooling="mean",
                        final_pooling="mean", out_dim=4, batch_size=1, nonlinearity=self.canon_nonlinearity,
                        canon_feature=self.canon_feature, canon_translation=self.canon_translation,
                        angular_feature="pv", dropout=self.canon_dropout)
        return EuclideanGroupNBody(VNDeepSets(hyper, device="cpu"))

    def build_graph(self, spec: TaskSpec, seed: int = 0) -> nn.Module:
        reason = self.supports(spec)
        if reason:
            raise ValueError(reason)
        fields = cast(dict[str, str], nbody_fields(spec))
        return build_at_params(lambda w: NBodyCanonicalised(self.nbody_canonicalizer(),
                                                            BackboneModel(spec, w, self.depth), spec, fields),
                               self.params, self.width)

    def build_image(self, spec: TaskSpec) -> nn.Module:
        """equiadapt's C_N canonicaliser before our CNN, the whole model parameter-matched to the
        default baseline CNN unless ``width``/``params`` is set (module docstring)."""
        reason = self.supports(spec)
        if reason:
            raise ValueError(reason)
        sizes = image_size_options(self)
        g = resolve_group(sizes.pop("group"), spec, discrete=True)
        n, layers = group_order(g), self.canon_layers or IMAGE_LAYERS
        convs = max(layers, 2)  # ESCNNEquivariantNetwork: a first and a last conv, layers - 2 between
        Canonicalization, Network = _image_library()
        shape = (image_field(spec)[1], 1, 1)  # only the channel count is read (1 channel: no pad/crop/resize)

        def factory(w: int, depth: int, fast: bool) -> ImageModel:
            fields = self.canon_width or max(2, w // (2 * n))  # ``canonicalization``'s rule
            net = unshare_bases(Network(shape, fields, self.canon_kernel, "rotation", n, layers))
            canonicalizer = Canonicalization(net, _config(beta=self.beta, input_crop_ratio=0.8, resize_shape=32), shape)
            return ImageCanonicalised(spec, canonicalizer, w, depth, self.canon_kernel, convs)

        return build_image_model(factory, spec, **sizes, match_baseline=True)

    # ---- hooks
    def auxiliary_loss(self, model: nn.Module, batch: Batch, pred: torch.Tensor) -> torch.Tensor | None:
        if isinstance(model, ImageCanonicalised):
            w = self.prior_weight_for("image2d")
            return None if w == 0 else w * library_image_prior_and_identity(model.canonicalizer, model.scores(batch))[0]
        w = self.prior_weight_for("graph3d")
        if w == 0:
            return None
        m = cast(NBodyCanonicalised, model)
        return w * library_prior_and_identity(m.canonicalizer, m.rotation(batch))[0]

    @torch.no_grad()
    def extra_metrics(self, model: nn.Module, batch: Batch, pred: torch.Tensor) -> dict[str, float]:
        if isinstance(model, ImageCanonicalised):
            prior, ident = library_image_prior_and_identity(model.canonicalizer, model.scores(batch))
            return {"identity_metric": float(ident), "prior_ce": float(prior)}
        m = cast(NBodyCanonicalised, model)
        prior, ident = library_prior_and_identity(m.canonicalizer, m.rotation(batch))
        return {"identity_metric": float(ident), "prior_mse": float(prior)}
