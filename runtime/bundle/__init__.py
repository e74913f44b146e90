"""The bundle contract: the manifest every backend reads, and the bundle's life outside a model
(writing it safely, ``pack``, ``verify``, ``inspect``)."""
