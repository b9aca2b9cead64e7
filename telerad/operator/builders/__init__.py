"""Pure functions from specs to desired objects: no I/O, no clock, no randomness."""
