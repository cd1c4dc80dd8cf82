"""Admin allow/deny lists with iComet's order."""

import pytest

from imd.proto.comet.ipfilter import IpFilter


@pytest.mark.parametrize("allow,deny,ip,ok", [
    ([], [], "8.8.8.8", True),
    (["127.0.0.1"], [], "127.0.0.1", True),
    (["127.0.0.1"], [], "127.0.0.2", False),
    (["127.0.0.1"], ["all"], "10.0.0.1", False),
    (["192.168"], ["all"], "192.168.3.4", True),
    (["192.168"], ["all"], "192.1680.3.4", False),
    (["192.16"], ["all"], "192.168.3.4", False),
    (["all"], ["10"], "10.1.2.3", False),
    (["all"], ["10"], "11.1.2.3", True),
    (["10.1"], ["10"], "10.1.2.3", True),
    (["*"], [], "1.2.3.4", True),
    (["10.0.0.0/8"], ["all"], "10.200.0.1", True),
    (["10.0.0.0/8"], ["all"], "11.0.0.1", False),
    (["127.0.0.1"], [], "::ffff:127.0.0.1", True),
    (["::1"], [], "::1", True),
    (["::1"], [], "::2", False),
    (["fd00::/8"], [], "fd00::5", True),
    (["127.0.0.1"], [], "not-an-ip", False),
])
def test_filter(allow, deny, ip, ok):
    assert IpFilter(allow, deny).check(ip) is ok
