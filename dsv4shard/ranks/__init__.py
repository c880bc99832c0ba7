"""Real mx.distributed ranks in separate processes, kept alive for many
examples: a pool on localhost (ring, nccl) or across hosts (a hostfile)."""
