"""The push button and the status LED on the Pi's GPIO header, through gpiozero.

gpiozero calls back from its own threads; the button hands those edges to
asyncio as ButtonEvents. Tests and simulation pass gpiozero's MockFactory as
`pin_factory`, so no GPIO chip is needed.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from typing import Any

from heimdall_edge.devices.base import ButtonEvent, DeviceError, IndicatorState
from heimdall_edge.settings import ButtonSettings, LedSettings

log = logging.getLogger(__name__)

HEADER_PIN = {
    0: 27, 1: 28, 2: 3, 3: 5, 4: 7, 5: 29, 6: 31, 7: 26, 8: 24, 9: 21,
    10: 19, 11: 23, 12: 32, 13: 33, 14: 8, 15: 10, 16: 36, 17: 11, 18: 12, 19: 35,
    20: 38, 21: 40, 22: 15, 23: 16, 24: 18, 25: 22, 26: 37, 27: 13,
}  # fmt: skip
"""BCM GPIO number -> physical pin on the 40-pin header, for messages people can act on."""

EVENTS_KEPT = 64


def pin_error(what: str, pin: int, exc: BaseException) -> DeviceError:
    """A DeviceError that names the pin both ways and what to check."""
    return DeviceError(
        f"{what} on GPIO{pin} (header pin {HEADER_PIN.get(pin, '?')}) cannot be opened "
        f"({type(exc).__name__}: {exc}). Check that no other program or HAT driver uses "
        f"GPIO{pin} (`pinctrl get {pin}`), that this user may use the GPIO chip (group 'gpio', "
        "/dev/gpiochip*), and that gpiozero has a pin driver (python3-lgpio on Raspberry Pi OS, "
        "with the venv made --system-site-packages); use `run --simulate` off the Pi"
    )


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class GpioButton:
    """A push button from a GPIO pin to ground, using the Pi's internal pull-up.

    Presses, releases and long holds are queued (oldest dropped past
    EVENTS_KEPT) until read; debouncing is done by gpiozero's pin driver
    (`bounce_ms`).
    """

    def __init__(
        self,
        settings: ButtonSettings | None = None,
        *,
        pin_factory: Any = None,
        hold_s: float | None = None,
    ) -> None:
        from gpiozero import Button

        self.settings = settings = settings or ButtonSettings()
        self.hold_s = hold_s if hold_s is not None else settings.long_press_s
        self._events: collections.deque[ButtonEvent] = collections.deque(maxlen=EVENTS_KEPT)
        self._lock = threading.Lock()
        self._loop = _running_loop()
        self._wakeup: asyncio.Event | None = asyncio.Event() if self._loop else None
        try:
            self._button = Button(
                settings.pin,
                pull_up=True,
                bounce_time=settings.bounce_ms / 1000 if settings.bounce_ms else None,
                hold_time=self.hold_s,
                pin_factory=pin_factory,
            )
        except Exception as exc:  # gpiozero, lgpio and the kernel each raise their own kinds
            raise pin_error("button", settings.pin, exc) from exc
        self._button.when_pressed = lambda: self._post(ButtonEvent.PRESSED)
        self._button.when_released = lambda: self._post(ButtonEvent.RELEASED)
        self._button.when_held = lambda: self._post(ButtonEvent.HELD)

    @property
    def pin(self) -> Any:
        """The gpiozero pin (a MockPin under simulation: `pin.drive_low()` presses)."""
        return self._button.pin

    @property
    def is_pressed(self) -> bool:
        return bool(self._button.is_pressed)

    def _post(self, event: ButtonEvent) -> None:
        """Runs in gpiozero's callback thread (or the caller's, with MockFactory)."""
        with self._lock:
            self._events.append(event)
            loop, wakeup = self._loop, self._wakeup
        if loop is not None and wakeup is not None:
            try:
                loop.call_soon_threadsafe(wakeup.set)
            except RuntimeError:  # that loop is closed; the next reader rebinds
                pass

    def _bind(self) -> asyncio.Event:
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._loop is not loop or self._wakeup is None:
                self._loop, self._wakeup = loop, asyncio.Event()
            return self._wakeup

    async def next_event(self) -> ButtonEvent:
        wakeup = self._bind()
        while True:
            wakeup.clear()
            if (event := self.pending()) is not None:
                return event
            await wakeup.wait()

    def pending(self) -> ButtonEvent | None:
        with self._lock:
            return self._events.popleft() if self._events else None

    def clear(self) -> None:
        with self._lock:
            self._events.clear()

    def close(self) -> None:
        self._button.close()


BLINK = {
    IndicatorState.THINKING: (0.1, 0.1),  # fast
    IndicatorState.FOLLOW_UP: (0.8, 0.2),  # lit, with short dips: "go on, I'm listening"
    IndicatorState.ERROR: (0.5, 1.5),  # slow
}
LIT = {IndicatorState.LISTENING, IndicatorState.SPEAKING}


class GpioIndicator:
    """The status LED: off when idle, lit while listening or speaking, blinking fast while
    thinking, lit with short dips while waiting for a follow-up, slowly after an error.

    With the LED disabled (led.enabled = false) it does nothing, so callers never check.
    """

    def __init__(self, settings: LedSettings | None = None, *, pin_factory: Any = None) -> None:
        self.settings = settings = settings or LedSettings()
        self.state = IndicatorState.IDLE
        self._led: Any = None
        if not settings.enabled:
            return
        from gpiozero import LED

        try:
            self._led = LED(settings.pin, pin_factory=pin_factory)
        except Exception as exc:
            raise pin_error("status LED", settings.pin, exc) from exc

    @property
    def pin(self) -> Any:
        return None if self._led is None else self._led.pin

    @property
    def is_lit(self) -> bool:
        return self._led is not None and bool(self._led.is_lit)

    def show(self, state: IndicatorState) -> None:
        if state is self.state:
            return  # do not restart a blink in the middle
        self.state = state
        if self._led is None:
            return
        if state in BLINK:
            on_time, off_time = BLINK[state]
            self._led.blink(on_time=on_time, off_time=off_time, background=True)
        elif state in LIT:
            self._led.on()
        else:
            self._led.off()

    def close(self) -> None:
        if self._led is not None:
            self._led.close()
            self._led = None
