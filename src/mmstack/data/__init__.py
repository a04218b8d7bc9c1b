"""mmstack.data: on-disk data formats and robust loading.

- ``images``: ``load_image`` (any supported file/bytes -> upright RGB, or ``ImageError``), ``decode_data_url``.
- ``pairs``: image-text ``Pair`` records from JSONL, CSV/TSV, folders and webdataset tars; writers.
- ``conversations``: LLaVA-Instruct ``Conversation``/``Turn`` records (JSON list or JSONL).
- ``preferences``: ``Preference`` pairs (prompt, chosen, rejected) in JSONL.
- ``mixture``: ``Mixture``, a deterministic weighted interleaving of data sets.
- ``records``: ``SkipReport`` and the bad-record plumbing the readers share.
"""

from mmstack.data.conversations import Conversation, Turn, read_conversations, write_conversations
from mmstack.data.images import DEFAULT_MAX_PIXELS, decode_data_url, encode_data_url, load_image
from mmstack.data.mixture import Mixture
from mmstack.data.pairs import (
    Pair,
    read_pairs,
    write_pairs,
    write_pairs_csv,
    write_pairs_folder,
    write_pairs_jsonl,
    write_webdataset,
)
from mmstack.data.preferences import Preference, read_preferences, write_preferences
from mmstack.data.records import SkipReport

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "Conversation",
    "Mixture",
    "Pair",
    "Preference",
    "SkipReport",
    "Turn",
    "decode_data_url",
    "encode_data_url",
    "load_image",
    "read_conversations",
    "read_pairs",
    "read_preferences",
    "write_conversations",
    "write_pairs",
    "write_pairs_csv",
    "write_pairs_folder",
    "write_pairs_jsonl",
    "write_preferences",
    "write_webdataset",
]
