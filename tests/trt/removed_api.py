"""What TensorRT 11 removed from the Python API, as data: the fakes refuse these names the way the real 11.x
module does (AttributeError), and tests/test_trt11_removed_api.py scans the toolkit's modules for them.

Sources: "Removed Python APIs and Replacements"
(https://docs.nvidia.com/deeplearning/tensorrt/latest/api/migration/tensorrt-10x-to-11x-python-api-reference.html)
and a diff of every name the Python bindings define (`python/src/**/*.cpp` of NVIDIA/TensorRT at tags v10.16 and
v11.1): what 10.16 binds and 11.1 does not. Only what a builder or an executor could call is listed (the plugin
registry's removed lookups and IStreamReader too, for completeness); BuilderFlag.DIRECT_IO is absent on purpose:
the 11.x bindings still have it (deprecated), whatever the 11.0-11.4 pages say (the 11.5 page corrects them).
"""

from __future__ import annotations

#: Attribute names (methods, properties, classes, enum members) TensorRT 11 no longer has anywhere, with the
#: replacement the migration guide names. Unique enough to be flagged wherever they are used as attributes.
REMOVED_NAMES: dict[str, str] = {
    # weak typing (BuilderFlag members whose names are not plain words; FP16/INT8/... are below)
    "OBEY_PRECISION_CONSTRAINTS": "strong typing (always enforced)",
    "PREFER_PRECISION_CONSTRAINTS": "strong typing (always enforced)",
    "REJECT_EMPTY_ALGORITHMS": "editable timing cache",
    "WEIGHTLESS": "BuilderFlag.STRIP_PLAN",
    "EXPLICIT_BATCH": "nothing: networks are explicit batch (create_network(0))",
    # per-layer / per-tensor precision
    "set_output_type": "a Cast in the ONNX graph",
    "output_type_is_set": "a Cast in the ONNX graph",
    "reset_output_type": "a Cast in the ONNX graph",
    "precision_is_set": "a Cast in the ONNX graph",
    "reset_precision": "a Cast in the ONNX graph",
    "compute_precision": "casting the normalization's inputs in the graph",
    "set_dynamic_range": "explicit quantization (Q/DQ nodes)",
    "get_dynamic_range": "explicit quantization (Q/DQ nodes)",
    "reset_dynamic_range": "explicit quantization (Q/DQ nodes)",
    "get_tensors_with_dynamic_range": "explicit quantization (Q/DQ nodes)",
    # implicit INT8 calibration
    "IInt8Calibrator": "explicit quantization (Q/DQ nodes)",
    "IInt8EntropyCalibrator": "explicit quantization (Q/DQ nodes)",
    "IInt8EntropyCalibrator2": "explicit quantization (Q/DQ nodes)",
    "IInt8MinMaxCalibrator": "explicit quantization (Q/DQ nodes)",
    "IInt8LegacyCalibrator": "explicit quantization (Q/DQ nodes)",
    "CalibrationAlgoType": "explicit quantization (Q/DQ nodes)",
    "int8_calibrator": "explicit quantization (Q/DQ nodes)",
    "set_calibration_profile": "explicit quantization (Q/DQ nodes)",
    "get_calibration_profile": "explicit quantization (Q/DQ nodes)",
    "QuantizationFlag": "explicit quantization (Q/DQ nodes)",
    "set_quantization_flag": "explicit quantization (Q/DQ nodes)",
    "get_quantization_flag": "explicit quantization (Q/DQ nodes)",
    "clear_quantization_flag": "explicit quantization (Q/DQ nodes)",
    "quantization_flags": "explicit quantization (Q/DQ nodes)",
    # algorithm selection
    "IAlgorithmSelector": "the editable timing cache",
    "algorithm_selector": "the editable timing cache",
    # builder queries
    "platform_has_fast_fp16": "strongly typed networks (query CUDA for type support)",
    "platform_has_fast_int8": "explicit quantization (query CUDA for type support)",
    "platform_has_tf32": "query CUDA for type support",
    # engine / context memory
    "device_memory_size": "ICudaEngine.device_memory_size_v2",
    "get_device_memory_size_for_profile": "ICudaEngine.get_device_memory_size_for_profile_v2",
    "create_execution_context_without_device_memory":
        "create_execution_context(ExecutionContextAllocationStrategy.USER_MANAGED)",
    "weight_streaming_budget": "ICudaEngine.weight_streaming_budget_v2",
    "minimum_weight_streaming_budget": "ICudaEngine.weight_streaming_budget_v2",
    "has_implicit_batch_dimension": "nothing (always explicit batch)",
    "all_shape_inputs_specified": "IExecutionContext.infer_shapes",
    # parser, plugin registry, streams, preview features, tactic sources
    "supports_model": "OnnxParser.supports_model_v2",
    "parse_with_weight_descriptors": "OnnxParser.parse / load_initializer",
    "get_plugin_creator": "IPluginRegistry.get_creator",
    "plugin_creator_list": "IPluginRegistry.all_creators",
    "IStreamReader": "IStreamReaderV2",
    "PROFILE_SHARING_0806": "nothing (always on)",
}

