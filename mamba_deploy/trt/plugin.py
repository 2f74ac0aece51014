"""TensorRT plugins for the graph contract's custom ops: ``SelectiveScanStep`` and ``SelectiveScan`` (Mamba-1,
kernels of plugins/selective_scan.h) and ``SSDScanStep`` and ``SSDScan`` (Mamba-2, kernels of plugins/ssd.h).

Each op gets an ``IPluginV3`` (+ ``IPluginV3OneCore``/``OneBuild``/``OneRuntime``) class and an
``IPluginCreatorV3One`` creator registered under the op's name, version and namespace from
``onnx/contract.py``; the plugin fields are the op's ONNX attributes (``delta_softplus`` INT32,
``softplus_threshold`` FLOAT32). With the creators registered and the ONNX parser flag ``ENABLE_PLUGIN_OVERRIDE``
set, the parser puts a PLUGIN_V3 layer where the graph has the custom node instead of inlining its function body.

The plugin is split in two so that the half a TensorRT engine would run is testable without TensorRT:

* :class:`ScanOpLogic` — plain Python, no TensorRT import: fields, output dtypes/shapes rules, the format
  rule (fp32 ports pinned to FLOAT, activation ports FLOAT/HALF/BF16 all alike) and :meth:`ScanOpLogic.enqueue`,
  which reads sizes from the tensor descriptors and launches the C-ABI kernels (``kernels.launch_step/scan``) on
  the given stream. Descriptors only need ``.type`` (with a ``.name`` of FLOAT/HALF/BF16) and ``.dims``.
* the TensorRT classes made by :func:`plugin_classes` — thin adapters that hold a ScanOpLogic and forward to it.

TensorRT calls at parse time: create_plugin, get_output_data_types, get_output_shapes, clone; at build time:
get_output_shapes, supports_format_combination, configure_plugin, get_workspace_size, get_valid_tactics,
get_fields_to_serialize; at run time (deserialize → create_plugin with phase RUNTIME): on_shape_change,
attach_to_context, enqueue.
"""
from __future__ import annotations

import functools

import numpy as np

from ..artifact import dtype_info
from ..onnx import contract
from . import kernels

# TensorRT DataType member name → dtype code of the kernels' C ABI (names from the artifact's dtype table)
_TRT_DTYPE_CODES = {dtype_info(name).trt: code for name, code in kernels.DTYPE_CODES.items()}


