"""Search with a trained model: a faiss index folder, exact and approximate kinds, calibrated
distance thresholds, near-duplicate groups and retrieval grids.

Everything but :class:`~dcml.search.index.Index` (which can embed images through a model) is a
pure function on arrays: usable without a model.
"""
