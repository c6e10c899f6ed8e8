"""Reports over finished runs: saelab-report's tables and plots."""
