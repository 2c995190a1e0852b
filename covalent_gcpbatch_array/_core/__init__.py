"""The executor's internals: coalescing, jobs, storage, envelopes and the task contract."""
