"""The pure core: changes and their validation, batch planning, outcome classification,
masking. No I/O; everything above depends on it, it depends on nothing of ours."""
