"""The service: composition (settings -> parts), lifecycle, doctor, systemd."""
