"""One turn: keep, transcribe, reply, speak, record; routing, the voice cache, transcripts finished later."""
