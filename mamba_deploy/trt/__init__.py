"""TensorRT support: the selective-scan plugin and engine building.

    compat.py   import ``tensorrt`` (>= 10) or TensorRT-RTX, whichever is installed (+ the RTX library symlink)
    kernels.py  the CUDA kernels of plugins/ through their C ABI (nvcc build into a cache, ctypes, torch wrappers)
    plugin.py   IPluginV3 plugins + IPluginCreatorV3One creators for SelectiveScanStep / SelectiveScan
    builder.py  ONNX artifact → step.engine / prefill.engine + build_report.json

Nothing here is imported by ``import mamba_deploy``; the session lives in runtime/trt_session.py.
"""
