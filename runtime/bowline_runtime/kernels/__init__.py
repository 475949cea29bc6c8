"""Native kernels for what torch has no single op for (compiled on the machine that runs them)."""
