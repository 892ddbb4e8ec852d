"""The exercises, one module per chapter, each listing its exercises in `EXERCISES`."""
