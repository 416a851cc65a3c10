"""Speech and reply engines: the Protocols in base, then local/ and cloud/ implementations."""
