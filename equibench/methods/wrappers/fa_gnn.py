"""``fa_gnn``: FA-GNN, PCA frame averaging at every layer of a GNN (Puny et al.'s n-body model).

Puny, Atzmon, Ben-Hamu, Misra, Grover, Smith, Lipman, "Frame Averaging for Invariant and
Equivariant Network Design" (ICLR 2022), n-body table: FA-GNN, test MSE ~0.0057; reference code
``omri1348/Frame-Averaging``, ``nbody/``.

This is *not* the registered ``frame_averaging``, which averages once around the whole shared
backbone (input framed once, the backbone run end to end in each frame, outputs averaged). Here
every layer's output is itself a frame average, and the next layer is framed again with frames
built from the latent features:

1. Input frames: centroid t and PCA frames {F_k} of the first point field (``blocks.pca_frames``:
   the 8 sign flips of the covariance eigenvectors for O(3), 4 proper frames for SO(3)). Each
   copy k sees the framed input ``(F_k^T, -F_k^T t) . X`` (points ``F_k^T (x - t)``, vectors
   ``F_k^T v``, invariants unchanged), flattened into one feature vector per node, then a linear
   embedding to ``width`` channels.
2. Layer l (``depth`` of them, all copies as one batch of K x B graphs, on the CPU in equal
   chunks of whole copies, ``blocks.pca_frames.copies_per_call``): the reference's GCL,
   ``m_ij = phi([h_i, h_j, e_ij])`` (two linear layers, SiLU after each),
   ``h_i <- h_i + psi([h_i, sum_j m_ij])`` (linear, SiLU, linear), with invariant edge
   attributes e_ij = (|x_i - x_j|^2, the task's invariant edge inputs; n-body: q_i q_j). The
   layer is not equivariant; it never sees a raw coordinate.
3. Between layers (after every layer but the last), the latent frame average: the ``width``
   channels of copy k are read as ``width / 3`` vectors expressed in frame k, mapped out
   (``F_k v``) and averaged over the K copies, giving ``width / 3`` O(3)-equivariant,
   translation-invariant vectors per node. New frames come from them: per graph, centre c =
   mean of all its latent vectors, PCA of (v - c) over the graph's nodes x channels, the same
   K sign frames; copy k of the next layer sees ``F'_k^T (v - c)``, flattened back to ``width``.
4. Output: a decoder (linear, SiLU, linear) in the last latent frame; the prediction of copy k
   is mapped out with that frame (``rho_out(F'_k)``; points also get + t, the input centroid)
   and averaged over the K copies. Graph-level outputs are sum-pooled per copy first.

So each forward makes ``depth`` frame averages (``depth - 1`` latent + the output), counted in
``FAGNNModel.frame_averages``. Every average is exactly O(3)- (SO(3)-) equivariant given
equivariant frames, so the model is exact (``exact=True``) wherever the input covariance and
each latent covariance have distinct eigenvalues; at ties a frame is ill-defined (see
``equibench.metrics.degeneracy``). Frames carry no gradient (eigenvectors detached, as in the
reference); the framed latent vectors keep theirs.

Settings of the paper's n-body run (reference ``nbody.py``): 4 layers, width 60 (20 latent
vectors), SiLU, lr 1e-3, batch 100, 3 000 training samples, O(3) frames: the defaults here are
``depth=4``, ``width=60``, ``group="O3"`` (the optimiser settings belong to the suite).
Differences from the reference, on purpose: the node input is every typed input of the task (on
n-body also the charge q_i, which the reference passes only through q_i q_j on edges), and the
eigen-decomposition runs in float64 (``torch.symeig`` in float32 there). ``residual=True`` (not
in the paper) predicts point outputs as a displacement of the input position instead of
relative to the centroid.

Works on every graph3d task with a point input (the frames are built from it): n-body (point
output), normals (``1o``), QM9 and md (``0e`` graph level, or md forces ``1o``). Parameters:
``params`` sizes ``width`` (a multiple of 3) with ``build_at_params``.

``degenerate="average"`` (default ``"arbitrary"``: the above, unchanged): when the input's
covariance has tied eigenvalues (benzene, methane, regular polygons, a square and its centre,
collinear particles), every frame set of that forward pass, the input's and each latent one, is
built by ``blocks.pca_frames.symmetric_frames`` (tie-breaking axes from the outermost points /
velocities, resp. latent vectors, in the tied eigenspace; the number of copies then varies per
graph and layer, each average weighted 1 / |frames|), and where nothing breaks a tie the latent
vectors and the output are projected on what the residual stabiliser fixes (latent vectors: the
axial component, resp. zero). Every frame set is then equivariant, so the model is exact on those
inputs too (1e-15 measured). Inputs without a tie take the path above, bit for bit: their latent
covariances only tie by accident (an input's stabiliser forces a latent tie only where it forces
one in the input's own covariance).
"""
from __future__ import annotations

