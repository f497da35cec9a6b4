"""OpenAI-compatible serving with continuous batching: `pyjamba serve`, or `create_app` in Python.

slots.py     SlotPool: per-sequence attention K/V and Mamba states, each slot at its own length
sampling.py  per-request sampling (generate's warpers), logprobs
constrain.py structured output: formats compiled to grammars (llguidance), per-sequence matchers, masks
engine.py    Engine: the scheduler and the step loop, in one background thread
prefix_cache.py  PrefixCache: states at prompt block boundaries, so shared prefixes are read once
text.py      detokenizing a choice's tokens, stop strings
chat_output.py  a chat choice's text as content, reasoning, tool calls, citations
tools.py     the Jamba families' tool-call formats; tools and tool_choice checks
requests.py  request validation: prompts to token ids, limits, sampling settings
job.py       a request in flight: its sequences' events turned into text
responses.py OpenAI response bodies and server-sent-event chunks
schemas.py   pydantic schemas of the OpenAI API
errors.py    the OpenAI error body for every failure
metrics.py   Prometheus metrics
app.py       the FastAPI app: routes, API key and body-size gate, lifespan
cli.py       `pyjamba serve`
"""

from .app import Backend, Settings, create_app
from .engine import Engine
from .slots import SlotPool

__all__ = ["Backend", "Engine", "Settings", "SlotPool", "create_app"]
