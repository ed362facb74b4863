"""The assistant's identity: an editable YAML file (name, description, values, core Q&A).

The persona consultant reviews memories against it, and its ``core`` Q&A pairs are the
"old core" mixed into every night's training set so the persona survives learning.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml
from pydantic import BaseModel, Field, ValidationError

from memory.records import IdentityItem

DEFAULT = Path(__file__).resolve().parent.parent / "reverie" / "samples" / "identity.yaml"


class Identity(BaseModel):
    name: str
    description: str
    values: list[str] = Field(default_factory=list)
    core: list[IdentityItem] = Field(default_factory=list)

    def text(self) -> str:
        """A paragraph for prompts."""
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
