"""One turn: keep, transcribe, reply, speak, record; routing, voice cache, later transcripts."""
