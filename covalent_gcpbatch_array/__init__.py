"""Covalent executor that coalesces electrons into Google Cloud Batch array jobs."""
