"""splitserve: disaggregated prefill/decode LLM serving on Ray.

The data path, one subpackage per hop: request -> cluster (router) -> prefill_worker -> kv_transfer ->
decode_worker -> tokens streamed back through server to client.
"""

__version__ = "0.1.0"
