"""dsv4shard: properties that sharded, fused and unfused DeepSeek-V4 MoE
blocks on MLX agree with a NumPy reference and with each other."""

from dsv4shard import kernel_cache as _kernel_cache

# Before any kernel is compiled in this process (see kernel_cache).
_kernel_cache.keep_private()
