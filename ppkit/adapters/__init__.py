"""Architecture adapters."""
