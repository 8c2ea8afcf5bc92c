"""Validation in the target engines (``quantkit.validate``)."""
