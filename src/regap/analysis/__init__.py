"""Analysis across runs: gap-safety correlation, the report."""
