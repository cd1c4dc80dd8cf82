"""iComet-compatible comet for imd: channel model, encodings, HTTP, WebSocket handshake, ports."""
