"""The neuron database: schema, writer, and read/query API.

    from cache.db import open_database        # NeuronDB: semantic/keyword search, neuron lookup
    from cache.writer import DatabaseWriter   # used by `python -m precompute build`
    from cache.paths import db_path           # data/<model-slug>.duckdb
    from cache.embedder import embed          # sentence-transformers, offline
    python -m cache import transluce|neuronpedia|openai   # cache.importers: other publishers' databases

Submodules are imported on demand so ``import cache`` stays cheap.
"""

__all__ = ["db", "writer", "paths", "embedder", "codec", "schema", "vector_index", "provenance", "importers"]
