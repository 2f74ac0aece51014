"""Build TensorRT engines (step and prefill) from an ONNX artifact.

For each graph: parse the ONNX file with our plugin creators registered and the parser flag
``ENABLE_PLUGIN_OVERRIDE`` (each ``SelectiveScanStep``/``SelectiveScan`` node becomes one PLUGIN_V3 layer), or,
with ``use_plugin=False``, without them (the parser inlines each node's ONNX function body into plain layers);
one optimization profile over batch (and sequence length for prefill) read from the manifest's symbolic dims;
the serialized engine written next to the graphs (temp file, then rename) and ``build_report.json`` listing
every layer (name and type) of every network, plan sizes and build times.

Engines are specific to the TensorRT flavor/version they were built with, and to the GPU architecture
(TensorRT), or JIT-specialised on first run (TensorRT-RTX). Building needs no GPU with TensorRT-RTX.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from ..artifact import (BATCH_ALIASES, BUILD_REPORT, ENGINE_FILES, SEQ_ALIASES, check_against_graphs, graph_spec,
                        read_manifest)
from ..errors import UserError
from ..io import atomic_write, write_json
from ..onnx import contract

PLUGIN_LAYER_TYPE = "PLUGIN_V3"


def _logger(trt, verbose: bool):
    class Logger(trt.ILogger):
        """Collects errors (for our message) and prints warnings only when verbose."""

        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR):
                self.errors.append(msg)
            if verbose or severity in (trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR):
                print(f"[TensorRT {severity.name}] {msg}", flush=True)

    return Logger()


def profile_ranges(spec: dict, graph: str, max_batch: int, opt_batch: int, max_len: int, opt_len: int) -> dict:
    """{input name: (min, opt, max) shapes} from the manifest's symbolic dims ("batch", "seq")."""
    out = {}
    for inp in spec["inputs"]:
        dims = []
        for d in inp["shape"]:
            if isinstance(d, int):
                dims.append((d, d, d))
            elif d in BATCH_ALIASES:
                dims.append((1, opt_batch, max_batch))
            elif d in SEQ_ALIASES:
                dims.append((1, opt_len, max_len))
            else:
                raise UserError(f"the {graph} graph's input {inp['name']} has a dynamic dim {d!r} that this "
                                "builder does not know; export the artifact again with this mamba-deploy")
        out[inp["name"]] = tuple(tuple(x[i] for x in dims) for i in range(3))
    return out


def network_layers(network) -> list[dict]:
    return [{"name": network.get_layer(i).name, "type": network.get_layer(i).type.name}
            for i in range(network.num_layers)]


def _engine_layers(trt, logger, plan) -> tuple[list | None, str | None]:
    """Per-layer info of the built engine from the engine inspector (needs a runtime that can deserialize)."""
    try:
        import torch
        if not torch.cuda.is_available():
            return None, "not inspected: no CUDA device here (the network layers above are the record)"
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(plan)
        if engine is None:
            return None, "the engine could not be deserialized here (no GPU?)"
        inspector = engine.create_engine_inspector()
        info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
        return info.get("Layers", info), None
    except Exception as e:  # engine inspection is a bonus; the network listing above is the record
        return None, f"{type(e).__name__}: {e}"


def build_engine(trt, onnx_path: Path, ranges: dict, use_plugin: bool, strongly_typed: bool, precision_flag,
                 timing_cache, verbose: bool = False) -> dict:
    """Parse and build one graph. Returns {"plan": bytes, "layers": [...], "build_seconds", ...}."""
    logger = _logger(trt, verbose)
    builder = trt.Builder(logger)
    flags = 0
    if strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if use_plugin:
        parser.set_flag(trt.OnnxParserFlag.ENABLE_PLUGIN_OVERRIDE)
    t0 = time.perf_counter()
    if not parser.parse_from_file(str(onnx_path)):
        errs = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors)) or "; ".join(logger.errors)
        raise UserError(f"TensorRT could not parse {onnx_path.name}: {errs}")
    parse_s = time.perf_counter() - t0
    layers = network_layers(network)
    config = builder.create_builder_config()
    if precision_flag is not None:
        config.set_flag(precision_flag)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        if name not in ranges:
            raise UserError(f"{onnx_path.name} has an input {name!r} its manifest does not list; export again")
        profile.set_shape(name, *ranges[name])
    config.add_optimization_profile(profile)
    if timing_cache is not None:
        config.set_timing_cache(timing_cache, ignore_mismatch=False)
    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    build_s = time.perf_counter() - t0
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build {onnx_path.name}: " + ("; ".join(logger.errors) or "see log"))
    plan = bytes(plan)
    engine_layers, engine_layers_note = _engine_layers(trt, logger, plan)
    return {"plan": plan, "layers": layers, "parse_seconds": parse_s, "build_seconds": build_s,
            "engine_layers": engine_layers, "engine_layers_note": engine_layers_note}


def _precision(trt, flavor: str, artifact_dtype: str, precision: str | None):
    """(strongly_typed, builder flag or None) for the requested precision."""
    if precision is None or precision == artifact_dtype:
        return True, None
    if flavor == "tensorrt" and artifact_dtype == "fp32":
        return False, {"fp16": trt.BuilderFlag.FP16, "bf16": trt.BuilderFlag.BF16}[precision]
    raise UserError(f"the artifact is {artifact_dtype} and {flavor} builds it as typed; for {precision} export the "
                    f"artifact with --dtype {precision}, or build with --precision {artifact_dtype}")


