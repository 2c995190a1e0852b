"""The local cloud: a Google Batch API emulator and fake-gcs-server, for offline runs.

``LocalCloud`` starts both and points Google's real clients at them; importing this package is
cheap (no covalent, no Google client libraries).
"""

from covalent_gcpbatch_array.exceptions import LocalCloudError
from covalent_gcpbatch_array.local.cloud import LocalCloud

__all__ = ["LocalCloud", "LocalCloudError"]
