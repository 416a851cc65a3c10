"""On-device engines: faster-whisper, Piper and the offline reply, with their model files."""
