"""The base of every recipe model: unknown keys and non-finite numbers are errors."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    # no NaN / inf anywhere (a learning rate of .inf passes gt=0 otherwise)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False)
