"""The streaming chat service."""
