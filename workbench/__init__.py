"""UNet performance workbench: per-layer convolution study across NNPACK and TVM."""

__version__ = "0.1.0"


def load_hybrid(out_dir, threads=None):
    """The exported hybrid model in this process: a callable from a NumPy input to the NumPy output."""
    from .hybrid import load_hybrid as _load

    return _load(out_dir, threads)
