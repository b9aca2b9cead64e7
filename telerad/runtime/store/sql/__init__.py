"""The catalog in SQL, once for every backend: the statements, written for both SQLite and
PostgreSQL, over a `Database` port that each backend adapts (its connection, its locking,
its migrations) and a `Dialect` that holds the few phrases the two spell differently."""