class ScanOpLogic:
    """Everything the plugin decides, for one op (``contract.OPS[op_type]``), without TensorRT."""

    def __init__(self, op_type: str, fields: dict | None = None):
        self.spec = contract.OPS[op_type]
        self.op_type = op_type
        self.fields = dict(self.spec.attributes)
        for name, value in (fields or {}).items():
            if name not in self.fields:
                raise ValueError(f"{op_type} has no field {name!r}; fields: {', '.join(self.fields)}")
            self.fields[name] = type(self.spec.attributes[name])(np.asarray(value).ravel()[0])
        self.n_inputs = len(self.spec.inputs)
        # in_out positions whose dtype is fp32 whatever the activations are (A, D, δ bias, state in/out)
        ports = list(self.spec.inputs) + list(self.spec.outputs)
        self.fp32_positions = frozenset(i for i, p in enumerate(ports) if p.dtype == "fp32")
        self.act_positions = frozenset(i for i, p in enumerate(ports) if p.dtype == "act")
        self.state_input = [p.name for p in self.spec.inputs].index("ssm_state")

    @property
    def is_scan(self) -> bool:
        return self.op_type in (contract.SELECTIVE_SCAN.op_type, contract.SSD_SCAN.op_type)

    @property
    def is_ssd(self) -> bool:
        return self.op_type in contract.SSD_OPS

    # -- build-time rules ------------------------------------------------------------------------------------------
    def output_dtypes(self, input_types: list) -> list:
        """y in the activation dtype (that of x), ssm_state_out in the state's dtype (fp32)."""
        return [input_types[0], input_types[self.state_input]]

    def output_shape_sources(self) -> list[int]:
        """Output i has the shape of input ``output_shape_sources()[i]`` (y ← x, ssm_state_out ← ssm_state)."""
        return [0, self.state_input]

    def supports(self, pos: int, type_names: list[str], linear: bool) -> bool:
        """Format rule. ``type_names``: names of the in/out types (e.g. 'FLOAT', 'HALF') so far."""
        if not linear:
            return False
        t = type_names[pos]
        if pos in self.fp32_positions:
            return t == "FLOAT"
        if pos == 0:
            return t in _TRT_DTYPE_CODES
        return t == type_names[0]  # every activation port shares x's dtype

    # -- run time ----------------------------------------------------------------------------------------------
    def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream) -> int:
        """Launch the kernel for these descriptors/pointers on ``stream`` (cudaStream_t as int). Returns 0."""
        if self.is_ssd:
            return self._enqueue_ssd(input_desc, inputs, outputs, stream)
        code = _TRT_DTYPE_CODES[input_desc[0].type.name]
        x_dims = tuple(int(v) for v in input_desc[0].dims)
        d, N = (int(v) for v in input_desc[2].dims)  # A: [d, N]
        names = [p.name for p in self.spec.inputs]
        ptrs = {n: int(ptr) for n, ptr in zip(names, inputs)}
        ptrs["state_in"] = ptrs.pop("ssm_state")
        ptrs["y"], ptrs["state_out"] = int(outputs[0]), int(outputs[1])
        softplus = bool(self.fields["delta_softplus"])
        threshold = float(self.fields["softplus_threshold"])
        if x_dims[1] != d:
            raise ValueError(f"{self.op_type}: x has {x_dims[1]} channels, A has {d}")
        if self.is_scan:
            b, _, L = x_dims
            kernels.launch_scan(ptrs, b, d, L, N, code, softplus, threshold, int(stream))
        else:
            b, _ = x_dims
            kernels.launch_step(ptrs, b, d, N, code, softplus, threshold, int(stream))
        return 0

    def _enqueue_ssd(self, input_desc, inputs, outputs, stream) -> int:
        """SSDScanStep: x [b, H, P], B [b, G, N]; SSDScan: x [b, L, H, P], B [b, L, G, N]; D [H, P|1]."""
        code = _TRT_DTYPE_CODES[input_desc[0].type.name]
        names = [p.name for p in self.spec.inputs]
        dims = {n: tuple(int(v) for v in d.dims) for n, d in zip(names, input_desc)}
        ptrs = {n: int(ptr) for n, ptr in zip(names, inputs)}
        ptrs["state_in"] = ptrs.pop("ssm_state")
        ptrs["y"], ptrs["state_out"] = int(outputs[0]), int(outputs[1])
        H, P = dims["x"][-2:]
        G, N = dims["B"][-2:]
        if dims["A"] != (H,) or dims["D"] not in ((H, P), (H, 1)) or H % G:
            raise ValueError(f"{self.op_type}: x {dims['x']}, A {dims['A']}, B {dims['B']}, D {dims['D']} do not fit")
        f = self.fields
        common = dict(d_per_channel=dims["D"] == (H, P) and P != 1, dt_softplus=bool(f["dt_softplus"]),
                      dt_limit=(float(f["dt_min"]), float(f["dt_max"])),
                      softplus_threshold=float(f["softplus_threshold"]), stream=int(stream))
        if self.is_scan:
            b, L = dims["x"][:2]
            kernels.launch_ssd_scan(ptrs, b, L, H, P, G, N, code, **common)
        else:
            kernels.launch_ssd_step(ptrs, dims["x"][0], H, P, G, N, code, **common)
        return 0


