"""One rank's run: ``finetune`` (model, data, engine, loop, final/), the training loop (``trainer``),
the divergence guard, metrics, the end-of-run report, ``dstk verify``'s parity check, and the CPU
plumbing that makes DeepSpeed fast on host memory (``host_memory``, ``shm_collectives``, ``comms``)."""
