"""Pipeline settings as a Dagster resource, generated from the one declaration (rag_clean.config.declaration).

One optional field per run setting (retired ones included, so old run configs keep working), with the
setting's doc as its description in the launchpad. Every field left unset falls through to config file <
.env < environment; fields set in run config win and are recorded as "run config".
"""


from typing import Optional

import dagster as dg
from pydantic import Field, create_model

from rag_clean.config.declaration import run_settings
from rag_clean.config.settings import EmbedderSettings, resolve_settings

# Run config takes lists where the engine keeps tuples.
_CONFIG_TYPES = {"bool": bool, "int": int, "float": float, "str": str, "choice": str, "list": list[str]}

_SettingFields = create_model(
    "_SettingFields", __base__=dg.ConfigurableResource, __module__=__name__,
    **{s.key: (Optional[_CONFIG_TYPES[s.kind]], Field(default=None, description=s.doc))
       for s in run_settings(retired=True)},
)


class EmbedderSettingsResource(_SettingFields):
    """The declared run settings (fields generated) plus where to read the lower layers from."""

    config_file: str = ""
    dotenv_file: str = ""
    override_source: str = "run config"

    def resolve(self) -> EmbedderSettings:
        overrides = {s.key: getattr(self, s.key) for s in run_settings(retired=True)}
        return resolve_settings(
            config_file=self.config_file or None,
            dotenv_file=self.dotenv_file or None,
            overrides=overrides,
            override_source=self.override_source,
        )
