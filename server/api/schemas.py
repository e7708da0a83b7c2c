"""Request bodies, validated by pydantic; a violation becomes a 400 that names the field.

Limits that depend on the server (context length, `max_logprobs`, threshold bounds) are
checked later, in `validation.py`, where the settings and the tokenized prompt are known.
What the OpenAI endpoints honour and refuse is listed in docs/openai-compat.md.
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
    model_validator,
)

from server.engine.types import MAX_TEMPERATURE, JsonOutput

PositiveInt = Annotated[StrictInt, Field(gt=0)]
NonNegativeInt = Annotated[StrictInt, Field(ge=0)]
Seed = Annotated[StrictInt, Field(ge=-(2**63), le=2**63 - 1)]  # what torch and vLLM accept
MAX_STOP_STRINGS = 16


class ThresholdOverrides(BaseModel):
    """Per-request flag thresholds (nats); each must lie within the server's bounds."""

    model_config = ConfigDict(extra="forbid")
    eu: FiniteFloat | None = None
    bias: FiniteFloat | None = None
    variance: FiniteFloat | None = None


class JsonSchemaSpec(BaseModel):
    name: StrictStr
    description: StrictStr | None = None
    schema_: dict | None = Field(default=None, alias="schema")  # absent: any JSON object
    strict: StrictBool | None = None  # the grammar enforces the schema either way


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`; one model, not a tagged union, so errors name
    `response_format.type` or `response_format.json_schema.<field>`."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("'json_schema' is required when type is 'json_schema'")
        return self


class SamplingFields(BaseModel):
    """Fields shared by every generation endpoint."""

    max_tokens: PositiveInt | None = None
    temperature: Annotated[FiniteFloat, Field(ge=0, le=MAX_TEMPERATURE)] | None = None
    top_p: Annotated[FiniteFloat, Field(gt=0, le=1)] | None = None
    seed: Seed | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool = False
    thresholds: ThresholdOverrides | None = None
    stop_on_uncertainty: StrictBool = False
    ignore_eos: StrictBool = False  # vLLM's extra parameter: generate past EOS up to max_tokens
    response_format: ResponseFormat | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _at_most_16_stops(cls, value):
        """Said before the union's per-member errors, which would not mention the limit."""
        if isinstance(value, list) and len(value) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(value)}")
        return value

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def json_output(self) -> JsonOutput | None:
        """The grammar `response_format` asks for; None for text."""
        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return None
        return JsonOutput(fmt.json_schema.schema_ if fmt.type == "json_schema" else None)


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

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data):
        """The OpenAI spec marks most fields nullable and typed SDKs send `null` for unset ones:
        a top-level `null` means the field's default (a required field stays required)."""
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

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
    tool_calls: list[dict] | None = None  # refused when not empty: see ChatCompletionRequest
    function_call: dict | None = None

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
    functions: list[dict] | None = None  # the legacy form of tools
    tool_choice: StrictStr | dict | None = None
    parallel_tool_calls: StrictBool | None = None
    function_call: StrictStr | dict | None = None

    @field_validator("tool_choice", "parallel_tool_calls", "function_call")
    @classmethod
    def _needs_its_tools(cls, value, info: ValidationInfo):
        """As OpenAI: a choice among tools needs the tools (fields validate in order: they come first)."""
        tools = "functions" if info.field_name == "function_call" else "tools"
        if not info.data.get(tools):
            raise ValueError(f"'{info.field_name}' is only allowed when '{tools}' are specified")
        return value

    def unsupported(self) -> tuple[str, str] | None:
        if self.tools:
            return "tools", "tools are not supported"
        if self.functions:
            return "functions", "functions are not supported"
        for i, m in enumerate(self.messages):
            # no tools here, so no template renders them; dropping them would change the conversation
            if m.tool_calls or m.function_call:
                field = "tool_calls" if m.tool_calls else "function_call"
                return f"messages[{i}].{field}", "a history with tool calls is not supported (no tools here)"
        if self.top_logprobs and not self.logprobs:
            return "top_logprobs", "top_logprobs needs logprobs=true"
        return super().unsupported()
