"""The ``gcpbatch-array`` command and its tools."""