from typing import cast

import torch
from torch import nn
from torch_geometric.data import Batch
from torch_geometric.nn import global_add_pool

from ...core.registry import register_method
from ...core.spec import TaskSpec
from ...symmetry.fieldtypes import POINT, field_dim
from ...symmetry.group3d import act_on_batch, act_on_output
from ..base import EVERY_INPUT, GENERIC_INPUTS, Method, build_at_params
from ..blocks.backbone import edge_geometry, mlp, node_features
from ..blocks.breaking import FieldInputOption
from ..blocks.pca_frames import (
    FrameList,
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
    gather_graphs,
    into_frame,
    out_of_frame,
    pca_axes,
    principal_axes,
    proper_base,
    region,
    replicate,
    sign_framed_copies,
    sign_frames_supported,
    stabiliser_projection,
    sum_per_graph,
    symmetric_frames,
)


class GCL(nn.Module):
    """The reference's graph convolution layer (no coordinates, residual node update)."""

    def __init__(self, width: int, edge_dim: int) -> None:
        super().__init__()
        self.phi = mlp([2 * width + edge_dim, width, width], last_act=True)
        self.psi = mlp([2 * width, width, width])

    def forward(self, h: torch.Tensor, edge_index: torch.Tensor, edge_attr: torch.Tensor) -> torch.Tensor:
        src, dst = edge_index
        m = self.phi(torch.cat([h.index_select(0, dst), h.index_select(0, src), edge_attr], dim=-1))
        agg = m.new_zeros(h.shape[0], m.shape[1]).index_add(0, dst, m)
        return h + self.psi(torch.cat([h, agg], dim=-1))


def frames_of_vectors(vecs: torch.Tensor, index: torch.Tensor, num_graphs: int,
                      group: str) -> tuple[torch.Tensor, torch.Tensor]:
    """PCA frames of per-node vector sets ``vecs [N, C, 3]`` pooled per graph (``index [N]``):
    ``(F [B, K, 3, 3], c [B, 3])`` with c the mean of each graph's N_b x C vectors."""
    C = vecs.shape[1]
    flat = vecs.reshape(-1, 3)
    idx = index.repeat_interleave(C)
    c = centroid(flat, idx, num_graphs)
    _, V = principal_axes(covariance(flat, c, idx, num_graphs))
    return frame_set(V, group), c