def build(artifact, precision: str | None = None, max_batch: int = 8, opt_batch: int | None = None,
          max_prefill_len: int = 2048, opt_prefill_len: int | None = None, use_plugin: bool = True,
          timing_cache_file=None, graphs=("step", "prefill"), verbose: bool = False, progress=None) -> dict:
    """Build the engines of ``artifact`` into it and write build_report.json there. Returns the report."""
    from . import compat

    artifact = Path(artifact)
    manifest = read_manifest(artifact, verify=True)   # checksums, as the runtimes check them
    check_against_graphs(artifact, manifest)
    if max_batch < 1 or max_prefill_len < 1:
        raise UserError("--max-batch and --max-prefill-len must be >= 1")
    opt_batch = min(opt_batch or max(1, max_batch // 2), max_batch)
    opt_len = min(opt_prefill_len or max(1, max_prefill_len // 2), max_prefill_len)
    trt = compat.tensorrt()
    flavor = compat.flavor()
    say = progress or (lambda msg: None)
    if use_plugin:
        without = sorted({op["op_type"] for op in manifest.get("custom_ops", []) if not op.get("plugin")})
        if without:
            raise UserError(f"no TensorRT plugin for {', '.join(without)} yet; build with --no-plugin (TensorRT "
                            "inlines their ONNX function bodies)")
        if not manifest.get("custom_ops"):
            raise UserError("this artifact has no custom ops (standard-op form, opset "
                            f"{manifest['onnx']['opset']}); build it with --no-plugin")
        from .plugin import register_plugins
        register_plugins(trt)
    strongly_typed, precision_flag = _precision(trt, flavor, manifest["dtype"], precision)

    cache = None
    timing_cache_file = Path(timing_cache_file) if timing_cache_file else None
    timing_cache_note = None
    if timing_cache_file is not None and flavor == "tensorrt_rtx":
        timing_cache_note = "ignored: timing caches are no-ops in TensorRT-RTX"
        say(f"--timing-cache {timing_cache_note}")
        timing_cache_file = None
    probe_config = trt.Builder(_logger(trt, False)).create_builder_config()
    if timing_cache_file is not None:
        blob = timing_cache_file.read_bytes() if timing_cache_file.is_file() else b""
        cache = probe_config.create_timing_cache(blob)
        if cache is None:
            raise UserError(f"{timing_cache_file} is not a TensorRT timing cache; delete it or pick another path")

    report = {"artifact": str(artifact.resolve()), "tensorrt": compat.describe(), "plugin": use_plugin,
              "precision": precision or manifest["dtype"], "artifact_dtype": manifest["dtype"],
              "strongly_typed": strongly_typed, "timing_cache": timing_cache_note or (str(timing_cache_file)
                                                                        if timing_cache_file else None),
              "profiles": {}, "engines": {}}
    for graph in graphs:
        spec = graph_spec(manifest, graph)
        ranges = profile_ranges(spec, graph, max_batch, opt_batch, max_prefill_len, opt_len)
        say(f"building the {graph} engine ({'plugin' if use_plugin else 'inlined ONNX functions'})")
        result = build_engine(trt, artifact / spec["file"], ranges, use_plugin, strongly_typed, precision_flag,
                              cache, verbose)
        n_plugin = sum(layer["type"] == PLUGIN_LAYER_TYPE for layer in result["layers"])
        n_custom = sum(op["count"] for op in manifest["custom_ops"] if op["graph"] == graph)
        if use_plugin and n_plugin != n_custom:
            raise RuntimeError(f"the {graph} network has {n_plugin} {PLUGIN_LAYER_TYPE} layers, expected one per "
                               f"custom node ({n_custom}): the parser did not use the selective-scan plugin")
        engine_path = artifact / ENGINE_FILES[graph]
        atomic_write(engine_path, bytes(result["plan"]))
        report["profiles"][graph] = {name: {"min": r[0], "opt": r[1], "max": r[2]} for name, r in ranges.items()}
        report["engines"][graph] = {
            "file": engine_path.name, "plan_bytes": len(result["plan"]),
            "parse_seconds": round(result["parse_seconds"], 3), "build_seconds": round(result["build_seconds"], 3),
            "plugin_layers": n_plugin, "num_layers": len(result["layers"]),
            "layer_types": _count_types(result["layers"]), "layers": result["layers"],
            "engine_layers": result["engine_layers"], "engine_layers_note": result["engine_layers_note"]}
    for graph, file in ENGINE_FILES.items():  # an engine of a graph not built now would not match the report
        if graph not in graphs:
            (artifact / file).unlink(missing_ok=True)
    if cache is not None and timing_cache_file is not None:
        atomic_write(timing_cache_file, bytes(cache.serialize()))
    report["plugins"] = [{"name": op, "version": contract.PLUGIN_VERSION, "namespace": contract.PLUGIN_NAMESPACE}
                         for op in contract.OPS] if use_plugin else []
    write_json(artifact / BUILD_REPORT, report)
    return report


def _count_types(layers: list[dict]) -> dict:
    counts: dict[str, int] = {}
    for layer in layers:
        counts[layer["type"]] = counts.get(layer["type"], 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))
