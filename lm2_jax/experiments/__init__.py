"""Research instruments: the memory capacity probe (recall)."""
