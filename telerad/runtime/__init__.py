"""The runtime the operator deploys: site gateways (and, later, inference workers)."""
