"""Methods that wrap the shared message-passing backbone (``blocks/backbone.py``) with a way of
getting symmetry: none (``baseline``), data augmentation, frame averaging, learned and PCA
canonicalisation, tensor frames and local canonicalisation. One registered name per module;
importing the package registers them all."""
from __future__ import annotations

from ...core.autoimport import import_submodules

unavailable: dict[str, str] = import_submodules(__name__, __path__)
