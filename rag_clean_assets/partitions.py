"""One dynamic partition per collection (a folder under the data root)."""

import dagster as dg

COLLECTIONS_PARTITION = "collections"
collections_partitions = dg.DynamicPartitionsDefinition(name=COLLECTIONS_PARTITION)
