"""Every path Reverie writes, in one place, derived from the data directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Paths:
    """The data directory's layout.

    Args:
        data_dir: root of everything the program writes (config key ``data_dir``).
        cache_dir: where fetched model files live; defaults to ``data_dir/models/cache``
            (config key ``models.cache_dir``, so several data directories can share one).
    """

    data_dir: Path
    cache_dir: Path | None = None

    @property
    def model_cache(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else self.data_dir / "models" / "cache"

    @property
    def days(self) -> Path:
        return self.data_dir / "days"

    @property
    def diary(self) -> Path:
        return self.data_dir / "diary"

    @property
    def chroma(self) -> Path:
        return self.data_dir / "chroma"

    @property
    def memories_db(self) -> Path:
        return self.data_dir / "memories.sqlite"

    @property
    def nights_db(self) -> Path:
        return self.data_dir / "nights.sqlite"

    @property
    def versions(self) -> Path:
        return self.data_dir / "models" / "versions"

    @property
    def adapters(self) -> Path:
        return self.data_dir / "adapters"

    @property
    def training_sets(self) -> Path:
        return self.data_dir / "training"

    @property
    def identity(self) -> Path:
        return self.data_dir / "identity.yaml"

    @property
    def experiments(self) -> Path:
        return self.data_dir / "experiments.jsonl"

    @property
    def evals(self) -> Path:
        """``reverie eval`` reports, one JSON file per run."""
        return self.data_dir / "evals"

    @property
    def cycles(self) -> Path:
        """``reverie cycle``'s experiment log: one JSON line per cycle."""
        return self.data_dir / "cycles.jsonl"
