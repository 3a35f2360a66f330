"""The model worker of `agentmem serve`: replies decode in turns, a long history's prefill is
cut into chunks between which the other replies decode, one session's replies take turns."""

from __future__ import annotations

import threading

from agentmem import MemoryConfig, chat
from agentmem.server.worker import Job, Worker

CHUNKED = MemoryConfig(exec_chunk=64)  # a long history: many chunks


def run_jobs(replies: list[chat.Reply], max_active: int = 8) -> list[tuple[int, object]]:
    """Submit the replies at once; the items they emit, in order, as (reply index, item)."""
    emitted: list[tuple[int, object]] = []
    done = threading.Semaphore(0)

    def sink(index: int):
        def emit(item) -> None:
            emitted.append((index, item))
            if isinstance(item, chat.Outcome | Exception):
                done.release()

        return emit

    worker = Worker(None, max_active=max_active)
    jobs = [Job(r, emit=sink(i)) for i, r in enumerate(replies)]
    for job in jobs:  # all waiting before the worker starts: admitted in one go
        worker.submit(job)
    worker.start()
    try:
        for _ in jobs:
            assert done.acquire(timeout=300)
    finally:
        worker.stop()
    return emitted


def reply(model: str, text: str, max_tokens: int, session_id: str | None = None) -> chat.Reply:
    return chat.Reply(
        model=model, messages=[{"role": "user", "content": text}], max_tokens=max_tokens,
        session_id=session_id, memory=CHUNKED,
    )  # fmt: skip


def test_a_short_reply_ends_while_a_long_history_is_still_prefilled(tiny_model):
    long_history = reply(tiny_model, "the quick brown fox jumps over the lazy dog " * 150, 2)
    short = reply(tiny_model, "hello", 4)
    emitted = run_jobs([long_history, short])
    order = [i for i, item in emitted]
    short_done = next(k for k, (i, item) in enumerate(emitted) if i == 1 and _end(item))
    long_first = order.index(0)
    assert long_first > short_done, order  # the long one's first token came after the short end
    (long_outcome,) = [item for i, item in emitted if i == 0 and _end(item)]
    assert long_outcome.input_tokens > 20 * CHUNKED.exec_chunk  # it was long: many chunks


def test_one_sessions_replies_take_turns(tiny_model):
    first = reply(tiny_model, "hello", 6, session_id="s")
    second = reply(tiny_model, "again", 6, session_id="s")
    second.may_be_new = True  # only the new message: it follows the first reply in memory
    emitted = run_jobs([first, second])
    order = [i for i, _ in emitted]
    assert order == sorted(order), order  # the second began once the first had ended
    outcomes = [item for _, item in emitted if _end(item)]
    assert outcomes[1].appended
    assert outcomes[1].cached_tokens == outcomes[0].input_tokens + outcomes[0].output_tokens


def test_a_failing_reply_does_not_stop_the_worker(tiny_model):
    bad = chat.Reply(model=tiny_model, messages=[{"role": "user"}], max_tokens=2)  # no content
    good = reply(tiny_model, "hello", 2)
    emitted = run_jobs([bad, good])
    ends = {i: item for i, item in emitted if _end(item)}
    assert isinstance(ends[0], Exception) and isinstance(ends[1], chat.Outcome)


def _end(item) -> bool:
    return isinstance(item, chat.Outcome | Exception)
