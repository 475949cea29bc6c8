"""Speculative decoding: propose k tokens cheaply (a draft model or n-gram prompt lookup), score them
with the target model in one forward, keep the longest prefix the target agrees with.

The output distribution is the target's, exactly: greedy keeps a draft token only where it equals the
target's argmax; sampling uses the rejection rule of Leviathan et al. / Chen et al. (`rejection`).
`SpeculativeDecoder` (`step`) is the engine step used when `--speculative-model` / `--speculative-config`
is set; everything it computes besides the forwards is in small pure modules.
"""

from bowline_runtime.engine.spec_decode.config import SpeculativeConfig, speculative_config_from

__all__ = ["SpeculativeConfig", "speculative_config_from"]
