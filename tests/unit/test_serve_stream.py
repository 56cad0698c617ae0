"""How a streamed request's events reach its event loop: batched per interval, the end sent at once."""

import asyncio
import threading
import time
import types

from llmforge.serve.engine import Event
from llmforge.serve.openai_api import _Run


def run_stream(interval: float, produce, on_batch=lambda batch: None) -> tuple[list, int]:
    """The batches ``event_batches`` yields (their events) while ``produce(put)`` feeds one choice from another
    thread, started once the first event's batch is out, and how many times the loop was woken for it.
    ``on_batch`` sees each batch as it comes."""
    async def main():
        run = _Run(types.SimpleNamespace(), types.SimpleNamespace(), chat=False)
        run.choices = 1
        wakes = []
        real_wake = run._wake
        run._wake = lambda: wakes.append(1) or real_wake()
        put = run._sink(0)
        batches = []
        feeder = threading.Thread(target=produce, args=(put,))

        async def consume():
            async for batch in run.event_batches(interval):
                batches.append([event for _, event in batch])
                on_batch(batches[-1])
                if len(batches) == 1:
                    feeder.start()

        put(Event(0, "a", 1))
        # With a 60 s interval, a last event waiting for the interval's end would time this out.
        await asyncio.wait_for(consume(), timeout=20)
        feeder.join()
        return batches, len(wakes)
    return asyncio.run(main())


def test_events_within_an_interval_wake_the_loop_once_and_the_end_goes_out_at_once():
    def produce(put):
        for i in range(2, 50):
            put(Event(0, "x", i))
            time.sleep(0.002)  # as a decode step would: the loop gets to run between events
        put(Event(0, "", 50, "length"))

    batches, wakes = run_stream(60.0, produce)
    assert [len(b) for b in batches] == [1, 49]  # the first at once; the rest inside one interval
    assert batches[-1][-1].finish_reason == "length"
    # the first event, the first of the 48 middle ones, the end: not one wake per event
    assert wakes <= 3


def test_without_an_interval_every_burst_goes_out_as_it_comes():
    gate = threading.Event()

    def produce(put):
        put(Event(0, "b", 2))
        gate.wait(10)
        put(Event(0, "", 3, "stop"))

    def on_batch(batch):
        if [event.text for event in batch] == ["b"]:
            gate.set()  # the middle event came on its own, before the end was even sent

    batches, _ = run_stream(0.0, produce, on_batch)
    assert [[event.text for event in batch] for batch in batches] == [["a"], ["b"], [""]]
