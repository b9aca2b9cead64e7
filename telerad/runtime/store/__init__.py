"""Instance files on the tiers, and the catalog with its job queue."""
