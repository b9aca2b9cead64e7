"""The shared backend: one PostgreSQL database for the gateways of a site and for the
sites of a tenant, each site's rows kept apart by row-level security."""
