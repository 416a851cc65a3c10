"""The service: brings devices and engines up, runs turns forever, talks to systemd.

READY=1 is sent only once devices are open and engines loaded. WATCHDOG=1 is
sent only while the loop really makes progress: the listener read a microphone
frame lately (its pulse), or a stage finished (see HealthWatchdog). SIGTERM stops taking new
captures, cuts playback short and lets the current capture finish writing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from heimdall_edge.app.sdnotify import HealthWatchdog, Notifier
from heimdall_edge.capture import Capture
from heimdall_edge.devices.base import (
    Button,
    ButtonEvent,
    Camera,
    Indicator,
    IndicatorState,
    Microphone,
    MicrophoneEnded,
    Speaker,
)
from heimdall_edge.devices.camera import frames_while
from heimdall_edge.listen.listener import build_listener
from heimdall_edge.listen.playback import ListeningSpeaker
from heimdall_edge.settings import Settings
from heimdall_edge.spool.durable import replace_file
from heimdall_edge.spool.keeper import SpoolKeeper
from heimdall_edge.spool.store import Spool
from heimdall_edge.sync.syncer import Syncer
from heimdall_edge.turn.backfill import Backfill
from heimdall_edge.turn.conversation import Conversation
from heimdall_edge.turn.interaction import FIXED_PHRASES, Interaction, TurnResult, answerable
from heimdall_edge.turn.preferred_voice import PreferredVoice
from heimdall_edge.turn.routing import Engines
from heimdall_edge.turn.speculation import Speculation
from heimdall_edge.turn.upgrade import Upgrade

log = logging.getLogger(__name__)

STOP_GRACE_S = 5.0
"""How long the background tasks get to end once cancelled, before the service goes without them."""

MIC_STALL_S = 1.0  # a read this slow means the device is away: report it, keep the loop alive
STATUS_FILE = "status.json"
TURN_HEALTHY_S = 120.0  # a turn still running after this is wedged: stop vouching for it


@dataclass
class Devices:
    microphone: Microphone
    button: Button | None
    indicator: Indicator
    camera: Camera
    speaker: Speaker

    async def aclose(self) -> None:
        if self.button is not None:
            self.button.close()
        self.indicator.close()
        await asyncio.gather(self.microphone.aclose(), self.camera.aclose(), self.speaker.aclose())


class Appliance:
    def __init__(
        self,
        settings: Settings,
        devices: Devices,
        engines: Engines,
        spool: Spool,
        *,
        syncer: Syncer | None = None,
        notifier: Notifier | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.devices = devices
        self.engines = engines
        self.spool = spool
        self.syncer = syncer
        self.keeper = syncer.keeper if syncer else SpoolKeeper(spool, settings.sync)
        """Retention and quota, one per process: the syncer's when there is one."""
        self.notifier = notifier or Notifier()
        self._clock = clock
        self.listener = build_listener(
            devices.microphone, devices.button, settings.listening, devices.speaker, clock=clock
        )
        self.watchdog = HealthWatchdog.from_env(
            self.notifier, clock=clock, pulse=lambda: self.listener.last_frame_at
        )
        self.conversation = Conversation(
            settings.cloud.history_turns, settings.cloud.history_minutes * 60, clock
        )
        self._follow_up = False
        assert settings.device_id is not None
        self.interaction = Interaction(
            device_id=settings.device_id,
            spool=spool,
            engines=engines,
            speaker=ListeningSpeaker(devices.speaker, self.listener),
            indicator=devices.indicator,
            make_room=self.keeper.make_room,
            on_kept=self._recorded,
            clock=clock,
        )
        self._playback_stop = asyncio.Event()
        self._in_turn = False
        """A capture is being recorded or answered: background work (the backfill) waits."""
        self.backfill = Backfill(
            spool, engines.transcribe, idle=self._idle, on_recorded=self._recorded
        )
        stt = engines.cloud_stt
        self.upgrade = (
            Upgrade(
                spool,
                engines.transcribe_in_cloud,
                local_engine=engines.stt.name,
                cloud_available=stt.policy.available,
                idle=self._idle,
                requests_per_minute=settings.resilience.requests_per_minute,
                on_recorded=syncer.notify if syncer else None,
            )
            if stt is not None and settings.stt.upgrade
            else None
        )
        self.preferred_voice = (
            PreferredVoice(
                engines,
                FIXED_PHRASES,
                idle=self._idle,
                requests_per_minute=settings.resilience.requests_per_minute,
            )
            if engines.cloud_tts is not None and engines.cache is not None
            else None
        )

    def _idle(self) -> bool:
        """No capture being recorded or answered: background transcription may run."""
        return not self._in_turn

    def _recorded(self) -> None:
        """A turn or a backfill recorded a capture: it is ready to sync, and maybe to upgrade."""
        if self.syncer is not None:
            self.syncer.notify()
        if self.upgrade is not None:
            self.upgrade.notify()

    async def start(self) -> None:
        """Load what must be warm before the first turn, then tell systemd we are ready."""
        if self.settings.engines.preload:
            self.notifier.status("loading speech models")
            started = time.monotonic()
            await self.engines.load()
            rendered = await self.engines.prerender(FIXED_PHRASES)
            log.info(
                "speech models loaded in %.1f s (%d fixed phrases rendered)",
                time.monotonic() - started,
                rendered,
            )
        # Opening picamera2 takes about a second on a Pi: not on the event loop.
        if not await asyncio.to_thread(lambda: self.devices.camera.available):
            log.warning("no camera: captures will hold audio only")
        self.devices.indicator.show(IndicatorState.IDLE)
        await asyncio.to_thread(self._write_status)
        self.notifier.ready(self._idle_status())

    async def serve(self, stop: asyncio.Event) -> None:
        """Turn after turn until `stop` is set; an error in one turn never ends the loop.

        A finite microphone (simulation from files) running out ends the service cleanly.
        """
        background = [
            asyncio.create_task(self.watchdog.run(), name="watchdog"),
            asyncio.create_task(self._watch_microphone(), name="microphone-stall"),
        ]
        # One probe per cloud speech service; the store's runs in the syncer.
        for service, connectivity in self.engines.connectivities.items():
            background.append(
                asyncio.create_task(connectivity.run(), name=f"connectivity-{service}")
            )
        if self.syncer is not None:  # store and forward, in the background of every turn
            background.append(asyncio.create_task(self.syncer.run(stop), name="sync"))
        background.append(asyncio.create_task(self.backfill.run(stop), name="backfill"))
        if self.upgrade is not None:
            background.append(asyncio.create_task(self.upgrade.run(stop), name="upgrade"))
        if self.preferred_voice is not None:
            background.append(
                asyncio.create_task(self.preferred_voice.run(stop), name="preferred-voice")
            )
        try:
            while not stop.is_set():
                turn = asyncio.create_task(self.one_turn(), name="turn")
                stopped = asyncio.create_task(stop.wait())
                await asyncio.wait({turn, stopped}, return_when=asyncio.FIRST_COMPLETED)
                stopped.cancel()
                if stop.is_set() and not turn.done():
                    await self._finish_for_stop(turn)
                    break
                if not turn.cancelled() and isinstance(turn.exception(), MicrophoneEnded):
                    log.info("microphone input ended: stopping")
                    break
                self._report(turn)
        finally:
            self.notifier.stopping("finishing the current capture")
            await _stop_all(background)

    async def _finish_for_stop(self, turn: asyncio.Task[TurnResult | None]) -> None:
        """On SIGTERM: end the capture now, cut playback, and let the spool finish writing."""
        self.listener.finish()
        self._playback_stop.set()
        try:
            await asyncio.wait_for(asyncio.shield(turn), timeout=self.settings.stop_grace_s)
        except TimeoutError:
            log.error(
                "current turn did not finish within %.0f s of SIGTERM", self.settings.stop_grace_s
            )
            turn.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await turn
        self._report(turn)

    def _report(self, turn: asyncio.Task[TurnResult | None]) -> None:
        if turn.cancelled():
            return
        if (exc := turn.exception()) is not None:
            log.error("turn failed; the loop carries on", exc_info=exc)
            self.devices.indicator.show(IndicatorState.ERROR)

    async def one_turn(self) -> TurnResult | None:
        """Wait for a trigger, capture, and run the interaction on it.

        After a reply that asked something, the trigger may be speech alone for
        `listening.follow_up_s` (the follow-up window); None when it closes unused.
        """
        try:
            return await self._one_turn()
        finally:
            self._in_turn = False

    async def _one_turn(self) -> TurnResult | None:
        camera_done = asyncio.Event()
        camera_task: asyncio.Task[list[bytes]] | None = None
        frames_so_far: list[bytes] = []
        history = self.conversation.history()
        speculation = Speculation(
            self.engines,
            lambda transcript: self.interaction.request_for(transcript, frames_so_far, history),
            answerable,
        )

        def capture_started() -> None:
            nonlocal camera_task
            self._in_turn = True
            self.devices.indicator.show(IndicatorState.LISTENING)
            self.notifier.status("capturing")
            camera_task = asyncio.create_task(
                frames_while(
                    self.devices.camera,
                    camera_done,
                    self.settings.camera.frames if self.settings.camera.enabled else 0,
                    self.settings.camera.interval_ms,
                    frames_so_far,
                )
            )

        follow_up_s = self.settings.listening.follow_up_s if self._follow_up else 0.0
        self._follow_up = False
        if follow_up_s:
            self.devices.indicator.show(IndicatorState.FOLLOW_UP)
            self.notifier.status("listening for a follow-up")
        try:
            utterance = await self.listener.next_utterance(
                on_start=capture_started, follow_up_s=follow_up_s, pauses=speculation
            )
        except BaseException:  # stopping, or the microphone ended: no stream left open
            await speculation.aclose()
            raise
        finally:
            camera_done.set()
        frames = await camera_task if camera_task is not None else []
        self.watchdog.beat()
        if utterance is None or not utterance.has_speech:
            await speculation.aclose()
            if utterance is None:
                log.info("follow-up window closed: nobody spoke")
            else:
                log.info("capture ended (%s) without speech: nothing kept", utterance.reason.value)
            self.devices.indicator.show(IndicatorState.IDLE)
            self.notifier.status(self._idle_status())
            return None
        self.notifier.status("answering")
        self._playback_stop.clear()
        helpers = [
            asyncio.create_task(self._watch_barge_in()),
            asyncio.create_task(self._vouch_for_turn()),
        ]
        try:
            result = await self.interaction.run(
                Capture(utterance, tuple(frames)), self._playback_stop, history, speculation
            )
        finally:
            for helper in helpers:
                helper.cancel()
            if self.devices.button is not None:
                self.devices.button.clear()
        self.watchdog.beat()
        self.conversation.add(result.transcript, result.reply)
        self._follow_up = self._asks_for_more(result)
        log.info(
            "capture %s: %r -> %r (%s)",
            result.capture_id,
            result.transcript,
            result.reply,
            ", ".join(f"{k} {v:.0f} ms" for k, v in result.timings_ms.items()),
        )
        self.notifier.status(self._idle_status())
        await asyncio.to_thread(self._write_status)
        return result

    def _asks_for_more(self, result: TurnResult) -> bool:
        """Open the follow-up window after this reply? (Never after a barge-in: a capture follows anyway.)"""
        listening = self.settings.listening
        if not listening.follow_up_s or not result.reply or self.listener.barged_in:
            return False
        return listening.follow_up_always or result.reply.rstrip().endswith("?")

    def _idle_status(self) -> str:
        """The STATUS= line while waiting: mode, wake word, and each cloud service as the
        device sees it ("offline" when it cannot be reached, else its breaker's state)."""
        wake = self.listener.wake_word
        text = f"listening ({self.listener.mode}"
        text += f", wake word {wake.model.phrase!r})" if wake is not None else ")"
        online = self.engines.online
        policies = {
            p.service: p.breaker.state.value if online.get(p.service, True) else "offline"
            for p in self.engines.policies
        }
        if policies:
            text += "; cloud: " + ", ".join(f"{k} {v}" for k, v in sorted(policies.items()))
        return text

    def _reachable(self) -> dict[str, bool]:
        """Each cloud service's reachability, by service: the speech services' and the store's."""
        reachable = self.engines.online
        store = self.syncer.connectivity if self.syncer is not None else None
        if store is not None:
            reachable[store.service] = store.online
        return reachable

    def _write_status(self) -> None:
        """status.json for `heimdall-edge doctor`: reachability, breakers, spool counts.

        `online`: every cloud speech service configured can be reached (true with none);
        `reachable`: each service, the store included, on its own.
        """
        status = {
            "updated_at": time.time(),
            "online": all(self.engines.online.values()),
            "reachable": self._reachable(),
            "breakers": {p.service: p.breaker.snapshot() for p in self.engines.policies},
            "cloud_calls": self.engines.call_stats(),
            "captures": self.spool.counts(),
            "sync": self.syncer.status() if self.syncer else None,
        }
        try:
            replace_file(
                self.settings.state_dir / STATUS_FILE, json.dumps(status, default=str).encode()
            )
        except OSError as exc:  # only `doctor` reads it: never worth a turn (a full disk, say)
            log.warning("could not write %s: %s", STATUS_FILE, exc)

    async def _vouch_for_turn(self) -> None:
        """Beat while a turn runs (inference can take seconds on a Pi), but only up to a bound.

        The event loop is demonstrably alive while this runs; a turn that outlives
        TURN_HEALTHY_S is stuck, so the pings stop and systemd restarts us.
        """
        deadline = time.monotonic() + TURN_HEALTHY_S
        while time.monotonic() < deadline:
            self.watchdog.beat()
            await asyncio.sleep(1.0)
        log.error("turn has run for over %.0f s: no longer healthy", TURN_HEALTHY_S)

    async def _watch_microphone(self) -> None:
        """Say when a read waits on the microphone (unplugged, reopening with backoff), and beat.

        A loop waiting on the device is alive, so it still beats, once a second; a
        wedged loop stops reading, and so stops both the pulse and these beats.
        """
        started = self._clock()
        stalled = False
        while True:
            await asyncio.sleep(MIC_STALL_S)
            last = self.listener.last_frame_at
            waiting = self.listener.reading and (
                self._clock() - (started if last is None else last) >= MIC_STALL_S
            )
            if waiting:
                self.watchdog.beat()
            if waiting != stalled:
                stalled = waiting
                self.notifier.status(
                    f"waiting for microphone {self.devices.microphone.name}"
                    if waiting
                    else "listening"
                )

    async def _watch_barge_in(self) -> None:
        """A press while the device is answering stops the playback."""
        button = self.devices.button
        if button is None:
            return
        button.clear()
        while await button.next_event() is not ButtonEvent.PRESSED:
            pass
        log.info("button pressed while speaking: playback stopped")
        self._playback_stop.set()


async def _stop_all(tasks: list[asyncio.Task[Any]]) -> None:
    """Cancel the background tasks and wait for them, but never for ever.

    A task that lets a cancellation slip (a library catching it, a race on Python 3.11) is
    cancelled again every half second; one still running after STOP_GRACE_S is named in
    the journal and left behind, so that the service can still stop and systemd restart it.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STOP_GRACE_S
    pending = set(tasks)
    while pending and loop.time() < deadline:
        for task in pending:
            task.cancel()
        done, pending = await asyncio.wait(pending, timeout=0.5)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                log.error("%s ended with an error", task.get_name(), exc_info=task.exception())
    if pending:
        log.error(
            "background tasks still running after %.0f s: %s; stopping without them",
            STOP_GRACE_S,
            ", ".join(sorted(t.get_name() for t in pending)),
        )
