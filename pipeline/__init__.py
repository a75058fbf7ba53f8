"""A YAML-declared pipeline engine: stages on sized pools joined by bounded channels.

The engine knows documents only as files and items only as dictionaries; what a
stage does with them (PDFs, embeddings, Qdrant) lives in the `stages` package and
is found through the `pipeline.stages` entry points or a `module:Class` path.
"""

__version__ = "0.1.0"
