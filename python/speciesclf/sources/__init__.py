"""Where images come from: paths, bytes, arrays, base64 and URLs (through the one hardened fetcher)."""
