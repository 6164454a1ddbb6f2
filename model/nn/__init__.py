"""The network, pure JAX with no I/O: transformer layers, paged attention, sampling."""
