"""The chat engine: upstream providers, the demo model, chunk decoding, tools."""
