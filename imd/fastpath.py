"""The hot paths imd uses: the compiled imd._fastpath, or its pure-Python twin.

The Cython extension is used unless it is not built or the environment sets
``IMD_PURE_PYTHON=1``. ``IMPL`` says which one was picked ("cython" or
"python"); the API (see imd/_fastpath_py.py) is re-exported from it. Importing
this module is cheap and imports no gevent.
"""

import os

if os.environ.get("IMD_PURE_PYTHON", "") not in ("", "0"):
    from imd import _fastpath_py as _impl
    IMPL = "python"
else:
    try:
        from imd import _fastpath as _impl
        IMPL = "cython"
    except ImportError:
        from imd import _fastpath_py as _impl
        IMPL = "python"

FrameError = _impl.FrameError
FrameDecoder = _impl.FrameDecoder
encode_frame = _impl.encode_frame
WSError = _impl.WSError
WSDecoder = _impl.WSDecoder
ws_encode = _impl.ws_encode
ws_close_payload = _impl.ws_close_payload
ws_parse_close = _impl.ws_parse_close
send_many = _impl.send_many

__all__ = ["IMPL", "FrameError", "FrameDecoder", "encode_frame", "WSError", "WSDecoder", "ws_encode",
           "ws_close_payload", "ws_parse_close", "send_many"]
