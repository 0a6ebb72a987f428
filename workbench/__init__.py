"""UNet performance workbench: per-layer convolution study across NNPACK and TVM.

The handful of names a notebook needs; everything else lives in its module (`workbench.plots`,
`workbench.kernels`, ...). Imported on first use, so `import workbench` stays quick.
"""

__version__ = "0.1.0"

# name -> (module, attribute)
_API = {
    # models
    "UNetSpec": ("model", "UNetSpec"),
    "reference_unet": ("model", "reference_unet"),
    "load_onnx": ("model", "load_onnx"),
    "network": ("networks", "network"),
    "layer_table": ("intensity", "layer_table"),
    # devices
    "open_device": ("rpc", "open_device"),
    "open_session": ("session", "open_session"),
    # the study, as stages
    "StudyConfig": ("study", "StudyConfig"),
    "WorkDir": ("records", "WorkDir"),
    "measure_layers": ("study", "measure_layers"),
    "choose_plans": ("study", "choose_plans"),
    "build_models": ("study", "build_models"),
    "compare_end_to_end": ("study", "compare_end_to_end"),
    "run_study": ("study", "run_study"),
    # the result
    "load_hybrid": ("hybrid", "load_hybrid"),
    "WorkbenchError": ("errors", "WorkbenchError"),
}

__all__ = sorted(_API)


def __getattr__(name):
    if name not in _API:
        raise AttributeError(f"module 'workbench' has no attribute {name!r}")
    from importlib import import_module

    module, attribute = _API[name]
    return getattr(import_module(f"{__name__}.{module}"), attribute)


def __dir__():
    return sorted(list(globals()) + __all__)
