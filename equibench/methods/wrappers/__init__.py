"""Methods that wrap the shared message-passing backbone (``blocks/backbone.py``) with a way of
getting symmetry: none (``baseline``), data augmentation, frame averaging, learned and PCA
canonicalisation, tensor frames and local canonicalisation. One registered name per module."""
