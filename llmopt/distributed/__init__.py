"""One model across ranks: process groups, sharding of weights and the KV cache, the
layers that communicate, and the loop a worker rank runs. The scheduler stays single,
on the driver (rank 0)."""
