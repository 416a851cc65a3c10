"""The front end's parts on real audio: Silero woken by webrtcvad, the earcon canceller,
noise suppression and gain, the wake-word detector (its refractory period, cutoff, reset,
and the own-voice guard built on it)."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest

from heimdall_edge.audio import (
    FRAME_MS,
    FRAME_SAMPLES,
    SAMPLE_RATE,
    Audio,
    frames,
    read_audio,
    silence,
)
from heimdall_edge.listen.earcon import FOLLOW_UP_EARCON, WAKE_EARCON
from heimdall_edge.listen.earcon_canceller import EarconCanceller
from heimdall_edge.listen.frontend import NoiseAndGain
from heimdall_edge.listen.own_voice import OwnVoiceGuard
from heimdall_edge.listen.vad import SileroJudge, WebRtcJudge, make_judge
from heimdall_edge.listen.wakeword import WakeWordDetector
from heimdall_edge.settings import BUILTIN_WAKE_WORDS, ListeningSettings
from heimdall_edge.testing.voices import PiperSpeaker, noise, to_pcm


@pytest.fixture(scope="module")
def voice(models_dir: Path) -> PiperSpeaker:
    return PiperSpeaker(models_dir)


def samples_of(pcm: bytes) -> np.ndarray:
    return np.frombuffer(pcm, dtype="<i2").astype(np.float64)


def db(energy_ratio: float) -> float:
    return 10 * np.log10(energy_ratio)


@functools.cache
def recording(speech_dir: Path, name: str) -> bytes:
    return read_audio(speech_dir / name).pcm


# --- speech judges ----------------------------------------------------------------------------


def judged(judge, pcm: bytes) -> list[bool]:
    return [judge(frame) for frame in frames(pcm)]


def test_silero_hears_speech_and_not_a_fan_that_webrtcvad_calls_speech(speech_dir: Path) -> None:
    speech = recording(speech_dir, "v2j_turn_on_living_room_lamp.wav")
    fan = to_pcm(0.05 * noise("pink", 10 * SAMPLE_RATE, seed=3))
    silero, webrtc = SileroJudge(0.5, WebRtcJudge(2)), WebRtcJudge(2)
    assert sum(judged(silero, speech)) >= 20  # the words
    assert sum(judged(webrtc, fan)) > 100  # webrtcvad: a fan is speech
    silero.reset()
    assert sum(judged(silero, fan)) == 0


def test_webrtcvad_lets_silero_sleep_through_silence(speech_dir: Path) -> None:
    quiet_room = silence(3000) + recording(speech_dir, "ps_goforward.wav") + silence(3000)
    gated, always = SileroJudge(0.5, WebRtcJudge(2)), SileroJudge(0.5)
    with_gate, without = judged(gated, quiet_room), judged(always, quiet_room)
    chunks = len(quiet_room) // (512 * 2)
    assert always.chunks_judged == chunks
    assert gated.chunks_judged < chunks / 2  # the silence cost nothing
    agree = sum(a == b for a, b in zip(with_gate, without, strict=True)) / len(without)
    assert agree > 0.97 and sum(with_gate) > 0


def test_the_same_audio_always_gets_the_same_decisions(speech_dir: Path) -> None:
    pcm = recording(speech_dir, "jfk.flac")
    judge = SileroJudge(0.5, WebRtcJudge(2))
    first = judged(judge, pcm)
    judge.reset()
    assert judged(judge, pcm) == first


def test_silero_holds_speech_down_to_its_lower_threshold() -> None:
    class Detector:
        def __init__(self, probabilities: list[float]) -> None:
            self.probabilities = iter(probabilities)

        def process_samples(self, samples: list[float]) -> float:
            return next(self.probabilities)

        def reset(self) -> None:
            pass

    judge = SileroJudge(0.5, detector=Detector([0.45, 0.6, 0.4, 0.36, 0.34, 0.55]))
    # Frames are 480 samples, chunks 512: the first frame completes no chunk, then each
    # frame completes one, and the newest chunk decides (0.5 to start, 0.35 to go on).
    decisions = [judge(bytes(FRAME_SAMPLES * 2)) for _ in range(6)]
    assert decisions == [False, False, True, True, True, False]


def test_the_judge_the_settings_ask_for() -> None:
    assert isinstance(make_judge(ListeningSettings(vad="webrtc")), WebRtcJudge)
    judge = make_judge(ListeningSettings(vad="silero", vad_threshold=0.7))
    assert isinstance(judge, SileroJudge) and judge.tail_frames == 3


# --- the earcon canceller ---------------------------------------------------------------------


def echo_of(earcon: Audio, *, delay_ms: int, gain_db: float, rt60: float, seed: int) -> np.ndarray:
    """The earcon as a microphone hears it: late, quieter, with a room's decaying tail."""
    rng = np.random.default_rng(seed)
    tail = np.arange(int(rt60 * SAMPLE_RATE)) / SAMPLE_RATE
    impulse = rng.normal(0, 1, tail.size) * 10 ** (-3 * tail / rt60)  # -60 dB at rt60
    impulse[0] = 8.0
    impulse /= np.sqrt(np.sum(impulse**2))
    heard = np.convolve(samples_of(earcon.pcm), impulse) * 10 ** (gain_db / 20)
    return np.concatenate([np.zeros(SAMPLE_RATE * delay_ms // 1000), heard])


def cancelled(pcm: bytes, earcon_frequencies: tuple[float, ...], window: int) -> bytes:
    canceller = EarconCanceller()
    canceller.arm(earcon_frequencies, window)
    return b"".join(canceller.process(frame) for frame in frames(pcm))


@pytest.mark.parametrize("earcon", [WAKE_EARCON, FOLLOW_UP_EARCON], ids=["wake", "follow-up"])
@pytest.mark.parametrize("rt60", [0.3, 0.6])
def test_the_earcon_is_taken_out_and_the_speech_under_it_kept(
    speech_dir: Path, earcon, rt60: float
) -> None:
    speech = samples_of(recording(speech_dir, "v2j_what_time_is_it.wav"))
    heard = echo_of(earcon.audio, delay_ms=40, gain_db=-6, rt60=rt60, seed=1)
    length = len(speech) + FRAME_SAMPLES
    echo = np.resize(np.concatenate([heard, np.zeros(length)]), length)
    window = -(-(len(heard) + SAMPLE_RATE * 400 // 1000) // FRAME_SAMPLES)
    pcm = lambda x: np.clip(x, -32768, 32767).astype("<i2").tobytes()
    span = slice(0, window * FRAME_SAMPLES)
    left = samples_of(cancelled(pcm(echo), earcon.frequencies, window))[: len(echo)]
    assert db(np.sum(echo[span] ** 2) / np.sum(left[span] ** 2)) > 35
    padded = np.resize(np.concatenate([speech, np.zeros(FRAME_SAMPLES)]), length)
    kept = samples_of(cancelled(pcm(padded), earcon.frequencies, window))[:length]
    assert db(np.sum((kept[span] - padded[span]) ** 2) / np.sum(padded[span] ** 2)) < -15


def test_outside_its_window_the_canceller_changes_nothing(speech_dir: Path) -> None:
    pcm = recording(speech_dir, "ps_goforward.wav")
    canceller = EarconCanceller()
    canceller.arm(WAKE_EARCON.frequencies, 5)
    out = [canceller.process(frame) for frame in frames(pcm)]
    assert out[5:] == frames(pcm)[5:] and out[:5] != frames(pcm)[:5]
    assert not canceller.armed


async def test_whisper_never_hears_the_earcon(speech_dir: Path, whisper) -> None:
    """One breath: the command starts while the wake sound still rings in the room."""
    speech = samples_of(recording(speech_dir, "v2j_what_time_is_it.wav"))
    heard = echo_of(WAKE_EARCON.audio, delay_ms=40, gain_db=0, rt60=0.6, seed=2)
    lead = np.zeros(int(0.08 * SAMPLE_RATE))
    together = np.concatenate([heard, np.zeros(len(speech))])[: len(speech) + len(lead)]
    together[len(lead) :] += speech
    window = -(-(len(heard) + SAMPLE_RATE * 400 // 1000) // FRAME_SAMPLES)
    pcm = np.clip(together, -32768, 32767).astype("<i2").tobytes()
    clean = await whisper.transcribe(Audio(cancelled(pcm, WAKE_EARCON.frequencies, window), 16000))
    assert clean.text.lower().strip(" .?!").startswith("what time is it")


# --- noise suppression and gain ---------------------------------------------------------------


def test_noise_suppression_takes_a_steady_noise_down_and_keeps_frames_whole() -> None:
    hiss = to_pcm(0.05 * noise("pink", 6 * SAMPLE_RATE, seed=5))
    front = NoiseAndGain(noise_suppression=4, auto_gain_dbfs=0)
    out = b"".join(front.process(frame) for frame in frames(hiss))
    assert len(out) == len(frames(hiss)) * len(frames(hiss)[0])
    tail = slice(3 * SAMPLE_RATE, None)  # once it has learnt the noise
    assert db(np.sum(samples_of(hiss)[tail] ** 2) / np.sum(samples_of(out)[tail] ** 2)) > 10


def test_auto_gain_lifts_quiet_speech(speech_dir: Path) -> None:
    quiet = (samples_of(recording(speech_dir, "jfk.flac")) * 0.05).astype("<i2").tobytes()
    front = NoiseAndGain(noise_suppression=0, auto_gain_dbfs=3)
    out = b"".join(front.process(frame) for frame in frames(quiet))
    assert db(np.sum(samples_of(out) ** 2) / np.sum(samples_of(quiet) ** 2)) > 6


def test_with_both_off_the_front_end_is_not_there() -> None:
    assert NoiseAndGain.from_settings(ListeningSettings()) is None
    assert NoiseAndGain.from_settings(ListeningSettings(noise_suppression=1)) is not None


# --- the wake-word detector -------------------------------------------------------------------


def test_the_built_in_names_are_the_wheels_models() -> None:
    from pymicro_wakeword import Model

    assert sorted(BUILTIN_WAKE_WORDS) == sorted(model.value for model in Model)


PHRASES = {
    "hey_jarvis": "Hey Jarvis",
    "okay_nabu": "Okay Nabu",
    "alexa": "Alexa",
    "hey_mycroft": "Hey Mycroft",
}


def detections(detector: WakeWordDetector, pcm: bytes) -> list[int]:
    return [i for i, frame in enumerate(frames(pcm)) if detector.feed(frame)]


@pytest.mark.parametrize("name", BUILTIN_WAKE_WORDS)
def test_each_built_in_wakes_once_per_phrase(voice: PiperSpeaker, name: str) -> None:
    detector = WakeWordDetector(name, cutoff=None, refractory_ms=2000)
    phrase = to_pcm(voice.say(f"{PHRASES[name]}.", pace=1.0))
    said_twice = silence(1000) + phrase + silence(2500) + phrase + silence(1000)
    found = detections(detector, said_twice)
    assert len(found) == 2, found
    assert detector.model.phrase == PHRASES[name]
    first_end = (len(silence(1000)) + len(phrase)) // 960
    assert first_end - 15 <= found[0] <= first_end + 10  # at the end of the phrase


def test_the_refractory_period_and_the_cutoff_are_settings(voice: PiperSpeaker) -> None:
    phrase = to_pcm(voice.say("Hey Jarvis.", pace=1.0))
    twice = silence(500) + phrase + silence(1500) + phrase + silence(1000)
    apart = (len(phrase) + len(silence(1500))) // 960
    found = detections(WakeWordDetector("hey_jarvis", cutoff=None, refractory_ms=2000), twice)
    assert len(found) == 2 and found[1] - found[0] == pytest.approx(apart, abs=3)
    longer = WakeWordDetector("hey_jarvis", cutoff=None, refractory_ms=apart * 30 + 500)
    assert len(detections(longer, twice)) == 1
    # Without it, one phrase keeps the probability up long enough to wake twice.
    assert len(detections(WakeWordDetector("hey_jarvis", cutoff=None, refractory_ms=0), twice)) > 2
    unreachable = WakeWordDetector("hey_jarvis", cutoff=0.999999, refractory_ms=2000)
    assert detections(unreachable, twice) == []


def test_the_own_voice_guard_knows_when_the_speaker_says_the_wake_word(voice: PiperSpeaker) -> None:
    detector = WakeWordDetector("hey_jarvis", cutoff=None, refractory_ms=2000)
    guard = OwnVoiceGuard(detector, settle_frames=14)
    reply = voice.say("Hey Jarvis is my name.", pace=1.0)
    guard.playback_started(mic_frame=100)
    rate = 22_050  # as Piper sends it
    from heimdall_edge.audio import resample

    guard.played(Audio(to_pcm(resample(reply, SAMPLE_RATE, rate)), rate), mic_frame=100)
    covered = [frame for frame in range(100, 100 + len(reply) // 480 + 40) if guard.covers(frame)]
    assert covered, "the reply says the wake word: its moment must be covered"
    assert not guard.covers(99 - 10) and not guard.covers(100 + len(reply) // 480 + 40)
    guard.playback_started(mic_frame=1000)
    assert not guard.covers(1000)


def test_the_guard_keeps_time_with_the_microphone_when_the_speaker_runs_dry(
    voice: PiperSpeaker,
) -> None:
    """A reply that says the wake word in two sentences, the second synthesized 2 s late: the
    microphone hears the gap (its refractory period runs out, it wakes twice), and so does
    the twin."""
    first = to_pcm(voice.say("You can wake me by saying hey jarvis."))
    second = to_pcm(voice.say("Hey Jarvis is my name."))
    start, gap = 100, 67
    resumes = start + len(frames(first)) + gap
    mic = WakeWordDetector("hey_jarvis", cutoff=None, refractory_ms=2000)
    guard = OwnVoiceGuard(mic, settle_frames=14)
    guard.playback_started(mic_frame=start)
    guard.played(Audio(first, SAMPLE_RATE), mic_frame=start)
    heard = silence(start * FRAME_MS) + b"".join(frames(first)) + silence(gap * FRAME_MS) + second
    woke = []
    for read, frame in enumerate(frames(heard), start=1):
        if read == resumes:
            guard.played(Audio(second, SAMPLE_RATE), mic_frame=read)
        guard.heard(read)
        if mic.feed(frame):
            woke.append(read)
    assert len(woke) == 2, "the microphone hears the wake word in both sentences"
    assert all(guard.covers(frame) for frame in woke), woke
