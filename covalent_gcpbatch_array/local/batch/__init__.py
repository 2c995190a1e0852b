"""The Google Batch API emulator."""
