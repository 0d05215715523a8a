"""The bodies of the OpenAI routes, as pydantic models with strict types: "max_tokens": "5" is a mistake to
report, not to guess at. Every field a body may hold either works or is refused with a 400 naming it: unknown
fields are refused (extra=forbid), and OpenAI's fields this server does not implement are accepted only at
their no-op value (UNSUPPORTED)."""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


# field -> the values that ask for nothing (what a client library sends when the user set nothing)
UNSUPPORTED = {"presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logprobs": (None, False),
               "top_logprobs": (None, 0), "logit_bias": (None, {}), "echo": (None, False), "best_of": (None, 1),
               "suffix": (None, ""), "tools": (None, []), "tool_choice": (None, "none"),
               "response_format": (None, {"type": "text"})}


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: StrictStr | None = Field(None, description="Must be the served model's name (GET /v1/models).")
    max_tokens: StrictInt | None = Field(None, ge=1, description="Most tokens to generate (server cap applies).")
    temperature: StrictFloat = Field(1.0, ge=0.0, le=2.0, description="0 is greedy decoding.")
    top_p: StrictFloat = Field(1.0, gt=0.0, le=1.0)
    n: StrictInt = Field(1, ge=1, description="Completions per prompt.")
    stream: StrictBool = False
    stop: StrictStr | list[StrictStr] | None = Field(None, description="Up to 4 strings that end the text.")
    seed: StrictInt | None = None
    top_k: StrictInt = Field(0, ge=0, description="Sample among the k most likely tokens (0: all).")
    stream_options: StreamOptions | None = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    logprobs: Any = None
    top_logprobs: Any = None
    logit_bias: Any = None
    echo: Any = None
    best_of: Any = None
    suffix: Any = None
    tools: Any = None
    tool_choice: Any = None
    response_format: Any = None


class CompletionRequest(Body):
    prompt: StrictStr | list[StrictStr] = Field(..., description="Text to continue (or a list of texts).")
    max_tokens: StrictInt | None = Field(16, ge=1, description="Most tokens to generate (server cap applies).")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart] | None = None


class ChatRequest(Body):
    messages: list[ChatMessage] = Field(..., description="The conversation so far (at least one message).")
    max_completion_tokens: StrictInt | None = Field(None, ge=1, description="Newer name of max_tokens.")


class QAInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question: StrictStr
    context: StrictStr = ""


class TaskRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: StrictStr | None = None
    input: Union[StrictStr, QAInput, list[StrictStr], list[QAInput]] = Field(
        ..., description="classify/translate: text or list of texts; answer: {question, context} or a list.")

