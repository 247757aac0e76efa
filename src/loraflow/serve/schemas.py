"""Request bodies of the OpenAI-compatible endpoints, validated by pydantic, and the error shape.

Fields OpenAI defines that this server cannot honour (logit_bias, tools, suffix, ...) are refused
with a 400 rather than silently ignored; fields no OpenAI endpoint defines are ignored, as
other OpenAI-compatible servers do. Extensions: `fusion` (see loraflow.serve.registry) and
`ignore_eos` (vLLM's: keep decoding past the end-of-sequence token).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts
MAX_STOPS = 16  # OpenAI allows 4, vLLM any number; lm-evaluation-harness sends a task's `until` plus the EOS text
MAX_STOP_CHARS = 1024  # per stop sequence: each decode step matches the output's tail against every one
MAX_LOGPROBS = 20  # top alternatives per token: OpenAI's chat limit (its legacy completions allow 5), vLLM's default

Finite = Annotated[float, Field(allow_inf_nan=False)]


class APIError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: Finite | None = Field(None, ge=0, le=2)
    top_p: Finite | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    n: int = Field(1, ge=1, le=128)
    presence_penalty: Finite = Field(0.0, ge=-2, le=2)
    frequency_penalty: Finite = Field(0.0, ge=-2, le=2)
    # OpenAI fields with only the default supported
    logit_bias: dict[str, Any] | None = None
    # extensions
    fusion: str | dict[str, Any] | None = None
    ignore_eos: bool = False

    @model_validator(mode="after")
    def _supported(self):
        if self.logit_bias:
            raise ValueError("logit_bias: not supported")
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"stop: at most {MAX_STOPS} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop: stop sequences must be non-empty")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop: a stop sequence may be at most {MAX_STOP_CHARS} characters")
        return self

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _chat_supported(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs: true")
        if self.tools or self.tool_choice not in (None, "none"):
            raise ValueError("tools: tool calls are not supported")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise ValueError("response_format: only text is supported")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


    @property
    def top_logprobs_count(self) -> int | None:
        """Alternatives per generated token, or None when no log-probs were asked for."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_GenerationRequest):
    """A legacy completion; `prompt` is a string, token ids, or a batch of either (one choice each)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)  # 0 (with echo): score the prompt only
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = None

    @model_validator(mode="after")
    def _completion_supported(self):
        if isinstance(self.prompt, list) and (not self.prompt or any(p == [] or p == "" for p in self.prompt)):
            raise ValueError("prompt: empty")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: 0 only with echo (the prompt's log-probabilities)")
        if self.suffix:
            raise ValueError("suffix: not supported")
        if self.best_of not in (None, 1, self.n):
            raise ValueError("best_of: only equal to n is supported")
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        """The batch of prompts, each a string or token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and isinstance(self.prompt[0], int):
            return [list(self.prompt)]
        return list(self.prompt)

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens
