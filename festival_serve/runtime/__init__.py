"""Runtime wing: where a network runs — backends, TensorRT engines, devices, GPU shares, preflight, caches, offline guards.

The lowest floor: imports nothing else of festival_serve."""
