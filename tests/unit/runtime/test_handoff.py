"""The engine thread's hand-over to the event loop: `settled` fires only after the consumers a step's
outputs woke have run (what AsyncEngine waits for on the CPU before its next step), and without a
consumer it still fires, so the engine never waits longer than its bound."""

from __future__ import annotations

import asyncio
import threading

from bowline_runtime.engine.async_engine import deliver_by_loop


def test_settled_runs_after_the_woken_consumers():
    events: list[str] = []
    ready = threading.Event()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        streams = {f"r{i}": (loop, asyncio.Queue()) for i in range(3)}

        async def consume(rid: str) -> None:
            item = await streams[rid][1].get()
            events.append(f"{rid}:{item}")  # stands for the chunk a stream writes

        tasks = [asyncio.create_task(consume(rid)) for rid in streams]
        await asyncio.sleep(0)  # every consumer waits on its queue
        settled = threading.Event()

        def engine_thread() -> None:
            deliver_by_loop(streams, [(rid, "tok") for rid in streams], lambda: (events.append("settled"),
                                                                                 settled.set()))
            ready.set()

        threading.Thread(target=engine_thread).start()
        await asyncio.gather(*tasks)
        await loop.run_in_executor(None, settled.wait, 5)

    asyncio.run(main())
    assert ready.is_set()
    assert events[-1] == "settled"
    assert sorted(events[:-1]) == ["r0:tok", "r1:tok", "r2:tok"]


def test_settled_fires_for_outputs_nobody_awaits():
    async def main() -> bool:
        loop = asyncio.get_running_loop()
        streams = {"r0": (loop, asyncio.Queue())}
        settled = threading.Event()
        threading.Thread(target=deliver_by_loop, args=(streams, [("r0", "tok"), ("gone", "tok")], settled.set)).start()
        return await loop.run_in_executor(None, settled.wait, 5)

    assert asyncio.run(main())
