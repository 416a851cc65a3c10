"""The durable capture store: files, records and revisions, recovery, quota, retention, leases."""