class FAGNNModel(nn.Module):
    """FA-GNN (module docstring): embed -> [GCL -> latent frame average -> reframe] x (depth - 1)
    -> GCL -> decoder -> output frame average."""

    def __init__(self, spec: TaskSpec, width: int, depth: int, group: str, residual: bool = False,
                 degenerate: str = "arbitrary") -> None:
        super().__init__()
        self.degenerate = check_degenerate(degenerate)
        if width % 3 or width < 3:
            raise ValueError(f"fa_gnn: width must be a positive multiple of 3, got {width}")
        if depth < 1:
            raise ValueError(f"fa_gnn: depth must be positive, got {depth}")
        self.spec, self.width, self.depth = spec, width, depth
        self.group, self.residual = check_group(group), residual
        self.point = first_point_field(spec)
        in_dim = sum(field_dim(t) for t in spec.inputs.values())
        edge_dim = 1 + sum(field_dim(t) for t in spec.edge_inputs.values())
        self.embed = nn.Linear(in_dim, width)
        self.layers = nn.ModuleList(GCL(width, edge_dim) for _ in range(depth))
        self.decoder = mlp([width, width, field_dim(spec.output)])
        self.frame_averages = 0  # frame averages made so far (depth per forward)

    def input_frames(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(F [B, K, 3, 3], t [B, 3])``: PCA frame set and centroid of the point input."""
        B = int(batch.num_graphs)
        pos = batch[self.point]
        t = centroid(pos, batch.batch, B)
        _, V = principal_axes(covariance(pos, t, batch.batch, B))
        return frame_set(V, self.group), t

    @staticmethod
    def copies(F: torch.Tensor) -> torch.Tensor:
        """``[K * B, 3, 3]`` copy-major (graph k * B + b is copy k of graph b, like ``replicate``)."""
        return F.transpose(0, 1).reshape(-1, 3, 3)

    def average_latent(self, h: torch.Tensor, F: torch.Tensor, node_graph: torch.Tensor) -> torch.Tensor:
        """Frame average of latent vectors: ``h [K * N, width]`` in frames ``F [B, K, 3, 3]`` ->
        ``[N, width / 3, 3]`` world vectors, the mean over k of ``F_k v_k``."""
        self.frame_averages += 1
        K = F.shape[1]
        N = node_graph.shape[0]
        v = h.reshape(K, N, -1, 3)
        Fn = F.transpose(0, 1)[:, node_graph]  # [K, N, 3, 3]
        return torch.einsum("knij,kncj->knci", Fn, v).mean(0)

    def reframe(self, v: torch.Tensor, node_graph: torch.Tensor,
                num_graphs: int) -> tuple[torch.Tensor, torch.Tensor]:
        """New frames from latent vectors ``v [N, C, 3]``: ``(h [K * N, 3C], F [B, K, 3, 3])`` with
        copy k holding ``F_k^T (v - c)``."""
        F, c = frames_of_vectors(v, node_graph, num_graphs, self.group)
        Fn = F.transpose(0, 1)[:, node_graph]  # [K, N, 3, 3]
        framed = torch.einsum("knji,ncj->knci", Fn, v - c[node_graph].unsqueeze(1))
        return framed.reshape(-1, self.width), F

    def average_output(self, y: torch.Tensor, F: torch.Tensor, t: torch.Tensor, big: Batch,
                       batch: Batch) -> torch.Tensor:
        """Map every copy's prediction out of its frame (``rho_out(F_k)``; points + t, or + the
        input position with ``residual``) and average over the copies."""
        self.frame_averages += 1
        K = F.shape[1]
        Fk = self.copies(F)
        if self.spec.level == "graph":
            y = global_add_pool(y, big.batch, size=int(big.num_graphs))
        shift = t.repeat(K, 1) if not self.residual else torch.zeros_like(t).repeat(K, 1)
        out = act_on_output(y, self.spec, out_of_frame(Fk, shift), big)
        out = out.reshape(K, -1, out.shape[-1]).mean(0)
        if self.residual and self.spec.output == POINT:
            out = out + (batch[self.point] if self.spec.level == "node"
                         else centroid(batch[self.point], batch.batch, int(batch.num_graphs)))
        return out

    def frame_list(self, vecs: torch.Tensor, index: torch.Tensor, num_graphs: int) -> FrameList:
        """Frames of latent vectors ``vecs [N, C, 3]`` pooled per graph for the ``degenerate``
        path: ``symmetric_frames`` of the N x C vectors about their mean, or, where nothing ties,
        the K sign frames of every graph (weights 1 / K)."""
        C = vecs.shape[1]
        flat = vecs.reshape(-1, 3)
        idx = index.repeat_interleave(C)
        c = centroid(flat, idx, num_graphs)
        fl = symmetric_frames(flat, (flat - c[idx]).unsqueeze(1), idx, num_graphs, self.group)
        if fl is not None:
            return fl
        F, _ = frames_of_vectors(vecs, index, num_graphs, self.group)
        B, K = F.shape[0], F.shape[1]
        graph = torch.arange(B, device=F.device).repeat_interleave(K)
        zeros = torch.zeros(B, dtype=torch.long, device=F.device)
        return FrameList(F.reshape(-1, 3, 3), graph, torch.full((B * K,), 1.0 / K, dtype=F.dtype, device=F.device),
                         c, torch.zeros_like(c), zeros, zeros.bool(), self.group)

    def forward_symmetric(self, batch: Batch, fl: FrameList) -> torch.Tensor:
        """The ``degenerate="average"`` forward pass (class docstring): frame lists of varying size
        per graph (``gather_graphs``), weighted averages, stabiliser projections."""
        B, N, C = int(batch.num_graphs), batch.num_nodes, self.width // 3
        t = fl.t  # the input centroid: the origin of point outputs
        big, node_idx = gather_graphs(batch, self.spec, fl.graph)
        h = self.embed(node_features(act_on_batch(big, self.spec, into_frame(fl.F, t[fl.graph]), target=False),
                                     self.spec))
        for i, layer in enumerate(self.layers):
            h = layer(h, big.edge_index, edge_geometry(big, self.spec)[1])  # invariant edge attributes
            if i == self.depth - 1:
                break
            self.frame_averages += 1
            w = fl.weight[big.batch]
            world = torch.einsum("nij,ncj->nci", fl.F[big.batch], h.reshape(-1, C, 3)) * w[:, None, None]
            v = world.new_zeros(N, C, 3).index_add(0, node_idx, world)
            a = fl.axis[batch.batch].unsqueeze(1)
            stab = fl.stab[batch.batch][:, None, None]
            v = torch.where(stab == 1, (v * a).sum(-1, keepdim=True) * a, torch.where(stab == 2, 0 * v, v))
            fl = self.frame_list(v, batch.batch, B)
            big, node_idx = gather_graphs(batch, self.spec, fl.graph)
            framed = torch.einsum("nji,ncj->nci", fl.F[big.batch], (v - fl.t[batch.batch].unsqueeze(1))[node_idx])
            h = framed.reshape(-1, self.width)
        self.frame_averages += 1
        y = self.decoder(h)
        if self.spec.level == "graph":
            y = global_add_pool(y, big.batch, size=int(big.num_graphs))
        shift = torch.zeros_like(t) if self.residual else t
        out = act_on_output(y, self.spec, out_of_frame(fl.F, shift[fl.graph]), big)
        w = fl.weight.to(out.dtype)
        if self.spec.level == "graph":
            res = out.new_zeros(B, out.shape[-1]).index_add(0, fl.graph, out * w[:, None])
        else:
            res = out.new_zeros(N, out.shape[-1]).index_add(0, node_idx, out * w[big.batch][:, None])
        if self.residual and self.spec.output == POINT:
            res = res + (batch[self.point] if self.spec.level == "node" else t)
        fl = FrameList(fl.F, fl.graph, fl.weight, t, fl.axis, fl.stab, fl.tied, fl.group)  # about the input centroid
        return stabiliser_projection(res, self.spec, batch, fl)

    def forward(self, batch: Batch) -> torch.Tensor:
        if self.degenerate == "average":
            B = int(batch.num_graphs)
            pos = batch[self.point]
            fl = symmetric_frames(pos, candidate_vectors(batch, self.spec, centroid(pos, batch.batch, B)),
                                  batch.batch, B, self.group)
            if fl is not None:  # the input's covariance ties: frames from the input itself, every layer
                return self.forward_symmetric(batch, fl)
        if sign_frames_supported(self.spec):
            return self.forward_signs(batch)
        F, t = self.input_frames(batch)
        K, B = F.shape[1], int(batch.num_graphs)
        big = replicate(batch, self.spec, K)
        framed = act_on_batch(big, self.spec, into_frame(self.copies(F), t.repeat(K, 1)), target=False)
        _, edge_attr = edge_geometry(framed, self.spec)  # invariants (|x_i - x_j|^2, q_i q_j)
        h = self.embed(node_features(framed, self.spec))
        for i, layer in enumerate(self.layers):
            h = layer(h, big.edge_index, edge_attr)
            if i < self.depth - 1:
                v = self.average_latent(h, F, batch.batch)
                h, F = self.reframe(v, batch.batch, B)
        return self.average_output(self.decoder(h), F, t, big, batch)

    def forward_signs(self, batch: Batch) -> torch.Tensor:
        """``forward`` where every input is a point, an l = 1 vector or invariant, and so is the
        output (``sign_frames_supported``): every frame of a set is ``F_k = W diag(sigma_k)``
        (``frame_signs``), so framing is one projection on W times the K sign vectors, and a frame
        average is ``W (1/K sum_k sigma_k * v_k)``: one 3 x 3 product per node and vector instead
        of K. The invariant edge attributes are computed once and repeated. The same function as
        the generic path (to rounding)."""
        B, N, C = int(batch.num_graphs), batch.num_nodes, self.width // 3
        index = batch.batch
        with region("equibench.frames"):
            V, t = pca_axes(batch[self.point], index, B)
            W = proper_base(V, self.group)
            sig = frame_signs(self.group, V.dtype, V.device)  # [K, 3]
            K = sig.shape[0]
            sig_v = sig[:, None, None, :]
        with region("equibench.to_frame"):
            big = sign_framed_copies(batch, self.spec, W, t, sig.unsqueeze(1))
            edge_attr = edge_geometry(batch, self.spec)[1].repeat(K, 1)  # invariants: the same in every frame
            h = self.embed(node_features(big, self.spec))
        chunk = copies_per_call(batch, K)
        for i, layer in enumerate(self.layers):
            with region("equibench.backbone"):
                h = self.run_layer(cast(GCL, layer), h, big.edge_index, edge_attr, K, chunk)
            if i == self.depth - 1:
                break
            with region("equibench.to_frame"):
                self.frame_averages += 1
                v = (h.reshape(K, N, C, 3) * sig_v).mean(0) @ W.index_select(0, index).transpose(-1, -2)  # world
            with region("equibench.frames"):
                W, c = latent_axes(v, index, B, self.group)
            with region("equibench.to_frame"):
                Wn = W.index_select(0, index)
                h = (((v - c.index_select(0, index).unsqueeze(1)) @ Wn).unsqueeze(0) * sig_v).reshape(K * N, self.width)
        with region("equibench.to_frame"):
            self.frame_averages += 1
            y = self.decoder(h)
            if self.spec.level == "graph":
                y = global_add_pool(y, big.batch, size=int(big.num_graphs))
            shift = torch.zeros_like(t) if self.residual else t
            out = average_sign_frames(y, self.spec, W, shift, sig.unsqueeze(1), batch)
            if self.residual and self.spec.output == POINT:
                out = out + (batch[self.point] if self.spec.level == "node" else t)
            return out

    @staticmethod
    def run_layer(layer: GCL, h: torch.Tensor, edge_index: torch.Tensor, edge_attr: torch.Tensor, copies: int,
                  chunk: int) -> torch.Tensor:
        """``layer`` on the ``copies`` copy-major copies of a batch, ``chunk`` copies per call
        (``copies_per_call``): the copies share no edge, and every chunk of c copies has the
        edges of the first c (same offsets), so a chunk is one call on a slice."""
        if chunk >= copies:
            return layer(h, edge_index, edge_attr)
        N, E = h.shape[0] // copies, edge_index.shape[1] // copies
        outs = []
        for k in range(0, copies, chunk):
            c = min(chunk, copies - k)
            outs.append(layer(h[k * N:(k + c) * N], edge_index[:, :c * E], edge_attr[:c * E]))
        return torch.cat(outs)


def latent_axes(vecs: torch.Tensor, index: torch.Tensor, num_graphs: int,
                group: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W [B, 3, 3], c [B, 3])``: ``frames_of_vectors`` as the base W of its sign frames
    (``proper_base``), from per-node sums instead of a ``[N * C, 3]`` scatter: c = the mean of each
    graph's N_b x C vectors, W from the eigenvectors of sum (v - c)(v - c)^T."""
    C = vecs.shape[1]
    count = torch.bincount(index, minlength=num_graphs).clamp_min(1).to(vecs.dtype) * C
    c = sum_per_graph(vecs.sum(1), index, num_graphs) / count.unsqueeze(-1)
    d = (vecs - c.index_select(0, index).unsqueeze(1)).detach()
    outer = (d.unsqueeze(-1) * d.unsqueeze(-2)).sum(1)  # [N, 3, 3], exactly symmetric
    cov = sum_per_graph(outer, index, num_graphs)
    _, V = principal_axes(cov)
    return proper_base(V, group), c


