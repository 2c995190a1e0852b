"""The original one-job-per-electron plugin, covalent-gcpbatch-plugin 0.15.0, as a benchmark row.

The plugin runs unmodified, from PyPI, in a venv of its own (:mod:`.venv`: its pinned
google-cloud-batch 0.9.0 and google-cloud-storage 2.7.0, Covalent 0.240.0), against the same
LocalCloud as ours. What differs from a real project, and nothing else:

- ``GCPBatchExecutor._get_batch_client`` returns the plugin's own async gRPC client on an
  insecure channel to the emulator's gRPC front end, instead of one for Google's endpoint with
  default credentials (:mod:`.shim`, installed by a ``.pth`` file of that venv and active only
  where ``CGA_SEED_BATCH_ENDPOINT`` is set);
- ``STORAGE_EMULATOR_HOST`` points its ``storage.Client()`` calls, and its tasks', at
  fake-gcs-server (what the storage library itself supports);
- LocalCloud's ``image_map`` runs the plugin's image as its Dockerfile does, ``python exec.py``
  with the plugin's own ``exec.py``, by that venv's Python (:mod:`.run`).

Modules: :mod:`.venv` makes the venv, :mod:`.shim` is the patch, :mod:`.run` starts the plugin's
side of a run, :mod:`.burst` is that side (run by the plugin's venv).
"""
