"""The layer's pieces: its configuration and parameters, and what it applies per head."""
