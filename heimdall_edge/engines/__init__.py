"""Speech and reply engines: one module per provider, all behind the Protocols in base."""
