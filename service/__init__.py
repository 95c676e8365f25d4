"""The robustnorm inference service: a micro-batching FastAPI server over the ``robustnorm`` library.

Layers, from the model outwards (each usable without the ones after it):

- :mod:`service.engine`: runs one micro-batch on the model in a dedicated thread (grouped statistics,
  padding, drift);
- :mod:`service.batcher`: collects queued requests into micro-batches and routes results back;
- :mod:`service.predictor`: ties decoding, batcher, engine and metrics together, without HTTP;
- :mod:`service.app` and :mod:`service.routes`: the HTTP surface of docs/architecture.md;
- :mod:`service.cli`: the ``robustnorm-serve`` command.
"""
