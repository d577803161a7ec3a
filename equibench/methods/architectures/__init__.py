"""Intrinsically equivariant architectures (the e3nn tensor-product network, escnn steerable point
convolutions, ...). One registered name per module."""
