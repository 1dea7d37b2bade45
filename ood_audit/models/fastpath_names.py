"""The opt-in fast paths by name, with what each does: what ``train.fast_path``, the
CLI's flags and their help are checked against. Torch-free, so configs and ``--help``
load without torch; :mod:`.fastpath` applies them.
"""

#: Fast-path options by name, with what they do; the CLI derives its flags' help from this.
FAST_PATHS: dict[str, str] = {
    "channels_last": "activations in channels-last (NHWC) memory format on GPUs, which cuDNN "
                     "convolves faster (CPUs use it on the exact path already); changes log p(x) "
                     "by rounding only (~1e-6 relative)",
    "compile": "torch.compile the whole forward pass (one graph, no breaks); needs a C++ "
               "compiler on CPU, Triton on CUDA; the first batch pays minutes of compilation",
    "bf16": "coupling networks in bfloat16 (autocast); log-dets, priors, ActNorm and the "
            "1x1 convolution stay float32/float64; changes bits/dim by ~1e-3",
    "tf32": "TensorFloat-32 matmuls and convolutions, CUDA only (an error on CPU); the 1x1 "
            "convolution then runs in float64",
}
