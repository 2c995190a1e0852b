"""Cloud Logging's ``entries:list``, as the Batch emulator serves it."""
