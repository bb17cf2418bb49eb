"""The model registry as a Dagster resource (path empty = $RAG_CLEAN_MODEL_REGISTRY or the bundled file)."""


import dagster as dg

from rag_clean.config.registry import Registry, load_registry


class ModelRegistryResource(dg.ConfigurableResource):
    path: str = ""

    def load(self) -> Registry:
        return load_registry(self.path or None)
