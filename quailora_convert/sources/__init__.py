"""Where the model comes from: MODEL resolved to a local folder of safetensors weights, and read lazily.

resolve (open_model: a folder, a Hub repo pinned to its commit, a .gguf file, pickle weights on
request; a context manager that owns its temporary folders), hub (model downloads), gguf and
pickled (the two formats converted into a temporary safetensors folder), checkpoint (tensors read
one at a time, names mapped between the checkpoint and the model).
"""
