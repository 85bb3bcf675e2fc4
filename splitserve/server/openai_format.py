"""OpenAI response shapes for completions and chat completions, so OpenAI SDKs parse our answers unchanged."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from splitserve.cluster.messages import Token
from splitserve.server.frontend import Run


@dataclass(frozen=True)
class OpenAIFormat:
    chat: bool

    @property
    def id_prefix(self) -> str:
        return "chatcmpl-" if self.chat else "cmpl-"

    def envelope(self, run: Run, model: str, choices: list[dict[str, Any]], chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {
            "id": self.id_prefix + run.request.request_id,
            "object": kind,
            "created": int(time.time()),
            "model": model,
            "choices": choices,
        }

    def choice(self, run: Run, tokens: list[Token], finish_reason: str | None, chunk: bool) -> dict[str, Any]:
        text = "".join(t.text for t in tokens)
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason, "logprobs": self._logprobs(run, tokens)}
        if not self.chat:
            choice["text"] = text
        elif chunk:
            # The first chunk announces the role, as OpenAI's does.
            first = run.completion_tokens == len(tokens)
            choice["delta"] = {"role": "assistant", "content": text} if first else {"content": text}
        else:
            choice["message"] = {"role": "assistant", "content": text}
        return choice

    def _logprobs(self, run: Run, tokens: list[Token]) -> dict[str, Any] | None:
        if not run.request.params.logprobs:
            return None
        if self.chat:
            return {
                "content": [
                    {"token": t.text, "logprob": t.logprob, "bytes": list(t.text.encode()), "top_logprobs": []}
                    for t in tokens
                ]
            }
        return {
            "tokens": [t.text for t in tokens],
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": None,
            "text_offset": None,
        }


def usage(run: Run) -> dict[str, Any]:
    prompt = len(run.request.prompt_token_ids)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": run.completion_tokens,
        "total_tokens": prompt + run.completion_tokens,
    }


def timing(run: Run) -> dict[str, Any]:
    """splitserve's extension field: the request's latencies and the workers that served it."""
    return asdict(run.summary)
