"""kv_settings: `K<bits>V<bits>[-prod]` parsing, names and cache knobs."""

from __future__ import annotations


def test_parse_settings():
    from tq_cli.kv_settings import Setting, parse_settings

    got = parse_settings("fp16, K4V3,k3.5v2.5,K4V3-prod,K4V3")
    assert got == [Setting(4, 3), Setting(3.5, 2.5), Setting(4, 3, "prod")]
    assert [s.name for s in got] == ["K4V3", "K3.5V2.5", "K4V3-prod"]
    assert got[1].knobs(0, 0)["sink_tokens"] == 0
