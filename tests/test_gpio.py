"""The button and the status LED on gpiozero's MockFactory: no GPIO chip needed.

A press is `pin.drive_low()` (the button shorts the pulled-up pin to ground),
a release `pin.drive_high()`.

Debouncing itself is not tested here: gpiozero's MockPin stores `bounce` but
does not apply it (its `_set_bounce` says "XXX Need to implement this"); on
the Pi the lgpio pin driver filters bounces (`gpio_set_debounce_micros`). We
check that bounce_ms reaches the pin, and that repeated edges to the same
level do not turn into extra events.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest
from gpiozero.pins.mock import MockFactory

from heimdall_edge.devices.base import ButtonEvent, DeviceError, IndicatorState
from heimdall_edge.devices.gpio import GpioButton, GpioIndicator
from heimdall_edge.settings import ButtonSettings, LedSettings

TIMEOUT = 5


@pytest.fixture
def factory() -> Iterator[MockFactory]:
    factory = MockFactory()
    yield factory
    factory.reset()


async def next_events(button: GpioButton, n: int) -> list[ButtonEvent]:
    return [await asyncio.wait_for(button.next_event(), timeout=TIMEOUT) for _ in range(n)]


async def test_presses_and_releases_arrive_in_order(factory):
    button = GpioButton(ButtonSettings(pin=17), pin_factory=factory)
    pin = factory.pin(17)
    assert button.pin is pin and not button.is_pressed

    pin.drive_low()
    assert button.is_pressed
    pin.drive_high()
    pin.drive_low()
    pin.drive_high()

    assert await next_events(button, 4) == [
        ButtonEvent.PRESSED,
        ButtonEvent.RELEASED,
        ButtonEvent.PRESSED,
        ButtonEvent.RELEASED,
    ]
    assert button.pending() is None
    button.close()


async def test_events_from_gpiozero_threads_wake_the_event_loop(factory):
    button = GpioButton(ButtonSettings(), pin_factory=factory)
    pin = factory.pin(17)

    def press_later() -> None:
        time.sleep(0.05)
        pin.drive_low()  # gpiozero calls back on this thread, as lgpio's would

    waiter = asyncio.ensure_future(button.next_event())
    threading.Thread(target=press_later).start()
    assert await asyncio.wait_for(waiter, timeout=TIMEOUT) is ButtonEvent.PRESSED
    button.close()


async def test_long_hold_gives_held_between_press_and_release(factory):
    button = GpioButton(ButtonSettings(), pin_factory=factory, hold_s=0.2)
    pin = factory.pin(17)

    pin.drive_low()
    started = time.monotonic()
    assert await next_events(button, 2) == [ButtonEvent.PRESSED, ButtonEvent.HELD]
    assert 0.15 <= time.monotonic() - started < 1.0
    pin.drive_high()
    assert await next_events(button, 1) == [ButtonEvent.RELEASED]
    button.close()


async def test_short_press_is_not_a_hold(factory):
    button = GpioButton(ButtonSettings(), pin_factory=factory, hold_s=0.2)
    pin = factory.pin(17)
    pin.drive_low()
    await asyncio.sleep(0.05)
    pin.drive_high()
    await asyncio.sleep(0.35)  # well past the hold time
    assert [button.pending(), button.pending(), button.pending()] == [
        ButtonEvent.PRESSED,
        ButtonEvent.RELEASED,
        None,
    ]
    button.close()


def test_settings_reach_gpiozero(factory):
    button = GpioButton(ButtonSettings(pin=22, bounce_ms=30, long_press_s=3.0), pin_factory=factory)
    pin = factory.pin(22)
    assert pin.bounce == pytest.approx(0.03)  # debouncing is the pin driver's job
    assert pin.pull == "up"  # button to ground, internal pull-up
    assert button._button.hold_time == 3.0
    button.close()

    button = GpioButton(ButtonSettings(pin=22, bounce_ms=0), pin_factory=factory)
    assert factory.pin(22).bounce is None
    button.close()


def test_repeated_edges_to_the_same_level_are_one_press(factory):
    button = GpioButton(ButtonSettings(), pin_factory=factory)
    pin = factory.pin(17)
    pin.drive_low()
    pin.drive_low()  # already low: no edge, no event
    pin.drive_high()
    pin.drive_high()
    assert [button.pending(), button.pending(), button.pending()] == [
        ButtonEvent.PRESSED,
        ButtonEvent.RELEASED,
        None,
    ]
    button.close()


def test_presses_before_anyone_waits_are_kept_and_clear_forgets_them(factory):
    button = GpioButton(ButtonSettings(), pin_factory=factory)  # built outside any event loop
    pin = factory.pin(17)
    pin.drive_low()
    pin.drive_high()

    async def first() -> ButtonEvent:
        return await asyncio.wait_for(button.next_event(), timeout=TIMEOUT)

    assert asyncio.run(first()) is ButtonEvent.PRESSED  # the loop binds on first wait
    pin.drive_low()
    button.clear()  # e.g. presses made while the device was answering
    assert button.pending() is None
    button.close()


def test_a_pin_already_in_use_is_a_clear_device_error(factory):
    first = GpioButton(ButtonSettings(pin=17), pin_factory=factory)
    with pytest.raises(DeviceError) as caught:
        GpioButton(ButtonSettings(pin=17), pin_factory=factory)
    message = str(caught.value)
    assert "GPIO17 (header pin 11)" in message
    assert "no other program" in message and "python3-lgpio" in message
    first.close()

    led = GpioIndicator(
        LedSettings(pin=17), pin_factory=factory
    )  # the button's pin is free again...
    with pytest.raises(DeviceError, match=r"status LED on GPIO17 \(header pin 11\)"):
        GpioIndicator(LedSettings(pin=17), pin_factory=factory)  # ...but not twice
    led.close()


# --- the status LED ---------------------------------------------------------------------------


def transitions(pin) -> list[tuple[float, bool]]:
    return [(round(s.timestamp, 2), bool(s.state)) for s in pin.states[1:]]


async def test_led_follows_the_appliance_state(factory):
    led = GpioIndicator(LedSettings(pin=27), pin_factory=factory)
    pin = factory.pin(27)
    assert not led.is_lit and pin.state is False  # idle: off

    led.show(IndicatorState.LISTENING)
    assert led.is_lit and pin.state is True
    led.show(IndicatorState.SPEAKING)
    assert pin.state is True
    led.show(IndicatorState.IDLE)
    assert pin.state is False

    pin.clear_states()
    led.show(IndicatorState.THINKING)  # fast blink: 0.1 s on, 0.1 s off
    await asyncio.sleep(0.55)
    led.show(IndicatorState.IDLE)
    changes = transitions(pin)
    assert len(changes) >= 5
    assert all(0.05 <= t <= 0.2 for t, _ in changes[1:-1])
    assert pin.state is False

    pin.clear_states()
    led.show(IndicatorState.ERROR)  # slow blink: 0.5 s on, 1.5 s off
    await asyncio.sleep(0.3)
    assert pin.state is True
    await asyncio.sleep(0.5)
    assert pin.state is False
    led.close()


async def test_showing_the_same_state_again_does_not_restart_the_blink(factory):
    led = GpioIndicator(LedSettings(pin=27), pin_factory=factory)
    pin = factory.pin(27)
    led.show(IndicatorState.ERROR)
    await asyncio.sleep(0.3)
    led.show(IndicatorState.ERROR)
    await asyncio.sleep(0.35)
    assert pin.state is False  # 0.65 s in: the first "on" ended on time
    led.close()


def test_disabled_led_is_a_quiet_no_op():
    led = GpioIndicator(LedSettings(enabled=False))  # no pin is touched, no pin factory needed
    for state in IndicatorState:
        led.show(state)
    assert led.state is IndicatorState.ERROR and not led.is_lit and led.pin is None
    led.close()
