"""UNet performance workbench: per-layer convolution study across NNPACK and TVM."""

__version__ = "0.1.0"
