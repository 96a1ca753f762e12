"""Export, backends, the batched sampler and the inference service. Importing the package is free of
torch and friends, so the CLI can name the backends without loading them."""

BACKENDS = ("torch", "torch-compile", "onnxruntime", "tensorrt")
