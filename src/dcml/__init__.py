"""dcml: Divide-and-Conquer Metric Learning (Sanakoyeu et al., CVPR 2019 / TPAMI 2021)."""

__version__ = "0.1.0"

__all__ = ["Index", "__version__", "load_model"]


def __getattr__(name: str):
    # Lazy: `import dcml` stays light (no torch, no faiss) until a model or an index is asked for.
    if name == "load_model":
        from dcml.inference import load_model

        return load_model
    if name == "Index":
        from dcml.search.index import Index

        return Index
    raise AttributeError(f"module 'dcml' has no attribute {name!r}")
