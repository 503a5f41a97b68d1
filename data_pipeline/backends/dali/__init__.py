"""DALI backend: pipelines (decode + augment graphs) and the streams that wrap them."""
