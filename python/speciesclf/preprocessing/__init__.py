"""Bytes to model input: the preprocessing spec, decoding, resize/crop/normalise on the native or the
Pillow backend, and the CUDA path. Nothing here knows about models or labels."""
