"""Multi-LoRA serving: PEFT adapters over one base model, many of them in one batch.

`modules` parses vLLM's flags, `adapter` reads and checks a PEFT adapter folder against the base
model's shapes, `delta` adds each row's low-rank update after the base projections (the base
product runs once for the whole batch), `manager` keeps the engine's adapter registry (names, ids,
the loaded set with its LRU bound, in-flight use).
"""
