"""Native CPU kernels: C++ extensions compiled on first use into the cache (see each module, e.g. `ggml`)."""
