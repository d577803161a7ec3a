"""``canonicalization``: a learned equivariant canonicaliser in front of the shared model (equiadapt).

Kaba et al., ICML 2023; Mondal et al., NeurIPS 2023; library ``equiadapt`` (its settings: no
prior in the n-body example, prior weight 100 for images, identity metric 1 - MSE(R, I)).

graph3d: a learned O(3)-equivariant canonicaliser in front of the shared backbone. A small
network c (``VectorCanonicaliser``) maps a graph to vectors u_1..u_3 (and u_4 if
``learn_translation``) with c(Q X + s) = Q c(X) for Q in O(3): invariant scalars (charges, Gram
matrix of each node's vectors, squared edge lengths) drive an EGNN-style scalar network whose
outputs weight equivariant vectors (centred positions x_i - x_bar, l = 1 odd fields such as
velocities, edge vectors x_j - x_i), summed over the graph. Gram-Schmidt gives the frame
F = [e1, e2, e3] (``blocks.pca_frames.gram_schmidt``; for "O3" e3 = sign(<u3, e1 x e2>) e1 x e2,
so F(QX) = Q F(X) and det F = +-1; for "SO3" det F = +1), R = F^T (rows = axes), and the origin
t = x_bar (+ u_4). The backbone phi sees the canonical input R (x - t), R v, and

    f(X) = rho_out(R^T, t) phi(R (X - t)),

exactly E(3)- (resp. SE(3)-) equivariant wherever u_1, u_2 are non-zero and non-parallel and
<u3, e1 x e2> != 0. Gradients flow through R into the canonicaliser. Where they are close to
parallel, round-off is amplified: on QM9, two of 2 264 test molecules (344 and 1750, an atom on a
symmetry axis of the molecule to float32 rounding) measure up to 1.1e-10 in float64 at
initialisation, just over the 1e-10 exactness limit (``tests/test_exactness.py`` names them).

Prior (``auxiliary_loss``): ``prior_weight * mean((R - I)^2)`` over graphs and the 9 entries
(equiadapt's continuous-group prior, ``MSELoss(R, I)``). Default per domain, as equiadapt sets
it: graph3d **no prior** (weight 0: equiadapt's n-body example trains without one), image2d
weight 100 (equiadapt's image examples). On isotropic data such as n-body no equivariant R can
stay near I (mean((R - I)^2) stays ~2/3, its Haar average), so a prior only adds gradient noise;
at weight 100 its gradient norm (~75 at init) dwarfs the task's (~1.5) and trips the shared
gradient clipping. Measured (n-body, 1 000 train, 600 steps, batch 50, lr 1e-3, 3 seeds): test
MSE 0.0304 (w = 100), 0.0282 (w = 1), 0.0268 (w = 0). Pass ``prior_weight`` to override.

``extra_metrics`` (graph3d):

* ``identity_metric`` = 1 - mean((R - I)^2), equiadapt's identity metric for continuous groups
  (``1 - mse_loss(R, I)`` over the batch and the 9 entries): 1 at the identity, 1/3 on average
  for a Haar-random rotation (proper or improper), -1/3 at R = -I;
* ``identity_share`` = share of graphs whose canonical element is (near) the identity: det R = +1
  and rotation angle arccos((tr R - 1) / 2) <= ``identity_angle`` degrees (this was called
  ``identity_metric`` before it took equiadapt's definition);
* ``prior_mse`` = mean((R - I)^2) (= 1 - ``identity_metric``; the prior's value at weight 1);
* ``mean_angle_deg`` = mean of that angle, an improper R (det -1) counting as 180.

Where this still differs from equiadapt's n-body canonicaliser (``EuclideanGroupNBody`` with
``VNDeepSets``): our canonicaliser is an EGNN-style scalar network weighting equivariant vectors
(``VectorCanonicaliser``), not vector neurons, and has no bias or dropout on coordinates; it runs
on any graph size (equiadapt's bakes 5 nodes and the batch size into its hyperparameters); the
translation is the centroid plus a predicted vector (equiadapt predicts it outright); the frame is
fitted jointly with the backbone from scratch rather than in front of a pretrained model. The
Gram-Schmidt agrees (e3 = the part of u3 orthogonal to e1, e2, i.e. sign(<u3, e1 x e2>) e1 x e2).
The parameter count (``params``) is matched over canonicaliser + backbone; the canonicaliser's
hidden width is ``canon_width`` or, by default, half the backbone width (about 10% of the
parameters), so both scale together when matching.

image2d (``blocks.canon2d.Canonicalised``): a small escnn C_N canonicaliser c (C_N = the task's
cyclic group; an SO(2) task uses C8) scores each group element, c(r^m x) = roll(c(x), m);
k* = argmax; the baseline CNN phi sees x_c = r^{-k*} x, so f(r^m x) = f(x) exactly wherever the
argmax is unique (C4 exact). Training uses a straight-through weighting
w = onehot(k*) + softmax(c) - stopgrad(softmax(c)) (forward value exactly one-hot). Prior
(``auxiliary_loss``): ``prior_weight * CE(c(x), identity index)``, weight 100 by default
(equiadapt's image setting). ``extra_metrics``: ``identity_metric`` = share of inputs with
k* = 0 (equiadapt's identity metric for discrete groups), ``prior_ce`` = that cross-entropy. The
canonicaliser has ``IMAGE_CANON_DEPTH`` steerable blocks of max(2, width // (2N)) regular fields
(the graph options ``canon_width`` / ``canon_depth`` do not apply); without ``width`` and
``params`` the whole model is parameter-matched to the default baseline CNN.
"""
from __future__ import annotations

