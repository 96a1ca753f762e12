"""A stand-in for the `tensorrt` module (TensorRT cannot be installed on CPU machines).

It implements the part of the TensorRT 10 Python API that serving/tensorrt.py uses and behaves like
it where it matters for that code: parsing fails on a broken ONNX file, an engine holds its
optimization profiles and rejects input shapes outside the selected profile, unset inputs or
addresses fail execution, and tensors are read from and written to the raw addresses the caller
binds. Execution runs the ONNX graph with onnxruntime. Selected with JANUSFLOW_TENSORRT_MODULE.
"""

from __future__ import annotations

import base64
import ctypes
import json

import numpy as np
import onnx
import onnxruntime as ort

__version__ = "10.99.0-standin"
_C = {np.float32: ctypes.c_float, np.int64: ctypes.c_int64, np.bool_: ctypes.c_bool,
      np.int32: ctypes.c_int32}


class Logger:
    WARNING = 2

    def __init__(self, level=WARNING):
        self.level = level


class NetworkDefinitionCreationFlag:
    STRONGLY_TYPED = 1


class BuilderFlag:
    BF16 = 1
    FP16 = 2
    PREFER_PRECISION_CONSTRAINTS = 3


class LayerType:
    MATRIX_MULTIPLY, ELEMENTWISE, REDUCE, SOFTMAX, NORMALIZATION, OTHER = range(6)


_LAYER_TYPES = {"MatMul": LayerType.MATRIX_MULTIPLY, "Gemm": LayerType.MATRIX_MULTIPLY,
                "Add": LayerType.ELEMENTWISE, "Mul": LayerType.ELEMENTWISE, "Div": LayerType.ELEMENTWISE,
                "ReduceMean": LayerType.REDUCE, "ReduceSum": LayerType.REDUCE, "Softmax": LayerType.SOFTMAX,
                "LayerNormalization": LayerType.NORMALIZATION}


class _Layer:
    def __init__(self, node):
        self.name, self.type = node.name, _LAYER_TYPES.get(node.op_type, LayerType.OTHER)
        self.precision = None  # TensorRT's own choice until set


class _Network:
    def __init__(self, flags):
        self.flags, self.onnx, self.layers = flags, None, []

    @property
    def num_layers(self):
        return len(self.layers)

    def get_layer(self, i):
        return self.layers[i]


class OnnxParser:
    def __init__(self, network, logger):
        self.network, self.errors = network, []

    def parse_from_file(self, path):
        try:
            model = onnx.load(path)
            onnx.checker.check_model(model)
        except Exception as exc:  # what TensorRT reports as parser errors
            self.errors = [f"ModelImporter: {exc}"]
            return False
        self.network.onnx = model.SerializeToString()
        self.network.layers = [_Layer(node) for node in model.graph.node]
        return True

    @property
    def num_errors(self):
        return len(self.errors)

    def get_error(self, i):
        return self.errors[i]


class _Profile:
    def __init__(self):
        self.shapes = {}

    def set_shape(self, name, lo, opt, hi):
        if not all(a <= b <= c for a, b, c in zip(lo, opt, hi)):
            raise ValueError(f"profile for {name}: need min <= opt <= max, got {lo} {opt} {hi}")
        self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))


class _TimingCache:
    def __init__(self, data: bytes):
        self.data = data or b"timing-cache:"

    def serialize(self):
        return self.data + b"+"


class _Config:
    def __init__(self):
        self.profiles, self.flags, self.cache = [], set(), None

    def set_flag(self, flag):
        self.flags.add(flag)

    def create_timing_cache(self, data):
        return _TimingCache(bytes(data))

    def set_timing_cache(self, cache, ignore_mismatch):
        self.cache = cache
        return True

    def get_timing_cache(self):
        return self.cache

    def add_optimization_profile(self, profile):
        self.profiles.append(profile.shapes)
        return len(self.profiles) - 1