#: BuilderFlag (and TacticSource) members removed in 11 whose names are plain words ("FP16" is also a dtype
#: name): flagged only as members of BuilderFlag / TacticSource.
REMOVED_BUILDER_FLAGS: dict[str, str] = {
    "FP16": "strong typing: fp16 tensors and Casts in the ONNX graph (ModelOpt AutoCast)",
    "BF16": "strong typing: bf16 tensors and Casts in the ONNX graph (ModelOpt AutoCast)",
    "INT8": "explicit quantization (Q/DQ nodes)",
    "FP8": "explicit quantization (Q/DQ nodes)",
    "INT4": "explicit quantization (Q/DQ nodes)",
    "FP4": "explicit quantization (Q/DQ nodes)",
}
#: TacticSource members removed in 11 (the enum stays, with its other members).
REMOVED_TACTIC_SOURCES = frozenset({"CUBLAS", "CUBLAS_LT", "CUDNN"})

#: Properties that became read-only (or vanished) on layers and tensors: `layer.precision = trt.float32`
#: and `tensor.dtype = trt.float16` are weak typing. Flagged only when assigned a TensorRT value.
REMOVED_SETTERS: dict[str, str] = {
    "precision": "ILayer.precision is removed: a Cast in the ONNX graph",
    "dtype": "ITensor.dtype is read-only: a Cast in the ONNX graph",
}

#: The toolkit's own implicit-INT8 seam, removed with TensorRT's calibrators: engines/calibration_hook.py
#: (CalibratorFactory, require_calibrator, INT8_NEEDS_CALIBRATION), the `calibrator=` argument of
#: engines.build_all / BuildSettings, and calibration/int8.py's factory of TensorRT calibrators.
REMOVED_SEAM: dict[str, str] = {
    "calibration_hook": "engines/calibration_hook.py is gone: INT8 is an int8-qdq graph",
    "CalibratorFactory": "engines/calibration_hook.py is gone: INT8 is an int8-qdq graph",
    "require_calibrator": "engines/calibration_hook.py is gone: INT8 is an int8-qdq graph",
    "INT8_NEEDS_CALIBRATION": "engines/calibration_hook.py is gone: INT8 is an int8-qdq graph",
    "calibrator_factory": "the builder takes no calibrator: INT8 is an int8-qdq graph",
}
SEAM_KEYWORDS = frozenset({"calibrator"})


def removed_message(owner: str, name: str) -> str:
    """The AttributeError text of a fake for a name TensorRT 11 removed."""
    why = REMOVED_NAMES.get(name) or REMOVED_BUILDER_FLAGS.get(name) or REMOVED_SETTERS.get(name, "")
    return f"'{owner}' object has no attribute '{name}' (removed in TensorRT 11; replacement: {why or 'none'})"
