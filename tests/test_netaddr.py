from splitserve.netaddr import join_host_port, split_host_port


def test_ipv6_hosts_are_bracketed_and_round_trip():
    assert join_host_port("fdff:ffff::a504", 6291) == "[fdff:ffff::a504]:6291"
    assert join_host_port("10.0.0.2", 80) == "10.0.0.2:80"
    for host in ("fdff:ffff:0:0:a504::", "10.0.0.2", "localhost"):
        assert split_host_port(join_host_port(host, 7)) == (host, 7)
