"""The assistant's identity: an editable YAML file (name, description, values, core Q&A).

The persona consultant reviews memories against it, and its ``core`` Q&A pairs are the
"old core" mixed into every night's training set so the persona survives learning.
"""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

import yaml
from pydantic import BaseModel, Field, ValidationError

from reverie.memory.records import IdentityItem

# The shipped identity, wherever the package is installed (a checkout or a wheel).
DEFAULT = Path(str(resources.files("reverie") / "samples" / "identity.yaml"))


class Identity(BaseModel):
    name: str
    description: str
    values: list[str] = Field(default_factory=list)
    core: list[IdentityItem] = Field(default_factory=list)

    def system_prompt(self) -> str:
        """The day chat's system prompt: who the assistant is, in the shape small chat
        models were tuned on ("You are a helpful AI assistant named ..."). The values are
        left out here (they stay in :meth:`text`, for the persona consultant).

        Measured on SmolLM2-135M-Instruct (291 general questions, greedy, 48 tokens,
        ``benchmarks/bench_retention.py --chat-path``): no system prompt (the template's
        own) 179 right; :meth:`text` 161; this sentence 183."""
        return f"You are a helpful AI assistant named {self.name}, {self.description}"

    def text(self) -> str:
        """A paragraph for prompts: name, description and values."""
        values = "; ".join(self.values)
        return f"You are {self.name}, {self.description}" + (f" Your values: {values}." if values else "")


def load_identity(path: Path) -> Identity:
    """Load the identity file, creating it from the shipped default when missing.

    Raises:
        ValueError: the file is not valid YAML or misses a field; names the file and field.
    """
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(DEFAULT, path)
    try:
        return Identity.model_validate(yaml.safe_load(path.read_text()) or {})
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from exc
    except ValidationError as exc:
        fields = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"{path}: {fields}") from exc
