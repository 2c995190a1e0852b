"""Cloud Storage for the local cloud: fake-gcs-server and the proxy in front of it."""
