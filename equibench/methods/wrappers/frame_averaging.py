"""``frame_averaging``: the shared model averaged over frames (PCA; C_N on images) once, around it all.

Puny et al., "Frame Averaging for Invariant and Equivariant Network Design" (ICLR 2022).

Which is which: this method frames the *input* once and averages the *output* of the whole
shared backbone (the paper's frame-averaging operator applied to the backbone every wrapping
method shares, so that the comparison isolates the mechanism). The paper's n-body model, FA-GNN
(n-body table, test MSE ~0.0057), instead averages at every layer of its GNN, re-framing latent
features between layers: that is the registered ``fa_gnn`` (``wrappers/fa_gnn.py``), with the
reference's own network.

graph3d: the shared backbone averaged over PCA frames. For each graph, with the PCA frame set
{F_k} of its first point field (``blocks.pca_frames``: 8 sign flips for O(3), 4 proper frames
for SO(3)) and centroid t,

    f(X) = 1/|F| sum_k  rho_out(F_k, t) . phi( (F_k^T, -F_k^T t) . X )

where phi is the shared backbone and ``(R, s) . X`` acts on every typed field (points
``R x + s``, irreps fields ``D(R) v``, invariants unchanged). Because the frame set is
equivariant, f is exactly E(3)- (resp. SE(3)-) equivariant wherever the covariance eigenvalues
are distinct; at ties the frame is ill-defined (see ``equibench.metrics.degeneracy``). All
frames run as one batch of |F| x B graphs (on the CPU in the fewest equal chunks of whole copies
that keep a backbone call under ``blocks.pca_frames.CPU_EDGES_PER_CALL`` edges: larger calls cost
more per graph there). Every frame is F_k = W diag(sigma_k) (W = V, resp. [v1, v2, v1 x v2]), so
on points / l = 1 fields the input is projected on W once and copy k is that times sigma_k, and
the average is ``rho_out(W, t) (1/|F| sum_k sigma_k * y_k)`` (``forward_signs``; other field types
take the per-frame 3 x 3 products, the same function). The frame carries no gradient
(eigenvectors detached); the centroid keeps its (linear, harmless) gradient.

``stochastic=True`` (FAENet): in training mode one uniformly random frame per graph and
forward pass; in eval mode the full average. FA adds no parameters: ``params`` sizes the
backbone exactly as for ``baseline``.

image2d (``blocks.cnn.GroupAveraged``): the frame is the whole cyclic group C_N of the task
(an SO(2) task uses C8), exact group averaging f(x) = 1/|G| sum_g phi(g x) of the baseline CNN
phi (C4 exact; C8 through interpolation); the |G| outputs are summed in sorted order so the
average does not depend on the order of the copies. ``stochastic=True``: one random element per
image in training mode, the full average in eval mode. Sized exactly like the baseline CNN.

``degenerate`` (graph3d): ``"arbitrary"`` (default; the behaviour before the option) averages
over the 8 sign frames of eigh's eigenvectors even where covariance eigenvalues tie (benzene,
methane, a regular polygon, a square and its centre), where that basis is arbitrary and the
average not equivariant (fp64 relative errors 1e-5 .. 3e-2 measured untrained). ``"average"``
replaces, on exactly those graphs, the frame set by one built from the input itself
(``blocks.pca_frames.symmetric_frames``: in-plane axes from the outermost points /
velocities projected on the tied eigenspace, with the axis signs each leaves open; a stabiliser
projection where no candidate exists, e.g. collinear inputs with vector outputs): an equivariant
frame set, so the average is exact there too (1e-15 measured; docstring of ``symmetric_frames`` for the inputs it
covers). Graphs without a tie keep the usual 8 frames (bit-identical when no graph of the batch
ties). Cost: one extra eigen-decomposition per batch, and |frames| backbone copies per tied
graph (benzene and methane 24, a regular pentagon 20, for O(3)) instead of 8.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn
from torch_geometric.data import Batch

from ...core.registry import register_method
from ...core.spec import TaskSpec
from ...symmetry.group3d import act_on_batch, act_on_output
from ..base import EVERY_INPUT, GENERIC_INPUTS, Method
from ..blocks.cnn import GroupAveraged, resolve_group
from ..blocks.image import build_image_model, image_size_options
from ..blocks.pca_frames import (
    average_in_frames,
    average_sign_frames,
    candidate_vectors,
    centroid,
    check_degenerate,
    check_group,
    copies_per_call,
    covariance,
    first_point_field,
    frame_set,
    frame_signs,
    frame_support,
    into_frame,
    out_of_frame,
    pca_basis,
    principal_axes,
    region,
    replicate,
    sign_framed_chunks,
    sign_frames_supported,
    symmetric_frames,
)
from .baseline import Baseline


class FrameAveragedModel(nn.Module):
    """The backbone averaged over the frame set ``frames(batch)``. The sign-frame fast path
    (``forward_signs``) recomputes equibench's own PCA frames, so it runs only where ``frames`` is
    this class's: a subclass with its own frame set (a reference library's) takes the generic path."""

    def __init__(self, backbone: nn.Module, spec: TaskSpec, group: str, stochastic: bool,
                 degenerate: str = "arbitrary") -> None:
        super().__init__()
        self.backbone, self.spec = backbone, spec
        self.group, self.stochastic = group, stochastic
        self.degenerate = check_degenerate(degenerate)
        self.point = first_point_field(spec)

    def frames(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(F [B, K, 3, 3], t [B, 3])``: the PCA frame set and centroid of every graph."""
        B = int(batch.num_graphs)
        pos = batch[self.point]
        t = centroid(pos, batch.batch, B)
        _, V = principal_axes(covariance(pos, t, batch.batch, B))
        return frame_set(V, self.group), t

    def forward(self, batch: Batch) -> torch.Tensor:
        if self.degenerate == "average" and not (self.stochastic and self.training):
            B = int(batch.num_graphs)
            pos = batch[self.point]
            cands = candidate_vectors(batch, self.spec, centroid(pos, batch.batch, B))
            frames = symmetric_frames(pos, cands, batch.batch, B, self.group)
            if frames is not None:  # some graph has tied eigenvalues
                return average_in_frames(self.backbone, batch, self.spec, frames)
        if sign_frames_supported(self.spec) and type(self).frames is FrameAveragedModel.frames:
            return self.forward_signs(batch)
        F, t = self.frames(batch)
        B, K = F.shape[0], F.shape[1]
        if self.stochastic and self.training:
            pick = torch.randint(K, (B,), device=F.device)
            F, K = F[torch.arange(B, device=F.device), pick].unsqueeze(1), 1
        Fk = F.transpose(0, 1).reshape(K * B, 3, 3)  # copy-major, like ``replicate``
        tk = t.repeat(K, 1)
        big = batch if K == 1 else replicate(batch, self.spec, K)
        out = self.backbone(act_on_batch(big, self.spec, into_frame(Fk, tk), target=False))
        out = act_on_output(out, self.spec, out_of_frame(Fk, tk), big)
        return out.reshape(K, -1, out.shape[-1]).mean(0)

    def forward_signs(self, batch: Batch) -> torch.Tensor:
        """The forward pass on points / l = 1 fields: every frame is ``F_k = W diag(sigma_k)``
        (``frame_signs``), so each field is projected on W once and copy k is that times sigma_k
        (``sign_framed_copies``), and the average is mapped out of W once (``average_sign_frames``);
        the same function as the generic path (up to rounding), a fraction of its cost."""
        with region("equibench.frames"):
            B = int(batch.num_graphs)
            basis = pca_basis(batch[self.point], batch.batch, B, self.group)
            W = basis.W
            sig = frame_signs(self.group, W.dtype, W.device).unsqueeze(1)  # [K, 1, 3]
            if self.stochastic and self.training:  # one random frame per graph
                sig = sig[torch.randint(sig.shape[0], (B,), device=W.device), 0].unsqueeze(0)  # [1, B, 3]
        chunk = copies_per_call(batch, sig.shape[0])
        outs = []
        assert self.point is not None  # frame_support: the task has a point field
        with region("equibench.to_frame"):  # the framed copies share one projection and their structure
            chunks = sign_framed_chunks(batch, self.spec, W, basis.t, sig, chunk, {self.point: basis.proj},
                                        basis.W_rows)
        while True:  # one call for every frame, except large CPU batches
            with region("equibench.to_frame"):
                big = next(chunks, None)
            if big is None:
                break
            with region("equibench.backbone"):
                outs.append(self.backbone(big))
        with region("equibench.to_frame"):
            out = outs[0] if len(outs) == 1 else torch.cat(outs)
            return average_sign_frames(out, self.spec, W, basis.t, sig, batch, basis.W_rows, basis.t_rows)


