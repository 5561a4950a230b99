"""HTTP and WebSocket controllers: they frame events, nothing more."""
