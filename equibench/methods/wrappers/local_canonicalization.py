"""``local_canonicalization``: the tensor-frames pipeline with scalar-only messages.

Same local frames R_i, same local inputs and output map as ``tensor_frames`` (Lippmann et al.,
"Beyond canonicalization: how tensorial messages improve equivariant message passing", ICLR 2025,
call this ablation local canonicalisation), but the hidden features are declared ``width x 0n``
(invariant scalars): ``h_j`` reaches node i unchanged, i.e. expressed in frame j rather than
frame i; only ``edge_vec`` is rotated into frame i, ``R_i (x_j - x_i)``. Still exactly
O(3)-equivariant wherever the frames are (every local quantity is invariant); this is the ablation
that tensor frames' tensorial messages (rho(R_i R_j^T) h_j) improve on.

Frames, handedness (``"wide"`` default, ``"local"`` the paper's, which drops the O(3)-exactness
claim), the planar projection, the exactness claim and the ``frame_*`` metrics are exactly those
of ``tensor_frames`` (its module docstring).
"""
from __future__ import annotations

from ...core.registry import register_method
from ..blocks.tfmp import Reps, TensorReps
from .tensor_frames import TensorFrames


@register_method("local_canonicalization")
class LocalCanonicalization(TensorFrames):
    """Tensor frames with scalar-only messages: each node's inputs canonicalised in its own local frame.

    Options: ``width``, ``depth``, ``params``, ``so3``, ``frames`` ("learned" | "nearest"),
    ``handedness`` ("wide" | "local")."""

    def __init__(self, *, width: int = 64, depth: int = 4, params: int | None = None,
                 so3: bool = False, frames: str = "learned", handedness: str = "wide",
                 field_input: bool = False) -> None:
        super().__init__(width=width, depth=depth, params=params, so3=so3, frames=frames, handedness=handedness,
                         field_input=field_input)
        self.options.pop("hidden_reps", None)

    def hidden_reps(self, size: int) -> Reps:
        return TensorReps(((size, 0, False),))
