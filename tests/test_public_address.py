"""public_address: which hosts the worker may reach for a user (real DNS of the machine's own names only)."""

from __future__ import annotations

import pytest

from comfy_worker.public_address import (
    HostAllowList,
    NotPublic,
    address_problem,
    literal_problem,
    resolve_checked,
    resolved_problem,
)


@pytest.mark.parametrize(
    ("host", "problem"),
    [
        ("127.0.0.1", "loopback"),
        ("127.1", "loopback"),  # legacy forms the C library accepts
        ("2130706433", "loopback"),
        ("0x7f.1", "loopback"),
        ("localhost", "loopback"),
        ("api.localhost", "loopback"),
        ("LOCALHOST.", "loopback"),
        ("[::1]", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),  # IPv4 inside IPv6: judged as the IPv4 address
        ("2002:7f00:1::", "loopback"),
        ("64:ff9b::a00:1", "private"),
        ("0.0.0.0", "unspecified"),
        ("10.1.2.3", "private"),
        ("192.168.0.1", "private"),
        ("172.17.0.1", "private"),
        ("169.254.169.254", "link-local"),  # the cloud's metadata service
        ("[fe80::1%eth0]", "link-local"),
        ("fd00::1", "private"),
        ("224.0.0.1", "multicast"),
        ("100.64.0.1", "not globally routable"),
        ("8.8.8.8", None),
        ("2606:4700::1111", None),
        ("example.com", None),  # a name: DNS decides
        ("1e100.net", None),
    ],
)
def test_literal_problem_names_every_kind_of_non_public_host(host, problem):
    assert literal_problem(host) == problem


def test_a_name_is_judged_by_every_address_it_resolves_to():
    assert resolved_problem("h", ["8.8.8.8", "1.1.1.1"]) is None
    assert resolved_problem("h", ["8.8.8.8", "10.0.0.1"]) == "h resolves to 10.0.0.1, a private address"
    assert address_problem("2606:4700::1111") is None
    with pytest.raises(NotPublic, match="localhost resolves to 127.0.0.1, a loopback address"):
        resolve_checked("localhost", 80)


def test_the_allow_list_takes_host_or_host_port_and_refuses_a_malformed_entry():
    allowed = HostAllowList(["127.0.0.1:8080", "Hooks.Internal", "[::1]:9000", " "], "WEBHOOK_ALLOW_HOSTS")
    assert allowed.allows("127.0.0.1", 8080) and not allowed.allows("127.0.0.1", 8188)
    assert allowed.allows("hooks.internal.", 443) and allowed.allows("HOOKS.internal", 80)
    assert allowed.allows("::1", 9000) and allowed.allows("[::1]", 9000) and not allowed.allows("::1", 80)
    assert not HostAllowList([], "X")
    with pytest.raises(ValueError, match=r"WEBHOOK_ALLOW_HOSTS: 'host:http': the port must be a number"):
        HostAllowList(["host:http"], "WEBHOOK_ALLOW_HOSTS")
