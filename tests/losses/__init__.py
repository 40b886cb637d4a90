"""Loss tests. A package so ``reference`` here does not clash with tests/evaluation/reference.py."""
