"""Dagster wiring for rag_clean: assets, partitions, checks, sensors, jobs, Definitions.

Importing the package quiets what a person running it cannot act on (every entry point imports it first:
the code location, the CLIs, the instance class the webserver and the daemon load):

- Dagster's Preview / Beta / Supersession warnings about APIs this project chose on purpose (partitioned
  asset checks, backfill policies, observable source assets, data versions, `dagster asset materialize` and
  `dagster dev`, which Dagster 1.13 supersedes by `dg`; see README, "UI" and rag_clean_assets/ui.py);
- third-party progress bars (transformers' "Loading weights", hub downloads): the run log has its own.
"""

import os
import warnings

from dagster._utils.warnings import BetaWarning, PreviewWarning, SupersessionWarning

for _category in (BetaWarning, PreviewWarning, SupersessionWarning):
    warnings.filterwarnings("ignore", category=_category)
# Read by huggingface_hub and transformers when they are first imported (after this package).
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
