"""Intrinsically equivariant architectures: the e3nn tensor-product network and escnn
steerable point convolutions. One registered name per module; importing the package registers
them all (a module whose optional dependency is missing is listed in ``unavailable``)."""
from __future__ import annotations

from ...core.autoimport import import_submodules

unavailable: dict[str, str] = import_submodules(__name__, __path__)
