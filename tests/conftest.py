"""Set for the whole test session, before any test module imports transformers or huggingface_hub (which read
these once, at import): nothing may be downloaded in a test."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
