"""The conversation a follow-up is answered in: bounded in turns and in time; only the cloud sees it."""

from __future__ import annotations

from heimdall_edge.engines.base import Exchange, ReplyRequest
from heimdall_edge.engines.cloud.openai_reply import SYSTEM_PROMPT, OpenAIReplyEngine
from heimdall_edge.engines.local.offline_reply import OfflineReplyEngine
from heimdall_edge.testing.clocks import FakeClock
from heimdall_edge.turn.conversation import Conversation


def test_keeps_the_last_turns_only() -> None:
    conversation = Conversation(max_turns=2, max_idle_s=300, clock=FakeClock())
    for n in range(3):
        conversation.add(f"question {n}", f"answer {n}")
    assert conversation.history() == (
        Exchange("question 1", "answer 1"),
        Exchange("question 2", "answer 2"),
    )


def test_a_quiet_spell_starts_a_new_conversation() -> None:
    clock = FakeClock()
    conversation = Conversation(max_turns=6, max_idle_s=300, clock=clock)
    conversation.add("what's on today", "Two meetings. Want the first?")
    clock.advance(300)
    assert len(conversation.history()) == 1  # exactly the limit: still the same conversation
    clock.advance(0.001)
    assert conversation.history() == ()
    conversation.add("and tomorrow", "Nothing yet.")
    assert conversation.history() == (Exchange("and tomorrow", "Nothing yet."),)


def test_turns_without_words_or_answer_add_nothing_but_keep_it_going() -> None:
    clock = FakeClock()
    conversation = Conversation(max_turns=6, max_idle_s=60, clock=clock)
    conversation.add("hello", "Hi.")
    clock.advance(50)
    conversation.add(None, None)  # a turn that failed: still a turn
    clock.advance(50)
    assert conversation.history() == (Exchange("hello", "Hi."),)


def test_zero_turns_means_every_turn_stands_alone() -> None:
    conversation = Conversation(max_turns=0, max_idle_s=60, clock=FakeClock())
    conversation.add("hello", "Hi.")
    assert conversation.history() == ()


def test_the_cloud_reply_sees_the_earlier_turns_in_order() -> None:
    engine = OpenAIReplyEngine(client=None, model="m", max_tokens=50)  # type: ignore[arg-type]
    request = ReplyRequest(
        "and tomorrow?",
        history=(Exchange("what's on today", "Two meetings."), Exchange("when", "At ten.")),
    )
    messages = engine.messages(request)
    assert [m["role"] for m in messages] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
        "user",
    ]
    assert messages[0]["content"] == SYSTEM_PROMPT
    assert [m["content"] for m in messages[1:5]] == [
        "what's on today",
        "Two meetings.",
        "when",
        "At ten.",
    ]
    assert messages[-1]["content"][0] == {"type": "text", "text": "and tomorrow?"}


def test_the_offline_reply_answers_the_same_with_or_without_history() -> None:
    engine = OfflineReplyEngine()
    alone = ReplyRequest("please remember the milk")
    with_history = ReplyRequest("please remember the milk", history=(Exchange("a", "b"),))
    assert engine.answer(alone) == engine.answer(with_history) == "I saved that."
