"""Per-request sampling settings, validated where they enter so a bad value names its field."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_STOP_STRINGS = 16
MAX_LOGPROBS = 20


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: int = Field(16, ge=1, le=1 << 20, description="Output tokens at most.")
    temperature: float = Field(0.0, ge=0.0, le=100.0, description="0 = greedy.")
    top_k: int = Field(0, ge=0, description="Keep the k most likely tokens; 0 = all.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Keep the smallest set with this probability mass.")
    seed: int | None = Field(None, ge=0, lt=1 << 63, description="Makes sampling reproducible per request.")
    stop_token_ids: tuple[int, ...] = Field((), description="Token ids that end generation (not returned).")
    stop: tuple[str, ...] = Field((), max_length=MAX_STOP_STRINGS, description="Strings that end generation.")
    ignore_eos: bool = Field(False, description="Keep generating past the EOS token.")
    logprobs: bool = Field(False, description="Return the log-probability of each sampled token.")

    @model_validator(mode="after")
    def _check(self) -> SamplingParams:
        if any(not s for s in self.stop):
            raise ValueError("stop: empty stop string (fix: remove it)")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError("stop_token_ids: token ids are non-negative")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