@functools.lru_cache(maxsize=None)
def plugin_classes(trt):
    """(plugin class, creator class) for ``trt`` (the module from compat.tensorrt()); made once per module."""

    def field_collection(logic: ScanOpLogic | None, op_spec):
        """(PluginFieldCollection, the numpy arrays it points into). A PluginField does not own its data: the
        caller must keep the arrays alive as long as TensorRT may read the collection."""
        fields, arrays = [], []
        for name, default in op_spec.attributes.items():
            value = default if logic is None else logic.fields[name]
            is_int = isinstance(default, int)
            arrays.append(np.array([value], np.int32 if is_int else np.float32))
            kind = trt.PluginFieldType.INT32 if is_int else trt.PluginFieldType.FLOAT32
            fields.append(trt.PluginField(name, arrays[-1], kind))
        return trt.PluginFieldCollection(fields), arrays

    class SelectiveScanPlugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        def __init__(self, logic: ScanOpLogic):
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.logic = logic
            self.num_outputs = len(logic.spec.outputs)
            self.plugin_namespace = contract.PLUGIN_NAMESPACE
            self.plugin_name = logic.op_type
            self.plugin_version = contract.PLUGIN_VERSION
            self.timing_cache_id = ""  # one kernel, no tactics: every instance can share timing entries

        # core
        def get_capability_interface(self, type):
            return self

        def clone(self):
            return SelectiveScanPlugin(ScanOpLogic(self.logic.op_type, self.logic.fields))

        # build
        def get_output_data_types(self, input_types):
            return self.logic.output_dtypes(list(input_types))

        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            return [trt.DimsExprs(inputs[i]) for i in self.logic.output_shape_sources()]

        def supports_format_combination(self, pos, in_out, num_inputs):
            names = [in_out[i].desc.type.name for i in range(pos + 1)]
            return self.logic.supports(pos, names, in_out[pos].desc.format == trt.TensorFormat.LINEAR)

        def configure_plugin(self, inp, out):
            pass

        def get_workspace_size(self, input_desc, output_desc):
            return 0

        def get_valid_tactics(self):
            return []

        def get_fields_to_serialize(self):
            self._fields = field_collection(self.logic, self.logic.spec)  # keeps the arrays alive
            return self._fields[0]

        # runtime
        def set_tactic(self, tactic):
            pass

        def on_shape_change(self, inp, out):
            pass

        def attach_to_context(self, context):
            return self.clone()

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            return self.logic.enqueue(input_desc, output_desc, inputs, outputs, workspace, stream)

        def destroy(self):
            pass

    class SelectiveScanPluginCreator(trt.IPluginCreatorV3One):
        def __init__(self, op_type: str):
            trt.IPluginCreatorV3One.__init__(self)
            self.op_type = op_type
            self.name = op_type
            self.plugin_namespace = contract.PLUGIN_NAMESPACE
            self.plugin_version = contract.PLUGIN_VERSION
            self._fields = field_collection(None, contract.OPS[op_type])  # keeps the arrays alive
            self.field_names = self._fields[0]

        def create_plugin(self, name, fc, phase):
            fields = {f.name: np.array(f.data) for f in fc} if fc is not None else {}
            return SelectiveScanPlugin(ScanOpLogic(self.op_type, fields))

    return SelectiveScanPlugin, SelectiveScanPluginCreator


_CREATORS: list = []  # keeps the Python creators alive as long as TensorRT's registry refers to them


def register_plugins(trt=None) -> list[str]:
    """Register creators for every contract op with TensorRT's plugin registry (idempotent). Returns the names."""
    if trt is None:
        from .compat import tensorrt
        trt = tensorrt()
    _, creator_cls = plugin_classes(trt)
    registry = trt.get_plugin_registry()
    names = []
    for op_type in contract.OPS:
        existing = registry.get_creator(op_type, contract.PLUGIN_VERSION, contract.PLUGIN_NAMESPACE)
        if existing is None:
            creator = creator_cls(op_type)
            if not registry.register_creator(creator, contract.PLUGIN_NAMESPACE):
                raise RuntimeError(f"TensorRT refused to register the {op_type} plugin creator")
            _CREATORS.append(creator)
        names.append(op_type)
    return names