import functools
from typing import ClassVar, cast

import torch
from torch import nn
from torch_geometric.data import Batch

from ...core.registry import register_method
from ...core.spec import TaskSpec
from ...metrics.catalogue import method_metric
from ...symmetry.fieldtypes import POINT, irreps
from ...symmetry.group2d import group_order
from ..base import EVERY_INPUT, GENERIC_INPUTS, Method, build_at_params
from ..blocks.backbone import BackboneModel, mlp, run_mlp
from ..blocks.canon2d import Canonicalised
from ..blocks.cnn import resolve_group
from ..blocks.image import build_image_model, image_size_options
from ..blocks.pca_frames import (
    apply_in_frame,
    centroid,
    check_group,
    first_point_field,
    frame_support,
    gram_schmidt,
    region,
    sum_per_graph,
)
from .baseline import Baseline

#: steerable blocks of the image canonicaliser (image2d)
IMAGE_CANON_DEPTH = 2
#: default prior weight per domain (equiadapt: no prior in its n-body example, 100 for images)
DEFAULT_PRIOR_WEIGHT: dict[str, float] = {"graph3d": 0.0, "image2d": 100.0}

#: the canonicalisers' diagnostics (``extra_metrics``; equiadapt reports three of them): context only, no
#: better direction (on isotropic data no equivariant canonicaliser can stay near the identity)
CANONICALISER_METRICS = {m.stat: m for m in (
    method_metric("identity_metric", log_scale=False,
                  description="equiadapt's identity metric: 1 - MSE(R, I) of the canonicalising rotation (graph3d); "
                              "share of inputs mapped to the identity element (images)"),
    method_metric("prior_mse", description="mean((R − I)²) of the canonical rotation (graph canonicaliser)"),
    method_metric("mean_angle_deg", unit="deg", log_scale=False,
                  description="mean rotation angle of the canonical frame (improper = 180)"),
    method_metric("prior_ce", description="cross-entropy of the canonicaliser's scores to the identity (images)"),
    method_metric("identity_share", log_scale=False,
                  description="share of graphs whose canonical rotation is within identity_angle of the identity "
                              "(det +1); equiadapt's identity_metric is 1 − MSE(R, I)"))}


def _field_layout(t: str) -> tuple[list[int], list[int]]:
    """Column indices of the 0e scalars and start columns of the 1o vectors of a field."""
    if t == POINT:
        return [], [0]
    scalars, vectors, offset = [], [], 0
    for mul, ir in irreps(t):
        for _ in range(mul):
            if ir.l == 0 and ir.p == 1:
                scalars.append(offset)
            elif ir.l == 1 and ir.p == -1:
                vectors.append(offset)
            offset += ir.dim
    return scalars, vectors


