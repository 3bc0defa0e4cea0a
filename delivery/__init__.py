"""Delivery: the coalescer (buffer -> batches), the poster (batch -> Braze under the shared
budget) and the Braze HTTP client. Depends on `core`, `stores` and `config`."""
