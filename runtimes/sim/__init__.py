"""The `sim` engine: a simulated vLLM OpenAI-compatible server for machines without a GPU.

Run it with `python -m runtimes.sim --model NAME --port PORT`; see `runtimes.sim.__main__` for the
flags and `runtimes.sim.server` for the HTTP surface it mirrors.
"""

__version__ = "0.1.0"
