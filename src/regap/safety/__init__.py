"""Safety evaluation: image attack conditions, response judges, statistics and judge validation."""
