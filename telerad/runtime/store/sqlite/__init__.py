"""The embedded backend: one SQLite file per site on the gateway's hot volume."""
