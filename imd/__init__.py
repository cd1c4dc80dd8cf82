"""imd: one gevent daemon for XMPP, iComet-compatible comet and raw-TCP instant messaging."""

__version__ = "0.1.0"
