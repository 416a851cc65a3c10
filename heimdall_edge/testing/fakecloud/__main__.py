"""`python -m heimdall_edge.testing.fakecloud`: try the cloud path without keys."""

from __future__ import annotations

import argparse
import logging
import threading

from heimdall_edge.testing.fakecloud.cloud import FakeCloud
from heimdall_edge.testing.fakecloud.wire import ROUTES, Fault


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m heimdall_edge.testing.fakecloud",
        description="Serve fake OpenAI (Whisper, chat) and ElevenLabs (TTS) APIs on 127.0.0.1.",
    )
    parser.add_argument(
        "--port", type=int, default=8787, help="port to listen on (0: any free port)"
    )
    parser.add_argument(
        "--latency-ms", type=float, default=0.0, help="delay before every answer, in ms"
    )
    parser.add_argument(
        "--transcript", default="what time is it", help="what every transcription returns"
    )
    parser.add_argument(
        "--reply",
        default="It is a fine day. Is there anything else?",
        help="what every chat answer says",
    )
    parser.add_argument(
        "--chars-per-second", type=float, default=15.0, help="speaking rate of the fake voice"
    )
    parser.add_argument("--openai-key", default="sk-test", help="the key the fake OpenAI accepts")
    parser.add_argument(
        "--elevenlabs-key", default="el-test", help="the key the fake ElevenLabs accepts"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    if args.latency_ms < 0:
        parser.error(f"--latency-ms must be >= 0, got {args.latency_ms}")
    if args.chars_per_second <= 0:
        parser.error(f"--chars-per-second must be > 0, got {args.chars_per_second}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")

    cloud = FakeCloud(
        openai_key=args.openai_key,
        elevenlabs_key=args.elevenlabs_key,
        transcript=args.transcript,
        reply=args.reply,
        chars_per_second=args.chars_per_second,
        port=args.port,
    )
    try:
        cloud.start()
    except OSError as exc:
        parser.exit(1, f"cannot listen on 127.0.0.1:{args.port}: {exc.strerror or exc}\n")
    if args.latency_ms:
        for route in ROUTES:
            cloud.fault(route, Fault(latency_s=args.latency_ms / 1000))
    # These are the fake's own keys (not secrets): the lines are for the user to paste.
    print("# fake cloud is running; in another shell:", flush=True)
    for name, value in cloud.env().items():
        print(f"export {name}={value}", flush=True)
    print("# Ctrl-C to stop", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        cloud.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