class Builder:
    builds = 0  # how many engines were built (tests check the cache avoids rebuilds)

    def __init__(self, logger):
        self.logger = logger

    def create_network(self, flags):
        return _Network(flags)

    def create_builder_config(self):
        return _Config()

    def create_optimization_profile(self):
        return _Profile()

    def build_serialized_network(self, network, config):
        if network.onnx is None or not config.profiles:
            return None
        Builder.builds += 1
        return json.dumps({"onnx": base64.b64encode(network.onnx).decode(),
                           "profiles": [{k: list(map(list, v)) for k, v in p.items()}
                                        for p in config.profiles],
                           "strongly_typed": bool(network.flags >> NetworkDefinitionCreationFlag.STRONGLY_TYPED & 1),
                           "flags": sorted(config.flags),
                           "fp32_layers": sum(layer.precision is float32 for layer in network.layers)}).encode()


class DataType:
    FLOAT, INT64, BOOL, INT32 = np.float32, np.int64, np.bool_, np.int32


float32 = DataType.FLOAT


def nptype(dtype):
    return dtype


class _Engine:
    def __init__(self, blob: dict):
        self.model_bytes = base64.b64decode(blob["onnx"])
        self.profiles = blob["profiles"]
        self.session = ort.InferenceSession(self.model_bytes, providers=["CPUExecutionProvider"])
        self.types = {}
        for v in list(self.session.get_inputs()) + list(self.session.get_outputs()):
            self.types[v.name] = {"tensor(float)": np.float32, "tensor(int64)": np.int64,
                                  "tensor(bool)": np.bool_, "tensor(int32)": np.int32}[v.type]

    def get_tensor_dtype(self, name):
        return self.types[name]

    def create_execution_context(self):
        return _Context(self)


class _Context:
    def __init__(self, engine):
        self.engine, self.profile = engine, None
        self.shapes, self.addresses, self.outputs = {}, {}, None

    def set_optimization_profile_async(self, index, stream):
        if not 0 <= index < len(self.engine.profiles):
            raise ValueError(f"no optimization profile {index}")
        self.profile, self.outputs = index, None
        return True

    def set_input_shape(self, name, shape):
        lo, _, hi = self.engine.profiles[self.profile][name]
        if len(shape) != len(lo) or not all(a <= s <= b for a, s, b in zip(lo, shape, hi)):
            raise ValueError(f"{name} shape {tuple(shape)} is outside profile {self.profile} "
                             f"[{lo} .. {hi}]")
        self.shapes[name], self.outputs = tuple(shape), None
        return True

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return True

    def _read(self, name):
        shape, dtype = self.shapes[name], self.engine.types[name]
        n = int(np.prod(shape))
        buf = (_C[dtype] * n).from_address(self.addresses[name]) if n else None
        return np.frombuffer(buf, dtype=dtype).reshape(shape).copy() if n else np.zeros(shape, dtype)

    def _run(self):
        if self.outputs is None:
            names = [i.name for i in self.engine.session.get_inputs()]
            missing = [n for n in names if n not in self.shapes or n not in self.addresses]
            if missing:
                raise RuntimeError(f"inputs not bound: {missing}")
            feeds = {n: self._read(n) for n in names}
            outs = self.engine.session.run(None, feeds)
            self.outputs = dict(zip([o.name for o in self.engine.session.get_outputs()], outs))
        return self.outputs

    def get_tensor_shape(self, name):
        return self._run()[name].shape

    def execute_async_v3(self, stream):
        for name, value in self._run().items():
            if name not in self.addresses:
                return False
            ctypes.memmove(self.addresses[name], np.ascontiguousarray(value).ctypes.data, value.nbytes)
        return True


class Runtime:
    def __init__(self, logger):
        self.logger = logger

    def deserialize_cuda_engine(self, data):
        try:
            return _Engine(json.loads(bytes(data)))
        except (ValueError, KeyError):
            return None
