"""The attention core: computes on validated input and raises no user-facing error."""
