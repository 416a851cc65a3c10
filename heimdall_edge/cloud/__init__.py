"""Calling the cloud: error kinds, classification, breaker, call policy, connectivity."""
