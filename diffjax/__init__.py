"""diffjax."""
