"""XMPP c2s subset (RFC 6120/6121 and a few XEPs); see docs/xmpp.md and shared research xmpp.md."""