@register_method("fa_gnn")
class FAGNN(FieldInputOption, Method):
    """FA-GNN (Puny et al. 2022, n-body table): PCA frame averaging at every message-passing layer."""

    domains = ("graph3d",)
    exact = True
    exact_scope = GENERIC_INPUTS  # per-layer PCA frames are undecided on symmetric inputs
    group = "O3"
    smoke_options = {"width": 15, "depth": 2}

    def __init__(self, *, width: int = 60, depth: int = 4, params: int | None = None,
                 group: str = "O3", residual: bool = False, field_input: bool = False,
                 degenerate: str = "arbitrary") -> None:
        if width < 3 or width % 3:
            raise ValueError(f"width must be a positive multiple of 3 (width / 3 latent vectors), got {width}")
        if depth < 1:
            raise ValueError(f"depth must be positive, got {depth}")
        super().__init__(width=width, depth=depth, params=params, group=group, residual=residual)
        self.width, self.depth, self.params = width, depth, params
        self.group, self.residual = check_group(group), residual
        self.degenerate = check_degenerate(degenerate)
        if degenerate != "arbitrary":  # recorded only when set: existing rows stay as they were
            self.options.update(degenerate=degenerate)
            # exact on symmetric inputs too (measured 1e-15; pca_frames.symmetric_frames for the scope)
            self.exact_scope = EVERY_INPUT
        self.set_field_input(field_input)

    def supports(self, spec: TaskSpec) -> str | None:
        return super().supports(spec) or frame_support(spec)

    def build(self, spec: TaskSpec, seed: int = 0) -> nn.Module:
        spec = self.model_spec(spec)  # + the symmetry-breaking inputs under field_input=True
        reason = self.supports(spec)
        if reason:
            raise ValueError(reason)
        return build_at_params(lambda c: FAGNNModel(spec, 3 * c, self.depth, self.group, self.residual,
                                                    self.degenerate),
                               self.params, self.width // 3)