class VectorCanonicaliser(nn.Module):
    """Exactly O(3)-equivariant, translation-invariant map graph -> ``n_out`` vectors ``[B, n_out, 3]``.

    Uses only the 0e and 1o parts of the typed inputs (other irreps are ignored: still exact,
    just less information) and the 0e edge inputs.
    """

    def __init__(self, spec: TaskSpec, hidden: int = 32, depth: int = 2, n_out: int = 3) -> None:
        super().__init__()
        self.spec, self.n_out = spec, n_out
        self.point = first_point_field(spec)
        self.layout = {k: _field_layout(t) for k, t in spec.inputs.items()}
        self.edge_layout = {k: _field_layout(t)[0] for k, t in spec.edge_inputs.items()}
        n_s = sum(len(s) for s, _ in self.layout.values())
        self.n_v = sum(len(v) for _, v in self.layout.values())
        n_e = 1 + sum(len(s) for s in self.edge_layout.values())
        self.embed = mlp([n_s + self.n_v * (self.n_v + 1) // 2, hidden, hidden])
        self.phi = nn.ModuleList(mlp([2 * hidden + n_e, hidden, hidden], last_act=True) for _ in range(depth))
        self.psi = nn.ModuleList(mlp([2 * hidden, hidden, hidden]) for _ in range(depth))
        self.node_coef = nn.Linear(hidden, self.n_v * n_out)
        self.edge_coef = nn.Linear(hidden, n_out)
        assert self.point is not None  # frame_support: the task has a point field
        names = list(self.layout)  # the centred point field's position among the vectors V
        self.point_vector = sum([len(self.layout[k][1]) for k in names[:names.index(self.point)]])

    def node_inputs(self, batch: Batch, x_bar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Invariant scalars ``[N, n_s]`` and equivariant vectors ``[N, n_v, 3]`` (points centred)."""
        scal: list[torch.Tensor] = []
        vecs: list[torch.Tensor] = []
        for name, (s_idx, v_idx) in self.layout.items():
            val = batch[name].reshape(batch[name].shape[0], -1)
            if self.spec.inputs[name] == POINT:
                val = val - x_bar.index_select(0, batch.batch)
            scal.extend(val[:, i:i + 1] for i in s_idx)
            vecs.extend(val[:, i:i + 3] for i in v_idx)
        V = torch.stack(vecs, dim=1)
        S = torch.cat(scal, dim=-1) if scal else V.new_zeros(V.shape[0], 0)
        return S, V

    def forward(self, batch: Batch, x_bar: torch.Tensor) -> torch.Tensor:
        B = int(batch.num_graphs)
        S, V = self.node_inputs(batch, x_bar)
        N = V.shape[0]
        gram = (V @ V.transpose(1, 2)).reshape(N, -1).index_select(1, _triu_flat(self.n_v, V.device))
        h = run_mlp(self.embed, torch.cat([S, gram], dim=-1))
        src, dst = batch.edge_index
        pos = batch[self.point]
        evec = pos.index_select(0, src) - pos.index_select(0, dst)
        e_parts = [(evec * evec).sum(-1, keepdim=True)]
        for name, idx in self.edge_layout.items():
            val = batch[name].reshape(src.numel(), -1)
            e_parts.extend(val[:, i:i + 1] for i in idx)
        e_s = torch.cat(e_parts, dim=-1)
        for phi, psi in zip(self.phi, self.psi):
            m = run_mlp(phi, torch.cat([h.index_select(0, dst), h.index_select(0, src), e_s], dim=-1))
            h = h + run_mlp(psi, torch.cat([h, sum_per_graph(m, dst, N)], dim=-1))
        a = nn.functional.linear(h, self.node_coef.weight, self.node_coef.bias).reshape(-1, self.n_v, self.n_out)
        b = nn.functional.linear(m, self.edge_coef.weight, self.edge_coef.bias)
        # sum_e b_e (x_j - x_i) = sum_i beta_i (x_i - x_bar), beta_i = sum_{e from i} b_e - sum_{e into i} b_e
        # (beta sums to 0 over a graph): the edge vectors' terms join the centred point's node coefficient
        beta = b.new_zeros(N, self.n_out).index_add_(0, src, b).index_add_(0, dst, b, alpha=-1)
        a[:, self.point_vector].add_(beta)
        return sum_per_graph(a.transpose(1, 2) @ V, batch.batch, B)  # sum_v a_nvk V_nvd per graph


@functools.lru_cache(maxsize=16)
def _triu_cached(n: int, device: str) -> torch.Tensor:
    iu = torch.triu_indices(n, n, device=device)
    return iu[0] * n + iu[1]


def _triu_flat(n: int, device: torch.device) -> torch.Tensor:
    """Flat positions ``i * n + j`` of ``torch.triu_indices(n, n)`` in a row-major n x n matrix,
    built once per (n, device)."""
    return _triu_cached(n, str(device))


class _LastFrame:
    """The last forward's (batch, R), so the prior loss reuses R (with its graph). Copies and
    pickles start empty: a non-leaf tensor cannot be deep-copied (``model_in_dtype`` copies)."""

    def __init__(self) -> None:
        self.batch: Batch | None = None
        self.R: torch.Tensor | None = None

    def store(self, batch: Batch, R: torch.Tensor) -> None:
        self.batch, self.R = batch, R

    def __deepcopy__(self, memo: dict) -> _LastFrame:
        return _LastFrame()

    def __getstate__(self) -> dict:
        return {"batch": None, "R": None}


class CanonicalisedModel(nn.Module):
    """``f(X) = rho_out(R^T, t) phi(R (X - t))`` with a learned frame (module docstring)."""

    def __init__(self, canonicaliser: VectorCanonicaliser, backbone: nn.Module, spec: TaskSpec,
                 group: str, learn_translation: bool) -> None:
        super().__init__()
        self.canonicaliser, self.backbone, self.spec = canonicaliser, backbone, spec
        self.group, self.learn_translation = group, learn_translation
        self.point = first_point_field(spec)
        self._last = _LastFrame()

    def frame(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(F [B, 3, 3] columns = axes, t [B, 3])``; the rotation applied to inputs is R = F^T."""
        x_bar = centroid(batch[self.point], batch.batch, int(batch.num_graphs))
        u = self.canonicaliser(batch, x_bar)
        F = gram_schmidt(u[:, :3], self.group)
        t = x_bar + u[:, 3] if self.learn_translation else x_bar
        return F, t

    def rotation(self, batch: Batch) -> torch.Tensor:
        """R = F^T per graph, reusing the last forward's frame when called on the same batch."""
        if self._last.batch is batch and self._last.R is not None:  # store() sets both
            return self._last.R
        return self.frame(batch)[0].transpose(-1, -2)

    def forward(self, batch: Batch) -> torch.Tensor:
        with region("equibench.frames"):
            F, t = self.frame(batch)
        self._last.store(batch, F.transpose(-1, -2))
        return apply_in_frame(self.backbone, batch, self.spec, F, t)


def rotation_angle_deg(R: torch.Tensor) -> torch.Tensor:
    """Angle of each proper rotation in degrees; improper matrices (det -1) get 180 + their
    distance (never 'near the identity')."""
    cos = ((torch.diagonal(R, dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1, 1)
    ang = torch.rad2deg(torch.acos(cos))
    return torch.where(torch.linalg.det(R) > 0, ang, ang + 180.0)


@torch.no_grad()
def graph_canon_metrics(R: torch.Tensor, identity_angle: float) -> dict[str, float]:
    """graph3d diagnostics of canonical rotations ``R [B, 3, 3]`` (module docstring):
    ``identity_metric`` = 1 - mean((R - I)^2) (equiadapt's), ``identity_share`` (det +1 and angle
    <= ``identity_angle`` degrees), ``prior_mse`` and ``mean_angle_deg``."""
    R = R.double()
    mse = (R - torch.eye(3, dtype=R.dtype, device=R.device)).pow(2).mean().item()
    ang = rotation_angle_deg(R)
    return {"identity_metric": 1.0 - mse,
            "identity_share": (ang <= identity_angle).double().mean().item(),
            "prior_mse": mse,
            "mean_angle_deg": ang.clamp(max=180.0).mean().item()}


@torch.no_grad()
def image_canon_metrics(model: Canonicalised, batch: Batch) -> dict[str, float]:
    """image2d: ``identity_metric`` (share of inputs mapped to the identity element) and
    ``prior_ce`` (cross-entropy of the canonicaliser's scores to the identity index)."""
    scores = model.scores_for(batch)
    zero = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
    return {"identity_metric": (scores.argmax(-1) == 0).double().mean().item(),
            "prior_ce": nn.functional.cross_entropy(scores, zero).item()}


@register_method("canonicalization")
class Canonicalization(Baseline):
    """A learned equivariant canonicaliser in front of the shared backbone (Kaba et al. 2023; as equiadapt)."""
    exact = True
    exact_scope = GENERIC_INPUTS  # graph3d: the canonical frame is undecided on symmetric inputs
    #: image2d: on a C_N-symmetric image the argmax ties only between rotations giving the same image,
    #: so the canonical image (and an invariant output) is unique: exact on every input
    exact_scope_by_domain: ClassVar[dict[str, str]] = {"image2d": EVERY_INPUT}
    group = "O3"
    #: image2d: exact over the grid symmetries of C_N (C4 exactly) wherever the argmax is unique
    exact_by_domain: ClassVar[dict[str, bool]] = {"graph3d": True, "image2d": True}
    METRICS = tuple(CANONICALISER_METRICS.values())

    def __init__(self, *, width: int = 64, depth: int = 4, params: int | None = None, group: str = "O3",
                 prior_weight: float | None = None, canon_width: int | None = None, canon_depth: int = 2,
                 learn_translation: bool = True, identity_angle: float = 10.0, field_input: bool = False) -> None:
        super().__init__(width=width, depth=depth, params=params, field_input=field_input)
        if (canon_width is not None and canon_width < 1) or canon_depth < 1:
            raise ValueError("canon_width and canon_depth must be positive")
        self.group = check_group(group)
        if prior_weight is not None and prior_weight < 0:
            raise ValueError(f"prior_weight must be >= 0, got {prior_weight}")
        self.prior_weight_option = prior_weight
        self.identity_angle = float(identity_angle)
        self.canon_width, self.canon_depth = canon_width, canon_depth
        self.learn_translation = learn_translation
        self.options.update(group=group, prior_weight=prior_weight, canon_width=canon_width,
                            canon_depth=canon_depth, learn_translation=learn_translation,
                            identity_angle=identity_angle)

    def supports(self, spec: TaskSpec) -> str | None:
        return Method.supports(self, spec) or (None if spec.domain == "image2d" else frame_support(spec))

    def prior_weight_for(self, domain: str) -> float:
        """The prior weight used on ``domain``: the ``prior_weight`` option, or equiadapt's default
        for the domain (``DEFAULT_PRIOR_WEIGHT``: 0 on graph3d, 100 on image2d)."""
        if self.prior_weight_option is not None:
            return float(self.prior_weight_option)
        return DEFAULT_PRIOR_WEIGHT.get(domain, 0.0)

    def build_graph(self, spec: TaskSpec, seed: int = 0) -> nn.Module:
        n_out = 4 if self.learn_translation else 3

        def factory(w: int) -> nn.Module:
            hidden = self.canon_width or max(4, w // 2)
            canon = VectorCanonicaliser(spec, hidden, self.canon_depth, n_out)
            return CanonicalisedModel(canon, BackboneModel(spec, w, self.depth), spec, self.group,
                                      self.learn_translation)

        return build_at_params(factory, self.params, self.width)

    def build_image(self, spec: TaskSpec) -> nn.Module:
        """The baseline CNN behind a learned C_N canonicaliser (``Canonicalised``), parameter-matched
        (canonicaliser + CNN) to the default baseline CNN unless ``width`` or ``params`` is set."""
        sizes = image_size_options(self)
        g = resolve_group(sizes.pop("group"), spec, discrete=True)

        def factory(w: int, depth: int, fast: bool) -> Canonicalised:
            fields = max(2, w // (2 * group_order(g)))
            return Canonicalised(spec, w, depth, g, self.prior_weight_for("image2d"), fields, IMAGE_CANON_DEPTH,
                                 initialize=not fast, recompute=not fast)
        return build_image_model(factory, spec, **sizes, match_baseline=True)

    def auxiliary_loss(self, model: nn.Module, batch: Batch, pred: torch.Tensor) -> torch.Tensor | None:
        if isinstance(model, Canonicalised):  # image2d: prior_weight * CE(scores, identity index)
            return model.prior_loss(batch)
        weight = self.prior_weight_for("graph3d")
        if weight == 0:
            return None
        # graph3d: build_graph's CanonicalisedModel (cast, no isinstance: a torch.compile wrapper forwards it)
        R = cast(CanonicalisedModel, model).rotation(batch)
        eye = torch.eye(3, dtype=R.dtype, device=R.device)
        return weight * (R - eye).pow(2).mean()

    @torch.no_grad()
    def extra_metrics(self, model: nn.Module, batch: Batch, pred: torch.Tensor) -> dict[str, float]:
        if isinstance(model, Canonicalised):
            return image_canon_metrics(model, batch)
        # graph3d: build_graph's CanonicalisedModel (cast, no isinstance: a torch.compile wrapper forwards it)
        R = cast(CanonicalisedModel, model).rotation(batch)
        return graph_canon_metrics(R, self.identity_angle)
