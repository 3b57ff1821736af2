"""Where everything lives. Every path the harness writes is derived here, once, from HARNESS_HOME.

Default home is `./.harness` under the working directory (absolute from then on), so the CLI, `mlflow run` and
`harness ui` started from the project root share one store. `MLFLOW_TRACKING_URI` overrides the tracking store.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# MLflow's set_tracking_uri() exports MLFLOW_TRACKING_URI into this process's environment, so the variable is read
# once, at import, before the harness has called MLflow: only a value the user set counts as an override.
_USER_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")


@dataclass(frozen=True)
class Paths:
    home: Path

    @property
    def tracking_db(self) -> Path:
        return self.home / "mlflow.db"

    @property
    def tracking_uri(self) -> str:
        return _USER_TRACKING_URI or f"sqlite:///{self.tracking_db}"

    @property
    def artifact_root(self) -> Path:
        return self.home / "mlartifacts"

    @property
    def cache(self) -> Path:
        # Decoded images, features and converted weights can be shared between stores (tests, several studies).
        return Path(os.environ["HARNESS_CACHE"]).resolve() if os.environ.get("HARNESS_CACHE") else self.home / "cache"

    @property
    def image_cache(self) -> Path:
        return self.cache / "images"

    @property
    def feature_cache(self) -> Path:
        return self.cache / "features"

    @property
    def weights_cache(self) -> Path:
        return self.cache / "weights"

    @property
    def tuner_dir(self) -> Path:
        return self.home / "tuner"

    @property
    def demo_data(self) -> Path:
        return self.home / "data" / "demo"

    @property
    def reports(self) -> Path:
        return self.home / "reports"

    @property
    def keras_home(self) -> Path:
        # Keras looks for ImageNet files in $KERAS_HOME/models; default ~/.keras like Keras itself.
        return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")).resolve()


def get_paths() -> Paths:
    home = Path(os.environ.get("HARNESS_HOME", ".harness")).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    return Paths(home)
