"""Replay memories: a fixed number of slots holding samples (x, y, t and optional extra columns).

Every strategy that stores samples uses the memory the trainer hands it as ``ctx.replay``; it
never keeps its own copy. ``memory.TensorMemory`` keeps slots in process memory; the Arrow shard
store keeps the same slots in durable, memory-mapped Arrow IPC shards behind the same interface.
"""

from clgrid.replay.memory import ReplayMemory, TensorMemory

__all__ = ["ReplayMemory", "TensorMemory"]
