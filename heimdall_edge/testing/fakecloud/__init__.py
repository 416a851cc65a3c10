"""A fake of the cloud services the appliance talks to, over real HTTP on 127.0.0.1.

One stdlib ``ThreadingHTTPServer`` (HTTP/1.1, keep-alive, chunked streams) in a
background thread speaks the wire protocols the official clients expect:

* OpenAI ``POST /v1/audio/transcriptions`` (multipart/form-data) and
  ``POST /v1/chat/completions`` (plain, or server-sent events with ``stream: true``),
  authenticated with ``Authorization: Bearer <key>``;
* ElevenLabs ``POST /v1/text-to-speech/{voice_id}`` and ``.../stream``, answering
  raw s16le mono PCM (``output_format=pcm_<rate>``) or silent MP3 frames,
  authenticated with ``xi-api-key: <key>``.

Every request is recorded (fields, uploaded bytes, JSON body, arrival time), and
faults can be injected per route: latency, an HTTP error status (with the real
services' error bodies and ``Retry-After``), a hang, a truncated body, a
malformed body, and refused connections on the same port.

Used by tests and benchmarks (``with FakeCloud() as cloud: ...``, see cloud.py) and
standalone (__main__.py) for trying the cloud path without keys::

    python -m heimdall_edge.testing.fakecloud --port 8787 --latency-ms 150

API keys are never logged. Recorded headers keep the auth headers' presence but
not their values (``Recorded.auth_ok`` says whether the key was right).
"""