@register_method("frame_averaging")
class FrameAveraging(Baseline):
    """The shared backbone averaged over PCA frames (C_N on images) around the whole model (Puny et al. 2022)."""
    exact = True
    exact_scope = GENERIC_INPUTS  # graph3d: the PCA frames are undecided on symmetric inputs
    #: image2d: the average over the whole of C_N is exact on every image
    exact_scope_by_domain: ClassVar[dict[str, str]] = {"image2d": EVERY_INPUT}
    group = "O3"
    #: image2d: exact over the grid symmetries of C_N (C4 exactly)
    exact_by_domain: ClassVar[dict[str, bool]] = {"graph3d": True, "image2d": True}

    def __init__(self, *, width: int = 64, depth: int = 4, params: int | None = None,
                 group: str = "O3", stochastic: bool = False, field_input: bool = False,
                 degenerate: str = "arbitrary") -> None:
        super().__init__(width=width, depth=depth, params=params, field_input=field_input)
        self.group = check_group(group)
        self.stochastic = stochastic
        self.degenerate = check_degenerate(degenerate)
        self.options.update(group=group, stochastic=stochastic)
        if degenerate != "arbitrary":  # recorded only when set: existing rows stay as they were
            self.options.update(degenerate=degenerate)
            # exact on symmetric inputs too (measured 1e-15; pca_frames.symmetric_frames for the scope)
            self.exact_scope = EVERY_INPUT

    def supports(self, spec: TaskSpec) -> str | None:
        return Method.supports(self, spec) or (None if spec.domain == "image2d" else frame_support(spec))

    def build_graph(self, spec: TaskSpec, seed: int = 0) -> nn.Module:
        return FrameAveragedModel(self.build_backbone(spec), spec, self.group, self.stochastic, self.degenerate)

    def build_image(self, spec: TaskSpec) -> nn.Module:
        """The baseline CNN averaged over the task's C_N (``GroupAveraged``)."""
        sizes = image_size_options(self)
        g = resolve_group(sizes.pop("group"), spec, discrete=True)
        stochastic = bool(self.stochastic)
        return build_image_model(lambda w, depth, fast: GroupAveraged(spec, w, depth, g, stochastic), spec, **sizes)
