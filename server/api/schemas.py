"""Request bodies, validated by pydantic; a violation becomes a 400 that names the field.

Limits that depend on the server (context length, `max_logprobs`, threshold bounds) are
checked later, in `validation.py`, where the settings and the tokenized prompt are known.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    FiniteFloat,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationInfo,
    field_validator,
)

from server.engine.types import MAX_TEMPERATURE

PositiveInt = Annotated[StrictInt, Field(gt=0)]
NonNegativeInt = Annotated[StrictInt, Field(ge=0)]
Seed = Annotated[StrictInt, Field(ge=-(2**63), le=2**63 - 1)]  # what torch and vLLM accept


class ThresholdOverrides(BaseModel):
    """Per-request flag thresholds (nats); each must lie within the server's bounds."""

    model_config = ConfigDict(extra="forbid")
    eu: FiniteFloat | None = None
    bias: FiniteFloat | None = None
    variance: FiniteFloat | None = None


class SamplingFields(BaseModel):
    """Fields shared by every generation endpoint."""

    max_tokens: PositiveInt | None = None
    temperature: Annotated[FiniteFloat, Field(ge=0, le=MAX_TEMPERATURE)] | None = None
    top_p: Annotated[FiniteFloat, Field(gt=0, le=1)] | None = None
    seed: Seed | None = None
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=16)] | None = None
    stream: StrictBool = False
    thresholds: ThresholdOverrides | None = None
    stop_on_uncertainty: StrictBool = False
    ignore_eos: StrictBool = False  # vLLM's extra parameter: generate past EOS up to max_tokens

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class GenerateRequest(SamplingFields):
    """`POST /generate`: exactly one of `prompt` and `prompt_token_ids`."""

    model_config = ConfigDict(extra="forbid")
    prompt: StrictStr | None = None
    prompt_token_ids: list[StrictInt] | None = None
    logprobs: NonNegativeInt = 0  # top log-probs per token


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class OpenAIFields(SamplingFields):
    """OpenAI options: unknown fields are ignored (as OpenAI-compatible servers do); known
    ones that this server cannot honour are refused by `unsupported()`."""

    model_config = ConfigDict(extra="ignore")
    model: StrictStr | None = None
    stream_options: StreamOptions | None = None
    n: PositiveInt = 1
    presence_penalty: FiniteFloat | None = None
    frequency_penalty: FiniteFloat | None = None
    logit_bias: dict[str, float] | None = None
    user: StrictStr | None = None

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(cls, value, info: ValidationInfo):
        if value is not None and not info.data.get("stream", False):
            raise ValueError("stream_options is only allowed when stream is true")  # as OpenAI
        return value

    def unsupported(self) -> tuple[str, str] | None:
        """(param, message) of the first option this server cannot honour, else None."""
        if self.n > 1:
            return "n", "only n=1 is supported"
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                return name, f"{name} is not supported"
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported"
        return None


PROMPT_FORMS = "a string, a list of one string, a list of token ids, or a list of one list of token ids"


class CompletionRequest(OpenAIFields):
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    logprobs: Annotated[StrictInt, Field(ge=0)] | None = None
    echo: StrictBool = False
    best_of: PositiveInt | None = None
    suffix: StrictStr | None = None

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _one_prompt_form(cls, value, handler):
        """One sentence that says what is accepted, instead of one error per union member."""
        try:
            return handler(value)
        except ValueError:
            raise ValueError(f"prompt must be {PROMPT_FORMS}") from None

    def unsupported(self) -> tuple[str, str] | None:
        if self.echo:
            return "echo", "echo is not supported"
        if self.best_of not in (None, 1):
            return "best_of", "only best_of=1 is supported"
        if self.suffix:
            return "suffix", "suffix is not supported"
        return super().unsupported()


class TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(OpenAIFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: PositiveInt | None = None
    logprobs: StrictBool = False
    top_logprobs: NonNegativeInt | None = None
    tools: list[dict] | None = None

    def unsupported(self) -> tuple[str, str] | None:
        if self.tools:
            return "tools", "tools are not supported"
        if self.top_logprobs and not self.logprobs:
            return "top_logprobs", "top_logprobs needs logprobs=true"
        return super().unsupported()
