"""Building blocks shared by the methods (classes and functions, never a registry).

Graph pieces: ``backbone`` (the shared non-equivariant message-passing network), ``pca_frames``
(PCA frames, Gram-Schmidt and acting in a frame), ``tfmp`` (tensor-frame message passing),
``energy_forces`` (forces as -dE/dx of an energy model), ``breaking`` (the ``field_input``
option: a task's symmetry-breaking fields as typed inputs). Image pieces (``image2d`` domain):
``cnn`` (the image-model base, the plain CNN and group averaging), ``steerable2d`` (escnn
steerable CNNs, float64 basis re-sampling, invariant pooling), ``canon2d`` (the learned C_N
canonicaliser and the canonicalised CNN), ``image`` (sizing / parameter matching / dtype of an
image build).

Nothing here registers anything: ``equibench.methods`` does not import this package on its own;
the method files import the blocks they use (escnn is imported only when an escnn block is built).
"""
