"""The ears: from microphone frames to one utterance.

mic frame (30 ms) -> frontend (noise suppression, auto gain) -> earcon canceller
    idle:       wake word | speech onset | button          -> a trigger
    capturing:  endpointer (Silero woken by webrtcvad)      -> an Utterance
    speaking:   wake word only, never its own voice         -> barge-in
"""
