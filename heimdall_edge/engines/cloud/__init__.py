"""Cloud engines: OpenAI Whisper, OpenAI chat replies and ElevenLabs speech."""
